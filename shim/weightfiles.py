"""The weight files of a model, read into the page cache while its tree comes back.

A model evicted with ``weights = "discard"`` reloads its weights from their files after the
restore (or CUDA resume) of its tree. Read one after the other, the disk first serves the
images, then the weights, and the restore's own seconds (CRIU filling memory, the driver's
CUDA restore) pass with the disk idle. Asking the kernel for the weight files at the start
of the restore overlaps the two: the reload then reads what is already in the page cache,
and restore -> first token approaches the disk's time for the bytes that must come from it.

The files are found the way the engines find them: a local ``model_path`` folder, else the
model's snapshot in the Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME``/hub, as
huggingface_hub resolves them, from the engine's environment); for the built-in engine its
own ``model.safetensors`` under the same cache. Nothing is read where the files would not
fit in half the memory available now: pages read ahead and evicted before the reload reaches
them would be read twice.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmux.shim.builtin import paths as builtin_paths
from llmux.shim.config import EngineKind, ModelConfig

#: the formats vLLM loads, best first: the first that a folder holds is the weights
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")
#: what one readahead request may ask for where the device does not say (the kernel's
#: default read_ahead_kb): the kernel reads at most max(read_ahead_kb, max_sectors_kb) of
#: one POSIX_FADV_WILLNEED and drops the rest
DEFAULT_CHUNK_BYTES = 128 << 10
#: requests in flight at once: a few, so that the restore's own reads of its images from
#: the same disk take their turns between them (8.6 GB queued at once held a restore's
#: reads behind them: 1.36 s -> 5.23 s)
WINDOW_CHUNKS = 2
#: the share of the memory available now that the files may take
MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class Prefetched:
    """What one prefetch asked the kernel for, and how long the asking took."""

    files: int
    bytes: int
    seconds: float
    skipped: str = ""
    """Why nothing was read ("" when it was)."""


def weight_files(model: ModelConfig, env: Mapping[str, str]) -> list[Path]:
    """The files ``model``'s engine loads its weights from ([] where none is found)."""
    if model.engine is EngineKind.BUILTIN:
        return _builtin_files(model, env)
    folder = _model_folder(model.model_path, env)
    if folder is None:
        return []
    for pattern in WEIGHT_PATTERNS:
        found = sorted(p for p in folder.glob(pattern) if p.is_file())
        if found:
            return found
    return []


def _hf_home(env: Mapping[str, str]) -> Path:
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"])
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path(env.get("HOME") or Path.home()) / ".cache"
    return base / "huggingface"


def _hub_cache(env: Mapping[str, str]) -> Path:
    return Path(env["HF_HUB_CACHE"]) if env.get("HF_HUB_CACHE") else _hf_home(env) / "hub"


def _model_folder(model_path: str, env: Mapping[str, str]) -> Path | None:
    local = Path(model_path).expanduser()
    if local.is_dir():
        return local
    if model_path.count("/") != 1:
        return None
    repo = _hub_cache(env) / ("models--" + model_path.replace("/", "--"))
    snapshots = repo / "snapshots"
    try:
        revision = (repo / "refs" / "main").read_text().strip()
    except OSError:
        revision = ""
    if revision and (snapshots / revision).is_dir():
        return snapshots / revision
    found = sorted(snapshots.glob("*")) if snapshots.is_dir() else []
    return found[-1] if len(found) == 1 else None


def _builtin_files(model: ModelConfig, env: Mapping[str, str]) -> list[Path]:
    chosen = env.get("LLMUX_BUILTIN_BACKEND", "").strip().lower()
    candidates = [builtin_paths.checkpoint_dir(model.model_path, backend, model.weights_mb,
                                               _hf_home(env)) / "model.safetensors"
                  for backend in ((chosen,) if chosen else ("torch", "pure"))]
    return [p for p in candidates if p.is_file()][:1]


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def readahead_bytes(fd: int) -> int:
    """The most one ``POSIX_FADV_WILLNEED`` on ``fd`` reads: its block device's
    max(read_ahead_kb, max_sectors_kb) (a partition's are its disk's), else the default."""
    try:
        dev = os.fstat(fd).st_dev
        block = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
    except OSError:
        return DEFAULT_CHUNK_BYTES
    for folder in (block / "queue", block.parent / "queue"):
        try:
            kib = max(int((folder / name).read_text()) for name in
                      ("read_ahead_kb", "max_sectors_kb"))
        except (OSError, ValueError):
            continue
        return max(kib << 10, DEFAULT_CHUNK_BYTES)
    return DEFAULT_CHUNK_BYTES


def prefetch(files: Sequence[Path], stop: threading.Event | None = None) -> Prefetched:
    """Ask the kernel to read ``files`` into the page cache (``POSIX_FADV_WILLNEED``, in
    requests no larger than it serves whole, a few in flight at a time: no copies into this
    process); returns once the last request is queued, or at ``stop``. Blocking: run it in a
    thread."""
    t = time.monotonic()
    sizes: list[tuple[Path, int]] = []
    for path in files:
        try:
            sizes.append((path, path.stat().st_size))
        except OSError:
            continue
    total = sum(size for _p, size in sizes)
    room = int(available_bytes() * MEMORY_SHARE)
    if total > room:
        return Prefetched(0, 0, time.monotonic() - t,
                          skipped=f"{total >> 20} MiB of weights, more than half the "
                                  f"{room * 2 >> 20} MiB of memory available")
    asked = 0
    done = 0
    for path, size in sizes:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            # this descriptor's own reads (the waits below) start no readahead of their own
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            chunk = readahead_bytes(fd)
            offsets = range(0, size, chunk)
            for i, offset in enumerate(offsets):
                if stop is not None and stop.is_set():
                    return Prefetched(done, asked, time.monotonic() - t, skipped="stopped")
                length = min(chunk, size - offset)
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
                asked += length
                if i >= WINDOW_CHUNKS:  # wait for an earlier request: a bounded window
                    os.pread(fd, 1, offsets[i - WINDOW_CHUNKS] + chunk - 1)
        except OSError:
            continue
        finally:
            os.close(fd)
        done += 1
    return Prefetched(done, asked, time.monotonic() - t)
