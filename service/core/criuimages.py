"""Reading CRIU's image files without CRIU's own tools: the few records that say what memory is.

A checkpoint's size is CRIU's pages images (``pages-N.img``, raw 4 KiB pages) plus the
files llmux saved beside them. What the pages are is written in the small protobuf
images: ``pstree.img`` (the processes), ``core-PID.img`` (each one's name),
``mm-PID.img`` (its mappings, ``vma_entry``), ``pagemap-PID.img`` (which pages of which
addresses are in which pages image) and ``files.img`` (the file behind a mapping).
The bundle at /opt/llmux/criu ships no ``crit`` (it needs python3-pycriu and protobuf,
which the host's llmuxd does not have), and these five messages are stable image ABI
(images/*.proto in CRIU), so the fields read here are decoded by hand; unknown fields are
skipped as protobuf says.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PAGE = 4096

#: the first word of every protobuf image: IMG_COMMON_MAGIC or IMG_SERVICE_MAGIC; the
#: image's own magic follows it
_COMMON_MAGICS = (0x54564319, 0x55105940)

# vma_entry.status bits (criu/include/image.h)
VMA_AREA_REGULAR = 1 << 0
VMA_AREA_STACK = 1 << 1
VMA_AREA_VSYSCALL = 1 << 2
VMA_AREA_VDSO = 1 << 3
VMA_AREA_HEAP = 1 << 5
VMA_FILE_PRIVATE = 1 << 6
VMA_FILE_SHARED = 1 << 7
VMA_ANON_SHARED = 1 << 8
VMA_ANON_PRIVATE = 1 << 9
VMA_AREA_SYSVIPC = 1 << 10
VMA_AREA_VVAR = 1 << 12
VMA_AREA_MEMFD = 1 << 14

# pagemap_entry.flags (criu/include/pagemap.h)
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2

PROT_WRITE = 0x2


def magic(path: Path) -> bytes:
    """The magic words an image starts with (what a copy written anew starts with too)."""
    with path.open("rb") as f:
        head = f.read(8)
    if len(head) < 4:
        raise ImageError(f"{path.name}: too short for a CRIU image")
    return head[:8] if struct.unpack_from("<I", head)[0] in _COMMON_MAGICS else head[:4]


class ImageError(ValueError):
    """An image file that is not what its name says (truncated, another format)."""


# ------------------------------------------------------------------------------ protobuf


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf):
            raise ImageError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 70:
            raise ImageError("varint too long")


def fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of one message: varints and fixed ints as int, the rest bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield number, value
        elif wire == 1:
            yield number, int.from_bytes(buf[i:i + 8], "little")
            i += 8
        elif wire == 2:
            size, i = _varint(buf, i)
            if i + size > len(buf):
                raise ImageError("truncated field")
            yield number, buf[i:i + size]
            i += size
        elif wire == 5:
            yield number, int.from_bytes(buf[i:i + 4], "little")
            i += 4
        else:
            raise ImageError(f"unknown protobuf wire type {wire}")


def _ints(buf: bytes) -> dict[int, int]:
    return {n: v for n, v in fields(buf) if isinstance(v, int)}


def entries(path: Path) -> Iterator[bytes]:
    """The protobuf entries of one image: magic words, then (u32 size, message) pairs."""
    data = path.read_bytes()
    if len(data) < 4:
        raise ImageError(f"{path.name}: too short for a CRIU image")
    i = 8 if struct.unpack_from("<I", data)[0] in _COMMON_MAGICS else 4
    while i < len(data):
        if i + 4 > len(data):
            raise ImageError(f"{path.name}: truncated entry header")
        (size,) = struct.unpack_from("<I", data, i)
        i += 4
        if i + size > len(data):
            raise ImageError(f"{path.name}: truncated entry")
        yield data[i:i + size]
        i += size


# ------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class Vma:
    start: int
    end: int
    pgoff: int
    shmid: int
    """For a file mapping, the id of its file in files.img; for shared memory, its id."""
    prot: int
    flags: int
    status: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PagemapEntry:
    vaddr: int
    nr_pages: int
    flags: int
    """PE_* bits (images before the flags field: PE_PARENT or PE_PRESENT, as CRIU reads
    them)."""

    @property
    def stored(self) -> bool:
        """Its pages are in the pages image (not in a parent image)."""
        return bool(self.flags & PE_PRESENT)


@dataclass(frozen=True)
class Pagemap:
    pages_id: int
    entries: tuple[PagemapEntry, ...]


def read_pstree(images: Path) -> list[tuple[int, int]]:
    """(pid, ppid) of every process, root first."""
    out = []
    for raw in entries(images / "pstree.img"):
        f = _ints(raw)
        out.append((f.get(1, 0), f.get(2, 0)))
    return out


def read_comm(images: Path, pid: int) -> str:
    """The process's name (core_entry.tc.comm), "" when the image has none."""
    for raw in entries(images / f"core-{pid}.img"):
        for number, value in fields(raw):
            if number == 3 and isinstance(value, bytes):
                for n2, v2 in fields(value):
                    if n2 == 6 and isinstance(v2, bytes):
                        return v2.decode(errors="replace")
    return ""


