"""Configuration loading and validation: every rule, each with its key path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmux.shim.config import (
    Config,
    EngineKind,
    EvictionPolicy,
    ProcessStrategy,
    WeightStrategy,
    config_from_dict,
    load_config,
    parse_config,
)
from llmux.shim.errors import ConfigError

SEED_JSON = """{"models": {"qwen3-0.6b": {"model_path": "Qwen/Qwen3-0.6B", "port": 8001, "eviction":
  {"weights": "discard", "process": "checkpoint"}, "checkpoint_path":
  "/tmp/llmux-checkpoints/qwen3-0.6b/images"}}, "checkpoint": {"criu_path": "/usr/local/bin/criu",
  "cuda_plugin_dir": "/usr/lib/criu/", "images_dir": "/tmp/llmux-checkpoints",
  "cuda_checkpoint_path": "/usr/local/bin/cuda-checkpoint", "keep_images": true}, "port": 3000}"""


def base(**top: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"models": {"a": {"model_path": "org/a", "port": 8001}}}
    raw.update(top)
    return raw


def problems(raw: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    return dict(info.value.problems)


def problem(raw: Any, path: str) -> str:
    found = problems(raw)
    assert path in found, f"expected a problem at {path!r}, got {found}"
    return found[path]


def model(**fields: Any) -> dict[str, Any]:
    return base(models={"a": {"model_path": "org/a", "port": 8001, **fields}})


# ---------------------------------------------------------------------------- the seed


def test_seed_json_loads_unchanged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "config.json"
    path.write_text(SEED_JSON)
    with caplog.at_level("WARNING", logger="llmux.shim.config"):
        cfg = load_config(path)
    assert cfg.port == 3000 and cfg.source == str(path)
    m = cfg.models["qwen3-0.6b"]
    assert m.model_path == "Qwen/Qwen3-0.6B" and m.port == 8001
    assert m.engine is EngineKind.VLLM
    assert m.eviction == EvictionPolicy(WeightStrategy.DISCARD, ProcessStrategy.CHECKPOINT)
    assert m.checkpoint_path == Path("/tmp/llmux-checkpoints/qwen3-0.6b/images")
    assert cfg.checkpoint is not None
    assert cfg.checkpoint.keep_images is True
    assert cfg.needs_host
    # CRIU runs in llmuxd now: one line each says where the setting lives
    moved = {key: setting for key, setting in (("criu_path", "`criu`"),
                                               ("cuda_plugin_dir", "`cuda_plugin_dir`"),
                                               ("images_dir", "`state_dir`"),
                                               ("cuda_checkpoint_path", "`cuda_checkpoint`"))}
    lines = [r.getMessage() for r in caplog.records]
    for key, setting in moved.items():
        [line] = [x for x in lines if f"checkpoint.{key} is" in x]
        assert setting in line and "llmuxd's config" in line and str(path) in line


def test_json_detected_without_suffix(tmp_path: Path) -> None:
    path = tmp_path / "llmux.conf"
    path.write_text(SEED_JSON)
    assert "qwen3-0.6b" in load_config(path).models


def test_toml_native_format(tmp_path: Path) -> None:
    path = tmp_path / "llmux.toml"
    path.write_text("""
port = 3100
vllm_command = "/opt/vllm/bin/vllm"
log_dir = "/var/log/llmux"

[policy]
request_timeout_secs = 60
drain_before_switch = false
min_active_secs = 2
eviction = { weights = "offload", process = "keep_running" }

[models.small]
model_path = "org/small"
port = 8001
engine = "builtin"
weights_mb = 32
env = { CUDA_VISIBLE_DEVICES = "0" }

