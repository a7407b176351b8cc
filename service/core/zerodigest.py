"""A checksum of a saved file that skips its zeros, so that a restore verifies it without
reading its holes.

vLLM's /dev/shm segments are hundreds of MiB, nearly all never written (real vLLM CPU:
400 MiB, 100% zero pages, ``llmux checkpoints --explain``). The dump saves them sparse, but
a SHA-256 of the whole file still reads and hashes every zero: 0.3-0.8 s of each restore
on the 2-core test box. This digest hashes only the non-zero chunks, each with its offset,
and the size: it is the same for the same contents however the zeros are stored (holes or
written zeros, after any copy), and the verifier finds the data with SEEK_DATA/SEEK_HOLE.

Recorded as ``PREFIX + hex`` in SavedFile.sha256; a value without the prefix is a plain
SHA-256 of the whole file (checkpoints of earlier versions).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PREFIX = "nz-sha256:"
CHUNK = 1 << 20
_ZEROS = bytes(CHUNK)


class NonzeroDigest:
    """Fed the file's bytes in order (any piece sizes), like hashlib's update()."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._pending = bytearray()
        self._offset = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._pending += data
        while len(self._pending) >= CHUNK:
            self._chunk(bytes(self._pending[:CHUNK]))
            del self._pending[:CHUNK]

    def feed_at(self, offset: int, chunk: bytes) -> None:
        """One whole chunk at a CHUNK-aligned offset (the verifier's way: holes skipped)."""
        self._offset = offset
        self._chunk(chunk)

    def _chunk(self, chunk: bytes) -> None:
        if chunk != _ZEROS[: len(chunk)]:
            self._hash.update(self._offset.to_bytes(8, "little"))
            self._hash.update(len(chunk).to_bytes(8, "little"))
            self._hash.update(chunk)
        self._offset += len(chunk)

    def hexdigest(self, size: int | None = None) -> str:
        """PREFIX + hex; ``size`` is the file's (the bytes fed, when not given)."""
        if self._pending:
            self._chunk(bytes(self._pending))
            self._pending.clear()
        final = self._hash.copy()
        final.update((self._offset if size is None else size).to_bytes(8, "little"))
        return PREFIX + final.hexdigest()


def of_file(path: Path) -> str:
    """The digest of a file, reading only its data extents (chunk-aligned)."""
    digest = NonzeroDigest()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            start = data - data % CHUNK
            while start < hole:
                chunk = os.pread(fd, min(CHUNK, size - start), start)
                if not chunk:
                    break
                digest.feed_at(start, chunk)
                start += CHUNK
            offset = max(start, hole)
    finally:
        os.close(fd)
    return digest.hexdigest(size)
