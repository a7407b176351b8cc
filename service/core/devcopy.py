"""Mount sources for a tree restored in a user namespace of its own: /dev and /sys.

A container runtime gives each container a tmpfs on /dev with device nodes it made (null,
zero, urandom, tty, the GPUs passed in). CRIU would rebuild that tmpfs from its contents,
but a tree in a user namespace of its own (llmux.shim.pidns) is restored inside it, where
mknod is not allowed ("tar: ./null: Cannot mknod: Operation not permitted"). So such a
dump declares the container's /dev external, and the restore binds a copy of the *target*
container's /dev made here as root: a small tmpfs with the same nodes, symlinks and
directories. It is detached from the host once CRIU is done (the restored tree keeps it);
the device cgroup of the container the tree joins still decides which nodes open.

/sys and /dev/mqueue likewise: CRIU binds an external mount with a plain clone of it, which
a user namespace may not take of a mount with mounts inside it (the host's /sys has cgroup,
bpf, debugfs...: "Failed to open_tree /sys: Invalid argument"), and it may not mount a
sysfs or mqueue of the host's network or IPC namespace itself ("Unable to mount mqueue
...: Operation not permitted"). A fresh one mounted here has nothing inside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat
import tempfile
from pathlib import Path

_MNT_DETACH = 2
#: mount flags by the per-mount options mountinfo shows; no atime option: strictatime
_FLAGS = {"ro": 0x1, "nosuid": 0x2, "nodev": 0x4, "noexec": 0x8, "noatime": 0x400,
          "nodiratime": 0x800, "relatime": 0x20_0000}
_MS_STRICTATIME = 0x100_0000
_libc = ctypes.CDLL(None, use_errno=True)

DEV = "/dev"
FRESH = {"/sys": "sysfs", "/dev/mqueue": "mqueue"}
"""Mount points bound from a fresh mount of their filesystem made here."""
MADE_HERE = frozenset({DEV, *FRESH})
"""What a dump of a tree in a user namespace of its own declares external."""


def _copy(src: Path, dst: Path, dev: int) -> None:
    for entry in os.scandir(src):
        st = entry.stat(follow_symlinks=False)
        to = dst / entry.name
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(entry.path), to)
        elif stat.S_ISDIR(st.st_mode):
            to.mkdir(mode=stat.S_IMODE(st.st_mode))
            if st.st_dev == dev:  # a directory of the tmpfs, not a mount point in it
                _copy(Path(entry.path), to, dev)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            os.mknod(to, st.st_mode, st.st_rdev)
        else:
            to.touch(mode=stat.S_IMODE(st.st_mode))
        with contextlib.suppress(OSError):
            os.chown(to, st.st_uid, st.st_gid, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(to, stat.S_IMODE(st.st_mode))  # the umask took its share


def _flags_of(pid: int) -> int:
    """The mount flags of the process's /dev: CRIU sets them again on the bind, and a user
    namespace may not change what it inherited locked (atime, nosuid, noexec)."""
    options = ""
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 5 and fields[4] == DEV:
                options = fields[5]
    names = options.split(",")
    flags = sum(_FLAGS.get(n, 0) for n in names)
    if not {"noatime", "relatime"} & set(names):
        flags |= _MS_STRICTATIME
    return flags


def prepare(caller_pid: int, under: Path) -> Path:
    """A tmpfs under ``under`` holding a copy of the caller's /dev (its view of it)."""
    where = Path(tempfile.mkdtemp(prefix="dev-", dir=under))
    if _libc.mount(b"llmux-dev", os.fsencode(where), b"tmpfs",
                   ctypes.c_ulong(_flags_of(caller_pid) & ~_FLAGS["ro"]),
                   b"mode=755,size=1m") != 0:
        err = ctypes.get_errno()
        where.rmdir()
        raise OSError(err, f"mount tmpfs on {where}: {os.strerror(err)}")
    try:
        src = Path(f"/proc/{caller_pid}/root{DEV}")
        _copy(src, where, src.stat().st_dev)
    except BaseException:
        release(where)
        raise
    return where


def release(where: Path) -> None:
    """Detach the copy from the host (a restored tree that binds it keeps it)."""
    _libc.umount2(os.fsencode(where), _MNT_DETACH)
    with contextlib.suppress(OSError):
        where.rmdir()


def prepare_fs(fstype: str, under: Path) -> Path:
    """A fresh mount of ``fstype`` (sysfs, mqueue: the host's network and IPC namespaces,
    which the shim shares) under ``under``, with no mounts inside."""
    where = Path(tempfile.mkdtemp(prefix=f"{fstype}-", dir=under))
    if _libc.mount(fstype.encode(), os.fsencode(where), fstype.encode(),
                   ctypes.c_ulong(_FLAGS["nosuid"] | _FLAGS["nodev"] | _FLAGS["noexec"]),
                   None) != 0:
        err = ctypes.get_errno()
        where.rmdir()
        raise OSError(err, f"mount {fstype} on {where}: {os.strerror(err)}")
    return where
