"""vLLM's inconvenient traits, copied: uvloop (and its io_uring), /dev/shm segments.

vLLM's API server runs on uvloop, whose libuv sets up an io_uring instance CRIU cannot
dump; the product (and testing.py) start engines through ``llmux.shim.launch``, which
makes io_uring unavailable. vLLM's multiprocessing keeps ``psm_<hex>`` segments in
/dev/shm, mapped by several processes, removed on a clean stop, left behind by SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from llmux.shim.builtin.testing import EngineProcess, start_engine
from tests.support.procs import wait_until

EngineEnv = Callable[[str], dict[str, str]]
IO_URING_FD = "anon_inode:[io_uring]"
PSM_RE = re.compile(r"^psm_[0-9a-f]+$")


def state_of(engine: EngineProcess) -> dict[str, object]:
    body: dict[str, object] = httpx.get(f"{engine.base_url}/engine_state").json()
    return body


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from /proc."""
    pids, index = [pid], 0
    while index < len(pids):
        for task in Path(f"/proc/{pids[index]}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                pids += [int(p) for p in task.read_text().split()]
        index += 1
    return pids


def fd_targets(pid: int) -> list[str]:
    targets = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            targets.append(os.readlink(fd))
    return targets


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def seccomp_mode(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Seccomp:"):
            return int(line.split()[1])
    raise AssertionError(f"no Seccomp line in /proc/{pid}/status")


def segment_of(engine: EngineProcess) -> Path:
    segments = state_of(engine)["shm_segments"]
    assert isinstance(segments, list) and len(segments) == 1
    path = Path(segments[0])
    assert path.parent == Path("/dev/shm") and PSM_RE.match(path.name), path
    return path


def io_uring_disabled() -> bool:
    try:
        return Path("/proc/sys/kernel/io_uring_disabled").read_text().strip() == "2"
    except OSError:
        return False


# -- uvloop and io_uring -------------------------------------------------------------------
def test_api_server_runs_on_uvloop(shared_engine: EngineProcess) -> None:
    assert state_of(shared_engine)["api_event_loop"] == "uvloop.Loop"
    assert "/uvloop/loop." in Path(f"/proc/{shared_engine.pid}/maps").read_text()


def test_launched_tree_has_no_io_uring(shared_engine: EngineProcess) -> None:
    """Started through llmux.shim.launch: every process has the filter, none an io_uring."""
    pids = tree(shared_engine.pid)
    assert len(pids) == 4  # API server, engine core, its worker, resource tracker
    for pid in pids:
        assert seccomp_mode(pid) == 2, cmdline(pid)
        assert IO_URING_FD not in fd_targets(pid), cmdline(pid)


@pytest.mark.skipif(io_uring_disabled(), reason="io_uring is disabled on this kernel")
def test_unwrapped_api_server_holds_an_io_uring(engine_env: EngineEnv) -> None:
    """vLLM's trait: uvloop's libuv sets up an io_uring (which CRIU cannot dump)."""
    with start_engine("test-org/io-uring", weights_mb=1, extra_env=engine_env("pure"),
                      io_uring=True) as engine:
        assert state_of(engine)["api_event_loop"] == "uvloop.Loop"
        assert seccomp_mode(engine.pid) == 0
        assert IO_URING_FD in fd_targets(engine.pid)


# -- /dev/shm segments ---------------------------------------------------------------------
def test_shm_segment_is_mapped_by_the_api_server_and_the_engine_core(
    shared_engine: EngineProcess,
) -> None:
    state = state_of(shared_engine)
    core = state["pid_core"]
    assert isinstance(core, int)
    path = segment_of(shared_engine)
    assert path.stat().st_size >= 1 << 20
    for pid in (shared_engine.pid, core):
        maps = Path(f"/proc/{pid}/maps").read_text()
        [line] = [m for m in maps.splitlines() if m.endswith(f" {path}")]
        assert line.split()[1].endswith("s"), line  # MAP_SHARED


def test_engine_core_writes_its_counters_to_the_segment(shared_engine: EngineProcess) -> None:
    before = state_of(shared_engine)
    counters = before["shm_counters"]
    assert isinstance(counters, dict)
    assert counters["tokens_generated"] == before["tokens_generated"]
    r = httpx.post(f"{shared_engine.base_url}/v1/completions",
                   json={"prompt": "count me", "max_tokens": 7}, timeout=60)
    assert r.status_code == 200, r.text

    def counted() -> bool:
        after = state_of(shared_engine)["shm_counters"]
        assert isinstance(after, dict)
        return bool(after["tokens_generated"] == counters["tokens_generated"] + 7
                    and after["heartbeat"] > counters["heartbeat"])

    assert wait_until(counted, 10, "the shared-memory counters to count the 7 tokens")


def test_one_resource_tracker_serves_the_tree(shared_engine: EngineProcess) -> None:
    """Like a multiprocessing child, the core uses the API server's tracker (no second one)."""
    core = state_of(shared_engine)["pid_core"]
    assert isinstance(core, int)
    [tracker] = [p for p in shared_engine.child_pids() if p != core]
    assert "multiprocessing.resource_tracker" in cmdline(tracker)
    worker = state_of(shared_engine)["pid_worker"]
    assert tree(core) == [core, worker]
    [tracker_pipe] = [t for t in fd_targets(tracker) if t.startswith("pipe:")]
    assert tracker_pipe in fd_targets(core)
    assert tracker_pipe in fd_targets(shared_engine.pid)


def test_clean_stop_removes_the_segment(engine_env: EngineEnv) -> None:
    engine = start_engine("test-org/shm-clean", weights_mb=1, extra_env=engine_env("pure"))
    try:
        path = segment_of(engine)
        assert path.exists()
        os.kill(engine.pid, signal.SIGTERM)  # the API server alone, as a supervisor would
        assert engine.process.wait(timeout=30) == 0
        assert not path.exists()
    finally:
        engine.stop()


def test_sigkill_of_the_group_leaves_the_segment_behind(engine_env: EngineEnv) -> None:
    engine = start_engine("test-org/shm-kill", weights_mb=1, extra_env=engine_env("pure"))
    path = segment_of(engine)
    sockets = state_of(engine)["zmq_sockets"]
    assert isinstance(sockets, list)
    try:
        os.killpg(engine.pid, signal.SIGKILL)  # resource tracker included
        engine.process.wait(timeout=30)
        engine.stop()
        assert path.exists()
    finally:
        engine.stop()
        path.unlink(missing_ok=True)
        for socket_path in sockets:
            Path(socket_path).unlink(missing_ok=True)


def test_sigkill_of_the_api_server_alone_leaves_cleanup_to_the_resource_tracker(
    engine_env: EngineEnv,
) -> None:
    """The core notices its parent is gone and exits; the tracker then unlinks the leak."""
    engine = start_engine("test-org/shm-api-kill", weights_mb=1, extra_env=engine_env("pure"))
    path = segment_of(engine)
    sockets = state_of(engine)["zmq_sockets"]
    assert isinstance(sockets, list)
    try:
        os.kill(engine.pid, signal.SIGKILL)
        engine.process.wait(timeout=30)
        assert wait_until(lambda: not path.exists(), 30, f"the segment {path} to be removed")
        assert "leaked shared_memory" in engine.log_text()
    finally:
        engine.stop()
        path.unlink(missing_ok=True)
        for socket_path in sockets:
            Path(socket_path).unlink(missing_ok=True)


def _greedy(engine: EngineProcess) -> str:
    body = {"model": engine.model_path, "temperature": 0.0, "max_tokens": 10,
            "messages": [{"role": "user", "content": "What is 2+2?"}]}
    r = httpx.post(f"{engine.base_url}/v1/chat/completions", json=body, timeout=60)
    r.raise_for_status()
    return str(r.json()["choices"][0]["message"]["content"])


def test_a_prefix_cache_hit_can_change_the_greedy_answer(engine_env: EngineEnv) -> None:
    """vLLM 0.24, H100, a Qwen3-8B-shaped model with random weights, no eviction: the first
    answer, then another on every repeat (the prompt's blocks from the prefix cache), until a
    sleep resets the cache. Copied where asked (LLMUX_BUILTIN_PREFIX_DRIFT=1)."""
    env = {**engine_env("pure"), "LLMUX_BUILTIN_PREFIX_DRIFT": "1"}
    with start_engine("test-org/prefix-drift", weights_mb=1, extra_env=env) as engine:
        cold = _greedy(engine)
        warm = _greedy(engine)
        assert warm != cold
        assert _greedy(engine) == warm  # stable from then on
        httpx.post(f"{engine.base_url}/sleep", params={"level": "1"}, timeout=60
                   ).raise_for_status()
        httpx.post(f"{engine.base_url}/wake_up", timeout=60).raise_for_status()
        assert _greedy(engine) == cold  # the sleep reset the prefix cache
    with start_engine("test-org/prefix-drift", weights_mb=1, extra_env=engine_env("pure")
                      ) as engine:
        assert _greedy(engine) == _greedy(engine) == cold  # off by default
