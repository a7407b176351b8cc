"""Process helpers shared by the test folders and the benchmarks: one copy of each.

``tests.support.procs``: pytest puts the repository root on sys.path (pyproject's
``pythonpath``); the benchmarks run as ``python -m tests.bench.NAME`` from the root.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

# one copy of each: "alive" is the core's (exists and is not a zombie), free_port the
# built-in engine's test helper's (imported when called: it brings httpx)
from llmux.common.proctree import exists as pid_alive

T = TypeVar("T")


def _timed_out(what: str, timeout: float, last: object) -> AssertionError:
    return AssertionError(f"timed out after {timeout:g} s waiting for {what} "
                          f"(last value seen: {last!r})")


def wait_until(predicate: Callable[[], T], timeout: float, what: str,
               interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns a true value, and return that value.

    The suite's one wait: a timeout fails the test with an AssertionError naming ``what``
    was awaited and the last value ``predicate`` returned."""
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, last)
        time.sleep(interval)


async def wait_until_async(predicate: Callable[[], T], timeout: float, what: str,
                           interval: float = 0.05) -> T:
    """wait_until for a test running in the event loop: polls with ``asyncio.sleep``, so
    that what the loop must process first (a lifecycle's clean-up) goes on meanwhile."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, last)
        await asyncio.sleep(interval)


def free_port() -> int:
    """A free loopback port (llmux.shim.builtin.testing's)."""
    from llmux.shim.builtin.testing import free_port as builtin_free_port

    return builtin_free_port()


def processes_tagged(tag: str) -> list[int]:
    """Live PIDs whose environment carries LLMUX_TEST_TAG=tag (engines, restored or not)."""
    needle = f"LLMUX_TEST_TAG={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def kill_tagged(tag: str, timeout: float = 30.0) -> list[int]:
    """SIGKILL every live process carrying the tag; wait until none is left alive."""
    left = processes_tagged(tag)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if left:
        wait_until(lambda: not any(pid_alive(p) for p in left), timeout,
                   f"processes {left} to die")
    return left


def drop_caches() -> bool:
    """Write back dirty pages and empty the page cache, so that reads hit the disk (root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def proc_stats() -> Iterator[tuple[int, str]]:
    """(PID, the text of /proc/PID/stat) of every process still there when read."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            yield int(entry), Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue


def free_ports(n: int) -> list[int]:
    """n distinct free ports (sockets held open together so none repeats)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def tmpfs_at(directory: Path, size_mb: int) -> Iterator[Path]:
    """A root-only tmpfs of ``size_mb`` MiB mounted on ``directory`` (made), unmounted after:
    a state folder that fills up on cue."""
    directory.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs",
                    str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def mount_overlay(directory: Path, lower: str = "/") -> Path:
    """An overlay of ``lower`` with its upper, work and merged directories in ``directory``
    (made here): a container's root filesystem. Returns the merged directory (root)."""
    upper, work, merged = directory / "upper", directory / "work", directory / "merged"
    for d in (upper, work, merged):
        d.mkdir(parents=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)], check=True)
    return merged


def stop_shims(started: list[Any], tag: str) -> None:
    """Stops every shim a fixture started, then checks that none left an engine running."""
    for shim in started:
        shim.stop()
    leftovers = kill_tagged(tag)
    assert not leftovers, f"engines left running after the shim stopped: {leftovers}"


def marked_roots(entry: str) -> list[int]:
    """One PID per live engine whose processes carry ``entry`` (NAME=VALUE) in their
    environment: the session leaders. Engines lead their own session (spawned or restored
    by CRIU, which keeps it), so two sessions are two engines. Parentage would mislead: a
    task CRIU is restoring shows CRIU's environment until its memory is back."""
    want = entry.encode()
    sessions: set[int] = set()
    for pid, stat in proc_stats():
        fields = stat.rsplit(")", 1)[1].split()
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if want in env and fields[0] != "Z":
            sessions.add(int(fields[3]))
    return sorted(sessions)


def hold_pid(pid: int, tries: int = 50) -> subprocess.Popen[bytes] | None:
    """A process that holds exactly this PID (the host's ns_last_pid set to the PID before
    it, then a fork), or None when another process took it first. The counter is put back
    afterwards, so that other processes do not go on to take the PIDs right after it."""
    last = Path("/proc/sys/kernel/ns_last_pid")
    before = int(last.read_text())
    try:
        for _ in range(tries):
            last.write_text(str(pid - 1))
            p = subprocess.Popen(["sleep", "300"])
            if p.pid == pid:
                return p
            p.kill()
            p.wait()
        return None
    finally:
        if int(last.read_text()) < before:
            last.write_text(str(before))
