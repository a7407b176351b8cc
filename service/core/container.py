"""Where a process lives, seen from the host: mount namespace, rootfs, bind mounts, cgroups.

The service runs on the host and acts on --pid=host processes that live in containers. For
CRIU that means: the container's bind mounts must be declared external at dump and mapped
to the new container's bind sources at restore; the restore needs the new container's
merged rootfs as a host path (--root); files only in the old container's writable layer
must be carried over; the restored tree must join the new container's cgroups. A plain host
process is the degenerate case where nothing needs mapping.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from llmux.common import proctree
from llmux.common.errors import NoSuchProcess
from llmux.service.core.procerrors import no_such_process

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field_text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m[1], 8)), field_text)


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    dev: str
    """major:minor of the filesystem."""
    root: str
    """The path inside the filesystem that is mounted here ("/" unless a bind of a subdir)."""
    mount_point: str
    fstype: str
    source: str
    super_options: str

    def super_option(self, name: str) -> str | None:
        for opt in _split_super_options(self.super_options):
            if opt.startswith(name + "="):
                return opt[len(name) + 1 :]
        return None


def _split_super_options(text: str) -> list[str]:
    # Overlay options may contain escaped commas ("\,"); split on unescaped ones only.
    parts = re.split(r"(?<!\\),", text)
    return [p.replace("\\,", ",") for p in parts]


def parse_mountinfo(text: str) -> list[MountEntry]:
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        left, _, right = line.partition(" - ")
        lf = left.split()
        rf = right.split()
        out.append(
            MountEntry(
                mount_id=int(lf[0]),
                parent_id=int(lf[1]),
                dev=lf[2],
                root=_unescape(lf[3]),
                mount_point=_unescape(lf[4]),
                fstype=rf[0] if rf else "",
                source=_unescape(rf[1]) if len(rf) > 1 else "",
                super_options=rf[2] if len(rf) > 2 else "",
            )
        )
    return out


def read_mountinfo(pid: int | str = "self") -> list[MountEntry]:
    try:
        return parse_mountinfo(Path(f"/proc/{pid}/mountinfo").read_text())
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise NoSuchProcess(f"no process with PID {pid}") from exc


def mount_of(entries: Sequence[MountEntry], path: str) -> MountEntry | None:
    """The mount a path lives on: the last-mounted entry with the longest prefix."""
    best: MountEntry | None = None
    best_len = -1
    for e in entries:
        mp = e.mount_point
        inside = path == mp or path.startswith(mp.rstrip("/") + "/") or mp == "/"
        if inside and len(mp) >= best_len:
            best, best_len = e, len(mp)
    return best


def host_path_of(entry: MountEntry, host: Sequence[MountEntry]) -> str | None:
    """Where the filesystem subtree mounted by entry is reachable on the host.

    A host mount of the same filesystem whose root is a prefix of entry.root: the answer is
    that mount point plus the rest of the path. The most specific such mount wins.
    """
    best: tuple[int, str] | None = None
    for h in host:
        if h.dev != entry.dev:
            continue
        hroot = h.root.rstrip("/")
        if entry.root == h.root or entry.root.startswith(hroot + "/") or h.root == "/":
            rest = entry.root[len(hroot) :] if h.root != "/" else entry.root
            rest = "" if rest == "/" else rest
            candidate = (h.mount_point.rstrip("/") + rest) or "/"
            score = len(h.root)
            if best is None or score > best[0]:
                best = (score, candidate)
    return best[1] if best else None


@dataclass(frozen=True)
class Overlay:
    lowerdirs: tuple[str, ...]
    upperdir: str
    workdir: str
    merged: str | None
    """The merged rootfs as a host path (None when the host does not show the mount)."""


@dataclass(frozen=True)
class ExternalMount:
    key: str
    mount_point: str
    host_source: str | None


def _overlay_of(root: MountEntry, host: Sequence[MountEntry]) -> Overlay | None:
    if root.fstype != "overlay":
        return None
    lower = root.super_option("lowerdir") or ""
    upper = root.super_option("upperdir") or ""
    work = root.super_option("workdir") or ""
    lowerdirs = tuple(p.replace("\\:", ":") for p in re.split(r"(?<!\\):", lower) if p)
    merged = None
    for h in host:
        if h.fstype == "overlay" and upper and h.super_option("upperdir") == upper:
            merged = h.mount_point
    return Overlay(lowerdirs=lowerdirs, upperdir=upper, workdir=work, merged=merged)


def external_mount_key(mount_point: str) -> str:
    """A key CRIU accepts (no ':' or ']') that is the same for the same mount point anywhere."""
    safe = re.sub(r"[^A-Za-z0-9._/-]", "_", mount_point)
    return "llmux" + safe.replace("/", "_")


def read_cgroups(pid: int | str) -> dict[str, str]:
    """Hierarchy ("cpu,cpuacct", "name=systemd", "" for v2) -> cgroup path."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise NoSuchProcess(f"no process with PID {pid}") from exc
    out = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out[parts[1]] = parts[2]
    return out


