"""What a checkpoint's bytes are: every stored page by the kind of mapping it came from.

To make images smaller one must know what they hold. CRIU stores, per process, the pages
of private anonymous memory and the written (copied-on-write) pages of private file
mappings; shared memory once per segment; llmux saves /dev/shm segments and the writable
layer's files beside them. This module reads the images (criuimages.py) and sorts each
stored page under its mapping's kind, and counts the pages that need not be stored: all
zeros (a restore could leave them unmapped), or equal to the file page they map (the page
cache has them).

The kinds of anonymous memory are told apart the way glibc and the kernel lay them out:
the brk heap and the main stack by CRIU's own flags; a thread stack by the one-page
PROT_NONE guard just below it; a glibc thread arena by its 64 MiB alignment and span;
the rest by size (an mmap'd block of 1 MiB or more is a large malloc: torch's CPU
tensors and numpy arrays come from there; smaller ones are allocator pieces).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llmux.common.contract import CheckpointBreakdown, MemoryPart, ProcessMemory
from llmux.common.errors import ManifestMismatch, NotFound
from llmux.service.core import authz
from llmux.service.core import criuimages as ci
from llmux.service.core.authz import Caller
from llmux.service.core.criuimages import PAGE, Vma
from llmux.service.core.manifest import Manifest
from llmux.service.core.store import CheckpointStore, check_images, check_model
from llmux.service.core.upperfiles import ViewRoot

ZERO_PAGE = bytes(PAGE)
#: glibc's HEAP_MAX_SIZE on 64-bit: every thread arena is a mapping of this alignment
ARENA_SPAN = 64 << 20
LARGE_BLOCK = 1 << 20
#: a thread stack's guard below it (glibc's default guard is one page; allow a few)
MAX_GUARD = 64 << 10
READ_CHUNK = 4 << 20

HEAP = "heap (brk)"
MAIN_STACK = "main stack"
THREAD_STACKS = "thread stacks"
ARENAS = "malloc thread arenas"
LARGE = "anonymous >= 1 MiB (large allocations: tensors, arrays)"
SMALL = "anonymous < 1 MiB"
RESERVED = "anonymous, no access (reserved)"
LIBRARIES = "libraries and executables (private copies)"
OTHER_FILES = "other files (private copies)"
SHARED_FILES = "shared file mappings"
SHARED_ANON = "shared anonymous memory"
MEMFD = "memfd"
KERNEL = "vdso, vvar, vsyscall"
OTHER = "other"

#: a file's saved copy, by SavedFile.reason
FILE_KINDS = {"dev-shm": "/dev/shm segments", "upper": "writable-layer files",
              "link-remap": "deleted-but-open files"}

Opener = Callable[[str], "os.PathLike[str] | str | None"]
"""A path as the tree saw it -> where to read that file now (None: not readable)."""


def _is_library(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.endswith(".so") or ".so." in name or "/bin/" in path


def classify(vma: Vma, prev: Vma | None, nxt: Vma | None, paths: dict[int, str]) -> str:
    """The kind of one mapping (see the module's docstring for the rules)."""
    st = vma.status
    if st & (ci.VMA_AREA_VDSO | ci.VMA_AREA_VVAR | ci.VMA_AREA_VSYSCALL):
        return KERNEL
    if st & ci.VMA_AREA_HEAP:
        return HEAP
    if st & ci.VMA_AREA_STACK:
        return MAIN_STACK
    if st & ci.VMA_AREA_MEMFD:
        return MEMFD
    if st & (ci.VMA_ANON_SHARED | ci.VMA_AREA_SYSVIPC):
        return SHARED_ANON
    if st & ci.VMA_FILE_SHARED:
        return SHARED_FILES
    if st & ci.VMA_FILE_PRIVATE:
        return LIBRARIES if _is_library(paths.get(vma.shmid, "")) else OTHER_FILES
    if not st & ci.VMA_ANON_PRIVATE:
        return OTHER
    if vma.prot == 0:
        return RESERVED
    if (prev is not None and prev.end == vma.start and prev.prot == 0
            and prev.status & ci.VMA_ANON_PRIVATE and prev.size <= MAX_GUARD):
        return THREAD_STACKS
    if vma.start % ARENA_SPAN == 0 and vma.size <= ARENA_SPAN and (
            vma.size == ARENA_SPAN
            or (nxt is not None and nxt.start == vma.end and nxt.prot == 0
                and nxt.end - vma.start == ARENA_SPAN)):
        return ARENAS
    return LARGE if vma.size >= LARGE_BLOCK else SMALL


@dataclass
class _Tally:
    mappings: int = 0
    mapped: int = 0
    stored: int = 0
    zero: int = 0
    file_equal: int = 0
    duplicate: int = 0

    def part(self, kind: str) -> MemoryPart:
        return MemoryPart(kind=kind, mappings=self.mappings, stored_bytes=self.stored,
                          zero_bytes=self.zero, file_equal_bytes=self.file_equal,
                          duplicate_bytes=self.duplicate, mapped_bytes=self.mapped)


def _zero_pages(buf: memoryview) -> int:
    return sum(1 for o in range(0, len(buf), PAGE) if buf[o:o + PAGE] == ZERO_PAGE)


def _count_pages(buf: memoryview, seen: set[bytes]) -> tuple[int, int]:
    """(zero pages, non-zero pages whose contents an earlier page had: ``seen``)."""
    zero = dup = 0
    for o in range(0, len(buf), PAGE):
        page = buf[o:o + PAGE]
        if page == ZERO_PAGE:
            zero += 1
            continue
        key = hashlib.blake2b(page, digest_size=16).digest()
        if key in seen:
            dup += 1
        else:
            seen.add(key)
    return zero, dup


def _equal_pages(buf: memoryview, file: bytes) -> int:
    return sum(1 for o in range(0, len(buf), PAGE) if buf[o:o + PAGE] == file[o:o + PAGE])


class _Files:
    """The mapped files, opened once each, through the opener."""

    def __init__(self, opener: Opener) -> None:
        self._opener = opener
        self._fds: dict[str, int | None] = {}

    def read(self, path: str, offset: int, size: int) -> bytes | None:
        if path not in self._fds:
            where = self._opener(path)
            fd = None
            if where is not None:
                with contextlib.suppress(OSError):
                    # non-blocking: a FIFO put where the file was must not hang the read
                    fd = os.open(where, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
                                 | os.O_NONBLOCK)
                if fd is not None and not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    fd = None
            self._fds[path] = fd
        fd = self._fds[path]
        if fd is None:
            return None
        try:
            return os.pread(fd, size, offset)
        except OSError:
            return None

    def close(self) -> None:
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)


