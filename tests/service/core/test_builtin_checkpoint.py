"""The built-in engine (API server + engine core over ZMQ ipc) through a real CRIU round trip.

The shim's discard + checkpoint flow: sleep level 2 (weights discarded), checkpoint, the
processes are gone; restore, same PIDs, wake_up and reload_weights through the engine's ZMQ
channel, and the answer is the one from before.

The engine runs on uvloop, started through llmux.shim.launch (no io_uring), and its API
server and engine core share a /dev/shm ``psm_<hex>`` segment, as vLLM's do: after the
restore both map it again and the core's counters written there reach the API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmux.common import proctree
from llmux.common.errors import CriuFailed, ManifestMismatch, PortInUse, Unsupported
from llmux.service.core.engine import Caller, CheckpointEngine
from llmux.service.core.manifest import Manifest
from llmux.shim.builtin.testing import EngineProcess, start_engine_async
from tests.support.criu_testlib import reap, reaping
from tests.support.procs import wait_until_async

pytestmark = pytest.mark.criu

ME = Caller(pid=os.getpid(), uid=0)

BACKENDS = [
    pytest.param(
        "torch",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("torch") is None, reason="PyTorch not installed"
        ),
    ),
    "pure",
]


@contextlib.asynccontextmanager
async def _reaped(engines: list[EngineProcess], pids: list[int]) -> AsyncIterator[None]:
    """Inside, the engines are polled and pids reaped: the shim (the engines' parent) does
    it for real, here the test is parent and subreaper. On leaving, the engines stop."""

    def poll() -> None:
        for e in engines:
            e.process.poll()

    try:
        async with reaping(lambda: pids, poll):
            yield
    finally:
        for e in engines:
            await e.stop_async()


@pytest.fixture(params=BACKENDS)
async def builtin(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EngineProcess]:
    env = {
        "HF_HOME": str(tmp_path / "hf"),
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
        "LLMUX_BUILTIN_BACKEND": request.param,
    }
    engine = await start_engine_async("test-org/ckpt", weights_mb=8, extra_env=env)
    pids: list[int] = proctree.tree(engine.pid)  # the worker is a grandchild
    try:
        async with _reaped([engine], pids[1:]):
            yield engine
    finally:
        for _ in range(100):
            reap(pids)
            if not proctree.taken(pids):
                break
            await asyncio.sleep(0.05)


async def _post(client: httpx.AsyncClient, path: str, **kw: Any) -> httpx.Response:
    return await client.post(path, timeout=60, **kw)


async def _text(client: httpx.AsyncClient) -> str:
    r = await _post(client, "/v1/completions", json={"prompt": "the old tower", "max_tokens": 6})
    assert r.status_code == 200, r.text
    value: str = r.json()["choices"][0]["text"]
    return value


async def test_builtin_engine_checkpoint_restore_reload(
    engine: CheckpointEngine, builtin: EngineProcess
) -> None:
    async with httpx.AsyncClient(base_url=builtin.base_url) as client:
        before = await _text(client)
        state = (await client.get("/engine_state")).json()
        core = state["pid_core"]
        assert (await _post(client, "/sleep", params={"level": 2})).status_code == 200

        began = time.monotonic()
        m = await engine.checkpoint(ME, "builtin", builtin.pid)
        dump_secs = time.monotonic() - began
        assert builtin.pid in m.pids and core in m.pids
        await wait_until_async(lambda: not proctree.taken(m.pids), 30,
                               f"the dumped tree {m.pids} to be gone")
        assert not proctree.taken(m.pids)

        began = time.monotonic()
        r = await engine.restore(ME, "builtin")
        restore_secs = time.monotonic() - began
        assert r.pids == m.pids
        after = (await client.get("/engine_state")).json()
        assert after["pid_core"] == core
        assert after["api_event_loop"] == "uvloop.Loop"
        assert after["shm_segments"] == state["shm_segments"]
        [segment] = after["shm_segments"]
        for pid in (builtin.pid, core):
            assert segment in Path(f"/proc/{pid}/maps").read_text()
        assert (await _post(client, "/wake_up")).status_code == 200
        rpc = await _post(client, "/collective_rpc", json={"method": "reload_weights"})
        assert rpc.status_code == 200, rpc.text
        assert await _text(client) == before
        # the core counts tokens in its memory and in the segment the API server reads
        shared = (await client.get("/engine_state")).json()
        assert shared["tokens_generated"] == state["tokens_generated"] + 6
        assert shared["shm_counters"]["tokens_generated"] == shared["tokens_generated"]
        print(
            f"\n[bench] builtin engine ({len(m.pids)} processes, {m.images_bytes >> 20} MiB "
            f"images): criu dump {m.dump_seconds:.2f}s (job {dump_secs:.2f}s), "
            f"restore job {restore_secs:.2f}s"
        )


# ----------------------------------------------------------------- checks before CRIU, /dev/shm


@pytest.fixture
async def pure(tmp_path: Path) -> AsyncIterator[Any]:
    """start(io_uring=False) -> a pure-backend built-in engine, reaped and stopped after."""
    engines: list[EngineProcess] = []
    known: list[int] = []
    env = {"HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "xdg"),
           "LLMUX_BUILTIN_BACKEND": "pure"}

    async def start(io_uring: bool = False) -> EngineProcess:
        e = await start_engine_async("test-org/prechecks", weights_mb=1, extra_env=env,
                                     io_uring=io_uring)
        engines.append(e)
        known.extend(proctree.tree(e.pid))
        return e

    async with _reaped(engines, known):
        yield start


async def _gone(pids: list[int]) -> None:
    await wait_until_async(lambda: (reap(pids), not proctree.taken(pids))[1], 30,
                           f"PIDs {pids} to be free (reaped)")
    assert not proctree.taken(pids), f"PIDs {proctree.taken(pids)} still taken"


async def _dumped(engine: CheckpointEngine, model: str, pid: int) -> Manifest:
    """engine.checkpoint(ME, model, pid), then _gone: the tree's PIDs are free again."""
    m = await engine.checkpoint(ME, model, pid)
    await _gone(m.pids)
    return m


async def test_io_uring_is_refused_before_criu_and_the_tree_keeps_running(
    engine: CheckpointEngine, pure: Any
) -> None:
    """An engine started without llmux's launcher holds an io_uring fd (uvloop): llmuxd
    names it instead of letting CRIU fail on it, and nothing of the tree is touched."""
    target = await pure(io_uring=True)
    with pytest.raises(Unsupported) as info:
        await engine.checkpoint(ME, "uring", target.pid)
    message = str(info.value)
    assert "anon_inode:[io_uring]" in message and f"PID {target.pid}" in message, message
    assert "llmux.shim.launch" in message
    assert not engine.store.has("uring")
    async with httpx.AsyncClient(base_url=target.base_url) as client:
        assert len(await _text(client)) > 0


async def test_dev_shm_segments_travel_in_the_checkpoint(
    engine: CheckpointEngine, pure: Any
) -> None:
    """The tree's psm_* segment is saved at dump, removed from /dev/shm, put back at
    restore; after a clean stop (which deletes it) the kept checkpoint restores again."""
    target = await pure()
    async with httpx.AsyncClient(base_url=target.base_url) as client:
        before = await _text(client)
        [segment] = (await client.get("/engine_state")).json()["shm_segments"]
        m = await engine.checkpoint(ME, "shm", target.pid)
        saved = [f for f in m.files if f.reason == "dev-shm"]
        assert [f.path for f in saved] == [segment], m.files
        assert not Path(segment).exists(), "the dumped tree's segment was left in /dev/shm"
        assert target.port in m.listen_ports
        await _gone(m.pids)

        for round_ in range(2):
            restored = await engine.restore(ME, "shm")
            assert restored.pids == m.pids
            assert Path(segment).exists()
            assert await _text(client) == before
            # a clean stop of the restored engine deletes its segment, as vLLM's does
            os.killpg(m.root_pid, signal.SIGTERM)
            await _gone(m.pids)
            assert not Path(segment).exists(), f"round {round_}: segment survived SIGTERM"
        assert engine.store.has("shm")


async def test_a_taken_port_is_refused_before_criu(
    engine: CheckpointEngine, pure: Any
) -> None:
    target = await pure()
    m = await _dumped(engine, "port", target.pid)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", target.port))
        squatter.listen()
        with pytest.raises(PortInUse) as info:
            await engine.restore(ME, "port")
        message = str(info.value)
        assert f"port {target.port}" in message and f"PID {os.getpid()}" in message, message
        assert not proctree.taken(m.pids), "nothing was restored"
    assert engine.store.has("port")
    restored = await engine.restore(ME, "port")
    assert restored.pids == m.pids
    async with httpx.AsyncClient(base_url=target.base_url) as client:
        assert len(await _text(client)) > 0


async def test_a_failed_restore_takes_back_the_files_it_put_back(
    engine: CheckpointEngine, pure: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = await pure()
    m = await _dumped(engine, "undo", target.pid)
    [segment] = [f.path for f in m.files if f.reason == "dev-shm"]
    # CRIU fails at its very end, the whole tree restored (CRIU's FI_POST_RESTORE)
    monkeypatch.setenv("CRIU_FAULT", "6")
    with pytest.raises(CriuFailed):
        await engine.restore(ME, "undo")
    monkeypatch.delenv("CRIU_FAULT")
    assert not Path(segment).exists(), "a failed restore left its /dev/shm file behind"
    await _gone(m.pids)
    assert engine.store.has("undo")
    assert (await engine.restore(ME, "undo")).pids == m.pids


async def test_a_missing_file_the_tree_had_open_is_refused_before_criu(
    engine: CheckpointEngine, pure: Any
) -> None:
    target = await pure()
    async with httpx.AsyncClient(base_url=target.base_url) as client:
        jit_log = Path((await client.get("/engine_state")).json()["jit_log"])
    m = await engine.checkpoint(ME, "files", target.pid)
    assert str(jit_log) in m.external_files, m.external_files
    await _gone(m.pids)
    moved = jit_log.with_name(jit_log.name + ".away")
    jit_log.rename(moved)
    try:
        with pytest.raises(ManifestMismatch, match=str(jit_log)):
            await engine.restore(ME, "files")
        assert not proctree.taken(m.pids)
    finally:
        moved.rename(jit_log)
    assert (await engine.restore(ME, "files")).pids == m.pids
