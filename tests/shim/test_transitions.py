"""Transitions as types: the lifecycle's Action, the switcher's one Switch record per switch,
and what reads them (the metrics, the operator page's history, the control API), with the
shapes of /control/status and of the metrics as they were.

No engines: a switch target that answers as the lifecycle does, on a fake clock.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from llmux.shim.config import Config, EvictionPolicy, config_from_dict
from llmux.shim.control import ControlAPI
from llmux.shim.errors import EngineFailed
from llmux.shim.lifecycle import ModelState, ModelStatus
from llmux.shim.metrics import ShimMetrics
from llmux.shim.switcher import Switcher
from llmux.shim.transitions import Action, BroughtBack, PutAway, Switch, WakeKind
from llmux.shim.ui import SwitchHistory


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Target:
    """Answers activate and evict as the lifecycle does; each takes set seconds."""

    def __init__(self, clock: Clock, *, fail: str = "") -> None:
        self.clock = clock
        self.fail = fail
        self.running: set[str] = set()

    async def activate(self, model: str) -> WakeKind | None:
        self.clock.now += 2.0
        if model == self.fail:
            raise EngineFailed(f"model {model}: it would not start")
        if model in self.running:
            return None
        self.running.add(model)
        return WakeKind.RESTORE if model == "b" else WakeKind.COLD

    async def evict(self, model: str, policy: EvictionPolicy | None = None) -> ModelState:
        self.clock.now += 0.5
        self.running.discard(model)
        return ModelState.CHECKPOINTED


def _config() -> Config:
    raw = {"host": "127.0.0.1", "port": 3999, "metrics_port": 0,
           "policy": {"min_active_secs": 0},
           "models": {name: {"model_path": f"t/{name}", "port": 4000 + i, "engine": "builtin"}
                      for i, name in enumerate(("a", "b"))}}
    return config_from_dict(raw, source="test")


def test_action_knows_what_it_puts_away_and_brings_back() -> None:
    away = {a for a in Action if a.puts_away}
    back = {a for a in Action if a.brings_back}
    assert away == {Action.SLEEP, Action.ESCALATE}
    assert back == {Action.WAKE, Action.COLD_START, Action.RESTART}
    assert Action.STOP not in away | back
    # the metrics' `action` label and the lifecycle's observers see the same strings as ever
    assert [a.value for a in Action] == ["cold_start", "restart", "wake", "sleep", "escalate",
                                         "stop"]
    assert Action.RESTART == "restart" and str(Action.ESCALATE) == "escalate"


async def test_one_record_per_switch_from_what_the_switcher_awaited() -> None:
    clock, config = Clock(), _config()
    records: list[Switch] = []
    sw = Switcher(config, Target(clock), clock=clock, on_switch=records.append)
    first = await sw.wake("a")
    assert first.to_json()["wake"] == "cold"
    waiting = asyncio.ensure_future(sw.enter("b", None))
    await asyncio.sleep(0)
    second = await sw.wake("b")
    await waiting
    sw.leave("b")
    assert second.wake == "restore" and second.evicted == "a" and second.changed
    assert len(records) == 2 and sw.switches == 2
    one, two = records
    assert one.target == "a" and one.put_away == () and one.source is None
    assert one.brought_back == BroughtBack("a", WakeKind.COLD, 2.0) and one.how is WakeKind.COLD
    strategy = str(config.models["a"].eviction)
    assert two == Switch(target="b", put_away=(PutAway("a", strategy, "checkpointed", 0.5),),
                         brought_back=BroughtBack("b", WakeKind.RESTORE, 2.0), seconds=2.5,
                         ok=True, at=two.at, waiting=2)
    assert two.source == PutAway("a", strategy, "checkpointed", 0.5)
    assert two.outcome == "ok" and two.how is WakeKind.RESTORE
    with pytest.raises(AttributeError):
        two.ok = False  # type: ignore[misc]  # frozen: readers share it


async def test_a_failed_switch_is_recorded_as_failed() -> None:
    clock = Clock()
    records: list[Switch] = []
    sw = Switcher(_config(), Target(clock, fail="b"), clock=clock)
    sw.add_observer(records.append)
    await sw.wake("a")
    with pytest.raises(Exception, match="would not start"):
        await sw.wake("b")
    failed = records[-1]
    assert not failed.ok and failed.outcome == "failed"
    assert failed.brought_back is None and failed.how is None
    assert [p.model for p in failed.put_away] == ["a"]


def _switch(ok: bool = True) -> Switch:
    return Switch(target="b", put_away=(PutAway("a", "discard+checkpoint", "checkpointed", 0.25),),
                  brought_back=BroughtBack("b", WakeKind.RESTORE, 1.5) if ok else None,
                  seconds=1.75, ok=ok, at=1234.5, waiting=3)


def test_the_page_reads_the_records() -> None:
    h = SwitchHistory()
    h.observe_transition("a", Action.SLEEP, "discard+checkpoint", 0.25)
    h.observe_switch(_switch())
    assert list(h.switches) == [{
        "at": 1234.5, "from": "a", "to": "b", "ok": True, "seconds": 1.75,
        "strategy": "discard+checkpoint", "sleep_secs": 0.25, "wake": "restore",
        "wake_secs": 1.5, "waiting": 3}]
    assert h.came_back == {"b": {"how": "restore", "secs": 1.5, "at": 1234.5, "action": None}}
    texts = [t for _, t in h.lines]
    assert texts[0].endswith("a: sleep (discard+checkpoint) 0.250 s")
    assert texts[1].endswith("switch a -> b: ok in 1.750 s; sleep discard+checkpoint 0.250 s; "
                             "restore 1.500 s; 3 waiting")
    h.observe_switch(_switch(ok=False))
    failed = h.switches[-1]
    assert failed["ok"] is False and failed["wake"] is None and failed["wake_secs"] is None
    assert h.came_back["b"]["how"] == "restore", "a failed switch brings nothing back"
    assert "FAILED" in h.lines[-1][1]


def _metrics() -> ShimMetrics:
    return ShimMetrics(in_flight=lambda: {"a": 0, "b": 1}, queue_depth=lambda: 2,
                       active_models=lambda: ["b"])


def _series(text: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if not line.startswith("#")}


def test_the_metrics_read_the_records_and_the_actions() -> None:
    m = _metrics()
    m.observe_switch(_switch())
    m.observe_switch(_switch(ok=False))
    for action, strategy in ((Action.COLD_START, "cold"), (Action.SLEEP, "retain+stop"),
                             (Action.ESCALATE, "discard+checkpoint"), (Action.RESTART, "cold"),
                             (Action.WAKE, "offload+keep_running"), (Action.STOP, "stop")):
        m.observe_transition("a", action, strategy, 0.5)
    text = m.render().decode()
    series = _series(text)
    assert 'llmux_switch_duration_seconds_count{model="b",outcome="ok"}' in series
    assert 'llmux_switch_duration_seconds_count{model="b",outcome="failed"}' in series
    sleeps = {s for s in series if s.startswith("llmux_sleep_duration_seconds_count")}
    assert sleeps == {'llmux_sleep_duration_seconds_count{model="a",strategy="retain+stop"}',
                      'llmux_sleep_duration_seconds_count{model="a",'
                      'strategy="discard+checkpoint"}'}
    wakes = {s for s in series if s.startswith("llmux_wake_duration_seconds_count")}
    assert wakes == {'llmux_wake_duration_seconds_count{model="a",strategy="cold"}',
                     'llmux_wake_duration_seconds_count{model="a",'
                     'strategy="offload+keep_running"}'}
    assert re.search(r'^llmux_wake_duration_seconds_count\{model="a",strategy="cold"\} 2\.0$',
                     text, re.M), "cold_start and restart"
    actions = {re.search(r'action="([^"]+)"', s)[1] for s in series  # type: ignore[index]
               if s.startswith("llmux_transition_duration_seconds_count")}
    assert actions == {"cold_start", "sleep", "escalate", "restart", "wake", "stop"}
    assert 'llmux_engine_restarts_total{model="a"}' in series
    # the metric families, as they were
    families = [f for f in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M)
                if not f[0].endswith("_created")]
    assert families == [
        ("llmux_requests_total", "counter"), ("llmux_requests_in_flight", "gauge"),
        ("llmux_queue_depth", "gauge"), ("llmux_model_active", "gauge"),
        ("llmux_switch_duration_seconds", "histogram"),
        ("llmux_sleep_duration_seconds", "histogram"),
        ("llmux_wake_duration_seconds", "histogram"),
        ("llmux_transition_duration_seconds", "histogram"),
        ("llmux_engine_restarts_total", "counter")]


class Statuses:
    """The lifecycle's statuses, as the control API reads them."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def status(self, model: str) -> ModelStatus:
        m = self.config.models[model]
        return ModelStatus(name=model, state=ModelState.RUNNING if model == "b"
                           else ModelState.CHECKPOINTED, pids=[], last_wake=WakeKind.RESTORE,
                           eviction=m.eviction, port=m.port, engine=m.engine.value, since=1.0)

    def statuses(self) -> dict[str, ModelStatus]:
        return {name: self.status(name) for name in self.config.models}