def cgroup_identity(cgroups: dict[str, str]) -> str:
    return ";".join(f"{k}:{v}" for k, v in sorted(cgroups.items()))


def cgroup_procs_files(cgroups: dict[str, str], host: Sequence[MountEntry]) -> list[Path]:
    """The cgroup.procs files (one per hierarchy mounted on the host) for these cgroups."""
    out = []
    for hierarchy, path in cgroups.items():
        for m in host:
            if hierarchy == "" and m.fstype == "cgroup2":
                pass
            elif hierarchy and m.fstype == "cgroup":
                opts = set(_split_super_options(m.super_options))
                if not set(hierarchy.split(",")) <= opts:
                    continue
            else:
                continue
            mroot = m.root.rstrip("/")
            if path != m.root and not path.startswith(mroot + "/"):
                continue
            rel = path[len(mroot) :].lstrip("/")
            procs = Path(m.mount_point) / rel / "cgroup.procs"
            if procs.exists():
                out.append(procs)
                break
    return out


_INIT_LAYER_SUFFIX = "-init/diff"


def _per_container_layer(lowerdir: str) -> bool:
    """Docker's overlay2 puts a per-container "<layer>-init" layer (/etc/hosts, /dev/console
    placeholders) under the image's layers, often through an l/<short> symlink: it differs
    between two containers of one image, so it is no part of the image's identity."""
    if lowerdir.rstrip("/").endswith(_INIT_LAYER_SUFFIX):
        return True
    try:
        target = os.readlink(lowerdir)
    except OSError:
        return False
    return target.rstrip("/").endswith(_INIT_LAYER_SUFFIX)


_PSEUDO_FS = frozenset({"proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2", "overlay"})


def _host_visible(m: MountEntry, host: Sequence[MountEntry]) -> bool:
    """A whole filesystem (root "/") that the host mounts too: its content lives outside."""
    return m.fstype not in _PSEUDO_FS and any(h.dev == m.dev for h in host)


def _is_external(m: MountEntry, mounts: Sequence[MountEntry], host: Sequence[MountEntry]) -> bool:
    """Whether CRIU must be told about the mount (external) or can rebuild it by itself.

    A bind of a host path, or a host filesystem mounted whole, is external. A bind whose
    source is a namespace-private filesystem that the namespace also mounts whole (a
    container runtime's read-only /proc/sys, /proc/bus binds and its /dev/null masks over
    /proc/keys) is a bind inside the dumped tree: CRIU recreates it, and no other
    container could supply it as an external mount.
    """
    if m.root == "/":
        return _host_visible(m, host)
    for other in mounts:
        if other is m or other.dev != m.dev or other.root != "/":
            continue
        if not _host_visible(other, host) and not any(h.dev == m.dev for h in host):
            return False
    return True


_MADE_AT_RESTORE = {"/dev": "tmpfs", "/sys": "sysfs", "/dev/mqueue": "mqueue"}
"""What a restore in a user namespace makes on the host to bind (core/devcopy.py)."""


