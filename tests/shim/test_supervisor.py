"""The engine supervisor with real built-in engine processes on free loopback ports."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmux.shim.config import Config
from llmux.shim.errors import EngineFailed
from llmux.shim.supervisor import Supervisor
from tests.support.procs import wait_until_async


def _fd_targets(pid: int) -> dict[int, str]:
    out: dict[int, str] = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
    return out


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(x.decode().split("=", 1) for x in raw if b"=" in x)


async def test_spawn_clean_fds_env_session_and_stop(
        builtin_config: Callable[..., Config], sentinel_fd: tuple[int, Path], procs: Any) -> None:
    cfg = builtin_config(["m1"], m1={"env": {"LLMUX_TEST_VAR": "hello"}})
    sup = Supervisor(cfg)
    pids: list[int] = []
    try:
        eng = await sup.spawn("m1")
        pid = eng.root_pid
        pids = sup.pids("m1")
        procs.track(*pids)
        assert pids[0] == pid and len(pids) >= 2, "API server and engine core"
        # it answers on its port
        r = await sup.engines.call("m1", "GET", "/health")
        assert r.status_code == 200
        state = (await sup.engines.call("m1", "GET", "/engine_state")).json()
        assert state["pid_api"] == pid and state["pid_core"] in pids

        # argv exactly as configured, no shell in between
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        assert cmdline == sup.argv(cfg.models["m1"])
        assert cmdline[:3] == [sys.executable, "-m", "llmux.shim.builtin"]
        assert "--weights-mb" in cmdline and "--enable-sleep-mode" not in cmdline
        # run through the launcher: io_uring is unavailable in the whole tree
        for p in pids:
            status = Path(f"/proc/{p}/status").read_text()
            assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status, p
            assert "anon_inode:[io_uring]" not in _fd_targets(p).values()

        # stdin /dev/null, stdout+stderr the per-model log, nothing inherited
        fds = _fd_targets(pid)
        log_path = str(sup.log_path("m1"))
        assert fds[0] == "/dev/null"
        assert fds[1] == log_path and fds[2] == log_path
        fd, sentinel = sentinel_fd
        assert os.get_inheritable(fd), "the sentinel would be inherited without close_fds"
        for p in pids:
            assert str(sentinel) not in _fd_targets(p).values(), f"pid {p} inherited the sentinel"
        assert stat.S_IMODE(os.stat(log_path).st_mode) == 0o600
        flags = int(Path(f"/proc/{pid}/fdinfo/1").read_text().split("flags:")[1].split()[0], 8)
        assert flags & os.O_APPEND

        # environment
        env = _environ(pid)
        assert env["NO_COLOR"] == "1"
        assert env["VLLM_SERVER_DEV_MODE"] == "1"
        assert env["UV_USE_IO_URING"] == "0"
        assert env["LLMUX_TEST_VAR"] == "hello"

        # own session and process group
        assert os.getsid(pid) == pid and os.getpgid(pid) == pid
        assert os.getsid(pid) != os.getsid(0)

        # stop ends the whole tree and reaps it
        rc = await sup.stop("m1")
        assert rc is not None
        assert not any(procs.running(p) for p in pids), "no process of the tree is left"
        assert not sup.is_alive("m1") and sup.pids("m1") == []
        assert "starting" in Path(log_path).read_text()
    finally:
        await sup.aclose()


def test_fd_hygiene_under_uvloop(builtin_config: Callable[..., Config],
                                 sentinel_fd: tuple[int, Path], procs: Any) -> None:
    """The shim runs on uvloop, whose own subprocess support ignores close_fds."""
    uvloop = pytest.importorskip("uvloop")
    cfg = builtin_config(["m1"])
    _, sentinel = sentinel_fd

    async def check() -> dict[int, dict[int, str]]:
        sup = Supervisor(cfg)
        try:
            await sup.spawn("m1")
            pids = sup.pids("m1")
            procs.track(*pids)
            return {p: _fd_targets(p) for p in pids}
        finally:
            await sup.aclose()

    fds = uvloop.run(check())
    root = next(iter(fds))
    assert fds[root][0] == "/dev/null"
    for pid, targets in fds.items():
        assert str(sentinel) not in targets.values(), f"pid {pid} inherited the sentinel"
    assert not procs.any_running(list(fds))


async def test_early_exit_is_reported_with_log_tail(builtin_config: Callable[..., Config]) -> None:
    script = "import sys; print('fatal: no such model, bad flag', flush=True); sys.exit(3)"
    cfg = builtin_config(["broken"], broken={"command": [sys.executable, "-c", script]})
    sup = Supervisor(cfg)
    try:
        with pytest.raises(EngineFailed) as info:
            await sup.spawn("broken")
        msg = info.value.message
        assert "broken" in msg and "exit code 3" in msg and "during start-up" in msg
        assert "fatal: no such model, bad flag" in msg
        assert not sup.is_alive("broken")
    finally:
        await sup.aclose()


async def test_startup_timeout_kills_the_whole_tree(
        builtin_config: Callable[..., Config], procs: Any) -> None:
    marker = f"llmux-test-{uuid.uuid4().hex}"
    # ignores SIGTERM and has a child: both must be gone after SIGKILL
    script = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
              f" subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', "
              f"'{marker}']); print('loading weights...', flush=True); time.sleep(300)")
    cfg = builtin_config(["slow"], slow={"command": [sys.executable, "-c", script, marker],
                                         "startup_timeout_secs": 1.5})
    sup = Supervisor(cfg, grace_secs=0.5)
    try:
        with pytest.raises(EngineFailed) as info:
            await sup.spawn("slow")
        msg = info.value.message
        assert "slow" in msg and "within 1.5 s" in msg and "loading weights..." in msg
        assert procs.pids_with_marker(marker) == []
    finally:
        await sup.aclose()
        procs.track(*procs.pids_with_marker(marker))


async def test_missing_command_is_a_clear_error(builtin_config: Callable[..., Config]) -> None:
    cfg = builtin_config(["m1"], m1={"command": ["/nonexistent/vllm"]})
    sup = Supervisor(cfg)
    try:
        with pytest.raises(EngineFailed, match=r"m1: cannot start engine '/nonexistent/vllm'"):
            await sup.spawn("m1")
    finally:
        await sup.aclose()


async def test_sigkill_is_detected_and_the_rest_of_the_tree_ended(
        builtin_config: Callable[..., Config], procs: Any) -> None:
    cfg = builtin_config(["m1"])
    sup = Supervisor(cfg, grace_secs=2)
    deaths: asyncio.Queue[tuple[str, int | None]] = asyncio.Queue()
    sup.add_death_listener(lambda m, rc: deaths.put_nowait((m, rc)))
    pids: list[int] = []
    try:
        eng = await sup.spawn("m1")
        pids = sup.pids("m1")
        procs.track(*pids)
        os.kill(eng.root_pid, signal.SIGKILL)
        model, rc = await asyncio.wait_for(deaths.get(), 30)
        assert (model, rc) == ("m1", -signal.SIGKILL)
        assert not sup.is_alive("m1")
        # the engine core goes with it (no GPU holder left behind)
        assert await procs.wait_gone(pids)
        # a new engine can be started for the model afterwards
        await sup.spawn("m1")
        assert sup.is_alive("m1")
        procs.track(*sup.pids("m1"))
    finally:
        await sup.aclose()


def _start_foreign_engine(cfg: Config, model: str) -> subprocess.Popen[bytes]:
    """An engine tree this supervisor did not spawn (as a restore would hand over)."""
    sup = Supervisor(cfg)
    argv = sup.argv(cfg.models[model])
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


async def _wait_health(port: int) -> None:
    async with httpx.AsyncClient(trust_env=False) as c:
        for _ in range(1200):
            try:
                if (await c.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("foreign engine never became healthy")


async def test_adopt_tracks_reports_death_and_stops(
        builtin_config: Callable[..., Config], procs: Any) -> None:
    cfg = builtin_config(["m1"])
    foreign = _start_foreign_engine(cfg, "m1")
    sup = Supervisor(cfg, grace_secs=2)
    deaths: list[tuple[str, int | None]] = []
    sup.add_death_listener(lambda m, rc: deaths.append((m, rc)))
    pids: list[int] = [foreign.pid]
    try:
        await _wait_health(cfg.models["m1"].port)
        state = (await httpx.AsyncClient(trust_env=False).get(
            f"http://127.0.0.1:{cfg.models['m1'].port}/engine_state")).json()
        eng = await sup.adopt("m1", foreign.pid, [foreign.pid, state["pid_core"]])
        await sup.wait_healthy("m1", within_secs=10)
        assert eng.adopted and sup.is_alive("m1")
        pids = sup.pids("m1")
        procs.track(*pids)
        assert pids[0] == foreign.pid and state["pid_core"] in pids
        await asyncio.sleep(0.5)
        assert all(procs.running(p) for p in pids), "adopted processes are never killed as strays"
        assert deaths == []
        # stop ends the adopted tree, which is not our child (the test process reaps it)
        await sup.stop("m1")
        assert foreign.wait(timeout=30) is not None
        assert not any(procs.running(p) for p in pids)
        assert deaths == [], "a stop is not a crash"
    finally:
        await sup.aclose()
        foreign.kill()
        foreign.wait()


async def test_adopted_death_is_reported(
        builtin_config: Callable[..., Config], procs: Any) -> None:
    cfg = builtin_config(["m1"])
    foreign = _start_foreign_engine(cfg, "m1")
    sup = Supervisor(cfg, grace_secs=2)
    deaths: asyncio.Queue[tuple[str, int | None]] = asyncio.Queue()
    sup.add_death_listener(lambda m, rc: deaths.put_nowait((m, rc)))
    pids: list[int] = [foreign.pid]
    try:
        await _wait_health(cfg.models["m1"].port)
        await sup.adopt("m1", foreign.pid)
        await sup.wait_healthy("m1", within_secs=10)
        pids = sup.pids("m1")
        procs.track(*pids)
        foreign.kill()
        foreign.wait()
        assert await asyncio.wait_for(deaths.get(), 30) == ("m1", None)
        assert not sup.is_alive("m1")
        assert await procs.wait_gone(pids)
    finally:
        await sup.aclose()


async def test_adopting_a_missing_pid_fails(builtin_config: Callable[..., Config]) -> None:
    cfg = builtin_config(["m1"])
    sup = Supervisor(cfg)
    proc = subprocess.Popen(["true"])
    proc.wait()
    try:
        with pytest.raises(EngineFailed, match="no such process"):
            await sup.adopt("m1", proc.pid)
    finally:
        await sup.aclose()


def test_vllm_argv_is_a_list_with_extra_args(builtin_config_dict: Callable[..., Any]) -> None:
    from llmux.shim.config import config_from_dict

    raw = builtin_config_dict(["q"], q={"engine": "vllm", "extra_args": ["--max-model-len",
                                                                          "4096; rm -rf /"]})
    raw["vllm_command"] = "/opt/vllm env/bin/vllm"
    cfg = config_from_dict(raw)
    argv = Supervisor(cfg).argv(cfg.models["q"])
    port = str(cfg.models["q"].port)
    assert argv == ["/opt/vllm env/bin/vllm", "serve", "llmux-test/q", "--host", "127.0.0.1",
                    "--port", port, "--served-model-name", "q",
                    "--max-model-len", "4096; rm -rf /"]
    # sleep mode only for an eviction that sleeps, or when the model asks for it
    for extra, flagged in (({"eviction": "offload+keep_running"}, True),
                           ({"eviction": "discard+stop"}, True),
                           ({"eviction": "retain+checkpoint"}, False),
                           ({"eviction": "retain+stop", "sleep_mode": True}, True)):
        raw = builtin_config_dict(["q"], q={"engine": "vllm", **extra})
        cfg = config_from_dict(raw)
        assert ("--enable-sleep-mode" in Supervisor(cfg).argv(cfg.models["q"])) is flagged, extra


def test_connections_to_counts_live_tcp_connections_to_a_port() -> None:
    import socket

    from llmux.common.resources import connections_to as open_connections
    from tests.support.procs import wait_until

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert open_connections(port) == 0  # the listener alone is not a connection
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        assert open_connections(port) == 1  # the accepted end, local port == port
        client.close()
        accepted.close()
        # the server side closes second (LAST_ACK, then gone): nothing left that a dump carries
        wait_until(lambda: open_connections(port) == 0, 5, "the connection to close")



async def test_what_a_tree_leaves_behind_is_removed_when_it_ends(
        builtin_config: Callable[..., Config], procs: Any) -> None:
    """The engine's TMPDIR (its ZMQ ipc sockets) and its /dev/shm segment outlive a
    SIGKILLed tree; the supervisor removes them, and touches nothing else."""
    import signal

    cfg = builtin_config(["m1", "m2"])
    sup = Supervisor(cfg)
    try:
        eng = await sup.spawn("m1")
        other = await sup.spawn("m2")
        procs.track(*sup.pids("m1"), *sup.pids("m2"))
        tmp = sup.tmp_dir("m1")
        assert any(p.is_socket() for p in tmp.iterdir()), sorted(tmp.iterdir())
        state = (await sup.engines.call("m1", "GET", "/engine_state")).json()
        [segment] = state["shm_segments"]
        assert Path(segment).exists()
        os.killpg(eng.root_pid, signal.SIGKILL)
        await wait_until_async(lambda: not tmp.exists() and not Path(segment).exists(), 10,
                               f"{tmp} and {segment} to go with their tree")
        assert not tmp.exists(), f"{tmp} outlived its tree"
        assert not Path(segment).exists(), f"{segment} outlived its tree"
        # the other engine's files are untouched, and it still answers
        assert sup.tmp_dir("m2").is_dir() and other.alive
        other_state = (await sup.engines.call("m2", "GET", "/engine_state")).json()
        [other_segment] = other_state["shm_segments"]
        assert Path(other_segment).exists()
        await sup.stop("m2")
        assert not sup.tmp_dir("m2").exists() and not Path(other_segment).exists()
    finally:
        await sup.aclose()


def test_the_launch_report_is_read_from_any_fd_number() -> None:
    """A shim holding thousands of connections opens the launcher's pipe past FD_SETSIZE
    (1024), where select() refuses ("filedescriptor out of range"): the report is still read."""
    import resource

    from llmux.shim.supervisor import _read_init_pid

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    high = 1500
    if hard != resource.RLIM_INFINITY and hard <= high:
        pytest.skip(f"the hard fd limit ({hard}) is below fd {high}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, high + 1), hard))
    try:
        r, w = os.pipe()
        os.dup2(r, high)
        os.close(r)
        os.write(w, b"4242\n")
        os.close(w)
        assert _read_init_pid(high) == 4242  # and the fd is closed
        with pytest.raises(OSError):
            os.fstat(high)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
