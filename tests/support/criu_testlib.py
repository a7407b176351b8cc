"""Helpers shared by the checkpoint engine's tests (tests/service/core): the target tree
(criu_target.py), reaping, and criu wrappers that block or fail at a stage."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from llmux.common import proctree

TARGET = Path(__file__).with_name("criu_target.py")


def reap(pids: list[int]) -> None:
    """Collect the test's own zombies (restored trees are reparented to the test)."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


@contextlib.asynccontextmanager
async def reaping(pids: Callable[[], list[int]],
                  poll: Callable[[], object] = lambda: None) -> AsyncIterator[None]:
    """While inside, every 50 ms: poll(), then reap(pids()): the test stands in for the real
    parent (the shim) of what it starts and restores."""

    async def loop() -> None:
        while True:
            poll()
            reap(pids())
            await asyncio.sleep(0.05)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@dataclass
class Target:
    """A running test tree (see criu_target.py)."""

    workdir: Path
    pid: int
    child: int
    port: int
    ipc: str
    proc: asyncio.subprocess.Process

    @property
    def pids(self) -> list[int]:
        return [self.pid, self.child]

    async def ping(self, timeout: float = 10.0) -> list[str]:
        async def go() -> list[str]:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            writer.write(b"ping\n")
            await writer.drain()
            line = await reader.readline()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return line.decode().split()

        return await asyncio.wait_for(go(), timeout)

    def alive(self) -> bool:
        return all(proctree.exists(p) for p in self.pids)

    def ours(self, pid: int) -> bool:
        return str(self.workdir) in proctree.cmdline(pid)

    def kill(self) -> None:
        for pid in self.pids:
            if self.ours(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


TargetFactory = Callable[..., Awaitable[Target]]


def blocking_criu(
    tmp_path: Path, real: str, stage: str = "post-dump", fail: bool = False
) -> tuple[str, Path]:
    """A criu wrapper whose dump runs an action script that blocks (or fails) at a stage.

    Returns (wrapper path, marker file that appears when the stage is reached).
    """
    marker = tmp_path / f"at-{stage}"
    act = tmp_path / "action.sh"
    then = "exit 1" if fail else "exec sleep 120"
    act.write_text(
        "#!/bin/sh\n"
        f'if [ "$CRTOOLS_SCRIPT_ACTION" = "{stage}" ]; then touch "{marker}"; {then}; fi\n'
        "exit 0\n"
    )
    act.chmod(0o755)
    wrapper = tmp_path / "criu-wrapper"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = dump ]; then exec "{real}" "$@" --action-script "{act}"; fi\n'
        f'exec "{real}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper), marker


def criu_after_dump(tmp_path: Path, real: str, then: str) -> tuple[str, Path]:
    """A criu wrapper whose dump succeeds for real, then runs a shell command (e.g. "exit 1",
    "exec sleep 120") as if CRIU failed or hung on its way out. Returns (wrapper, marker)."""
    marker = tmp_path / "dump-done"
    wrapper = tmp_path / "criu-after"
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = dump ]; then\n'
        f'  "{real}" "$@" || exit $?\n'
        f'  touch "{marker}"\n'
        f"  {then}\n"
        "fi\n"
        f'exec "{real}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper), marker