def _made_at_restore(m: MountEntry) -> bool:
    """A container's own /dev tmpfs, its sysfs or its mqueue."""
    return _MADE_AT_RESTORE.get(m.mount_point) == m.fstype and m.root == "/"


@dataclass(frozen=True)
class ContainerContext:
    """A process's view of the filesystem and cgroups, mapped to host paths."""

    pid: int
    mnt_ns: str
    foreign: bool
    """True when its mount namespace is not the service's: it lives in a container."""
    root: MountEntry | None
    overlay: Overlay | None
    externals: tuple[ExternalMount, ...] = ()
    cgroups: dict[str, str] = field(default_factory=dict)
    mounts: tuple[MountEntry, ...] = ()

    @classmethod
    def from_pid(cls, pid: int, *, userns: bool = False) -> ContainerContext:
        """``userns``: for a tree in a user namespace of its own, the container's own tmpfs
        on /dev, its sysfs and its mqueue are external too (core/devcopy.py makes them at
        restore: that namespace may neither mknod nor mount them)."""
        with no_such_process():
            proctree.require(pid)
        try:
            mnt_ns = os.readlink(f"/proc/{pid}/ns/mnt")
            own_ns = os.readlink("/proc/self/ns/mnt")
        except FileNotFoundError as exc:
            raise NoSuchProcess(f"no process with PID {pid}") from exc
        cgroups = read_cgroups(pid)
        if mnt_ns == own_ns:
            return cls(
                pid=pid, mnt_ns=mnt_ns, foreign=False, root=None, overlay=None, cgroups=cgroups
            )
        mounts = read_mountinfo(pid)
        host = read_mountinfo("self")
        root = next((m for m in reversed(mounts) if m.mount_point == "/"), None)
        overlay = _overlay_of(root, host) if root is not None else None
        externals: list[ExternalMount] = []
        for m in mounts:
            if m.mount_point == "/" or any(e.mount_point == m.mount_point for e in externals):
                continue  # the root, or a mount stacked on one already declared
            if _is_external(m, mounts, host) or (userns and _made_at_restore(m)):
                externals.append(
                    ExternalMount(
                        key=external_mount_key(m.mount_point),
                        mount_point=m.mount_point,
                        host_source=host_path_of(m, host),
                    )
                )
        return cls(
            pid=pid,
            mnt_ns=mnt_ns,
            foreign=True,
            root=root,
            overlay=overlay,
            externals=tuple(externals),
            cgroups=cgroups,
            mounts=tuple(mounts),
        )

    @property
    def cgroup_identity(self) -> str:
        return cgroup_identity(self.cgroups)

    @property
    def rootfs_host_path(self) -> str | None:
        """The rootfs as a host path: "/" for a host process, the overlay's merged dir."""
        if not self.foreign:
            return "/"
        if self.overlay is not None:
            return self.overlay.merged
        if self.root is not None:
            return host_path_of(self.root, read_mountinfo("self"))
        return None

    def rootfs_identity(self) -> dict[str, object]:
        """What makes two containers' filesystems the same image (lower layers)."""
        if not self.foreign:
            return {"kind": "host"}
        if self.overlay is not None:
            layers = [d for d in self.overlay.lowerdirs if not _per_container_layer(d)]
            return {"kind": "overlay", "lowerdirs": layers}
        root = self.root
        return {"kind": root.fstype if root else "unknown", "source": root.source if root else ""}

    def upper_path(self, path: str) -> Path | None:
        """Where a path the process sees would be in the writable layer, if it is on it."""
        if self.overlay is None or not path.startswith("/"):
            return None
        m = mount_of(self.mounts, path)
        if m is None or m.mount_point != "/":
            return None
        rel = PurePosixPath(path).relative_to("/")
        return Path(self.overlay.upperdir) / rel

    def cgroup_procs_files(self) -> list[Path]:
        return cgroup_procs_files(self.cgroups, read_mountinfo("self"))

    def external_for(self, mount_point: str) -> ExternalMount | None:
        return next((e for e in self.externals if e.mount_point == mount_point), None)