[models.big]
model_path = "org/big"
port = 8002
eviction = "discard+stop"
extra_args = ["--max-model-len", "8192"]
command = ["/usr/bin/env", "vllm"]
startup_timeout_secs = 3600
""")
    cfg = load_config(path)
    assert cfg.port == 3100 and cfg.vllm_command == "/opt/vllm/bin/vllm"
    assert cfg.log_dir == Path("/var/log/llmux")
    assert cfg.policy.request_timeout_secs == 60.0 and cfg.policy.drain_before_switch is False
    small, big = cfg.models["small"], cfg.models["big"]
    assert small.engine is EngineKind.BUILTIN and small.weights_mb == 32
    assert small.eviction == EvictionPolicy.parse("offload+keep_running"), "policy default"
    assert small.env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert big.eviction == EvictionPolicy.parse("discard+stop")
    assert big.extra_args == ("--max-model-len", "8192")
    assert big.command == ("/usr/bin/env", "vllm")
    assert big.startup_timeout_secs == 3600.0
    assert small.startup_timeout_secs == 1800.0, "default: 30 minutes"
    assert not cfg.needs_host


def test_defaults() -> None:
    cfg = config_from_dict(base())
    assert isinstance(cfg, Config)
    a = cfg.models["a"]
    assert a.eviction == EvictionPolicy(WeightStrategy.RETAIN, ProcessStrategy.STOP)
    assert a.engine is EngineKind.VLLM and a.extra_args == () and a.command is None
    assert cfg.checkpoint is None and cfg.max_active == 1 and cfg.vllm_command == "vllm"


def test_replicas_from_checkpoint_is_a_boolean_off_by_default() -> None:
    assert config_from_dict(base()).models["a"].replicas_from_checkpoint is False
    assert config_from_dict(model(replicas_from_checkpoint=True)).models["a"] \
        .replicas_from_checkpoint is True
    assert "true or false" in problem(model(replicas_from_checkpoint="yes"),
                             "models.a.replicas_from_checkpoint")


def test_retired_keys_are_accepted_with_a_deprecation_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="llmux.shim.config"):
        cfg = config_from_dict(base(admin_port=3001, warmup=True,
                                    policy={"policy_type": "fifo", "coalesce_window_ms": 5,
                                            "amortization_factor": 0.5}))
    assert cfg.policy.policy_type == "fifo" and not hasattr(cfg, "admin_port")
    lines = [r.getMessage() for r in caplog.records]
    for key in ("admin_port", "warmup", "policy.coalesce_window_ms",
                "policy.amortization_factor"):
        [line] = [x for x in lines if f": {key} is deprecated" in x]
        assert "ignored" in line


# ---------------------------------------------------------------------------- file errors


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize(("text", "fmt"), [("{", "json"), ("models = [", "toml")])
def test_syntax_errors(text: str, fmt: str) -> None:
    with pytest.raises(ConfigError, match=f"not valid {fmt.upper()}"):
        parse_config(text, fmt=fmt)


def test_top_level_must_be_a_table() -> None:
    assert "top level" in problem([1, 2], "")


# ---------------------------------------------------------------------------- every rule


def test_every_problem_is_listed_at_once() -> None:
    found = problems({"models": {"a": {"port": 70000, "engine": "tgi"},
                                 "b": {"model_path": "x", "port": 3000}},
                      "colour": "red", "policy": {"policy_type": "lru"}})
    assert set(found) >= {"models.a.model_path", "models.a.port", "models.a.engine",
                          "models.b.port", "colour", "policy.policy_type"}


def test_message_names_key_paths_and_source(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(model(eviction={"weights": "evaporate"})))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in info.value.message
    assert "models.a.eviction.weights: unknown weights strategy 'evaporate'" in info.value.message


def test_missing_models() -> None:
    assert "at least one model" in problem({"port": 3000}, "models")
    assert "non-empty" in problem({"models": {}}, "models")
    assert "non-empty" in problem({"models": ["a"]}, "models")


def test_missing_model_path_and_port() -> None:
    found = problems({"models": {"a": {}}})
    assert "missing" in found["models.a.model_path"]
    assert "missing" in found["models.a.port"]


def test_empty_model_path() -> None:
    assert "must not be empty" in problem(model(model_path="  "), "models.a.model_path")


def test_model_must_be_a_table() -> None:
    assert "expected a table" in problem({"models": {"a": "org/a"}}, "models.a")


@pytest.mark.parametrize("name", ["-a", "a/b", "../x", "a b", "x" * 129])
def test_invalid_model_name(name: str) -> None:
    raw = {"models": {name: {"model_path": "org/a", "port": 8001}}}
    assert "invalid model name" in problem(raw, f"models.{name}")


@pytest.mark.parametrize(("where", "path"), [
    ({"colour": 1}, "colour"),
    ({"models": {"a": {"model_path": "x", "port": 8001, "gpu": 0}}}, "models.a.gpu"),
    ({"policy": {"speed": 1}}, "policy.speed"),
    ({"checkpoint": {"dir": "/x"}}, "checkpoint.dir"),
    ({"models": {"a": {"model_path": "x", "port": 8001,
                       "eviction": {"weights": "retain", "how": 1}}}}, "models.a.eviction.how"),
])
def test_unknown_keys(where: dict[str, Any], path: str) -> None:
    raw = base()
    raw.update(where)
    assert "unknown key" in problem(raw, path)


@pytest.mark.parametrize(("fields", "path", "why"), [
    ({"port": "8001"}, "models.a.port", "expected an integer, got str"),
    ({"port": True}, "models.a.port", "got a boolean"),
    ({"weights_mb": 1.5}, "models.a.weights_mb", "expected an integer"),
    ({"extra_args": "--enforce-eager"}, "models.a.extra_args", "expected a list"),
    ({"extra_args": ["--x", 1]}, "models.a.extra_args", "every item must be a string"),
    ({"command": []}, "models.a.command", "must not be empty"),
    ({"env": {"A": 1}}, "models.a.env", "value of 'A' must be a string"),
    ({"env": ["A=1"]}, "models.a.env", "expected a table/object"),
    ({"startup_timeout_secs": 0}, "models.a.startup_timeout_secs", "greater than 0"),
    ({"weights_mb": -1}, "models.a.weights_mb", "must not be negative"),
    ({"checkpoint_path": ""}, "models.a.checkpoint_path", "must not be empty"),
    ({"engine": "tgi"}, "models.a.engine", "unknown engine 'tgi'"),
])
def test_wrong_model_field_types_and_values(fields: dict[str, Any], path: str, why: str) -> None:
    assert why in problem(model(**fields), path)


@pytest.mark.parametrize(("top", "path", "why"), [
    ({"port": "3000"}, "port", "expected an integer"),
    ({"port": 0}, "port", "not a port"),
    ({"metrics_port": 70000}, "metrics_port", "not a port"),
    ({"host": ""}, "host", "must not be empty"),
    ({"vllm_command": " "}, "vllm_command", "must not be empty"),
    ({"max_active": 0}, "max_active", "at least 1"),
    ({"max_body_bytes": 10}, "max_body_bytes", "at least 1024"),
    ({"startup_timeout_secs": -5}, "startup_timeout_secs", "greater than 0"),
    ({"log_dir": 5}, "log_dir", "expected a string"),
])
def test_wrong_top_level_values(top: dict[str, Any], path: str, why: str) -> None:
    assert why in problem(base(**top), path)


@pytest.mark.parametrize(("policy", "path", "why"), [
    ({"policy_type": "lru"}, "policy.policy_type", "unknown policy 'lru'"),
    ({"policy_type": "cost_aware"}, "policy.policy_type", "not implemented here"),
    ({"request_timeout_secs": 0}, "policy.request_timeout_secs", "greater than 0"),
    ({"min_active_secs": -1}, "policy.min_active_secs", "must not be negative"),
    ({"drain_before_switch": 1}, "policy.drain_before_switch", "expected true or false"),
    ({"eviction": "offload"}, "policy.eviction", "expected WEIGHTS+PROCESS"),
])
def test_policy_rules(policy: dict[str, Any], path: str, why: str) -> None:
    assert why in problem(base(policy=policy), path)


def test_policy_and_checkpoint_must_be_tables() -> None:
    assert "expected a table" in problem(base(policy=[]), "policy")
    assert "expected a table" in problem(base(checkpoint="yes"), "checkpoint")


@pytest.mark.parametrize(("eviction", "path", "why"), [
    ({"weights": "evaporate"}, "models.a.eviction.weights", "unknown weights strategy"),
    ({"process": "hibernate"}, "models.a.eviction.process", "unknown process strategy"),
    ("offload+hibernate", "models.a.eviction", "expected WEIGHTS+PROCESS"),
    ("offload", "models.a.eviction", "expected WEIGHTS+PROCESS"),
    (3, "models.a.eviction", "expected 'WEIGHTS+PROCESS' or {weights"),
])
def test_unknown_strategies(eviction: Any, path: str, why: str) -> None:
    assert why in problem(model(eviction=eviction), path)


def test_unknown_strategy_lists_the_valid_ones() -> None:
    why = problem(model(eviction={"process": "hibernate"}), "models.a.eviction.process")
    assert all(s in why for s in ("keep_running", "cuda_suspend", "checkpoint", "stop"))


@pytest.mark.parametrize(("checkpoint", "path", "why"), [
    ({"keep_images": "yes"}, "checkpoint.keep_images", "expected true or false"),
    ({"bus": ""}, "checkpoint.bus", "must not be empty"),
    ({"job_timeout_secs": 0}, "checkpoint.job_timeout_secs", "greater than 0"),
])
def test_checkpoint_rules(checkpoint: dict[str, Any], path: str, why: str) -> None:
    assert why in problem(base(checkpoint=checkpoint), path)


def test_port_clashes() -> None:
    raw = {"port": 3000, "metrics_port": 3000,
           "models": {"a": {"model_path": "x", "port": 8001},
                      "b": {"model_path": "y", "port": 8001},
                      "c": {"model_path": "z", "port": 3000}}}
    found = problems(raw)
    assert "already used by port" in found["metrics_port"]
    assert "already used by models.a.port" in found["models.b.port"]
    assert "already used by port" in found["models.c.port"]
    assert "models.a.port" not in found


def test_metrics_port_zero_disables_and_never_clashes() -> None:
    cfg = config_from_dict(base(metrics_port=0, models={"a": {"model_path": "x", "port": 9090}}))
    assert cfg.metrics_port == 0 and cfg.models["a"].port == 9090


@pytest.mark.parametrize("process", ["cuda_suspend", "checkpoint"])
def test_tensor_parallel_with_host_strategy_needs_safe_flags(process: str) -> None:
    why = problem(model(extra_args=["--tensor-parallel-size", "2"],
                        eviction={"weights": "offload", "process": process}),
                  "models.a.extra_args")
    assert "--enforce-eager" in why and "--disable-custom-all-reduce" in why
    why = problem(model(extra_args=["-tp=2", "--tensor-parallel-size=4", "--enforce-eager"],
                        eviction={"process": process}), "models.a.extra_args")
    assert "tensor parallel size 4" in why and "--disable-custom-all-reduce" in why
    assert "--enforce-eager" not in why.split("needs")[1]


def test_tensor_parallel_allowed_with_flags_or_local_strategies() -> None:
    ok = config_from_dict(model(extra_args=["--tensor-parallel-size", "2", "--enforce-eager",
                                            "--disable-custom-all-reduce"],
                                eviction="offload+checkpoint"))
    assert ok.models["a"].tensor_parallel_size == 2
    ok = config_from_dict(model(extra_args=["-tp", "4"], eviction="offload+keep_running"))
    assert ok.models["a"].tensor_parallel_size == 4


@pytest.mark.parametrize(("args", "why"), [
    (["--tensor-parallel-size"], "needs a value"),
    (["--tensor-parallel-size", "two"], "not a whole number"),
    (["--tensor-parallel-size=0"], "must be at least 1"),
])
def test_bad_tensor_parallel_size(args: list[str], why: str) -> None:
    assert why in problem(model(extra_args=args), "models.a.extra_args")


def test_an_unquoted_dotted_model_name_gets_a_hint() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config('[models.qwen3-0.6b]\nmodel_path = "Qwen/Qwen3-0.6B"\nport = 8001\n')
    assert e.value.problems == [
        ("models.qwen3-0", 'a table of tables, not a model: in TOML a model name with a dot '
                           'must be quoted, e.g. [models."qwen3-0.6b"]')
    ]


def test_scheduling_and_memory_defaults() -> None:
    cfg = config_from_dict(base())
    assert cfg.policy.max_wait_secs == 30 and cfg.policy.memory_budget_mb == 0
    a = cfg.models["a"]
    assert (a.memory_mb, a.priority, a.ttl_secs, a.pinned) == (0, 0, 0, False)
    assert a.max_concurrency is None


def test_scheduling_and_memory_keys_are_read() -> None:
    raw = base(policy={"max_wait_secs": 0, "memory_budget_mb": 4096})
    raw["models"]["a"].update(memory_mb=1000, priority=-2, ttl_secs=60, pinned=True,
                              extra_args=["--max-num-seqs=8"])
    cfg = config_from_dict(raw)
    assert cfg.policy.max_wait_secs == 0 and cfg.policy.memory_budget_mb == 4096
    a = cfg.models["a"]
    assert (a.memory_mb, a.priority, a.ttl_secs, a.pinned) == (1000, -2, 60, True)
    assert a.max_concurrency == 8


def test_scheduling_and_memory_rules_each_with_its_key_path() -> None:
    raw = base(policy={"max_wait_secs": -1, "memory_budget_mb": 1.5})
    raw["models"]["a"].update(memory_mb=-5, priority="high", ttl_secs=-1, pinned="yes",
                              extra_args=["--max-num-seqs", "0"])
    got = problems(raw)
    assert "must not be negative" in got["policy.max_wait_secs"]
    assert "expected an integer" in got["policy.memory_budget_mb"]
    assert "must not be negative" in got["models.a.memory_mb"]
    assert "expected an integer" in got["models.a.priority"]
    assert "must not be negative" in got["models.a.ttl_secs"]
    assert "expected true or false" in got["models.a.pinned"]
    assert "--max-num-seqs: must be at least 1" in got["models.a.extra_args"]


def test_a_model_estimated_above_the_budget_names_both_figures() -> None:
    raw = base(policy={"memory_budget_mb": 2000})
    raw["models"]["a"]["memory_mb"] = 3000
    got = problems(raw)
    assert list(got) == ["models.a.memory_mb"]
    assert "3000 MiB" in got["models.a.memory_mb"]
    assert "memory_budget_mb = 2000 MiB" in got["models.a.memory_mb"]
    raw["policy"]["memory_budget_mb"] = 0  # off: no limit to exceed
    assert config_from_dict(raw).models["a"].memory_mb == 3000


def test_pinned_models_must_fit_the_budget_together() -> None:
    raw = base(policy={"memory_budget_mb": 1000})
    raw["models"]["a"].update(memory_mb=600, pinned=True)
    raw["models"]["b"] = {"model_path": "org/b", "port": 8002, "memory_mb": 600, "pinned": True}
    got = problems(raw)
    assert list(got) == ["policy.memory_budget_mb"]
    assert "a (600 MiB), b (600 MiB) need 1200 MiB" in got["policy.memory_budget_mb"]
    raw["models"]["b"]["pinned"] = False  # one pinned, the other may be evicted: fine
    assert config_from_dict(raw).models["a"].pinned
