"""The switcher's ordering decisions with a fake clock (no engines: the order is the unit).

The target records what it was asked to activate and evict, in order; the clock moves
only when a test moves it, and ``_tick`` is what the switcher's own timer would call
when the starvation bound or min_active_secs is reached.
"""

from __future__ import annotations

import asyncio
from typing import Any

from llmux.shim.config import Config, EvictionPolicy, config_from_dict
from llmux.shim.errors import ServiceUnavailable
from llmux.shim.memory import FreeMemory
from llmux.shim.switcher import Switcher


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A switch target that does nothing but remember the order of its calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def activate(self, model: str) -> str:
        self.calls.append(f"+{model}")
        return "cold"

    async def evict(self, model: str, policy: EvictionPolicy | None = None) -> str:
        self.calls.append(f"-{model}")
        return "stopped"


def _config(policy: dict[str, Any], top: dict[str, Any] | None = None,
            **models: dict[str, Any]) -> Config:
    raw = {"host": "127.0.0.1", "port": 3999, "metrics_port": 0, **(top or {}),
           "policy": {"min_active_secs": 0, **policy},
           "models": {name: {"model_path": f"t/{name}", "port": 4000 + i, "engine": "builtin",
                             **models.get(name, {})}
                      for i, name in enumerate(("a", "b", "c"))}}
    return config_from_dict(raw, source="test")


async def _settle(sw: Switcher) -> None:
    for _ in range(20):
        await asyncio.sleep(0)
    while sw.switching:
        await asyncio.sleep(0.001)
    for _ in range(5):
        await asyncio.sleep(0)


async def _serving(sw: Switcher, model: str) -> None:
    await sw.wake(model)
    await _settle(sw)


def _waiter(sw: Switcher, model: str) -> asyncio.Task[None]:
    return asyncio.ensure_future(sw.enter(model, None))


async def test_the_model_with_the_oldest_request_goes_first() -> None:
    clock, rec = Clock(), Recorder()
    sw = Switcher(_config({"max_wait_secs": 30}), rec, clock=clock)
    await _serving(sw, "a")
    assert sw.try_enter("a")  # a busy
    tc = _waiter(sw, "c")
    clock.now += 1
    tb = _waiter(sw, "b")
    await _settle(sw)
    assert rec.calls == ["+a"]  # a is busy and no one waited 30 s: no switch yet
    clock.now += 1
    assert sw.try_enter("a")  # batching: a's new requests are admitted meanwhile
    sw.leave("a")
    sw.leave("a")  # a idle: switch to the model with the oldest request
    await tc
    assert rec.calls == ["+a", "-a", "+c"]
    sw.leave("c")
    await tb
    assert rec.calls == ["+a", "-a", "+c", "-c", "+b"]
    sw.leave("b")
    await sw.aclose()


async def test_past_the_bound_higher_priority_goes_first_then_age() -> None:
    clock, rec = Clock(), Recorder()
    sw = Switcher(_config({"max_wait_secs": 10}, c={"priority": 5}), rec, clock=clock)
    await _serving(sw, "a")
    assert sw.try_enter("a")  # a busy for ever
    tb = _waiter(sw, "b")
    clock.now += 1
    tc = _waiter(sw, "c")
    await _settle(sw)
    clock.now += 10.5  # both past their bound: c, of higher priority, first
    sw._tick()
    assert not sw.try_enter("a")  # a is being drained: nothing new for it
    sw.leave("a")
    await tc
    assert rec.calls == ["+a", "-a", "+c"]
    # b is past its bound as well: c serves what waited for it, then b's turn comes
    assert not sw.try_enter("c")
    sw.leave("c")
    await tb
    assert rec.calls[-2:] == ["-c", "+b"]
    sw.leave("b")
    await sw.aclose()


async def test_only_the_bound_ends_a_busy_models_batch() -> None:
    clock, rec = Clock(), Recorder()
    sw = Switcher(_config({"max_wait_secs": 5}), rec, clock=clock)
    await _serving(sw, "a")
    assert sw.try_enter("a")
    tb = _waiter(sw, "b")
    await _settle(sw)
    for _ in range(4):  # 4 s of a's traffic, each overlapping the next
        clock.now += 1
        assert sw.try_enter("a")
        sw.leave("a")
        sw._tick()
        await _settle(sw)
    assert rec.calls == ["+a"] and not tb.done()
    clock.now += 1.5
    sw._tick()
    await _settle(sw)
    assert not sw.try_enter("a")
    sw.leave("a")
    await tb
    assert rec.calls == ["+a", "-a", "+b"]
    assert 5 <= sw.longest_wait_secs <= 6
    sw.leave("b")
    await sw.aclose()


async def test_max_wait_zero_is_strict_arrival_order() -> None:
    clock, rec = Clock(), Recorder()
    sw = Switcher(_config({"max_wait_secs": 0}), rec, clock=clock)
    await _serving(sw, "a")
    assert sw.try_enter("a")
    tb = _waiter(sw, "b")
    await _settle(sw)
    assert not sw.try_enter("a")  # someone waits for b: a admits nothing new
    ta = _waiter(sw, "a")
    sw.leave("a")
    await tb
    await _settle(sw)
    assert not ta.done()  # a's request came after b's
    sw.leave("b")
    await ta
    assert rec.calls == ["+a", "-a", "+b", "-b", "+a"]
    sw.leave("a")
    await sw.aclose()


