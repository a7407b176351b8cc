"""What a process tree holds on the host besides its memory, read from /proc.

CRIU's log is the worst place to learn that a dump or a restore cannot work: a dump
fails on an fd it cannot handle after freezing the tree, a restore fails on a taken
port after half the tree is back. These checks run first and name the process, the fd,
the port and its holder. They also find the tree's files in /dev/shm, which CRIU does
not put in its images (file-backed shared mappings are restored from the file) and which
a clean stop of the engine deletes.

Every function here reads /proc synchronously: llmuxd's engine and the shim's supervisor
run the long ones in a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmux.common import proctree

SHM_DIR = "/dev/shm"

#: fd targets CRIU cannot dump (anon inodes it has no dumper for)
UNDUMPABLE = ("anon_inode:[io_uring]", "anon_inode:[perf_event]", "anon_inode:[userfaultfd]",
              "anon_inode:kvm-vm", "anon_inode:kvm-vcpu")

#: /proc/net/tcp states: LISTEN, and the ones in which a socket no longer holds its port
_LISTEN = "0A"
_FREE_STATES = {"06", "07"}  # TIME_WAIT (SO_REUSEADDR binds over it), CLOSE
_SOCKET = re.compile(r"socket:\[(\d+)\]")


@dataclass(frozen=True)
class Undumpable:
    pid: int
    fd: str
    """fd number, or "map" for a mapping without an fd"""
    target: str

    def __str__(self) -> str:
        where = f"fd {self.fd}" if self.fd != "map" else "a memory mapping"
        return f"{proctree.describe(self.pid)} holds {where} -> {self.target}"


def undumpable_fds(pids: Iterable[int]) -> list[Undumpable]:
    """Fds and mappings of the tree that CRIU has no dumper for (io_uring first of all)."""
    found: list[Undumpable] = []
    for pid in pids:
        with contextlib.suppress(OSError):
            for entry in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(entry.path)
                    if target.startswith(UNDUMPABLE):
                        found.append(Undumpable(pid, entry.name, target))
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                if "anon_inode:[io_uring]" in line and not any(
                    u.pid == pid and u.target == "anon_inode:[io_uring]" for u in found
                ):
                    found.append(Undumpable(pid, "map", "anon_inode:[io_uring]"))
    return found


def shm_paths(live_paths: Iterable[str]) -> list[str]:
    """The /dev/shm files among the paths the tree holds open or mapped (no link-remaps)."""
    out = {
        p
        for p in live_paths
        if p.startswith(SHM_DIR + "/")
        and "/" not in p[len(SHM_DIR) + 1 :]
        and not p[len(SHM_DIR) + 1 :].startswith("link_remap.")
    }
    return sorted(out)


def regular_files(paths: Iterable[str], view_root: Path) -> list[str]:
    """The paths (as the tree sees them) that are regular files, read through view_root."""
    out: list[str] = []
    for p in paths:
        with contextlib.suppress(OSError):
            if (view_root / p.lstrip("/")).is_file():
                out.append(p)
    return sorted(out)


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def in_use(paths: Iterable[Path]) -> set[Path]:
    """The paths that some process on the host holds open or mapped, by device and inode.

    One pass over /proc for any number of files: its cost is every process's maps and
    fds, whatever the number of paths asked about.
    """
    ids = {p: i for p in paths if (i := _file_id(p)) is not None}
    if not ids:
        return set()
    wanted = set(ids.values())
    maps_keys = {(f"{os.major(d):02x}:{os.minor(d):02x}", str(i)) for d, i in wanted}
    used: set[tuple[int, int]] = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            used |= _held_by(entry.name, wanted, maps_keys)
            if used == wanted:
                break
    return {p for p, i in ids.items() if i in used}


def _held_by(pid: str, wanted: set[tuple[int, int]],
             maps_keys: set[tuple[str, str]]) -> set[tuple[int, int]]:
    """Which of the wanted files the process maps or holds open."""
    held: set[tuple[int, int]] = set()
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            f = line.split(maxsplit=5)
            if len(f) >= 5 and (f[3], f[4]) in maps_keys:
                major, minor = (int(x, 16) for x in f[3].split(":"))
                held.add((os.makedev(major, minor), int(f[4])))
    with contextlib.suppress(OSError):
        for entry in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                st = os.stat(entry.path)
                if (st.st_dev, st.st_ino) in wanted:
                    held.add((st.st_dev, st.st_ino))
    return held


def remove_unused(paths: Iterable[Path]) -> list[Path]:
    """Delete the files no process holds open or mapped; return the ones deleted."""
    candidates = [p for p in paths if p.exists()]
    used = in_use(candidates)
    removed: list[Path] = []
    for p in candidates:
        if p in used:
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


# ---------------------------------------------------------------------- TCP ports


def _tcp_rows(pid: int | str) -> list[tuple[str, int, str, str]]:
    """(local address hex, local port, state, inode) of every TCP socket in pid's netns."""
    rows: list[tuple[str, int, str, str]] = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10:
                continue
            addr, _, port = f[1].rpartition(":")
            rows.append((addr, int(port, 16), f[3], f[9]))
    return rows


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                m = _SOCKET.fullmatch(os.readlink(entry.path))
                if m:
                    inodes.add(m[1])
    return inodes


def listening_ports(pids: Sequence[int]) -> list[int]:
    """TCP ports the tree listens on (any address), sorted."""
    if not pids:
        return []
    inodes: set[str] = set()
    for pid in pids:
        inodes |= _socket_inodes(pid)
    return sorted({port for _, port, state, ino in _tcp_rows(pids[0])
                   if state == _LISTEN and ino in inodes})