def read_vmas(images: Path, pid: int) -> list[Vma]:
    """The process's mappings (mm_entry.vmas), sorted by address."""
    vmas = []
    for raw in entries(images / f"mm-{pid}.img"):
        for number, value in fields(raw):
            if number == 14 and isinstance(value, bytes):
                f = _ints(value)
                vmas.append(Vma(f.get(1, 0), f.get(2, 0), f.get(3, 0), f.get(4, 0),
                                f.get(5, 0), f.get(6, 0), f.get(7, 0)))
    return sorted(vmas, key=lambda v: v.start)


def read_pagemap(path: Path) -> Pagemap:
    """A pagemap image: its head names the pages image, the entries its pages, in order."""
    it = entries(path)
    head = next(it, None)
    if head is None:
        raise ImageError(f"{path.name}: no pagemap head")
    pages_id = _ints(head).get(1, 0)
    out = []
    for raw in it:
        f = _ints(raw)
        # as CRIU's pagemap_entry fix-up: in_parent (field 3) means PE_PARENT; images
        # before the flags field (4) hold present pages otherwise
        flags = f.get(4, 0) | PE_PARENT if f.get(3) else f.get(4, PE_PRESENT)
        # nr_pages is field 5 (uint64) since CRIU 3.16; older images have field 2 (uint32)
        out.append(PagemapEntry(f.get(1, 0), f.get(5) or f.get(2, 0), flags))
    return Pagemap(pages_id, tuple(out))


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_pagemap_entry(e: PagemapEntry) -> bytes:
    """A pagemap_entry as CRIU 4.2 writes one: vaddr, compat_nr_pages 0, flags, nr_pages."""
    return (b"\x08" + _encode_varint(e.vaddr) + b"\x10\x00" + b"\x20" + _encode_varint(e.flags)
            + b"\x28" + _encode_varint(e.nr_pages))


def framed(message: bytes) -> bytes:
    """An image entry: its size (u32), then the message."""
    return struct.pack("<I", len(message)) + message


def read_file_paths(images: Path) -> dict[int, str]:
    """Regular files by id (files.img file_entry.reg: id and name)."""
    out: dict[int, str] = {}
    path = images / "files.img"
    if not path.exists():
        return out
    for raw in entries(path):
        for number, value in fields(raw):
            if number == 3 and isinstance(value, bytes):  # reg_file_entry
                reg = dict(fields(value))
                name = reg.get(6)
                ident = reg.get(1)
                if isinstance(name, bytes) and isinstance(ident, int):
                    out[ident] = name.decode(errors="replace")
    return out


def read_memfd_names(images: Path) -> dict[int, str]:
    """Shared memory ids to their memfd names (memfd.img's memfd_inode_entry: name,
    shmid); a shared anonymous mapping is a memfd named "/dev/zero" to CRIU."""
    out: dict[int, str] = {}
    path = images / "memfd.img"
    if not path.exists():
        return out
    for raw in entries(path):
        f = dict(fields(raw))
        name, shmid = f.get(1), f.get(5)
        if isinstance(name, bytes) and isinstance(shmid, int):
            out[shmid] = name.decode(errors="replace")
    return out


_SHMEM = re.compile(r"^pagemap-shmem-(\d+)\.img$")


def shmem_pagemaps(images: Path) -> dict[int, Path]:
    """Shared anonymous memory and memfd contents: one pagemap per shmid."""
    found = {}
    for p in images.iterdir():
        m = _SHMEM.match(p.name)
        if m:
            found[int(m.group(1))] = p
    return found
