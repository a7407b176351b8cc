"""Trees that run in a PID namespace of their own (``llmux serve`` starts every engine so:
llmux.shim.pidns), seen from the host.

Such a tree's root is the init of its namespace; CRIU dumps the namespace with it and
restores it into a fresh one, where every PID is free: the restore waits for no PID, and the
restored processes have new host PIDs, which are read back from /proc after CRIU (the
namespace's own PIDs, which the engine itself sees, are the dump's). A tree in the host's
PID namespace keeps its PIDs and needs them free (``PidInUse``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Sequence

from llmux.service.core import procerrors


def nspids(pid: int) -> list[int]:
    """The PID of ``pid`` in each namespace from this one down ([] when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except (FileNotFoundError, ProcessLookupError):
        return []
    return []


def owns_namespace(root_pid: int) -> bool:
    """Whether root_pid is the init (PID 1) of a PID namespace other than this service's."""
    try:
        if os.readlink(f"/proc/{root_pid}/ns/pid") == os.readlink("/proc/self/ns/pid"):
            return False
    except FileNotFoundError:
        return False
    found = nspids(root_pid)
    return len(found) >= 2 and found[-1] == 1


_NS_GET_USERNS = 0xB701


def owns_network(root_pid: int) -> bool:
    """Whether root_pid's network namespace is owned by its own user namespace (one that
    is not this service's): the tree then holds CAP_NET_ADMIN over it, and CRIU can restore
    its TCP connections by TCP repair inside that user namespace."""
    try:
        if os.readlink(f"/proc/{root_pid}/ns/user") == os.readlink("/proc/self/ns/user"):
            return False
        fd = os.open(f"/proc/{root_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return False
    try:
        owner = fcntl.ioctl(fd, _NS_GET_USERNS)
        try:
            st = os.fstat(owner)
        finally:
            os.close(owner)
        mine = os.stat(f"/proc/{root_pid}/ns/user")
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def inner_pids(pids: Sequence[int]) -> list[int]:
    """Each process's PID in its own (innermost) namespace, in order (0 when gone)."""
    return [(nspids(p) or [0])[-1] for p in pids]


def host_pids(root_pid: int) -> tuple[list[int], dict[int, int]]:
    """A restored tree: its host PIDs (root first) and the map from its namespace's PIDs
    to them."""
    pids = procerrors.tree(root_pid)  # a root already gone: NoSuchProcess
    return pids, {inner: pid for pid, inner in zip(pids, inner_pids(pids), strict=True)}