async def test_control_status_and_wake_keep_their_shapes() -> None:
    clock, config = Clock(), _config()
    sw = Switcher(config, Target(clock), clock=clock)
    control = ControlAPI(config.models, sw, Statuses(config))
    await sw.wake("a")
    woke = await sw.wake("b")
    assert woke.to_json() == {"model": "b", "action": "wake", "changed": True,
                              "seconds": 2.5, "wake": "restore", "evicted": "a"}
    status: dict[str, Any] = json.loads(json.dumps(control.status_json()))
    assert list(status) == ["active", "active_models", "queue_depth", "switching",
                            "memory_budget_mb", "memory_used_mb", "gpus", "models"]
    assert status["gpus"] == []  # one slot: no placement
    assert list(status["models"]["b"]) == [
        "state", "pids", "last_wake", "eviction", "port", "engine", "since", "sleep_level",
        "evicted_with", "restarts", "last_error", "memory_mb", "memory_source", "gpus", "active",
        "in_flight", "queued", "pinned", "ttl_secs", "idle_secs", "priority"]
    assert status["active"] == "b" and status["models"]["b"]["last_wake"] == "restore"
    assert status["models"]["a"]["active"] is False


def test_came_back_names_the_lifecycle_action_that_brought_it_back() -> None:
    h = SwitchHistory()
    h.observe_transition("b", Action.RESTART, "cold", 1.5)
    h.observe_switch(_switch())
    assert h.came_back["b"]["action"] == "restart"
    assert h.came_back["b"]["how"] == "restore", "how: the switch record's word"