def _runs(entries: tuple[ci.PagemapEntry, ...]) -> Iterator[tuple[int, int, int]]:
    """(address, pages, offset in the pages image) of each stored run, split to READ_CHUNK."""
    offset = 0
    per = READ_CHUNK // PAGE
    for e in entries:
        if not e.stored:
            continue
        for first in range(0, e.nr_pages, per):
            n = min(per, e.nr_pages - first)
            yield e.vaddr + first * PAGE, n, offset + first * PAGE
        offset += e.nr_pages * PAGE


def _process(images: Path, pid: int, paths: dict[int, str], files: _Files,
             shm_kinds: dict[int, str], seen: set[bytes]) -> ProcessMemory:
    vmas = ci.read_vmas(images, pid)
    kinds = [classify(v, vmas[i - 1] if i else None, vmas[i + 1] if i + 1 < len(vmas) else None,
                      paths) for i, v in enumerate(vmas)]
    tallies: dict[str, _Tally] = {}
    for v, k in zip(vmas, kinds, strict=True):
        t = tallies.setdefault(k, _Tally())
        t.mappings += 1
        t.mapped += v.size
        if k in (SHARED_ANON, MEMFD):
            shm_kinds[v.shmid] = k
    pagemap = ci.read_pagemap(images / f"pagemap-{pid}.img")
    starts = [v.start for v in vmas]
    with open(images / f"pages-{pagemap.pages_id}.img", "rb") as pages:
        for addr, n, offset in _runs(pagemap.entries):
            buf = memoryview(os.pread(pages.fileno(), n * PAGE, offset))
            if len(buf) != n * PAGE:
                raise ci.ImageError(f"pages-{pagemap.pages_id}.img is shorter than its pagemap")
            pos = 0
            while pos < len(buf):
                at = addr + pos
                i = bisect.bisect_right(starts, at) - 1
                vma = vmas[i] if i >= 0 and vmas[i].end > at else None
                end = min(len(buf), pos + (vma.end - at)) if vma else len(buf)
                piece = buf[pos:end]
                t = tallies.setdefault(kinds[i] if vma else OTHER, _Tally())
                t.stored += len(piece)
                zero, dup = _count_pages(piece, seen)
                t.zero += zero * PAGE
                t.duplicate += dup * PAGE
                if vma is not None and vma.status & ci.VMA_FILE_PRIVATE:
                    data = files.read(paths.get(vma.shmid, ""),
                                      vma.pgoff + (at - vma.start), len(piece))
                    if data is not None:
                        t.file_equal += _equal_pages(piece, data) * PAGE
                pos = end
    parts = sorted((t.part(k) for k, t in tallies.items()),
                   key=lambda p: (-p.stored_bytes, p.kind))
    return ProcessMemory(pid=pid, comm=ci.read_comm(images, pid), parts=parts)


