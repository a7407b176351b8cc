"""Files a tree needs that a fresh container would not have, carried inside the checkpoint.

CRIU restores open files by path and checks them (size, existence). A file the tree holds open
or mapped that lives only in the old container's writable layer (an ipc socket directory in
/tmp, a JIT log under a cache dir) is missing from a new container, and the restore fails or
the process talks to nothing. They are found by inspection (/proc/PID/fd, map_files, cwd,
bound unix sockets), saved with checksums at dump, and written back into the target's view
(/proc/CALLER/root, which includes its bind mounts) before CRIU runs.

The same mechanism carries CRIU's link_remap.* files (hard links to open-but-deleted files
that --link-remap leaves next to them): moved into the checkpoint after a dump, so no stale
link ever makes a later dump fail with "File exists", and put back before the restore.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from llmux.common import resources
from llmux.common.errors import InvalidArgument, ManifestMismatch
from llmux.service.core import zerodigest
from llmux.service.core.container import ContainerContext

_CHUNK = 1 << 20


@dataclass(frozen=True)
class SavedFile:
    path: str
    """Absolute path as the tree sees it (its mount namespace)."""
    kind: str
    """"file" or "dir"."""
    mode: int
    uid: int
    gid: int
    size: int = 0
    sha256: str = ""
    """zerodigest's checksum (``nz-sha256:...``), or a plain SHA-256 in older checkpoints."""
    stored: str = ""
    """Name under the checkpoint's files/ directory ("" for directories)."""
    mtime_ns: int = 0
    reason: str = "upper"
    """"upper" (only in the container's writable layer) or "link-remap"."""
    held: int | None = None
    """Bytes the stored copy takes (holes excluded: a 400 MiB ring buffer of zeros takes
    none); None in checkpoints of earlier versions."""

    @property
    def held_bytes(self) -> int:
        """What the copy takes on disk or in the memory tier (its size where not recorded)."""
        return self.size if self.held is None else self.held

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> SavedFile:
        return cls(
            path=str(data["path"]),
            kind=str(data["kind"]),
            mode=int(str(data["mode"])),
            uid=int(str(data["uid"])),
            gid=int(str(data["gid"])),
            size=int(str(data.get("size", 0))),
            sha256=str(data.get("sha256", "")),
            stored=str(data.get("stored", "")),
            mtime_ns=int(str(data.get("mtime_ns", 0))),
            reason=str(data.get("reason", "upper")),
            held=None if data.get("held") is None else int(str(data["held"])),
        )


def bound_socket_paths(pids: Iterable[int]) -> list[str]:
    """Filesystem paths of the unix sockets the processes have bound."""
    return resources.bound_unix_paths(list(pids))


def _in_upper(ctx: ContainerContext, path: str) -> bool:
    upper = ctx.upper_path(path)
    if upper is None:
        return False
    try:
        st = upper.lstat()
    except OSError:
        return False
    # A whiteout (char device 0:0) marks a deletion, not a file.
    return not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0)


def find_upper_files(pids: Sequence[int], ctx: ContainerContext) -> list[str]:
    """Paths (as the tree sees them) of files and directories it uses that are in the upper
    layer, with every directory on their way that is also only there, parents first."""
    if ctx.overlay is None:
        return []
    live, _ = resources.open_paths(pids)
    sockets = bound_socket_paths(pids)
    wanted: set[str] = set()
    for path in live:
        if _in_upper(ctx, path):
            wanted.add(path)
    for path in [*live, *sockets]:
        for parent in PurePosixPath(path).parents:
            p = str(parent)
            if p == "/":
                break
            if _in_upper(ctx, p) and _is_dir_in_upper(ctx, p):
                wanted.add(p)
    return sorted(wanted, key=lambda p: (p.count("/"), p))


def _is_dir_in_upper(ctx: ContainerContext, path: str) -> bool:
    upper = ctx.upper_path(path)
    return upper is not None and upper.is_dir() and not upper.is_symlink()


_ZEROS = bytes(_CHUNK)


