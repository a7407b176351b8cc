"""Writes that survive a crash: a file is either its old or its new version, on disk.

Every file llmuxd relies on after a crash or a power loss (the manifests, the jobs'
journals, the registry of restored trees) is written here: to ``<name>.new`` beside it,
synced, renamed over it, and the folder synced so that the rename itself is durable. A
crash mid-write leaves ``<name>.new`` at worst, which a reader may judge (the restore
journal's start-up cure does).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TEMP_SUFFIX = ".new"
"""What a write in progress adds to the file's name."""


def fsync_dir(path: Path) -> None:
    """Sync a folder: the names created, renamed or removed in it are on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """Where write_durably writes ``path`` before renaming it into place."""
    return path.with_name(path.name + TEMP_SUFFIX)


def write_durably(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably (write temp, fsync, rename,
    fsync the folder). A failed write removes its temp file and leaves ``path`` as it was."""
    tmp = temp_path(path)
    payload = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_durably(path: Path, value: object, mode: int = 0o600) -> None:
    """write_durably of ``value`` as JSON."""
    write_durably(path, json.dumps(value), mode)