def _shared(images: Path, shm_kinds: dict[int, str], seen: set[bytes]) -> list[MemoryPart]:
    tallies: dict[str, _Tally] = {}
    names = ci.read_memfd_names(images)
    for shmid, path in sorted(ci.shmem_pagemaps(images).items()):
        pagemap = ci.read_pagemap(path)
        if shmid in names:
            kind = SHARED_ANON if names[shmid] == "/dev/zero" else MEMFD
        else:
            kind = shm_kinds.get(shmid, SHARED_ANON)
        t = tallies.setdefault(kind, _Tally())
        t.mappings += 1
        with open(images / f"pages-{pagemap.pages_id}.img", "rb") as pages:
            for _addr, n, offset in _runs(pagemap.entries):
                buf = memoryview(os.pread(pages.fileno(), n * PAGE, offset))
                t.stored += len(buf)
                t.mapped += len(buf)
                zero, dup = _count_pages(buf, seen)
                t.zero += zero * PAGE
                t.duplicate += dup * PAGE
    return [t.part(k) for k, t in sorted(tallies.items())]


def _saved_files(manifest: Manifest, files_dir: Path) -> list[MemoryPart]:
    tallies: dict[str, _Tally] = {}
    for f in manifest.files:
        if f.kind != "file":
            continue
        t = tallies.setdefault(FILE_KINDS.get(f.reason, f.reason), _Tally())
        t.mappings += 1
        t.mapped += f.size
        t.stored += f.held_bytes
        zero = 0
        with contextlib.suppress(OSError), open(files_dir / f.stored, "rb") as src:
            while chunk := src.read(READ_CHUNK):
                zero += _zero_pages(memoryview(chunk)) * PAGE
        t.zero += max(0, zero - (f.size - f.held_bytes))  # holes are not stored zeros
    return [t.part(k) for k, t in sorted(tallies.items())]


def explain(manifest: Manifest, images: Path, files_dir: Path,
            opener: Opener = lambda path: path) -> CheckpointBreakdown:
    """The checkpoint's bytes, sorted (blocking: reads every page once)."""
    paths = ci.read_file_paths(images)
    files = _Files(opener)
    shm_kinds: dict[int, str] = {}
    seen: set[bytes] = set()  # 16-byte digests of the non-zero pages read so far
    try:
        processes = [_process(images, pid, paths, files, shm_kinds, seen)
                     for pid, _ppid in ci.read_pstree(images)]
    finally:
        files.close()
    pages_bytes = sum(p.stat().st_size for p in images.glob("pages-*.img"))
    images_bytes = sum(p.stat().st_size for p in images.iterdir() if p.is_file())
    return CheckpointBreakdown(
        model=manifest.model,
        images_bytes=images_bytes,
        files_bytes=manifest.files_bytes,
        processes=processes,
        shared=_shared(images, shm_kinds, seen),
        files=_saved_files(manifest, files_dir),
        other_images_bytes=images_bytes - pages_bytes,
    )



def _explain_for(store: CheckpointStore, caller: Caller, model: str) -> CheckpointBreakdown:
    authz.check_owner(caller, store.get(model).owner_uid, model)
    try:
        view = ViewRoot(caller.pid)
    except OSError:  # the caller is gone: no mapped file is compared
        view = None
    try:
        def opener(path: str) -> Path | None:
            if view is None or not path.startswith("/"):
                return None
            return view.path / path.lstrip("/")

        for attempt in (1, 2):
            # read without holding the model: the images may move between the tiers or
            # lose their zero pages (tiermove.py) under the read; then once again
            manifest = store.get(model)
            images = store.images_dir(model)
            try:
                check_images(model, images, manifest.image_sizes)
                return explain(manifest, images, store.files_dir(model), opener)
            except (FileNotFoundError, ManifestMismatch, ci.ImageError):
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")
    except ci.ImageError as exc:
        raise ManifestMismatch(f"checkpoint {model!r} has an unreadable image: {exc}") from exc
    except FileNotFoundError as exc:
        raise NotFound(f"checkpoint {model!r} went away while it was read") from exc
    finally:
        if view is not None:
            view.close()


async def explain_checkpoint(store: CheckpointStore, caller: Caller,
                             model: str) -> CheckpointBreakdown:
    """ExplainCheckpoint: the caller's own checkpoint, read in a thread."""
    check_model(model)
    return await asyncio.to_thread(_explain_for, store, caller, model)
