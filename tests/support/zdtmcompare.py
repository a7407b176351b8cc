"""What CRIU's zdtm compares between a task before a dump and after its restore: its open
files, its memory maps (path and size) and its mountinfo; and a process's RSS and fds."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections import Counter
from pathlib import Path

from llmux.common import proctree

_KERNEL_OBJECT = re.compile(r"^(socket|pipe|anon_inode:\[?[a-z_]+\]?)(:\[\d+\])?$")


def fds(pid: int) -> list[tuple[int, str]]:
    """fd -> what it names; a socket's or pipe's inode is new after a restore (zdtm too
    compares their kind, not their number)."""
    out = []
    base = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(base):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(base / fd)
            m = _KERNEL_OBJECT.match(target)
            out.append((int(fd), m.group(1) if m else target))
    return sorted(out)


def maps(pid: int) -> Counter[tuple[str, int]]:
    """(path, size) of every file-backed or named mapping."""
    found: Counter[tuple[str, int]] = Counter()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6:
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        found[(parts[5], hi - lo)] += 1
    return found


def mountinfo(pid: int) -> list[tuple[str, ...]]:
    """Mount point, options, fs type, source, super options: the IDs are not compared."""
    out = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fields = left.split()
        out.append((fields[4], fields[5], *right.split()))
    return sorted(out)


def snapshot(pids: list[int]) -> dict[int, tuple[object, ...]]:
    return {pid: (fds(pid), maps(pid), mountinfo(pid)) for pid in pids}


def usage(pid: int) -> tuple[int, int]:
    """(RSS bytes, open fds) of a process."""
    rss = proctree.rss_bytes([pid])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))




def differences(first: dict[int, tuple[object, ...]], now: dict[int, tuple[object, ...]]
                ) -> list[str]:
    """What differs, per PID and aspect (empty: the same)."""
    out = []
    for pid, before in first.items():
        after = now.get(pid)
        if after is None:
            out.append(f"PID {pid} is missing")
            continue
        for name, a, b in zip(("fds", "maps", "mountinfo"), before, after, strict=True):
            if a != b:
                if isinstance(a, Counter) and isinstance(b, Counter):
                    out.append(f"{name} of {pid}: gone {dict(a - b)}, new {dict(b - a)}")
                elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
                    gone = [x for x in a if x not in b]
                    new = [x for x in b if x not in a]
                    out.append(f"{name} of {pid}: gone {gone[:5]}, new {new[:5]}")
                else:
                    out.append(f"{name} of {pid} differ")
    return out


def settled(pids: list[int], secs: float = 10.0) -> dict[int, tuple[object, ...]]:
    """A snapshot the tree keeps for 0.2 s: the connection of the last answer closed, for
    one (the server closes its end a moment after the client)."""
    last = snapshot(pids)
    deadline = time.monotonic() + secs
    while True:
        time.sleep(0.2)
        now = snapshot(pids)
        if not differences(last, now) or time.monotonic() > deadline:
            return now
        last = now


def assert_same(first: dict[int, tuple[object, ...]], pids: list[int], what: str) -> None:
    """The restored tree matches ``first``, allowing what is in passage to settle (a
    connection being closed): a difference that stays 10 s is a failure. A process in this
    process's mount namespace is held to that namespace's mount table as it is now: other
    suites on the host mount and unmount meanwhile, and that is not the restore's doing."""
    found: list[str] = []

    def expected() -> dict[int, tuple[object, ...]]:
        own_ns = os.readlink("/proc/self/ns/mnt")
        here = mountinfo(os.getpid())
        out = dict(first)
        for pid, (f, m, _mounts) in first.items():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/ns/mnt") == own_ns:
                    out[pid] = (f, m, here)
        return out

    def same() -> bool:
        found[:] = differences(expected(), snapshot(pids))
        return not found

    deadline = time.monotonic() + 10
    while not same():
        assert time.monotonic() < deadline, f"{what}: {found}"
        time.sleep(0.2)
