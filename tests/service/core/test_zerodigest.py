"""The zero-skipping checksum of saved files (zerodigest.py) and the restore's verify of
them (upperfiles.verify), on real sparse files: a hole and a written zero are the same
contents, any changed byte or size is caught, old plain SHA-256 values still verify."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from llmux.common.errors import ManifestMismatch
from llmux.service.core import upperfiles, zerodigest
from llmux.service.core.upperfiles import SavedFile

MiB = 1 << 20


def _sparse(path: Path, size: int, data: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, chunk in data.items():
            f.seek(offset)
            f.write(chunk)
    return path


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_holes_and_written_zeros_give_one_digest(tmp_path: Path) -> None:
    data = {3 * MiB + 17: b"vLLM ring buffer head", 40 * MiB - 5: b"tail"}
    sparse = _sparse(tmp_path / "sparse", 40 * MiB, data)
    assert _allocated(sparse) < MiB
    dense = tmp_path / "dense"
    contents = sparse.read_bytes()
    dense.write_bytes(contents)
    assert _allocated(dense) >= 40 * MiB
    streamed = zerodigest.NonzeroDigest()
    for i in range(0, len(contents), 123_457):  # any piece sizes, in order
        streamed.update(contents[i:i + 123_457])
    want = streamed.hexdigest()
    assert want.startswith(zerodigest.PREFIX)
    assert zerodigest.of_file(sparse) == zerodigest.of_file(dense) == want


@pytest.mark.parametrize("change", ["byte in data", "byte in a hole", "size"])
def test_any_change_is_caught(tmp_path: Path, change: str) -> None:
    original = _sparse(tmp_path / "a", 8 * MiB, {MiB: b"x" * 100})
    other = tmp_path / "b"
    if change == "byte in data":
        _sparse(other, 8 * MiB, {MiB: b"x" * 99 + b"y"})
    elif change == "byte in a hole":
        _sparse(other, 8 * MiB, {MiB: b"x" * 100, 6 * MiB: b"\x01"})
    else:
        _sparse(other, 8 * MiB + 4096, {MiB: b"x" * 100})
    assert zerodigest.of_file(original) != zerodigest.of_file(other)


def _saved(tmp_path: Path, size: int, data: dict[int, bytes]) -> tuple[SavedFile, Path]:
    src = _sparse(tmp_path / "segment", size, data)
    files = tmp_path / "files"
    files.mkdir()
    [saved] = upperfiles.save([str(src)], Path("/"), files, reason="dev-shm")
    return saved, files


def test_verify_reads_the_new_digest_and_catches_corruption(tmp_path: Path) -> None:
    saved, files = _saved(tmp_path, 64 * MiB, {5 * MiB: b"state"})
    assert saved.sha256.startswith(zerodigest.PREFIX)
    assert _allocated(files / saved.stored) < 2 * MiB, "stored sparse"
    upperfiles.verify([saved], files)
    with open(files / saved.stored, "r+b") as f:  # a hole turned into data
        f.seek(50 * MiB)
        f.write(b"\x07")
    with pytest.raises(ManifestMismatch, match="checksum differs"):
        upperfiles.verify([saved], files)


def test_verify_still_takes_a_plain_sha256(tmp_path: Path) -> None:
    """Checkpoints of earlier versions recorded SHA-256 of the whole file."""
    saved, files = _saved(tmp_path, 2 * MiB, {100: b"old"})
    plain = hashlib.sha256((files / saved.stored).read_bytes()).hexdigest()
    old = SavedFile.from_dict({**saved.to_dict(), "sha256": plain})
    upperfiles.verify([old], files)
    broken = SavedFile.from_dict({**saved.to_dict(), "sha256": "0" * 64})
    with pytest.raises(ManifestMismatch):
        upperfiles.verify([broken], files)


def test_put_back_copies_data_and_keeps_holes(tmp_path: Path) -> None:
    """The put-back reads only the data extents: the target has the same bytes, sparse."""
    data = {0: b"head", 7 * MiB + 3: b"middle", 32 * MiB - 4: b"tail"}
    saved, files = _saved(tmp_path, 32 * MiB, data)
    target = tmp_path / "target"
    target.mkdir()
    upperfiles.put_back([SavedFile.from_dict({**saved.to_dict(), "path": "/seg"})], files,
                        target)
    back = target / "seg"
    assert back.read_bytes() == (tmp_path / "segment").read_bytes()
    assert _allocated(back) < 4 * MiB
    assert zerodigest.of_file(back) == saved.sha256
