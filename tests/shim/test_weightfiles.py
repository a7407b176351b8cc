"""Which files a model's weights are read from, and their read-ahead into the page cache
while its tree comes back (llmux.shim.weightfiles)."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from pathlib import Path

import pytest

from llmux.shim import weightfiles
from llmux.shim.builtin import paths as builtin_paths
from llmux.shim.config import EngineKind, ModelConfig

MIB = 1 << 20


def model(path: str, engine: EngineKind = EngineKind.VLLM, weights_mb: int = 8) -> ModelConfig:
    return ModelConfig(name="m", model_path=path, port=1, engine=engine, weights_mb=weights_mb)


def touch(path: Path, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"w" * size)
    return path


def test_a_local_folder_gives_its_safetensors_and_nothing_else(tmp_path: Path) -> None:
    shards = [touch(tmp_path / f"model-0000{i}-of-00002.safetensors") for i in (1, 2)]
    touch(tmp_path / "pytorch_model.bin")
    touch(tmp_path / "config.json")
    touch(tmp_path / "tokenizer.json")
    assert weightfiles.weight_files(model(str(tmp_path)), {}) == shards


def test_a_folder_without_safetensors_gives_its_bin_files(tmp_path: Path) -> None:
    weights = touch(tmp_path / "pytorch_model.bin")
    touch(tmp_path / "config.json")
    assert weightfiles.weight_files(model(str(tmp_path)), {}) == [weights]


def test_a_hub_id_is_found_in_the_cache_at_the_revision_main_names(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--Org--Name"
    touch(repo / "snapshots" / "old" / "model.safetensors")
    current = touch(repo / "snapshots" / "abc123" / "model.safetensors")
    touch(repo / "refs" / "main").write_text("abc123\n")
    assert weightfiles.weight_files(model("Org/Name"), {"HF_HOME": str(tmp_path)}) == [current]
    # HF_HUB_CACHE wins over HF_HOME, as in huggingface_hub
    assert weightfiles.weight_files(
        model("Org/Name"), {"HF_HOME": "/nonexistent", "HF_HUB_CACHE": str(tmp_path / "hub")}
    ) == [current]


def test_nothing_is_found_for_a_model_not_on_this_host(tmp_path: Path) -> None:
    assert weightfiles.weight_files(model("Org/Absent"), {"HF_HOME": str(tmp_path)}) == []
    assert weightfiles.weight_files(model(str(tmp_path / "absent")), {}) == []


def test_the_builtin_engine_s_file_is_under_the_engine_s_hf_home(tmp_path: Path) -> None:
    cfg = model("org/tiny", EngineKind.BUILTIN, weights_mb=16)
    pure = builtin_paths.checkpoint_dir("org/tiny", "pure", 16, tmp_path) / "model.safetensors"
    torch = builtin_paths.checkpoint_dir("org/tiny", "torch", 16, tmp_path) / "model.safetensors"
    touch(pure)
    env = {"HF_HOME": str(tmp_path)}
    assert weightfiles.weight_files(cfg, env) == [pure]
    touch(torch)
    assert weightfiles.weight_files(cfg, env) == [torch]
    assert weightfiles.weight_files(cfg, {**env, "LLMUX_BUILTIN_BACKEND": "pure"}) == [pure]
    assert weightfiles.weight_files(model("org/tiny", EngineKind.BUILTIN, 32), env) == []


def resident_fraction(path: Path) -> float:
    """The share of ``path``'s pages in the page cache (mincore over a shared mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        base = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if base in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(base, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            libc.munmap(base, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) / pages


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_prefetch_brings_the_files_into_the_page_cache(tmp_path: Path) -> None:
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for i, path in enumerate(files):
        path.write_bytes(os.urandom(MIB) * (24 + 8 * i))
        evict(path)
    assert max(resident_fraction(p) for p in files) < 0.5, "the test's files stayed cached"
    done = weightfiles.prefetch(files)
    assert (done.files, done.bytes, done.skipped) == (2, 56 * MIB, "")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and min(resident_fraction(p) for p in files) < 1.0:
        time.sleep(0.05)
    assert [resident_fraction(p) for p in files] == [1.0, 1.0]


def test_prefetch_reads_nothing_that_would_not_fit_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = touch(tmp_path / "model.safetensors", 4 * MIB)
    monkeypatch.setattr(weightfiles, "MEMORY_SHARE", 0.0)
    done = weightfiles.prefetch([path])
    assert (done.files, done.bytes) == (0, 0)
    assert "4 MiB of weights, more than half the" in done.skipped


def test_prefetch_stops_when_told(tmp_path: Path) -> None:
    path = touch(tmp_path / "model.safetensors", 4 * MIB)
    stop = threading.Event()
    stop.set()
    assert weightfiles.prefetch([path], stop) == weightfiles.Prefetched(
        0, 0, pytest.approx(0, abs=1.0), skipped="stopped")  # type: ignore[arg-type]