async def test_min_active_still_applies() -> None:
    clock, rec = Clock(), Recorder()
    sw = Switcher(_config({"max_wait_secs": 0, "min_active_secs": 3}), rec, clock=clock)
    await _serving(sw, "a")
    tb = _waiter(sw, "b")
    await _settle(sw)
    assert rec.calls == ["+a"] and sw.try_enter("a")  # protected for 3 s
    sw.leave("a")
    clock.now += 3
    sw._tick()
    await tb
    assert rec.calls == ["+a", "-a", "+b"]
    sw.leave("b")
    await sw.aclose()


async def test_engine_concurrency_bounds_a_batch() -> None:
    clock, rec = Clock(), Recorder()
    sw = Switcher(_config({"max_wait_secs": 30}, a={"extra_args": ["--max-num-seqs", "2"]}),
                  rec, clock=clock)
    await _serving(sw, "a")
    assert sw.try_enter("a") and sw.try_enter("a")
    assert not sw.try_enter("a")  # the engine runs two at once
    third = _waiter(sw, "a")
    await _settle(sw)
    assert not third.done()
    sw.leave("a")
    await third  # admitted as soon as a place is free
    assert sw.in_flight("a") == 2
    sw.leave("a")
    sw.leave("a")
    await sw.aclose()


async def test_lru_unpinned_is_the_victim_with_max_active() -> None:
    clock, rec = Clock(), Recorder()
    sw = Switcher(_config({"max_wait_secs": 30}, {"max_active": 2}, a={"pinned": True}),
                  rec, clock=clock)
    for m in ("a", "b"):
        await _serving(sw, m)
        clock.now += 1
    assert sw.active_models == ["a", "b"]
    await _serving(sw, "c")  # a is least recently used but pinned: b goes
    assert rec.calls[-2:] == ["-b", "+c"]
    assert sorted(sw.active_models) == ["a", "c"]
    await sw.aclose()


class Ledger(Recorder):
    """A device of ``size`` MiB where ``other`` MiB are taken by someone else and each
    resident model takes its figure: the decisions of admission, without engines."""

    def __init__(self, size: int, other: int, mem: dict[str, int]) -> None:
        super().__init__()
        self.size, self.other, self.mem = size, other, mem
        self.resident: set[str] = set()

    async def activate(self, model: str) -> str:
        self.resident.add(model)
        return await super().activate(model)

    async def evict(self, model: str, policy: EvictionPolicy | None = None) -> str:
        self.resident.discard(model)
        return await super().evict(model, policy)

    def memory_mb(self, model: str) -> int:
        return self.mem[model]

    def memory_source(self, model: str) -> str:
        return "pss"

    async def admission(self, model: str) -> tuple[int, FreeMemory]:
        used = sum(self.mem[m] for m in self.resident)
        return self.mem[model], FreeMemory(self.size - self.other - used, "host MemAvailable")

    async def measure(self, model: str) -> None:
        return None


async def test_admission_evicts_the_lru_when_that_covers_the_shortfall() -> None:
    clock = Clock()
    led = Ledger(1000, 300, {"a": 300, "b": 300, "c": 250})
    sw = Switcher(_config({}, {"max_active": 3}), led, memory=led, clock=clock)
    await _serving(sw, "a")
    clock.now += 1
    await _serving(sw, "b")
    clock.now += 1
    await _serving(sw, "c")  # 100 MiB free, 250 needed: a (least recently used) goes
    assert led.calls == ["+a", "+b", "-a", "+c"]
    assert sorted(sw.active_models) == ["b", "c"]
    await sw.aclose()


async def test_admission_shortfall_that_eviction_cannot_cover_is_a_503() -> None:
    clock = Clock()
    led = Ledger(1000, 300, {"a": 300, "b": 300, "c": 2000})
    sw = Switcher(_config({}, {"max_active": 3}), led, memory=led, clock=clock)
    await _serving(sw, "a")
    await _serving(sw, "b")
    try:
        await sw.enter("c", None)
        raise AssertionError("c was admitted")
    except ServiceUnavailable as e:
        assert e.code == "insufficient_memory"
        assert "it needs 2000 MiB, host MemAvailable is 100 MiB, short by 1900 MiB" in e.message
        assert "would free only 600 MiB" in e.message
    assert led.calls == ["+a", "+b"]  # nothing evicted for nothing
    assert sorted(sw.active_models) == ["a", "b"]
    await sw.aclose()


async def test_budget_evicts_lru_unpinned_until_the_model_fits() -> None:
    clock = Clock()
    led = Ledger(100_000, 0, {"a": 400, "b": 300, "c": 200})
    sw = Switcher(_config({"memory_budget_mb": 800}, a={"pinned": True}), led, memory=led,
                  clock=clock)
    for m in ("a", "b"):
        await _serving(sw, m)
        clock.now += 1
    assert led.calls == ["+a", "+b"] and sw.memory_used_mb() == 700
    await _serving(sw, "c")  # 900 > 800: a is the LRU but pinned, so b goes
    assert led.calls == ["+a", "+b", "-b", "+c"]
    assert sw.memory_used_mb() == 600
    await sw.aclose()