def _sparse_copy(fin: BinaryIO, fout: BinaryIO, digest: Any = None) -> int:
    """Copy, leaving holes where the source has whole chunks of zeros: vLLM's /dev/shm
    ring buffers are hundreds of MiB, mostly never written. Returns the size."""
    size = 0
    while chunk := fin.read(_CHUNK):
        if digest is not None:
            digest.update(chunk)
        if chunk == _ZEROS[: len(chunk)]:
            fout.seek(len(chunk), os.SEEK_CUR)
        else:
            fout.write(chunk)
        size += len(chunk)
    fout.truncate(size)
    return size


def _copy_data(fin: BinaryIO, fout: BinaryIO) -> None:
    """A sparse copy of a sparse file: only its data extents are read (SEEK_DATA), so a
    400 MiB segment of holes costs nothing; holes stay holes."""
    size = os.fstat(fin.fileno()).st_size
    offset = 0
    while offset < size:
        try:
            data = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole remains
            break
        hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
        fin.seek(data)
        fout.seek(data)
        left = hole - data
        while left > 0:
            chunk = fin.read(min(_CHUNK, left))
            if not chunk:
                break
            if chunk == _ZEROS[: len(chunk)]:
                fout.seek(len(chunk), os.SEEK_CUR)
            else:
                fout.write(chunk)
            left -= len(chunk)
        offset = hole
    fout.truncate(size)


def _hash_copy(src: Path, dst: Path) -> tuple[str, int, int]:
    """Copy sparse; the copy's checksum skips its zeros (zerodigest: a restore reads no hole).
    Returns the checksum, the size and the bytes the copy takes."""
    h = zerodigest.NonzeroDigest()
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with src.open("rb") as fin, os.fdopen(fd, "wb") as fout:
        size = _sparse_copy(fin, fout, h)
        fout.flush()
        os.fsync(fout.fileno())
        held = min(size, os.fstat(fout.fileno()).st_blocks * 512)
    return h.hexdigest(size), size, held


def save(
    paths: Sequence[str],
    view_root: Path | Callable[[str], Path],
    files_dir: Path,
    reason: str = "upper",
    start_index: int = 0,
) -> list[SavedFile]:
    """Copy the paths (read through view_root, e.g. /proc/PID/root, or a ViewRoot's
    resolve) into files_dir."""
    out = []
    for i, path in enumerate(paths, start=start_index):
        src = view_root(path) if callable(view_root) else view_root / path.lstrip("/")
        try:
            st = src.lstat()
        except FileNotFoundError:
            continue
        entry = SavedFile(path=path, kind="dir", mode=stat.S_IMODE(st.st_mode),
                          uid=st.st_uid, gid=st.st_gid, reason=reason)
        if stat.S_ISDIR(st.st_mode):
            out.append(entry)
        elif stat.S_ISREG(st.st_mode):
            stored = f"{i:05d}-{PurePosixPath(path).name}"[:200]
            digest, size, held = _hash_copy(src, files_dir / stored)
            out.append(replace(entry, kind="file", size=size, sha256=digest, stored=stored,
                               mtime_ns=st.st_mtime_ns, held=held))
    return out


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_present(saved: Sequence[SavedFile], files_dir: Path) -> None:
    """Every saved file's copy is there, a regular file (a link planted in its place would
    have the restore copy whatever it points to)."""
    for f in saved:
        if f.kind != "file":
            continue
        copy = files_dir / f.stored
        if copy.is_symlink():
            raise ManifestMismatch(
                f"saved file {f.path} is a symbolic link in the checkpoint ({copy}): planted?")
        if not copy.is_file():
            raise ManifestMismatch(f"saved file {f.path} is missing from the checkpoint ({copy})")


def verify(saved: Sequence[SavedFile], files_dir: Path) -> None:
    """Every saved file is there with its checksum, before anything is written anywhere."""
    check_present(saved, files_dir)
    for f in saved:
        if f.kind != "file":
            continue
        copy = files_dir / f.stored
        found = (zerodigest.of_file(copy) if f.sha256.startswith(zerodigest.PREFIX)
                 else sha256_of(copy))
        if found != f.sha256:
            raise ManifestMismatch(f"saved file {f.path} is corrupt: checksum differs ({copy})")


