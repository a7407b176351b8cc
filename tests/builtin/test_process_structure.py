"""vLLM's process shape: API server + engine-core child over ZMQ ipc, and their lifecycle."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import stat
import time
from pathlib import Path

import httpx
import pytest

from llmux.shim.builtin.checkpoint import ModelConfig
from llmux.shim.builtin.testing import EngineProcess, spawn_engine, start_engine
from tests.support.builtin_engine import EngineEnv
from tests.support.procs import wait_until

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
O_APPEND = 0o2000


def state_of(engine: EngineProcess) -> dict[str, object]:
    body: dict[str, object] = httpx.get(f"{engine.base_url}/engine_state").json()
    return body


def core_pid(engine: EngineProcess) -> int:
    pid = state_of(engine)["pid_core"]
    assert isinstance(pid, int)
    return pid


def gone(pid: int) -> bool:
    """The process has ended: no longer there, or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return True
    return fields[0] == "Z"


def wait_until_gone(pid: int, seconds: float = 30.0) -> bool:
    return wait_until(lambda: gone(pid), seconds, f"the engine core {pid} to end")


def test_api_server_and_engine_core_are_parent_and_child(shared_engine: EngineProcess) -> None:
    """The API server's children: the engine core and multiprocessing's resource tracker."""
    state = state_of(shared_engine)
    assert state["pid_api"] == shared_engine.pid
    core = core_pid(shared_engine)
    children = shared_engine.child_pids()
    assert core in children and len(children) == 2
    status = Path(f"/proc/{core}/status").read_text()
    assert f"PPid:\t{shared_engine.pid}\n" in status
    cmdline = Path(f"/proc/{core}/cmdline").read_bytes().split(b"\0")
    assert b"llmux.shim.builtin.engine_core" in cmdline
    assert os.readlink(f"/proc/{core}/fd/0") == "/dev/null"


def test_zmq_ipc_sockets_live_in_tmp_with_random_names(shared_engine: EngineProcess) -> None:
    sockets = state_of(shared_engine)["zmq_sockets"]
    assert isinstance(sockets, list) and len(sockets) == 2
    bound = Path("/proc/net/unix").read_text()
    for path in sockets:
        assert Path(path).parent == Path("/tmp")
        assert UUID_RE.match(Path(path).name)
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert path in bound


