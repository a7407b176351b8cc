"""Placement over several GPUs: the config's keys, the plan's choices (which GPUs, which
victims there), and the switcher deciding with it, on a fake clock. The built-in engine
with declared GPU slots is in test_placement_engines.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from llmux.shim.config import Config, EvictionPolicy, config_from_dict
from llmux.shim.errors import ConfigError, NoRoom
from llmux.shim.placement import Gpu, Placement, host_gpus
from llmux.shim.switcher import Switcher


def _config(models: dict[str, dict[str, Any]], *, top: dict[str, Any] | None = None,
            policy: dict[str, Any] | None = None) -> Config:
    raw = {"host": "127.0.0.1", "port": 3999, "metrics_port": 0, **(top or {}),
           "policy": {"min_active_secs": 0, **(policy or {})},
           "models": {name: {"model_path": f"t/{name}", "port": 4000 + i, "engine": "builtin",
                             **m} for i, (name, m) in enumerate(models.items())}}
    return config_from_dict(raw, source="test")


def _problems(models: dict[str, dict[str, Any]], **top: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        _config(models, top=top)
    return dict(e.value.problems)


# ------------------------------------------------------------------ config


def test_gpu_count_comes_from_tensor_parallel_size_or_the_key() -> None:
    cfg = _config({"a": {}, "b": {"extra_args": ["--tensor-parallel-size", "2"]},
                   "c": {"gpu_count": 3}, "d": {"extra_args": ["--device", "cpu"]}},
                  top={"gpus": 4})
    assert [cfg.models[m].gpus_needed for m in "abcd"] == [1, 2, 3, 0]
    assert cfg.gpus == 4


def test_gpu_keys_are_typed_and_every_problem_is_named_by_its_key() -> None:
    problems = _problems({"a": {"gpus": ["0"]}, "b": {"gpus": [0, 0]}, "c": {"gpu_count": -1},
                          "d": {"gpus": [1], "gpu_count": 2},
                          "e": {"gpus": [5]},
                          "f": {"gpu_count": 1, "extra_args": ["-tp", "2"]}}, gpus=2)
    assert "every item must be an integer" in problems["models.a.gpus"]
    assert "listed twice" in problems["models.b.gpus"]
    assert "must not be negative" in problems["models.c.gpu_count"]
    assert "allows 1 GPU(s), but the model needs 2" in problems["models.d.gpus"]
    assert "GPU 5 does not exist: gpus = 2" in problems["models.e.gpus"]
    assert "--tensor-parallel-size is 2" in problems["models.f.gpu_count"]
    assert "must not be negative" in _problems({"a": {}}, gpus=-1)["gpus"]


def test_a_model_needing_more_gpus_than_declared_is_refused() -> None:
    problems = _problems({"a": {"extra_args": ["--tensor-parallel-size=4"]}}, gpus=2)
    assert problems == {"models.a.extra_args": "the model needs 4 GPUs, but gpus = 2"}


def test_no_gpus_no_placement_and_one_gpu_is_one_slot_as_before() -> None:
    cfg = _config({"a": {}})
    p = Placement(cfg, host_gpus(cfg, None))
    assert not p.enabled and p.engine_env("a") == {}
    one = Placement(cfg, [Gpu(0, "H100")])
    assert not one.enabled and one.engine_env("a") == {}
    with pytest.raises(ConfigError, match="needs 2 GPUs, but this host has 1"):
        Placement(_config({"a": {"gpu_count": 2}}), [Gpu(0, "H100")])


def test_gpus_nvml_does_not_have_are_refused_at_start() -> None:
    cfg = _config({"a": {"gpus": [3]}, "b": {"gpu_count": 4}})
    with pytest.raises(ConfigError) as e:
        Placement(cfg, [Gpu(0, "H100"), Gpu(1, "H100")])
    assert dict(e.value.problems) == {
        "models.a.gpus": "GPU 3 does not exist: this host has GPUs [0, 1]",
        "models.b.gpu_count": "the model needs 4 GPUs, but this host has 2"}


# ------------------------------------------------------------------ the plan


@dataclass
class Res:
    name: str
    last: float
    pinned: bool = False

    def lru_key(self) -> tuple[bool, float]:
        return False, self.last


def _placed(models: dict[str, dict[str, Any]], n: int = 2, **top: Any) -> Placement:
    cfg = _config(models, top={"gpus": n, **top})
    return Placement(cfg, host_gpus(cfg, None))


def _up(p: Placement, model: str, residents: list[Res], *, mem: dict[str, int] | None = None,
        budget: int = 0, max_active: int = 1) -> tuple[tuple[int, ...], tuple[str, ...]]:
    plan = p.plan(model, residents, memory_mb=lambda m: (mem or {}).get(m, 0), budget=budget,
                  max_active=max_active)
    p.came_up(model)
    return plan.gpus, plan.victims


def test_free_gpus_first_then_the_least_recently_used_on_its_gpu() -> None:
    p = _placed({"a": {}, "b": {}, "c": {}})
    assert _up(p, "a", []) == ((0,), ())
    assert _up(p, "b", [Res("a", 1)]) == ((1,), ())
    assert p.engine_env("b") == {"CUDA_VISIBLE_DEVICES": "1"}
    # both GPUs full: the least recently used model goes, and c takes its GPU
    assert _up(p, "c", [Res("a", 5), Res("b", 2)]) == ((1,), ("b",))


def test_a_pinned_gpu_evicts_there_even_when_another_model_is_older() -> None:
    p = _placed({"a": {}, "b": {}, "c": {"gpus": [1]}})
    _up(p, "a", [])
    _up(p, "b", [Res("a", 1)])
    assert _up(p, "c", [Res("a", 1), Res("b", 9)]) == ((1,), ("b",))


def test_two_gpu_model_evicts_on_both_and_one_gpu_model_takes_the_cheaper_gpu() -> None:
    p = _placed({"a": {}, "b": {}, "tp": {"extra_args": ["--tensor-parallel-size", "2"]}})
    _up(p, "a", [])
    _up(p, "b", [Res("a", 1)])
    gpus, victims = _up(p, "tp", [Res("a", 1), Res("b", 2)])
    assert gpus == (0, 1) and sorted(victims) == ["a", "b"]
    assert p.engine_env("tp") == {"CUDA_VISIBLE_DEVICES": "0,1"}
    # a comes back: one victim either way (tp covers both GPUs)
    assert _up(p, "a", [Res("tp", 3)]) == ((0,), ("tp",))


def test_budget_per_gpu_with_a_model_counting_half_on_each_of_two() -> None:
    p = _placed({"a": {}, "b": {}, "tp": {"gpu_count": 2}})
    mem = {"a": 600, "b": 300, "tp": 800}  # tp counts 400 on each GPU
    _up(p, "a", [], mem=mem, budget=1000)
    _up(p, "b", [Res("a", 1)], mem=mem, budget=1000, max_active=9)
    # GPU 0 holds 600 (+400 fits 1000), GPU 1 holds 300: both fit, nobody is evicted
    assert _up(p, "tp", [Res("a", 1), Res("b", 2)], mem=mem, budget=1000) == ((0, 1), ())
    with pytest.raises(NoRoom, match="needs 1200 MiB on each of its 1 GPU") as e:
        p.plan("a", [], memory_mb=lambda m: 1200, budget=1000, max_active=1)
    assert e.value.code == "model_exceeds_budget"


def test_pinned_models_that_fill_every_gpu_are_named() -> None:
    p = _placed({"a": {"pinned": True}, "b": {"pinned": True}, "c": {}})
    _up(p, "a", [])
    _up(p, "b", [Res("a", 1, True)])
    with pytest.raises(NoRoom) as e:
        p.plan("c", [Res("a", 1, True), Res("b", 2, True)], memory_mb=lambda m: 0, budget=0,
               max_active=1)
    assert e.value.code == "no_gpu"
    assert "pinned model(s) a, b keep them full (max_active = 1 per GPU)" in e.value.message


def test_a_sleeping_engine_comes_back_only_where_it_is_a_suspended_one_moves() -> None:
    p = _placed({"a": {}, "b": {}, "c": {}})
    _up(p, "a", [])
    _up(p, "b", [Res("a", 1)])
    _up(p, "c", [Res("a", 1), Res("b", 5)])  # evicts a from GPU 0
    assert p.devices("c") == (0,)
    p.stays_home = lambda m: m == "a"  # a sleeps on GPU 0 with its CUDA context
    assert p.plan("a", [Res("b", 1), Res("c", 9)], memory_mb=lambda m: 0, budget=0,
                  max_active=1).victims == ("c",)
    assert p.gpu_map("a") == {}
    p.stays_home = lambda m: False  # a suspended: it may come back on GPU 1 instead
    plan = p.plan("a", [Res("b", 1), Res("c", 9)], memory_mb=lambda m: 0, budget=0,
                  max_active=1)
    assert plan == type(plan)((1,), ("b",))
    assert p.gpu_map("a") == {0: 1}  # the resume/restore's device map
    p.came_up("a")
    assert p.gpu_map("a") == {} and p.devices("a") == (1,)


def test_home_is_preferred_when_it_costs_no_more() -> None:
    p = _placed({"a": {}, "b": {}})
    _up(p, "a", [])
    _up(p, "b", [], max_active=2)  # a is away: b takes GPU 0 too
    assert p.devices("b") == (0,)
    # a comes back beside b: GPU 1 is emptier, but GPU 0 has room and is where a was
    assert _up(p, "a", [Res("b", 1)], max_active=2) == ((0,), ())
    # with one model per GPU it moves instead of evicting b
    assert _up(p, "a", [Res("b", 1)], max_active=1) == ((1,), ())


def test_a_checkpoint_found_at_start_up_is_homed_where_its_state_is(
        caplog: pytest.LogCaptureFixture) -> None:
    p = _placed({"a": {}, "tp": {"gpu_count": 2}, "b": {}}, n=3)
    p.found_home("a", [2])
    assert p.devices("a") == (2,)
    assert _up(p, "a", []) == ((2,), ())  # no remap: where the state is
    p.found_home("tp", [0, 1])
    assert p.devices("tp") == (0, 1)
    # a GPU this host lacks, or another count than the model needs: left out, and said
    p.found_home("b", [7])
    p.found_home("b", [0, 1])
    assert p.devices("b") is None
    assert caplog.text.count("action=checkpoint_gpus_ignored") == 2


def test_usage_lists_each_gpu() -> None:
    p = _placed({"a": {}, "tp": {"gpu_count": 2}}, n=3)
    _up(p, "tp", [])
    assert p.devices("tp") == (0, 1)
    mem = {"tp": 1001}.get
    usage = p.usage(["tp"], lambda m: mem(m) or 0, 2000)
    assert [(g["index"], g["models"], g["memory_used_mb"]) for g in usage] == [
        (0, ["tp"], 501), (1, ["tp"], 501), (2, [], 0)]


# ------------------------------------------------------------------ the switcher


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def activate(self, model: str) -> str:
        self.calls.append(f"+{model}")
        return "cold"

    async def evict(self, model: str, policy: EvictionPolicy | None = None) -> str:
        self.calls.append(f"-{model}")
        return "stopped"


async def _settle(sw: Switcher) -> None:
    for _ in range(20):
        await asyncio.sleep(0)
    while sw.switching:
        await asyncio.sleep(0.001)


async def test_switcher_keeps_one_model_per_gpu_and_evicts_on_the_right_one() -> None:
    cfg = _config({"a": {}, "b": {}, "c": {"gpus": [0]}}, top={"gpus": 2},
                  policy={"max_wait_secs": 0})
    p = Placement(cfg, host_gpus(cfg, None))
    rec = Recorder()
    sw = Switcher(cfg, rec, placement=p)
    for m in ("a", "b"):
        await sw.wake(m)
    assert sw.active_models == ["a", "b"] and rec.calls == ["+a", "+b"]
    assert [g["models"] for g in sw.gpu_usage()] == [["a"], ["b"]]
    await sw.wake("b")  # b used last: a is the least recently used, and on GPU 0
    await sw.wake("c")
    await _settle(sw)
    assert rec.calls == ["+a", "+b", "-a", "+c"]
    assert [g["models"] for g in sw.gpu_usage()] == [["c"], ["b"]]
    await sw.aclose()