def _safe_target(view_root: Path, path: str) -> Path:
    pure = PurePosixPath(path)
    if not pure.is_absolute() or ".." in pure.parts:
        raise InvalidArgument(f"saved path {path!r} is not a plain absolute path")
    return view_root / path.lstrip("/")


def put_back(saved: Sequence[SavedFile], files_dir: Path, view_root: Path) -> None:
    """Write the saved files into the target's view (parents first), replacing what is there.

    Files go in through a temporary name and a rename, so a reader never sees half a file.
    """
    for f in saved:
        target = _safe_target(view_root, f.path)
        if f.kind == "dir":
            if not target.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            os.chmod(target, f.mode)
            os.lchown(target, f.uid, f.gid)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.llmux-tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        with (files_dir / f.stored).open("rb") as fin, tmp.open("wb") as fout:
            _copy_data(fin, fout)
        os.chmod(tmp, f.mode)
        os.lchown(tmp, f.uid, f.gid)
        os.utime(tmp, ns=(f.mtime_ns, f.mtime_ns))
        os.replace(tmp, target)


class ViewRoot:
    """A process's root directory, held open so that it stays reachable after the process
    is gone (a dump kills the tree; its container, and so the mount namespace, lives on).

    A restored tree lives in a mount namespace CRIU made for it alone: when the dump kills
    the tree, that namespace's mounts (the /dev/shm bind among them) are detached. Such a
    directory stays reachable through an fd opened before the dump: hold() it, and
    resolve() finds the files in it afterwards.
    """

    def __init__(self, pid: int | None) -> None:
        self._fd: int | None = None
        self._held: dict[str, int] = {}
        if pid is None:
            self.path = Path("/")
            return
        self._fd = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY)
        self.path = Path(f"/proc/self/fd/{self._fd}")

    def hold(self, directory: str) -> None:
        """Keep the tree's directory (a path as the tree sees it) reachable."""
        key = str(PurePosixPath(directory))
        if key not in self._held:
            with contextlib.suppress(OSError):
                self._held[key] = os.open(self.path / key.lstrip("/"),
                                          os.O_PATH | os.O_DIRECTORY)

    def directory(self, directory: str) -> Path:
        """Where the tree's directory is now: its held fd, else through the root."""
        key = str(PurePosixPath(directory))
        fd = self._held.get(key)
        if fd is not None:
            return Path(f"/proc/self/fd/{fd}")
        return self.path / key.lstrip("/")

    def resolve(self, path: str) -> Path:
        """Where the tree's path is now, through a held directory when there is one."""
        pure = PurePosixPath(path)
        if str(pure.parent) in self._held:
            return self.directory(str(pure.parent)) / pure.name
        return self.path / path.lstrip("/")

    def close(self) -> None:
        for fd in self._held.values():
            os.close(fd)
        self._held.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ViewRoot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


LINK_REMAP_GLOB = "link_remap.*"


def link_remap_dirs(deleted_paths: Iterable[str], view: ViewRoot) -> list[str]:
    """Directories (as the tree sees them) where CRIU may put link_remap files: those of
    the deleted files the tree holds, and /dev/shm; held in the view."""
    dirs = {"/dev/shm"} | {str(PurePosixPath(p).parent) for p in deleted_paths}
    for d in dirs:
        view.hold(d)
    return sorted(d for d in dirs if view.directory(d).is_dir())


def list_link_remaps(dirs: Iterable[str], view: ViewRoot) -> list[str]:
    """The link_remap files in the directories, as the tree's paths."""
    out: list[str] = []
    for d in dirs:
        with contextlib.suppress(OSError):
            out.extend(sorted(f"{d.rstrip('/')}/{f.name}"
                              for f in view.directory(d).glob(LINK_REMAP_GLOB)))
    return out


def remove_files(paths: Iterable[Path]) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