def test_engine_core_keeps_a_jit_log_open_for_append(
    shared_engine: EngineProcess, cache_root: Path
) -> None:
    jit_log = state_of(shared_engine)["jit_log"]
    assert isinstance(jit_log, str)
    assert Path(jit_log).parent == cache_root / "xdg" / "llmux-builtin" / "jit"
    assert re.match(r"^shared-model-[0-9a-f]{12}\.log$", Path(jit_log).name)
    core = core_pid(shared_engine)
    open_fds = {fd.name: os.readlink(fd) for fd in Path(f"/proc/{core}/fd").iterdir()}
    [fd] = [fd for fd, target in open_fds.items() if target == jit_log]
    flags = int(Path(f"/proc/{core}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
    assert flags & O_APPEND
    assert "graphs ready" in Path(jit_log).read_text()


def test_health_is_503_until_the_engine_core_is_ready(
    engine_env: EngineEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The core waits on the checkpoint lock we hold, so 'starting' lasts as long as we like."""
    env = engine_env("pure")
    model = "test-org/slow-start"
    monkeypatch.setenv("HF_HOME", env["HF_HOME"])
    directory = ModelConfig.for_model(model, "pure", 1).directory
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        engine = spawn_engine(model, weights_mb=1, extra_env=env)
        try:
            status = None
            while status is None:
                engine._check_not_exited()
                try:
                    status = httpx.get(f"{engine.base_url}/health").status_code
                except httpx.TransportError:
                    time.sleep(0.05)
            assert status == 503
            completion = httpx.post(f"{engine.base_url}/v1/completions", json={"prompt": "x"})
            assert completion.status_code == 503
            assert "starting" in completion.json()["error"]["message"]
            fcntl.flock(lock, fcntl.LOCK_UN)
            engine.wait_ready()
            assert httpx.get(f"{engine.base_url}/health").status_code == 200
        finally:
            engine.stop()


def test_vllm_only_options_are_accepted_and_ignored(engine_env: EngineEnv) -> None:
    extra = ["--gpu-memory-utilization", "0.5", "--enforce-eager", "--tensor-parallel-size", "1",
             "--disable-custom-all-reduce", "--max-num-seqs=8", "--served-model-name", "alias"]
    with start_engine("test-org/flags", weights_mb=1, extra_args=extra,
                      extra_env=engine_env("pure")) as engine:
        assert httpx.get(f"{engine.base_url}/v1/models").json()["data"][0]["id"] == "alias"
        ok = httpx.post(f"{engine.base_url}/v1/completions", json={"model": "alias", "prompt": "x"})
        assert ok.status_code == 200
        log = engine.log_text()
    assert "Ignoring vLLM option(s)" in log
    assert "--gpu-memory-utilization 0.5" in log


def test_sigterm_stops_both_processes_cleanly(engine_env: EngineEnv) -> None:
    with start_engine("test-org/sigterm", weights_mb=1, extra_env=engine_env("pure")) as engine:
        state = state_of(engine)
        core = core_pid(engine)
        sockets = state["zmq_sockets"]
        assert isinstance(sockets, list)
        os.kill(engine.pid, signal.SIGTERM)  # the API server alone, as a supervisor would
        assert engine.process.wait(timeout=30) == 0
        assert wait_until_gone(core)
        assert not any(Path(p).exists() for p in sockets)
        assert "Shutdown requested by the API server" in engine.log_text()


def test_api_server_exits_non_zero_when_the_engine_core_dies(engine_env: EngineEnv) -> None:
    with start_engine("test-org/core-dies", weights_mb=1, extra_env=engine_env("pure")) as engine:
        os.kill(core_pid(engine), signal.SIGKILL)
        assert engine.process.wait(timeout=30) == 1
        assert "died unexpectedly" in engine.log_text()


def test_engine_core_exits_when_the_api_server_is_killed(engine_env: EngineEnv) -> None:
    with start_engine("test-org/api-dies", weights_mb=1, extra_env=engine_env("pure")) as engine:
        core = core_pid(engine)
        sockets = state_of(engine)["zmq_sockets"]
        assert isinstance(sockets, list)
        os.kill(engine.pid, signal.SIGKILL)
        engine.process.wait(timeout=30)
        assert wait_until_gone(core)
    for path in sockets:  # a killed server cannot remove its socket files; do it for it
        Path(path).unlink(missing_ok=True)


def test_engine_that_cannot_start_exits_non_zero(engine_env: EngineEnv) -> None:
    env = engine_env("pure")
    with spawn_engine("test-org/no-cuda", weights_mb=1, extra_env=env,
                      extra_args=["--device", "cuda"]) as engine:
        assert engine.process.wait(timeout=60) == 1
        assert "needs PyTorch" in engine.log_text()


def test_a_port_in_use_is_refused_before_anything_starts(engine_env: EngineEnv) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with spawn_engine("test-org/port-clash", port, weights_mb=1,
                          extra_env=engine_env("pure")) as engine:
            assert engine.process.wait(timeout=60) == 1
            log = engine.log_text()
    assert f"Cannot serve on 127.0.0.1:{port}" in log
    assert "Started engine core" not in log


def _listening_tcp(pid: int) -> set[tuple[str, int]]:
    """(address hex, port) of the TCP sockets ``pid`` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
            address, port = fields[1].split(":")
            found.add((address, int(port, 16)))
    return found


def test_a_worker_process_under_the_engine_core_holds_the_model(
    shared_engine: EngineProcess,
) -> None:
    """vLLM's VLLM::Worker: the model (and on a GPU all CUDA state) lives in a child of the
    engine core; the core itself never loads torch."""
    state = state_of(shared_engine)
    core, worker = state["pid_core"], state["pid_worker"]
    assert isinstance(core, int) and isinstance(worker, int) and worker != core
    assert f"PPid:\t{core}\n" in Path(f"/proc/{worker}/status").read_text()
    assert b"llmux.shim.builtin.worker" in Path(f"/proc/{worker}/cmdline").read_bytes()
    assert "libtorch" not in Path(f"/proc/{core}/maps").read_text()
    if state["backend"] == "torch":
        assert "libtorch" in Path(f"/proc/{worker}/maps").read_text()
        # torch.distributed at world size 1, as vLLM's worker: gloo on the CPU, its TCP
        # store listening on loopback in the worker
        assert (state["distributed"], state["world_size"]) == ("gloo", 1)
        assert ("0100007F", state["distributed_store_port"]) in _listening_tcp(worker)
        assert state["cuda_graphs"] is False  # no graphs on the CPU
    else:
        assert state["distributed"] is None if "distributed" in state else True


def test_a_dead_worker_takes_the_engine_down(engine_env: EngineEnv) -> None:
    """The engine core cannot serve without its model: it exits, and the API server too."""
    with start_engine("test-org/worker-death", weights_mb=1,
                      extra_env=engine_env("pure")) as engine:
        worker = state_of(engine)["pid_worker"]
        assert isinstance(worker, int)
        os.kill(worker, signal.SIGKILL)
        assert engine.process.wait(timeout=30) != 0
