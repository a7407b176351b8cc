"""Who may act on which process tree.

The rule: a caller acts only inside its own container. It may target a tree rooted at one of
its descendants, or a tree this service restored for its container (same cgroup identity,
and the tree still in it); never itself, its own ancestors, or any other PID. Root on the
host itself (the service's own mount namespace) is the administrator and may target any
tree but its own ancestors, PID 1 and the service. Container processes usually run as uid 0
as well, so being root is not enough: where the caller lives decides.

The caller's PID always comes from the bus (the D-Bus face resolves it), never from a claim.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import threading
from dataclasses import dataclass
from pathlib import Path

from llmux.common import proctree
from llmux.common.errors import AccessDenied, NoSuchProcess
from llmux.service.core.container import cgroup_identity, read_cgroups
from llmux.service.core.durable import write_json_durably
from llmux.service.core.procerrors import no_such_process


@dataclass(frozen=True)
class Caller:
    pid: int
    uid: int


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _mnt_ns(pid: int | str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except FileNotFoundError as exc:
        raise NoSuchProcess(f"no process with PID {pid}") from exc


def is_host_admin(caller: Caller) -> bool:
    return caller.uid == 0 and _mnt_ns(caller.pid) == _mnt_ns("self")


@dataclass(frozen=True)
class RestoredTree:
    root_pid: int
    start_time: int
    cgroups: str
    model: str


class RestoredRegistry:
    """Trees this service restored, by root PID, kept across service restarts.

    The start time tells a restored process from a later one that reuses its PID.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._trees: dict[int, RestoredTree] = {}
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            for item in data:
                tree = RestoredTree(
                    root_pid=int(item["root_pid"]),
                    start_time=int(item["start_time"]),
                    cgroups=str(item["cgroups"]),
                    model=str(item.get("model", "")),
                )
                self._trees[tree.root_pid] = tree
        except (FileNotFoundError, ValueError, TypeError, KeyError):
            self._trees = {}
        self._prune()

    def _prune(self) -> None:
        for pid, tree in list(self._trees.items()):
            st = proctree.read_stat(pid)
            if st is None or st.start_time != tree.start_time:
                del self._trees[pid]

    def _save(self) -> None:
        """Durably: the registry grants rights after a restart, so a crash must leave
        either the old or the new list, never a torn or lost one."""
        write_json_durably(self.path, [t.__dict__ for t in self._trees.values()])

    def add(self, root_pid: int, cgroups: str, model: str) -> None:
        st = proctree.read_stat(root_pid)
        if st is None:
            return
        with self._lock:  # restores run in threads; one writer of the file at a time
            self._prune()
            self._trees[root_pid] = RestoredTree(root_pid, st.start_time, cgroups, model)
            with contextlib.suppress(OSError):
                self._save()

    def live(self, model: str) -> int:
        """How many trees restored from the model's checkpoint still run (a root that
        has ended but is not reaped yet, a zombie, runs no more)."""
        with self._lock:
            self._prune()
            return sum(1 for t in self._trees.values()
                       if t.model == model and proctree.exists(t.root_pid))

    def get(self, root_pid: int) -> RestoredTree | None:
        tree = self._trees.get(root_pid)
        if tree is None:
            return None
        st = proctree.read_stat(root_pid)
        if st is None or st.start_time != tree.start_time:
            return None
        return tree


def check_target(caller: Caller, root_pid: int, restored: RestoredRegistry | None) -> None:
    """Raise AccessDenied unless the caller may act on the tree rooted at root_pid."""
    with no_such_process():
        proctree.require(root_pid)
    if proctree.read_stat(caller.pid) is None:
        raise AccessDenied(f"caller PID {caller.pid} is gone")
    if root_pid == caller.pid:
        raise AccessDenied(f"PID {root_pid} is the caller itself")
    caller_ancestors = proctree.ancestors(caller.pid)
    if root_pid in caller_ancestors:
        raise AccessDenied(f"PID {root_pid} is an ancestor of the caller (PID {caller.pid})")
    if root_pid == 1 or root_pid == os.getpid() or root_pid in proctree.ancestors(os.getpid()):
        raise AccessDenied(f"PID {root_pid} may not be checkpointed (init or the service)")
    if proctree.is_descendant(root_pid, caller.pid):
        return
    if is_host_admin(caller):
        return
    tree = restored.get(root_pid) if restored is not None else None
    if tree is not None:
        caller_cg = cgroup_identity(read_cgroups(caller.pid))
        target_cg = cgroup_identity(read_cgroups(root_pid))
        if tree.cgroups == caller_cg == target_cg:
            return
    raise AccessDenied(
        f"PID {root_pid} is outside the caller's container: only descendants of the caller "
        f"(PID {caller.pid}) or trees restored for its container may be targeted"
    )


def check_owner(caller: Caller, owner_uid: int, model: str) -> None:
    """Only the checkpoint's owner (same uid) or root may restore or delete it."""
    if caller.uid != 0 and caller.uid != owner_uid:
        raise AccessDenied(
            f"checkpoint {model!r} belongs to uid {owner_uid}; caller runs as uid {caller.uid}"
        )
