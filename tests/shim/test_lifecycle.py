"""The model lifecycle (eviction and wake) with real built-in engines.

Every weights x process combination that needs no host service is driven
through evict and activate, and the engine's own view (/is_sleeping,
/engine_state) is checked after each step. The host strategies run against a
stand-in backend that does with real signals and real processes what llmuxd
does with CUDA and CRIU (suspend = SIGSTOP, checkpoint = the tree ends,
restore = a new tree handed over by PID), so the lifecycle's own code paths
(adopt, resume, reload) are the real ones.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmux.common import resources
from llmux.shim.backend import RestoredTree, StoredCheckpoint
from llmux.shim.config import Config, EvictionPolicy, ProcessStrategy, WeightStrategy
from llmux.shim.errors import ConfigError, EngineFailed, HostUnavailable, ModelNotFound
from llmux.shim.lifecycle import Lifecycle, ModelState, WakeKind
from llmux.shim.supervisor import Supervisor
from tests.support.procs import wait_until, wait_until_async

Transitions = list[tuple[str, str, str]]


class Harness:
    def __init__(self, config: Config, backend: Any = None, **kw: Any) -> None:
        self.config = config
        self.supervisor = Supervisor(config, grace_secs=2)
        self.transitions: Transitions = []
        self.released: list[str] = []
        self.lifecycle = Lifecycle(config, self.supervisor, backend, observer=self._observe,
                                   **kw)
        self._prepare_dump = self.supervisor.engines.prepare_dump
        self.supervisor.engines.prepare_dump = self._release  # type: ignore[method-assign]

    def _observe(self, model: str, action: str, strategy: str, seconds: float) -> None:
        assert seconds >= 0
        self.transitions.append((model, action, strategy))

    async def _release(self, model: str, within_secs: float = 2.0,
                       root_pid: int | None = None) -> None:
        self.released.append(model)
        await self._prepare_dump(model, within_secs, root_pid)

    async def started(self, procs: Any, signum: int | None = None) -> tuple[Lifecycle, list[int]]:
        """The lifecycle, started and with m1 active; m1's PIDs, tracked by procs. With
        signum, that signal is then sent to m1's root."""
        await self.lifecycle.start()
        await self.lifecycle.activate("m1")
        pids = self.lifecycle.status("m1").pids
        procs.track(*pids)
        if signum is not None:
            os.kill(pids[0], signum)
        return self.lifecycle, pids

    async def get(self, model: str, path: str) -> Any:
        r = await self.supervisor.engines.call(model, "GET", path)
        return r.json()

    async def ask(self, model: str) -> str:
        body = {"model": model, "messages": [{"role": "user", "content": "Say something."}],
                "temperature": 0, "max_tokens": 8}
        r = await self.supervisor.engines.call(model, "POST", "/v1/chat/completions", json=body)
        return str(r.json()["choices"][0]["message"]["content"])