def connected_ports(pids: Sequence[int]) -> list[int]:
    """Local ports of the tree's own TCP sockets that are connected (neither listening nor
    closed), sorted: what CRIU carries with --tcp-established and restores by TCP repair."""
    if not pids:
        return []
    inodes: set[str] = set()
    for pid in pids:
        inodes |= _socket_inodes(pid)
    return sorted({port for _, port, state, ino in _tcp_rows(pids[0])
                   if ino in inodes and state != _LISTEN and state not in _FREE_STATES})


def connections_to(port: int, netns_pid: int | str = "self") -> int:
    """TCP connections whose local port is ``port``, in any state but listening or closed
    (what a dump of the port's owner would carry), in netns_pid's network namespace."""
    return sum(1 for _, p, state, _ in _tcp_rows(netns_pid)
               if p == port and state != _LISTEN and state not in _FREE_STATES)


def port_holders(ports: Iterable[int], netns_pid: int | str = "self") -> dict[int, str]:
    """For each port taken in netns_pid's network namespace: who holds it, in words."""
    wanted = set(ports)
    taken: dict[int, set[str]] = {}
    for _, port, state, ino in _tcp_rows(netns_pid):
        # inode 0: an orphan closing down (TIME_WAIT, FIN_WAIT2 of a dead server); it
        # inherited its listener's SO_REUSEADDR, so a restored listener binds over it
        if port in wanted and state not in _FREE_STATES and ino != "0":
            taken.setdefault(port, set()).add(ino)
    if not taken:
        return {}
    owners: dict[str, int] = {}
    all_inodes = set().union(*taken.values())
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            for ino in _socket_inodes(int(entry.name)) & all_inodes:
                owners.setdefault(ino, int(entry.name))
    out: dict[int, str] = {}
    for port, inodes in sorted(taken.items()):
        pids = sorted({owners[i] for i in inodes if i in owners})
        if pids:
            out[port] = proctree.describe(pids[0])
    return out


# ---------------------------------------------------------------------- what a tree made


def bound_unix_paths(pids: Sequence[int]) -> list[str]:
    """Filesystem paths of the unix sockets the tree has bound (its ZMQ ipc endpoints)."""
    if not pids:
        return []
    inodes: set[str] = set()
    for pid in pids:
        inodes |= _socket_inodes(pid)
    return sorted({path for ino, path in _unix_rows(pids[0]) if ino in inodes})


def _unix_rows(pid: int | str) -> list[tuple[str, str]]:
    """(inode, path) of every unix socket bound to a filesystem path in pid's netns."""
    rows: list[tuple[str, str]] = []
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
            f = line.split()
            if len(f) >= 8 and f[7].startswith("/"):
                rows.append((f[6], f[7]))
    return rows


# ---------------------------------------------------------------------- open files

_DELETED = " (deleted)"


def _links(pid: int) -> list[str]:
    """Paths of the files a process has open, mapped, or as cwd, as it sees them.

    The kernel writes these links relative to its mount namespace's root; a process
    whose root is a directory below that (chroot) sees them without that prefix.
    """
    raw = []
    base = Path(f"/proc/{pid}")
    for sub in ("fd", "map_files"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            for entry in os.scandir(base / sub):
                with contextlib.suppress(OSError):
                    raw.append(os.readlink(entry.path))
    with contextlib.suppress(OSError):
        raw.append(os.readlink(base / "cwd"))
    try:
        root = os.readlink(base / "root").rstrip("/")
    except OSError:
        root = ""
    if not root:
        return raw
    return [link[len(root) :] if link.startswith(root + "/") else link for link in raw]


def open_paths(pids: Iterable[int]) -> tuple[list[str], list[str]]:
    """(live paths, deleted paths) the processes hold open or mapped."""
    live: set[str] = set()
    deleted: set[str] = set()
    for pid in pids:
        for link in _links(pid):
            if not link.startswith("/"):
                continue
            if link.endswith(_DELETED):
                deleted.add(link[: -len(_DELETED)])
            else:
                live.add(link)
    return sorted(live), sorted(deleted)


# ---------------------------------------------------------------------- CRIU link-remaps


def deleted_file_ids(pids: Iterable[int]) -> set[tuple[int, int]]:
    """(device, inode) of the deleted files the tree holds open or mapped: the files CRIU's
    --link-remap gives a link_remap.N name during a dump. Matching by inode tells this
    tree's link-remaps from those of any other dump or restore going on at the same time."""
    ids: set[tuple[int, int]] = set()
    for pid in pids:
        for sub in ("fd", "map_files"):
            with contextlib.suppress(OSError):
                for entry in os.scandir(f"/proc/{pid}/{sub}"):
                    with contextlib.suppress(OSError):
                        if os.readlink(entry.path).endswith(" (deleted)"):
                            st = os.stat(entry.path)
                            ids.add((st.st_dev, st.st_ino))
    return ids


def owned_by(paths: Iterable[Path], ids: set[tuple[int, int]]) -> list[Path]:
    """The paths that are links to one of the files ``ids`` names."""
    return [p for p in paths if _file_id(p) in ids]


def stale(paths: Iterable[Path], min_age_secs: float) -> list[Path]:
    """Link-remaps left by an interrupted job: unchanged for min_age_secs and used by nobody.
    A young one belongs to a dump or restore in progress (its ctime is that of its link)."""
    now = time.time()
    old: list[Path] = []
    for p in paths:
        with contextlib.suppress(OSError):
            if now - p.stat().st_ctime >= min_age_secs:
                old.append(p)
    used = in_use(old)
    return [p for p in old if p not in used]
