"""Fixtures for the checkpoint engine tests: real CRIU, real process trees, real mounts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from llmux.common import proctree
from llmux.service.core.criu import BUNDLE_PATH, parse_version
from llmux.service.core.engine import CheckpointEngine, EngineConfig
from tests.support.criu_testlib import TARGET, Target, TargetFactory, reap, reaping
from tests.support.procs import tmpfs_at, wait_until_async


def find_criu() -> str | None:
    for candidate in (os.environ.get("LLMUX_CRIU"), BUNDLE_PATH, shutil.which("criu")):
        if not candidate or not os.access(candidate, os.X_OK):
            continue
        out = subprocess.run([candidate, "--version"], capture_output=True, text=True).stdout
        v = parse_version(out)
        if v is not None and v.major >= 4:
            return candidate
    return None


PR_SET_CHILD_SUBREAPER = 36


def _reap_zombie_children() -> None:
    """waitpid only our children that are already zombies: never a live one's status."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z" and int(fields[1]) == me:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry), os.WNOHANG)


@pytest.fixture(autouse=True)
def subreaper() -> Iterator[None]:
    """Make the test process the reaper of the trees CRIU restores for it, for one test.

    A restored tree is reparented to the nearest subreaper (else PID 1); PID 1 of some
    sandboxes never reaps, which would leave zombies holding the PIDs a restore needs.
    Switched off again afterwards, so that tests elsewhere in the session are not left
    with orphans re-parented to pytest that nobody reaps.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        _reap_zombie_children()


@pytest.fixture(scope="session")
def criu_path() -> str:
    if os.geteuid() != 0:
        pytest.skip("CRIU tests need root")
    path = find_criu()
    if path is None:
        pytest.skip("CRIU >= 4 not installed (run packaging/criu/install-criu.sh)")
    return path


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


OpenEngine = Callable[..., Awaitable[CheckpointEngine]]


@pytest.fixture
def open_engine(criu_path: str, state_dir: Path) -> OpenEngine:
    """open_engine(**settings): an engine on the test's state folder and CRIU, CUDA off;
    ``settings`` are EngineConfig's (state_dir too)."""

    async def open_(**settings: Any) -> CheckpointEngine:
        eng = await CheckpointEngine.open(EngineConfig(
            **{"state_dir": state_dir, "criu_path": criu_path, "cuda_mode": "off", **settings}))
        eng.pid_free_timeout = 1.0
        return eng

    return open_


@pytest.fixture
async def engine(open_engine: OpenEngine) -> CheckpointEngine:
    return await open_engine()


@pytest.fixture
async def spawn_target(tmp_path: Path) -> AsyncIterator[TargetFactory]:
    """Starts target trees as children of the test (their own session, stdio on /dev/null);
    every one is killed at teardown, restored or not. A background reaper collects their
    zombies as the shim (their real parent) would: a restore needs the PIDs free."""
    started: list[Target] = []

    def reapable() -> list[int]:
        out = []
        for t in started:
            out.append(t.child)
            if t.proc.returncode is not None:  # the original root was reaped by asyncio
                out.append(t.pid)
        return out

    async def spawn(ballast_mb: int = 0) -> Target:
        workdir = tmp_path / f"target{len(started)}"
        workdir.mkdir()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(TARGET),
            str(workdir),
            str(ballast_mb),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        ready = workdir / "ready"

        def is_ready() -> bool:
            if proc.returncode is not None:
                raise RuntimeError(f"target exited with {proc.returncode}")
            return ready.exists()

        await wait_until_async(is_ready, 30, f"the target in {workdir} to be ready")
        info = json.loads(ready.read_text())
        t = Target(workdir, info["pid"], info["child"], info["port"], info["ipc"], proc)
        started.append(t)
        return t

    async with reaping(reapable):
        yield spawn
        for t in started:
            t.kill()
        for t in started:
            if t.proc.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(t.proc.wait(), 10)
            for _ in range(100):
                if not proctree.taken(t.pids):
                    break
                await asyncio.sleep(0.05)
        for t in started:
            with contextlib.suppress(OSError):
                os.unlink(t.ipc.removeprefix("ipc://"))
    reap(reapable())


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted at teardown."""
    with tmpfs_at(tmp_path / "tiny", 1) as mnt:
        yield mnt