@pytest.fixture
async def harness(procs: Any) -> AsyncIterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(config: Config, backend: Any = None, **kw: Any) -> Harness:
        h = Harness(config, backend, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        for s in h.lifecycle.statuses().values():
            procs.track(*s.pids)
        await h.lifecycle.aclose()
        await h.supervisor.aclose()


WEIGHTS_STATE = {WeightStrategy.RETAIN: "device", WeightStrategy.OFFLOAD: "host",
                 WeightStrategy.DISCARD: "discarded"}


@pytest.mark.parametrize("weights", list(WeightStrategy))
@pytest.mark.parametrize("process", [ProcessStrategy.KEEP_RUNNING, ProcessStrategy.STOP])
async def test_local_policies_evict_and_wake(
        weights: WeightStrategy, process: ProcessStrategy,
        builtin_config: Callable[..., Config], harness: Callable[..., Harness],
        procs: Any) -> None:
    policy = EvictionPolicy(weights, process)
    h = harness(builtin_config(["m1"], eviction=str(policy)))
    lc = h.lifecycle
    await lc.start()
    assert lc.status("m1").state is ModelState.STOPPED
    assert lc.status("m1").to_json()["last_wake"] is None

    assert await lc.activate("m1") is WakeKind.COLD
    assert await lc.activate("m1") is None, "already running: nothing to do"
    baseline = await h.ask("m1")
    first = lc.status("m1")
    pids = first.pids
    procs.track(*pids)
    assert first.state is ModelState.RUNNING and len(pids) >= 2

    state = await lc.evict("m1")
    status = lc.status("m1")
    assert status.state is state
    if process is ProcessStrategy.KEEP_RUNNING:
        assert state is ModelState.SLEEPING
        assert status.pids == pids, "the same engine keeps running"
        assert (await h.get("m1", "/is_sleeping"))["is_sleeping"] is (
            weights is not WeightStrategy.RETAIN)
        engine = await h.get("m1", "/engine_state")
        assert engine["weights"] == WEIGHTS_STATE[weights]
    else:
        assert state is ModelState.STOPPED
        assert status.pids == []
        assert not procs.any_running(pids), "stop leaves no process of the tree"

    kind = await lc.activate("m1")
    status = lc.status("m1")
    assert status.state is ModelState.RUNNING
    assert kind is status.last_wake
    assert kind is (WakeKind.WAKE if process is ProcessStrategy.KEEP_RUNNING else WakeKind.COLD)
    assert (await h.get("m1", "/is_sleeping"))["is_sleeping"] is False
    assert (await h.get("m1", "/engine_state"))["weights"] == "device"
    assert await h.ask("m1") == baseline, "the same answer after waking"
    procs.track(*status.pids)

    actions = [(a, s) for _, a, s in h.transitions]
    wake_action = ("wake", str(policy)) if process is ProcessStrategy.KEEP_RUNNING \
        else ("cold_start", "cold")
    assert actions == [("cold_start", "cold"), ("sleep", str(policy)), wake_action]
    j = status.to_json()
    assert j["state"] == "running" and j["port"] == status.port and j["engine"] == "builtin"
    assert j["eviction"] == str(policy)


async def test_dead_engine_is_restarted_on_next_activate(
        builtin_config: Callable[..., Config], harness: Callable[..., Harness],
        procs: Any) -> None:
    h = harness(builtin_config(["m1"]))
    lc, old = await h.started(procs, signal.SIGKILL)
    assert await procs.wait_gone(old)
    assert await wait_until_async(lambda: lc.status("m1").state is ModelState.STOPPED, 30,
                                  "m1 to be stopped")
    status = lc.status("m1")
    assert status.state is ModelState.STOPPED and status.pids == []
    assert "exited unexpectedly" in (status.last_error or "")

    assert await lc.activate("m1") is WakeKind.COLD
    status = lc.status("m1")
    procs.track(*status.pids)
    assert status.state is ModelState.RUNNING and status.last_wake is WakeKind.COLD
    assert status.restarts == 1 and status.pids[0] != old[0]
    assert ("m1", "restart", "cold") in h.transitions


async def test_failed_eviction_escalates_to_stop(
        builtin_config: Callable[..., Config], harness: Callable[..., Harness],
        procs: Any) -> None:
    h = harness(builtin_config(["m1"], eviction="offload+keep_running"),
                engine_call_timeout_secs=1.0)
    lc, pids = await h.started(procs, signal.SIGSTOP)  # /sleep will never be answered
    assert await lc.evict("m1") is ModelState.STOPPED
    status = lc.status("m1")
    assert status.state is ModelState.STOPPED and status.pids == []
    assert "offload+keep_running failed" in (status.last_error or "")
    assert not procs.any_running(pids), "the GPU is freed: nothing of the tree is left"
    assert ("m1", "escalate", "offload+keep_running") in h.transitions
    # and it comes back cold
    assert await lc.activate("m1") is WakeKind.COLD
    procs.track(*lc.status("m1").pids)


async def test_evicting_a_killed_engine_ends_stopped(
        builtin_config: Callable[..., Config], harness: Callable[..., Harness],
        procs: Any) -> None:
    h = harness(builtin_config(["m1"], eviction="discard+keep_running"))
    lc, pids = await h.started(procs, signal.SIGKILL)
    assert await lc.evict("m1") is ModelState.STOPPED
    assert await procs.wait_gone(pids)
    assert lc.status("m1").state is ModelState.STOPPED


async def test_host_strategies_without_backend_are_refused_at_start(
        builtin_config: Callable[..., Config], harness: Callable[..., Harness]) -> None:
    cfg = builtin_config(["a", "b", "c"], a={"eviction": "offload+cuda_suspend"},
                         b={"eviction": "discard+checkpoint"})
    lc = harness(cfg).lifecycle
    with pytest.raises(ConfigError) as info:
        await lc.start()
    paths = [p for p, _ in info.value.problems]
    assert paths == ["models.a.eviction.process", "models.b.eviction.process"]
    assert "llmuxd" in info.value.message and "cuda_suspend" in info.value.message


async def test_host_policy_on_demand_without_backend_touches_nothing(
        builtin_config: Callable[..., Config], harness: Callable[..., Harness],
        procs: Any) -> None:
    h = harness(builtin_config(["m1"]))
    lc, _ = await h.started(procs)
    with pytest.raises(HostUnavailable, match="llmuxd"):
        await lc.evict("m1", EvictionPolicy.parse("retain+checkpoint"))
    assert lc.status("m1").state is ModelState.RUNNING


async def test_a_cancelled_caller_does_not_cut_a_transition_short(
        builtin_config: Callable[..., Config], harness: Callable[..., Harness],
        procs: Any) -> None:
    h = harness(builtin_config(["m1"], eviction="discard+keep_running"))
    lc = h.lifecycle
    await lc.start()
    caller = asyncio.create_task(lc.activate("m1"))
    await wait_until_async(lambda: h.supervisor.pids("m1"), 30, "m1's engine to be starting")
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert await lc.activate("m1") is None, "the cold start went on and completed"
    status = lc.status("m1")
    procs.track(*status.pids)
    assert status.state is ModelState.RUNNING and status.last_wake is WakeKind.COLD
    caller = asyncio.create_task(lc.evict("m1"))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert await lc.evict("m1") is ModelState.SLEEPING
    assert (await h.get("m1", "/engine_state"))["weights"] == "discarded"


async def test_unknown_model(builtin_config: Callable[..., Config],
                             harness: Callable[..., Harness]) -> None:
    lc = harness(builtin_config(["m1"])).lifecycle
    with pytest.raises(ModelNotFound, match="m1"):
        await lc.activate("nope")
    with pytest.raises(ModelNotFound):
        lc.status("nope")


# ------------------------------------------------------------------------ host strategies


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


class SignalBackend:
    """Stands in for llmuxd with real processes: what it does to a tree is observable.

    suspend/resume stop and continue the tree; checkpoint records the engine's
    sleep level and ends the tree; restore starts a new tree in the same state
    and hands it over by PID, as a CRIU restore does.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.calls: list[tuple[str, str]] = []
        self.images: dict[str, int] = {}
        self.foreign: list[subprocess.Popen[bytes]] = []
        self.checked = False

    async def check(self) -> None:
        self.checked = True

    async def suspend(self, model: str, root_pid: int) -> None:
        self.calls.append(("suspend", model))
        os.killpg(root_pid, signal.SIGSTOP)

    async def resume(self, model: str, root_pid: int) -> None:
        self.calls.append(("resume", model))
        os.killpg(root_pid, signal.SIGCONT)

    async def checkpoint(self, model: str, root_pid: int, *, weights_bytes: int,
                         gpus: Sequence[int] = ()) -> None:
        self.calls.append(("checkpoint", model))
        port = self.config.models[model].port
        async with httpx.AsyncClient(trust_env=False) as c:
            sleeping = (await c.get(f"http://127.0.0.1:{port}/is_sleeping")).json()
            weights = (await c.get(f"http://127.0.0.1:{port}/engine_state")).json()["weights"]
        self.images[model] = {"device": 0, "host": 1, "discarded": 2}[weights]
        assert sleeping["is_sleeping"] is (self.images[model] > 0)
        # as llmuxd: the tree's /dev/shm segments go into the checkpoint, the tree ends
        members = [int(p) for p in os.listdir("/proc") if p.isdigit()
                   and _pgid(int(p)) == root_pid]
        shm = resources.shm_paths(resources.open_paths(members)[0])
        os.killpg(root_pid, signal.SIGKILL)
        for _ in range(250):  # until no member maps them any more (zombies map nothing)
            if not resources.remove_unused(Path(p) for p in shm) and not any(
                    Path(p).exists() for p in shm):
                break
            await asyncio.sleep(0.02)

    async def restore(self, model: str, *, keep_images: bool,
                      port: int | None = None) -> RestoredTree:
        self.calls.append(("restore", model))
        level = self.images[model] if keep_images else self.images.pop(model)
        argv = Supervisor(self.config).argv(self.config.models[model])
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        self.foreign.append(proc)
        port = self.config.models[model].port
        async with httpx.AsyncClient(trust_env=False) as c:
            for _ in range(1200):
                try:
                    if (await c.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            if level:
                await c.post(f"http://127.0.0.1:{port}/sleep", params={"level": str(level)})
        return RestoredTree(root_pid=proc.pid, pids=[proc.pid])

    async def find_checkpoint(self, model: str) -> StoredCheckpoint | None:
        return StoredCheckpoint(gpus=[]) if model in self.images else None

    def reap(self) -> None:
        for p in self.foreign:
            p.kill()
            p.wait()


@pytest.mark.parametrize("weights", list(WeightStrategy))
async def test_checkpoint_and_restore_through_the_backend(
        weights: WeightStrategy, builtin_config: Callable[..., Config],
        harness: Callable[..., Harness], procs: Any) -> None:
    policy = EvictionPolicy(weights, ProcessStrategy.CHECKPOINT)
    cfg = builtin_config(["m1"], eviction=str(policy))
    backend = SignalBackend(cfg)
    h = harness(cfg, backend)
    lc = h.lifecycle
    try:
        await lc.start()
        assert backend.checked
        await lc.activate("m1")
        baseline = await h.ask("m1")
        pids = lc.status("m1").pids
        procs.track(*pids)

        assert await lc.evict("m1") is ModelState.CHECKPOINTED
        assert h.released == ["m1"], "connections released before the dump"
        assert await procs.wait_gone(pids)
        status = lc.status("m1")
        assert status.state is ModelState.CHECKPOINTED and status.pids == []

        assert await lc.activate("m1") is WakeKind.RESTORE
        status = lc.status("m1")
        procs.track(*status.pids)
        assert status.pids[0] == backend.foreign[-1].pid, "the restored tree is adopted"
        assert (await h.get("m1", "/engine_state"))["weights"] == "device"
        assert (await h.get("m1", "/is_sleeping"))["is_sleeping"] is False
        assert await h.ask("m1") == baseline
        assert backend.calls == [("checkpoint", "m1"), ("restore", "m1")]
        assert ("m1", "wake", str(policy)) in h.transitions
        await lc.aclose()
        assert not procs.any_running(status.pids), "aclose stops adopted engines too"
    finally:
        backend.reap()


async def test_cuda_suspend_and_resume(builtin_config: Callable[..., Config],
                                       harness: Callable[..., Harness], procs: Any) -> None:
    cfg = builtin_config(["m1"], eviction="offload+cuda_suspend")
    backend = SignalBackend(cfg)
    h = harness(cfg, backend)
    lc, pids = await h.started(procs)
    assert await lc.evict("m1") is ModelState.SUSPENDED
    assert lc.status("m1").pids == pids

    def stopped() -> bool:
        with open(f"/proc/{pids[0]}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"

    assert wait_until(stopped, 30, "the tree is stopped while suspended")
    assert await lc.activate("m1") is WakeKind.RESUME
    assert lc.status("m1").pids == pids, "resume keeps the same processes"
    assert (await h.get("m1", "/engine_state"))["weights"] == "device"
    assert backend.calls == [("suspend", "m1"), ("resume", "m1")]


async def test_existing_checkpoint_found_at_start_is_restored(
        builtin_config: Callable[..., Config], harness: Callable[..., Harness],
        procs: Any) -> None:
    cfg = builtin_config(["m1", "m2"], eviction="discard+checkpoint")
    backend = SignalBackend(cfg)
    backend.images["m1"] = 2  # left by an earlier run
    h = harness(cfg, backend)
    lc = h.lifecycle
    try:
        await lc.start()
        assert lc.status("m1").state is ModelState.CHECKPOINTED
        assert lc.status("m1").sleep_level is None
        assert lc.status("m2").state is ModelState.STOPPED
        assert await lc.activate("m1") is WakeKind.RESTORE
        procs.track(*lc.status("m1").pids)
        assert (await h.get("m1", "/engine_state"))["weights"] == "device"
        assert ("m1", "wake", "restore") in h.transitions
    finally:
        await lc.aclose()
        backend.reap()


async def test_failed_restore_falls_back_to_cold_start(
        builtin_config: Callable[..., Config], harness: Callable[..., Harness],
        procs: Any) -> None:
    cfg = builtin_config(["m1"], eviction="retain+checkpoint")

    class Broken(SignalBackend):
        async def restore(self, model: str, *, keep_images: bool,
                          port: int | None = None) -> RestoredTree:
            raise HostUnavailable("host service: restore of model m1 failed: "
                                  "org.llmux.Error.CriuFailed: no images")

    backend = Broken(cfg)
    backend.images["m1"] = 0
    h = harness(cfg, backend)
    lc = h.lifecycle
    await lc.start()
    assert lc.status("m1").state is ModelState.CHECKPOINTED
    assert await lc.activate("m1") is WakeKind.COLD
    status = lc.status("m1")
    procs.track(*status.pids)
    assert status.state is ModelState.RUNNING
    assert "CriuFailed" in (status.last_error or "")
    assert ("m1", "restart", "cold") in h.transitions


async def test_torch_engine_offload_then_discard(
        builtin_config: Callable[..., Config], harness: Callable[..., Harness],
        procs: Any) -> None:
    """The same cycles on the PyTorch model, whose weights really move and reload."""
    pytest.importorskip("torch")
    cfg = builtin_config(["m1"], m1={"env": {"LLMUX_BUILTIN_BACKEND": "torch"},
                                     "weights_mb": 16, "sleep_mode": True})
    h = harness(cfg)
    lc, _ = await h.started(procs)
    assert (await h.get("m1", "/engine_state"))["backend"] == "torch"
    baseline = await h.ask("m1")
    for policy, weights in (("offload+keep_running", "host"),
                            ("discard+keep_running", "discarded")):
        assert await lc.evict("m1", EvictionPolicy.parse(policy)) is ModelState.SLEEPING
        engine = await h.get("m1", "/engine_state")
        assert engine["weights"] == weights and engine["sleeping"] is True
        assert await lc.activate("m1") is WakeKind.WAKE
        assert (await h.get("m1", "/engine_state"))["weights"] == "device"
        assert await h.ask("m1") == baseline


# ------------------------------------------------------------------------ the real host service

CRIU = os.environ.get("LLMUX_CRIU", "/opt/llmux/criu/criu")


@pytest.fixture
async def host_service(tmp_path: Any) -> AsyncIterator[str]:
    """llmuxd (CRIU, no CUDA) on a private bus; yields the bus address."""
    import shutil
    import sys
    import tempfile

    from llmux.shim.backend import HostServiceBackend

    if os.geteuid() != 0 or not os.access(CRIU, os.X_OK):
        pytest.skip(f"llmuxd needs root and CRIU at {CRIU} (packaging/criu/install-criu.sh)")
    if shutil.which("dbus-daemon") is None:
        pytest.skip("needs dbus-daemon")
    bus_dir = tempfile.mkdtemp(prefix="llmux-shim-bus-")
    address = f"unix:path={bus_dir}/bus"
    bus = subprocess.Popen(["dbus-daemon", "--session", "--nofork", f"--address={address}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (tmp_path / "llmuxd.toml").write_text("")
    log = open(tmp_path / "llmuxd.log", "ab")  # noqa: SIM115 (closed below)
    daemon = subprocess.Popen(
        [str(os.path.join(os.path.dirname(sys.executable), "llmuxd")), "--bus", address,
         "--state-dir", str(tmp_path / "state"), "--criu", CRIU, "--cuda-mode", "off",
         "--config", str(tmp_path / "llmuxd.toml"), "--log-level", "debug"],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        for _ in range(300):
            backend = HostServiceBackend(address)
            try:
                await backend.check()
                break
            except HostUnavailable:
                assert daemon.poll() is None, (tmp_path / "llmuxd.log").read_text()
                await asyncio.sleep(0.1)
            finally:
                await backend.aclose()
        yield address
    finally:
        for proc in (daemon, bus):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        shutil.rmtree(bus_dir, ignore_errors=True)


@pytest.mark.criu
@pytest.mark.dbus
@pytest.mark.parametrize("weights", list(WeightStrategy))
async def test_checkpoint_and_restore_through_llmuxd(
        weights: WeightStrategy, host_service: str, builtin_config: Callable[..., Config],
        harness: Callable[..., Harness], procs: Any) -> None:
    """A real CRIU dump and restore of the built-in engine, driven through llmuxd over D-Bus;
    then a second shim (a new lifecycle) finds the checkpoint at start and restores it."""
    from llmux.shim.backend import HostServiceBackend

    policy = EvictionPolicy(weights, ProcessStrategy.CHECKPOINT)
    cfg = builtin_config(["m1"], eviction=str(policy), top={"checkpoint": {"bus": host_service}})
    h = harness(cfg, HostServiceBackend(host_service))
    lc = h.lifecycle
    await lc.start()
    assert lc.status("m1").state is ModelState.STOPPED
    await lc.activate("m1")
    baseline = await h.ask("m1")
    pids = lc.status("m1").pids
    procs.track(*pids)

    assert await lc.evict("m1") is ModelState.CHECKPOINTED, lc.status("m1").last_error
    assert h.released == ["m1"]
    assert await procs.wait_gone(pids)
    assert await lc.activate("m1") is WakeKind.RESTORE
    status = lc.status("m1")
    procs.track(*status.pids)
    assert status.pids[0] == pids[0], "CRIU gives the processes their PIDs back"
    assert (await h.get("m1", "/engine_state"))["weights"] == "device"
    assert await h.ask("m1") == baseline

    # evict again and hand over to a new shim instance, as after a restart of the shim
    assert await lc.evict("m1") is ModelState.CHECKPOINTED
    await lc.aclose()
    h2 = harness(cfg, HostServiceBackend(host_service))
    await h2.lifecycle.start()
    assert h2.lifecycle.status("m1").state is ModelState.CHECKPOINTED
    assert await h2.lifecycle.activate("m1") is WakeKind.RESTORE
    procs.track(*h2.lifecycle.status("m1").pids)
    assert (await h2.get("m1", "/is_sleeping"))["is_sleeping"] is False
    assert await h2.ask("m1") == baseline


@pytest.mark.criu
@pytest.mark.dbus
async def test_cuda_suspend_through_llmuxd(
        host_service: str, builtin_config: Callable[..., Config],
        harness: Callable[..., Harness], procs: Any) -> None:
    from llmux.shim.backend import HostServiceBackend

    cfg = builtin_config(["m1"], eviction="offload+cuda_suspend",
                         top={"checkpoint": {"bus": host_service}})
    h = harness(cfg, HostServiceBackend(host_service))
    lc = h.lifecycle
    await lc.start()
    await lc.activate("m1")
    baseline = await h.ask("m1")
    pids = lc.status("m1").pids
    procs.track(*pids)
    # No GPU here: llmuxd refuses to "suspend" a tree without CUDA state (never a silent
    # keep_running), and the lifecycle escalates to stop so that nothing stays held.
    assert await lc.evict("m1") is ModelState.STOPPED
    assert "org.llmux.Error.Unsupported" in (lc.status("m1").last_error or "")
    assert not any(procs.running(p) for p in pids)
    assert await lc.activate("m1") is WakeKind.COLD
    assert await h.ask("m1") == baseline


# ------------------------------------------------------------------ readiness by a real answer

#: an engine that looks healthy and never answers a request: vLLM with its EngineCore's
#: output thread dead (/health 200, every completion hangs)
_HEALTHY_BUT_DEAD = """
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port = int(sys.argv[sys.argv.index("--port") + 1])
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def do_POST(self):
        time.sleep(3600)
print("serving", flush=True)
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


async def test_an_engine_that_answers_health_but_not_requests_is_not_running(
        builtin_config: Callable[..., Config], harness: Callable[..., Harness],
        procs: Any) -> None:
    import sys

    cfg = builtin_config(["m1"], m1={"command": [sys.executable, "-c", _HEALTHY_BUT_DEAD],
                                     "probe_timeout_secs": 1})
    h = harness(cfg)
    lc = h.lifecycle
    await lc.start()
    with pytest.raises(EngineFailed) as info:
        await lc.activate("m1")
    message = info.value.message
    assert "m1" in message and "readiness probe" in message and "within 1 s" in message
    status = lc.status("m1")
    assert status.state is ModelState.STOPPED and status.pids == []
    assert "readiness probe" in (status.last_error or "")
    # stopped and cold-started once, then reported: two starts in the engine's log
    starts = h.supervisor.log_path("m1").read_text().count("--- llmux ")
    assert starts == 2, starts


async def test_a_success_clears_an_old_error(
        builtin_config: Callable[..., Config], harness: Callable[..., Harness],
        procs: Any) -> None:
    h = harness(builtin_config(["m1"], eviction="retain+keep_running"))
    lc, _ = await h.started(procs, signal.SIGKILL)
    assert await wait_until_async(lambda: lc.status("m1").state is ModelState.STOPPED, 30,
                                  "m1 to be stopped")
    assert "exited unexpectedly" in (lc.status("m1").last_error or "")
    assert await lc.activate("m1") is WakeKind.COLD
    procs.track(*lc.status("m1").pids)
    assert lc.status("m1").last_error is None
    assert await lc.evict("m1") is ModelState.SLEEPING
    assert lc.status("m1").last_error is None
