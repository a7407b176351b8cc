"""Drop the all-zero pages of private anonymous memory from CRIU's images after a dump.

CRIU 4.2.1 stores every present page, also those a process wrote zeros to: on the GPU, the
CUDA checkpoint's host copy of device memory that was never written (1.3 GiB of a 3.5 GiB
image of vLLM serving Qwen3-0.6B on an H100), and each stored page is read back and
copied into fresh memory by the restore. CRIU restores a private anonymous mapping into
fresh anonymous memory, which reads zero wherever no page is restored (and drops, with
MADV_DONTNEED, an inherited mapping's pages the image does not list), so a page of zeros
there need not be stored. Private file mappings keep every page (a page missing there
would be the file's, not zeros), and so do the images of shared memory and memfds.

The pass runs behind the dump, on a committed checkpoint (tiermove.py): :func:`prepare`
writes each process's new pages image and pagemap beside the old ones (``.zp``) while
restores may read the old ones; then, with the model held, :func:`install` writes a marker
saying the new set is whole and renames it over the old one, the store records the new
sizes in the manifest, and :func:`settle` removes the marker. A service that dies at any
point leaves either the old set or the marker, which :func:`recover` completes. A failure
(no space for the copy, an image it does not know) leaves the old set as it was.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import logging
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from llmux.service.core import criuimages as ci
from llmux.service.core.durable import fsync_dir, write_durably

log = logging.getLogger(__name__)

PAGE = ci.PAGE
#: written once every new file is complete, removed once all are renamed into place
MARKER = "zeropages.done"
SUFFIX = ".zp"
#: what a pass reads at a time
_CHUNK_PAGES = 1024
#: a process whose zero pages are fewer than this keeps its images as they are (the copy
#: would cost more than it saves)
MIN_DROP_BYTES = 4 << 20
#: mappings whose missing pages a restore leaves zero: anonymous and private (heap and
#: stacks included), with no other status bit (an allow-list: a kind CRIU adds later keeps
#: its pages)
_PLAIN_BITS = ci.VMA_AREA_REGULAR | ci.VMA_AREA_STACK | ci.VMA_AREA_HEAP | ci.VMA_ANON_PRIVATE
_ZEROS = bytes(PAGE)
_HEAD = bytes(8)  # a page whose first 8 bytes are not zero is kept at once
#: pagemap flags of pages stored in order in the process's own pages image
_SEQUENTIAL = (ci.PE_PRESENT, ci.PE_PRESENT | ci.PE_LAZY)


@dataclass(frozen=True)
class Dropped:
    """What a pass took out of a checkpoint's images."""

    bytes: int = 0
    processes: int = 0


class _Plain:
    """Which addresses of a process lie in plain private anonymous mappings."""

    def __init__(self, vmas: list[ci.Vma]) -> None:
        self.vmas = [v for v in vmas if v.status & ci.VMA_ANON_PRIVATE
                     and not v.status & ~_PLAIN_BITS]
        self.starts = [v.start for v in self.vmas]

    def __contains__(self, addr: int) -> bool:
        i = bisect.bisect_right(self.starts, addr) - 1
        return i >= 0 and self.vmas[i].start <= addr < self.vmas[i].end


def _plan(images: Path, pid: int) -> tuple[Path, Path, tuple[ci.PagemapEntry, ...]] | None:
    """The pagemap, the pages image and its entries of one process; None when there is
    nothing this pass may touch (no pagemap, pages in a parent image)."""
    pagemap_path = images / f"pagemap-{pid}.img"
    if not pagemap_path.exists():
        return None
    pagemap = ci.read_pagemap(pagemap_path)
    pages_path = images / f"pages-{pagemap.pages_id}.img"
    # PE_LAZY only says a lazy restore could fault them in: they are in the image
    if not pages_path.exists() or any(e.flags not in _SEQUENTIAL for e in pagemap.entries):
        return None
    return pagemap_path, pages_path, pagemap.entries


class _Buffer:
    """One chunk of memory mapped for a pass and unmapped after it. Reads and copies go
    through it: a heap buffer of a few MiB in each worker thread would stay in that
    thread's malloc arena, and llmuxd's RSS would grow with every dump it passes over."""

    def __init__(self, size: int) -> None:
        self.map = mmap.mmap(-1, size)
        self.view = memoryview(self.map)

    def read(self, src: io.BufferedReader, size: int) -> int:
        """Up to ``size`` bytes of ``src`` into the buffer's start; how many."""
        got = 0
        while got < size:
            n = src.readinto(self.view[got:size])
            if not n:
                break
            got += n
        return got

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a view still held: unmapped when freed
            self.view.release()
            self.map.close()


