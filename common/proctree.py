"""Process trees read from /proc: who belongs to a tree, who holds a PID, when PIDs are free.

Everything here reads /proc directly (no library exposes mountinfo, map_files or the
zombie-versus-reaped distinction that a restore depends on). A process may vanish between
any two reads, so every reader treats a missing /proc entry as "gone", never as an error;
only require() and tree(), asked for one process that must be there, raise ProcessNotFound.
That is this module's own exception, not a D-Bus error: the shim reads its trees here too,
and llmuxd's core answers it as org.llmux.Error.NoSuchProcess.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


class ProcessNotFound(LookupError):
    """No live process has the PID (never was, gone, or a zombie); the message says which."""


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/PID/stat that the engine needs."""

    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    start_time: int
    """Clock ticks since boot; with the PID it names one process for its whole life."""


def parse_stat(text: str) -> ProcStat:
    # comm may contain spaces and parentheses: it ends at the last ')'.
    open_paren = text.index("(")
    close_paren = text.rindex(")")
    pid = int(text[:open_paren])
    comm = text[open_paren + 1 : close_paren]
    rest = text[close_paren + 2 :].split()
    return ProcStat(
        pid=pid,
        comm=comm,
        state=rest[0],
        ppid=int(rest[1]),
        pgrp=int(rest[2]),
        session=int(rest[3]),
        start_time=int(rest[19]),
    )


def read_stat(pid: int) -> ProcStat | None:
    try:
        return parse_stat((PROC / str(pid) / "stat").read_text())
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return None


def exists(pid: int) -> bool:
    """True while the PID names a process that is not a zombie."""
    st = read_stat(pid)
    return st is not None and st.state not in ("Z", "X")


def require(pid: int) -> ProcStat:
    if pid <= 0:
        raise ProcessNotFound(f"PID {pid} is not a valid process ID")
    st = read_stat(pid)
    if st is None or st.state in ("Z", "X"):
        raise ProcessNotFound(f"no process with PID {pid}")
    return st


def all_stats() -> list[ProcStat]:
    out = []
    for entry in os.listdir(PROC):
        if entry.isdigit():
            st = read_stat(int(entry))
            if st is not None:
                out.append(st)
    return out


def tree(root: int) -> list[int]:
    """The root and all its descendants (processes, not threads), root first."""
    require(root)
    return descendants(root)


def descendants(root: int, stats: Iterable[ProcStat] | None = None) -> list[int]:
    """The root and its live descendants, root first, breadth first; empty when the root
    is gone. ``stats``: one snapshot of all_stats() to read instead of /proc."""
    live = [st for st in (all_stats() if stats is None else stats)
            if st.state not in ("Z", "X")]
    if not any(st.pid == root for st in live):
        return []
    children: dict[int, list[int]] = {}
    for st in live:
        children.setdefault(st.ppid, []).append(st.pid)
    out: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return out


def group(pgid: int, stats: Iterable[ProcStat] | None = None) -> list[int]:
    """The live members of process group ``pgid``, sorted."""
    return sorted(st.pid for st in (all_stats() if stats is None else stats)
                  if st.pgrp == pgid and st.state not in ("Z", "X"))


def threads(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(PROC / str(pid) / "task"))
    except FileNotFoundError:
        return []


def all_threads(pids: Iterable[int]) -> list[int]:
    return sorted({tid for pid in pids for tid in threads(pid)})


def ancestors(pid: int) -> list[int]:
    """Parent, grandparent, ... up to PID 1 (excluded: PID 0)."""
    out = []
    st = read_stat(pid)
    seen = {pid}
    while st is not None and st.ppid > 0 and st.ppid not in seen:
        out.append(st.ppid)
        seen.add(st.ppid)
        st = read_stat(st.ppid)
    return out


def is_descendant(pid: int, of: int) -> bool:
    """Strict: a process is not its own descendant."""
    return pid != of and of in ancestors(pid)


def cmdline(pid: int) -> str:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    return " ".join(p.decode(errors="replace") for p in raw.split(b"\0") if p)


