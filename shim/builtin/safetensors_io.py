"""Streaming reader/writer for the safetensors format, usable without torch or numpy.

safetensors' own Python API needs numpy to save and memory-maps on load; the engine
instead has to (a) write multi-GB tensors chunk by chunk, (b) work in the pure-Python
backend and (c) read weights into anonymous memory it owns, so that "4 GB of weights"
really means 4 GB resident. The format is an 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets}} and the raw bytes; files written here open
with the safetensors library unchanged (a test checks that).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I64": 8}
_CHUNK = 16 << 20


@dataclass(frozen=True)
class TensorSpec:
    """What to write: the data comes from ``chunks()`` so it never has to be in memory."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[bytes | memoryview]]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a file on disk: where its bytes are."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class SafetensorsError(ValueError):
    """A file that is not a well-formed safetensors file (names the file and the problem)."""


def write_file(path: Path, tensors: Iterable[TensorSpec], metadata: dict[str, str]) -> None:
    """Write ``path`` atomically (temporary file, fsync, rename)."""
    specs = list(tensors)
    header: dict[str, object] = {"__metadata__": metadata}
    position = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [position, position + spec.nbytes],
        }
        position += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for spec in specs:
            written = 0
            for chunk in spec.chunks():
                out.write(chunk)
                written += len(chunk)
            if written != spec.nbytes:
                raise SafetensorsError(
                    f"{path}: tensor {spec.name!r} produced {written} bytes, expected {spec.nbytes}"
                )
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of ``path`` with absolute file offsets."""
    with open(path, "rb") as src:
        head = src.read(8)
        if len(head) != 8:
            raise SafetensorsError(f"{path}: truncated (no header length)")
        (length,) = struct.unpack("<Q", head)
        if length > 100 << 20:
            raise SafetensorsError(f"{path}: header length {length} is implausible")
        try:
            header = json.loads(src.read(length))
        except ValueError as exc:
            raise SafetensorsError(f"{path}: header is not JSON: {exc}") from exc
    size = path.stat().st_size
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        info = TensorInfo(name, entry["dtype"], tuple(entry["shape"]),
                          8 + length + start, end - start)
        if info.offset + info.nbytes > size:
            raise SafetensorsError(f"{path}: tensor {name!r} runs past the end of the file")
        infos[name] = info
    return infos


def read_into(path: Path, info: TensorInfo, target: memoryview) -> None:
    """Fill ``target`` (exactly ``info.nbytes`` long) with the tensor's bytes."""
    if target.nbytes != info.nbytes:
        raise SafetensorsError(
            f"{path}: {info.name!r} has {info.nbytes} bytes, the buffer {target.nbytes}")
    view = target.cast("B")
    with open(path, "rb", buffering=0) as src:
        src.seek(info.offset)
        done = 0
        while done < info.nbytes:
            got = src.readinto(view[done : done + _CHUNK])
            if not got:
                raise SafetensorsError(f"{path}: unexpected end of file in {info.name!r}")
            done += got


@dataclass(frozen=True)
class Chunk:
    """A piece of one tensor: ``size`` bytes from ``file_offset``, which land at byte
    ``start`` of the tensor."""

    name: str
    start: int
    file_offset: int
    size: int


def chunks_of(infos: Iterable[TensorInfo], chunk_size: int) -> list[Chunk]:
    """Every tensor cut into chunks of at most ``chunk_size`` bytes, in file order."""
    out: list[Chunk] = []
    for info in sorted(infos, key=lambda i: i.offset):
        for start in range(0, info.nbytes, chunk_size):
            out.append(Chunk(info.name, start, info.offset + start,
                             min(chunk_size, info.nbytes - start)))
    return out


def pread_exactly(path: Path, fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``offset`` of the open file (positional: threads share ``fd``)."""
    done = 0
    while done < view.nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            raise SafetensorsError(f"{path}: unexpected end of file at byte {offset + done}")
        done += got


def read_parallel(path: Path, chunks: Sequence[Chunk],
                  readers: Sequence[Callable[[int, Chunk], None]]) -> None:
    """Hand ``chunks`` out to ``readers`` (one thread each, ``reader(fd, chunk)``), next
    chunk to the first one free, so that several reads are in flight at once: one reader
    gets a fraction of what the page cache or an NVMe disk delivers to several. The first
    error stops the others and is raised here."""
    fd = os.open(path, os.O_RDONLY)
    lock = threading.Lock()
    pending = iter(chunks)
    errors: list[BaseException] = []

    def run(reader: Callable[[int, Chunk], None]) -> None:
        while not errors:
            with lock:
                chunk = next(pending, None)
            if chunk is None:
                return
            try:
                reader(fd, chunk)
            except BaseException as exc:
                errors.append(exc)
                return

    try:
        if len(readers) == 1:
            run(readers[0])
        else:
            threads = [threading.Thread(target=run, args=(r,), name=f"load-{i}", daemon=True)
                       for i, r in enumerate(readers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        os.close(fd)
    if errors:
        raise errors[0]