def _rewrite(images: Path, pid: int, pause: Callable[[], None], buf: _Buffer) -> int:
    """The process's images without its droppable zero pages, as ``.zp`` files beside the
    old ones; returns the bytes dropped (0: nothing written). One read of the pages image;
    the copy starts at the first droppable page (what comes before it is copied as is)."""
    plan = _plan(images, pid)
    if plan is None:
        return 0
    pagemap_path, pages_path, entries = plan
    plain = _Plain(ci.read_vmas(images, pid))
    out_path = Path(str(pages_path) + SUFFIX)
    new_entries: list[ci.PagemapEntry] = []
    dropped = 0
    dst: BinaryIO | None = None
    try:
        with pages_path.open("rb") as src:
            done = 0  # bytes of the pages image before the current chunk
            for e in entries:
                vaddr, n, flags = e.vaddr, e.nr_pages, e.flags
                run_start = run_len = 0
                for first in range(0, n, _CHUNK_PAGES):
                    pause()
                    count = min(_CHUNK_PAGES, n - first)
                    if buf.read(src, count * PAGE) != count * PAGE:
                        raise ci.ImageError(f"{pages_path.name}: shorter than its pagemap")
                    raw = buf.map  # sliced as bytes to compare, written from as a view
                    base = vaddr + first * PAGE
                    kept_from = 0  # this chunk's pages from here on are kept, not yet written
                    for i in range(count):
                        addr, at = base + i * PAGE, i * PAGE
                        if (raw[at:at + 8] != _HEAD or raw[at:at + PAGE] != _ZEROS
                                or addr not in plain):
                            if not run_len:
                                run_start = addr
                            run_len += 1
                            continue
                        if dst is None:
                            dst = _copy_start(pages_path, out_path, done)
                        if kept_from < i:
                            dst.write(buf.view[kept_from * PAGE:i * PAGE])
                        kept_from = i + 1
                        dropped += PAGE
                        if run_len:
                            new_entries.append(ci.PagemapEntry(run_start, run_len, flags))
                            run_len = 0
                    if dst is not None and kept_from < count:
                        dst.write(buf.view[kept_from * PAGE:count * PAGE])
                    done += count * PAGE
                if run_len:
                    new_entries.append(ci.PagemapEntry(run_start, run_len, flags))
            if src.read(1):
                raise ci.ImageError(f"{pages_path.name}: longer than its pagemap")
        if dst is None:
            return 0
        if dropped < MIN_DROP_BYTES:  # not worth the renames
            dst.close()
            out_path.unlink()
            return 0
        dst.flush()
        os.fsync(dst.fileno())
    finally:
        if dst is not None:
            dst.close()
    head = next(ci.entries(pagemap_path))
    write_durably(Path(str(pagemap_path) + SUFFIX), ci.magic(pagemap_path) + ci.framed(head)
                  + b"".join(ci.framed(ci.encode_pagemap_entry(e)) for e in new_entries))
    return dropped


def _copy_start(src_path: Path, out_path: Path, length: int) -> BinaryIO:
    """The new pages image, holding the first ``length`` bytes of the old one (copied by
    the kernel: no buffer of ours)."""
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with src_path.open("rb") as src:
            offset = 0
            while offset < length:
                n = os.sendfile(fd, src.fileno(), offset, length - offset)
                if not n:
                    raise ci.ImageError(f"{src_path.name}: shorter than its pagemap")
                offset += n
        return open(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def prepare(images: Path, pause: Callable[[], None] = lambda: None) -> Dropped:
    """The new images of every process without its droppable zero pages, written beside
    the old ones (blocking; ``pause()`` before each chunk may block: the pass is background
    work and gives way). The old images stay in place until :func:`install`. A failure
    leaves them as they were, with no new file, and returns nothing dropped (logged)."""
    total, processes = 0, 0
    buf = _Buffer(_CHUNK_PAGES * PAGE)
    try:
        discard(images)  # what a pass cut short by a stop left
        for pid, _ppid in ci.read_pstree(images):
            pause()  # before the process's files are open: a wait holds none
            dropped = _rewrite(images, pid, pause, buf)
            if dropped:
                total += dropped
                processes += 1
    except (OSError, ci.ImageError) as exc:
        if images.is_dir():
            log.warning("zero pages of %s kept: %s", images, exc)
        discard(images)
        return Dropped()
    finally:
        buf.close()
    return Dropped(total, processes)


def room_needed(images: Path) -> int:
    """The most a pass writes beside the images before the old ones go: its pages images."""
    return sum(p.stat().st_size for p in images.glob("pages-*.img"))


def install(images: Path) -> None:
    """The new set in place of the old (the caller holds the model: no restore reads the
    images meanwhile); the marker stays until :func:`settle`, after the manifest."""
    fsync_dir(images)
    (images / MARKER).touch(mode=0o600)
    fsync_dir(images)
    _rename_new(images)


def settle(images: Path) -> None:
    """The pass is over: its marker goes, once the manifest has the new sizes."""
    with contextlib.suppress(FileNotFoundError):
        (images / MARKER).unlink()
    fsync_dir(images)


def recover(images: Path) -> bool:
    """Finish or undo a pass the service did not live to complete: with the marker the new
    files are whole and go into place (True: the caller records their sizes, then
    :func:`settle`); without it they are removed (False)."""
    if not (images / MARKER).exists():
        discard(images)
        return False
    _rename_new(images)
    return True


def _rename_new(images: Path) -> None:
    for new in sorted(images.glob(f"*{SUFFIX}")):
        os.replace(new, new.with_name(new.name.removesuffix(SUFFIX)))
    fsync_dir(images)


def discard(images: Path) -> None:
    """The new files of a pass not installed (none, if the folder is gone)."""
    with contextlib.suppress(FileNotFoundError):
        for new in images.glob(f"*{SUFFIX}*"):  # write_durably's temp files too
            with contextlib.suppress(FileNotFoundError):
                new.unlink()