def uid_of(pid: int) -> int | None:
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def tgid_of(tid: int) -> int | None:
    """The process a thread ID belongs to (/proc/TID exists for threads, unlisted)."""
    try:
        for line in (PROC / str(tid) / "status").read_text().splitlines():
            if line.startswith("Tgid:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def describe(pid: int) -> str:
    """A human description of a process, for error messages."""
    st = read_stat(pid)
    if st is None:
        return f"PID {pid} (gone)"
    cmd = cmdline(pid) or f"[{st.comm}]"
    if len(cmd) > 120:
        cmd = cmd[:117] + "..."
    text = f"PID {pid} '{cmd}' (uid {uid_of(pid)}, parent {st.ppid})"
    if st.state == "Z":
        parent = read_stat(st.ppid)
        pname = parent.comm if parent else "?"
        text += f", a zombie not yet reaped by its parent {st.ppid} ({pname})"
    return text


def holder(pid: int) -> str | None:
    """Who holds a PID (as a process or as a thread of one), or None when it is free."""
    st = read_stat(pid)
    if st is None:
        return None
    tgid = tgid_of(pid)
    if tgid is not None and tgid != pid:
        return f"thread {pid} of {describe(tgid)}"
    return describe(pid)


def taken(pids: Iterable[int]) -> list[int]:
    return [p for p in pids if (PROC / str(p)).exists()]


def rss_bytes(pids: Iterable[int]) -> int:
    """Resident memory of the processes: what a dump has to write, roughly, from above."""
    total = 0
    for pid in pids:
        try:
            for line in (PROC / str(pid) / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def pss_bytes(pids: Iterable[int]) -> int:
    """Proportional set size of the processes (smaps_rollup): each page shared among them
    counted once in all, so the sum is what the tree holds in memory."""
    total = 0
    for pid in pids:
        try:
            with open(PROC / str(pid) / "smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def io_read_bytes(pids: Iterable[int]) -> int:
    """Bytes read by the processes (rchar), for restore progress."""
    total = 0
    for pid in pids:
        try:
            for line in (PROC / str(pid) / "io").read_text().splitlines():
                if line.startswith("rchar:"):
                    total += int(line.split()[1])
                    break
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def stopped(pids: Iterable[int]) -> list[int]:
    """Processes in job-control stop (T), which a killed CRIU may leave behind."""
    out = []
    for pid in pids:
        st = read_stat(pid)
        if st is not None and st.state == "T":
            out.append(pid)
    return out


def start_times(pids: Iterable[int]) -> dict[int, int]:
    """Each live PID's start time: with it a PID names one process, even after a restart."""
    out: dict[int, int] = {}
    for pid in pids:
        st = read_stat(pid)
        if st is not None and st.state not in ("Z", "X"):
            out[pid] = st.start_time
    return out


def now_ticks() -> int:
    """Now, in the unit of a process's start time (clock ticks since boot): a process born
    from here on has a start time at least this."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK")) - 1


def born_since(floor: int, argv_has: Sequence[bytes]) -> list[int]:
    """Live processes born at ``floor`` or later whose argv holds every one of ``argv_has``
    (whole arguments)."""
    out = []
    for st in all_stats():
        if st.start_time < floor or st.state in ("Z", "X"):
            continue
        try:
            argv = Path(f"/proc/{st.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(a in argv for a in argv_has):
            out.append(st.pid)
    return out


def criu_clones(action: str, images: Path, since: int = 0) -> list[int]:
    """Processes born at ``since`` or later that run CRIU's ``action`` ("dump", "restore")
    on ``images``: CRIU itself and its helper tasks, clones of it that stay stopped when it
    dies mid-job."""
    return born_since(since, [action.encode(), b"--images-dir", os.fsencode(str(images))])


def same_processes(starts: dict[int, int]) -> list[int]:
    """The PIDs of ``starts`` that still name the very process recorded (not a reuse)."""
    out = []
    for pid, start in sorted(starts.items()):
        st = read_stat(pid)
        if st is not None and st.state not in ("Z", "X") and st.start_time == start:
            out.append(pid)
    return out


def tracer_of(pid: int) -> int:
    """The PID tracing ``pid`` (CRIU while it dumps), 0 for none or a gone process."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        pass
    return 0


def kill_exact(starts: dict[int, int], signum: int) -> list[int]:
    """Signal the recorded processes still alive (PID and start time both match)."""
    hit = []
    for pid in same_processes(starts):
        try:
            os.kill(pid, signum)
            hit.append(pid)
        except ProcessLookupError:
            continue
    return hit
