"""llmuxd's configuration: one schema with its defaults, one reader that lists every
problem with its key."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import pytest

from llmux.common.contract import DEFAULT_STATE_DIR
from llmux.service.config import ConfigError, DaemonConfig, load_config, read_config
from llmux.service.core.config import EngineConfig
from llmux.service.main import load_config as main_load_config


def test_the_defaults_are_llmuxds() -> None:
    config = read_config({}, "<empty>")
    assert config == DaemonConfig()
    engine = config.engine
    assert (config.bus, config.log_level) == ("system", "info")
    assert engine.state_dir == Path(DEFAULT_STATE_DIR) == config.state_dir
    assert (engine.criu_path, engine.cuda_mode, engine.cuda_checkpoint_path) == (
        "criu", "api", "cuda-checkpoint")
    assert engine.cuda_plugin_dir == "/usr/lib/criu/"
    assert engine.ghost_limit_bytes == 512 << 20
    assert engine.memory_tier_dir == Path("/dev/shm/llmux-checkpoints")
    assert engine.memory_tier_limit_bytes == -1 and engine.prefetch_threads == 0  # automatic
    assert (engine.criu_timeout_secs, engine.criu_timeout_secs_per_gib) == (120.0, 60.0)
    assert EngineConfig() == engine, "the core's defaults are the same ones"


def test_every_problem_is_listed_with_its_key() -> None:
    raw = {"state_dirr": "/x", "ghost_limit_bytes": "big", "cuda_mode": "gpu",
           "criu_timeout_secs": 0, "criu_timeout_secs_per_gib": -1.0, "log_level": "loud",
           "memory_tier_limit_bytes": -5, "bus": 3}
    with pytest.raises(ConfigError) as err:
        read_config(raw, "/etc/llmux/llmuxd.toml")
    keys = sorted(key for key, _message in err.value.problems)
    assert keys == sorted(["state_dirr", "ghost_limit_bytes", "cuda_mode", "criu_timeout_secs",
                           "criu_timeout_secs_per_gib", "log_level",
                           "memory_tier_limit_bytes", "bus"])
    text = str(err.value)
    assert text.startswith("/etc/llmux/llmuxd.toml: ")
    for complaint in ("unknown key 'state_dirr'", "ghost_limit_bytes must be a int, not str",
                      "cuda_mode must be one of api, binary, plugin, off",
                      "criu_timeout_secs must be positive",
                      "criu_timeout_secs_per_gib must be >= 0", "log_level must be one of",
                      "memory_tier_limit_bytes must be >= 0, or -1", "bus must be a str, not int"):
        assert complaint in text


def test_values_are_typed_and_the_file_names_are_mapped(tmp_path: Path) -> None:
    path = tmp_path / "llmuxd.toml"
    path.write_text('criu = "/opt/criu"\ncuda_checkpoint = "/opt/cc"\ncriu_timeout_secs = 30\n'
                    'memory_tier_dir = "/mnt/tier"\nmemory_tier_limit_bytes = 1024\n'
                    'log_level = "DEBUG"\nstate_dir = "/srv/ckpt"\n')
    config = load_config(path, {"state_dir": "/flag/wins", "bus": None})
    engine = config.engine
    assert engine.criu_path == "/opt/criu" and engine.cuda_checkpoint_path == "/opt/cc"
    assert engine.criu_timeout_secs == 30.0 and isinstance(engine.criu_timeout_secs, float)
    assert engine.memory_tier_dir == Path("/mnt/tier")
    assert engine.state_dir == Path("/flag/wins") and config.bus == "system"
    assert config.log_level == "DEBUG"


def test_the_command_line_goes_through_the_same_reader(tmp_path: Path) -> None:
    path = tmp_path / "llmuxd.toml"
    path.write_text("ghost_limit_bytes = 0\n")
    args = argparse.Namespace(config=path, bus="session", state_dir=None, criu=None,
                              cuda_mode="off", log_level=None)
    with pytest.raises(ConfigError, match="ghost_limit_bytes must be positive") as err:
        main_load_config(args)
    assert [key for key, _ in err.value.problems] == ["ghost_limit_bytes"]
    path.write_text("")
    config = main_load_config(args)
    assert config.bus == "session" and config.engine.cuda_mode == "off"


def test_a_config_built_in_code_is_held_to_the_same_rules() -> None:
    assert EngineConfig().problems() == []
    bad = EngineConfig(memory_tier_dir=None, memory_tier_limit_bytes=1 << 30,
                       ghost_limit_bytes=-1)
    assert bad.problems() == [
        ("ghost_limit_bytes", "ghost_limit_bytes must be positive: -1"),
        ("memory_tier_dir", "memory_tier_limit_bytes needs memory_tier_dir"),
    ]


def test_an_unreadable_or_torn_file_is_one_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("bus = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


def test_the_shipped_example_is_the_defaults_but_the_bundled_criu() -> None:
    example = Path(__file__).parents[2] / "packaging" / "examples" / "llmuxd.toml"
    config = load_config(example)
    assert config.engine == replace(EngineConfig(), criu_path="/usr/lib/llmux/criu/criu")
    assert replace(config, engine=EngineConfig()) == DaemonConfig()


def test_the_remote_table_is_read_with_its_key_paths() -> None:
    config = read_config({"remote": {"url": "s3://ckpts/cluster-1",
                                     "endpoint_url": "http://minio:9000",
                                     "credentials_file": "/etc/llmux/aws", "keep_local": False}},
                         "<file>")
    remote = config.engine.remote
    assert remote is not None
    assert (remote.url, remote.endpoint_url, remote.credentials_file, remote.keep_local) == (
        "s3://ckpts/cluster-1", "http://minio:9000", "/etc/llmux/aws", False)
    assert read_config({}, "<file>").engine.remote is None, "no [remote]: no store"
    assert read_config({"remote": {"url": "file:///mnt/shared"}}, "<f>").engine.remote


def test_every_problem_of_the_remote_table_is_listed() -> None:
    with pytest.raises(ConfigError) as err:
        read_config({"remote": {"endpoint_url": 5, "keep_locl": True}, "bus": 3}, "<file>")
    problems = dict(err.value.problems)
    assert sorted(problems) == ["bus", "remote.endpoint_url", "remote.keep_locl", "remote.url"]
    assert "missing" in problems["remote.url"]
    assert "must be a str" in problems["remote.endpoint_url"]
    with pytest.raises(ConfigError) as err:
        read_config({"remote": {"url": "http://bucket"}}, "<file>")
    assert err.value.problems == [
        ("remote.url", "remote.url must be s3://BUCKET[/PREFIX] or file:///PATH, not "
                       "'http://bucket'")]
    with pytest.raises(ConfigError) as err:
        read_config({"remote": "s3://x"}, "<file>")
    assert [k for k, _ in err.value.problems] == ["remote"]


def test_a_credentials_file_others_can_read_is_refused(tmp_path: Path) -> None:
    from llmux.common.errors import InvalidArgument
    from llmux.service.core.config import RemoteConfig
    from llmux.service.core.remote import RemoteStore

    creds = tmp_path / "aws"
    creds.write_text("[default]\naws_access_key_id = x\naws_secret_access_key = y\n")
    creds.chmod(0o644)
    with pytest.raises(InvalidArgument, match=r"remote.credentials_file .* root-only.*0644"):
        RemoteStore(RemoteConfig(url="s3://b", credentials_file=str(creds)))
    with pytest.raises(InvalidArgument, match=r"remote\.credentials_file"):
        RemoteStore(RemoteConfig(url="s3://b", credentials_file=str(tmp_path / "none")))
