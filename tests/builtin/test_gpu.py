"""The torch backend on a real GPU: weights and KV cache in CUDA virtual memory (vLLM's
CuMemAllocator), sleep levels unmap it, a wake maps it at the same addresses."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmux.shim.builtin.testing import EngineProcess, start_engine
from tests.support.builtin_engine import EngineEnv

MIB = 1 << 20


def _cuda_available() -> bool:
    """Cheap (no torch import at collection): PyTorch installed and an NVIDIA device node."""
    return importlib.util.find_spec("torch") is not None and Path("/dev/nvidiactl").exists()


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _cuda_available(), reason="no CUDA device visible to PyTorch"),
]


def state(engine: EngineProcess) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{engine.base_url}/engine_state").json()
    return body


def text(engine: EngineProcess) -> str:
    response = httpx.post(f"{engine.base_url}/v1/completions", timeout=60,
                          json={"prompt": "the golden bridge", "max_tokens": 8})
    assert response.status_code == 200, response.text
    value: str = response.json()["choices"][0]["text"]
    return value


def post(engine: EngineProcess, path: str) -> int:
    return httpx.post(f"{engine.base_url}{path}", timeout=120).status_code


def test_weights_live_on_the_gpu_and_sleep_levels_free_it(engine_env: EngineEnv) -> None:
    with start_engine("test-org/gpu-model", weights_mb=1024,
                      extra_env=engine_env("torch")) as engine:
        awake = state(engine)
        assert awake["device"] == "cuda"
        assert awake["cuda_memory_allocated"] >= 1024 * MIB
        before = text(engine)

        assert awake["cumem_weights_mapped_bytes"] >= 1024 * MIB
        assert awake["cumem_kv_cache_mapped_bytes"] >= 64 * MIB
        assert awake["cuda_graphs"] is True
        assert (awake["distributed"], awake["world_size"]) == ("nccl", 1)
        checksum = checksum_of(engine)

        assert post(engine, "/sleep?level=1") == 200
        offloaded = state(engine)
        assert offloaded["weights"] == "host"
        assert offloaded["cumem_mapped_bytes"] == 0
        assert offloaded["cumem_backup_bytes"] >= 1024 * MIB  # pinned host copy
        assert offloaded["cuda_memory_allocated"] < 16 * MIB
        assert offloaded["cuda_memory_reserved"] < 64 * MIB
        assert post(engine, "/wake_up") == 200
        woke = state(engine)
        assert woke["cuda_memory_allocated"] >= 1024 * MIB
        assert woke["cumem_backup_bytes"] == 0
        assert text(engine) == before
        assert checksum_of(engine) == checksum
        # the pinned buffers of the wake stay, as PyTorch's host cache keeps vLLM's, and
        # the next level-1 sleep reuses them instead of pinning again
        spare = state(engine)["cumem_spare_pinned_bytes"]
        assert spare >= 1024 * MIB
        time.sleep(3)
        assert state(engine)["cumem_spare_pinned_bytes"] == spare
        assert post(engine, "/sleep?level=1") == 200
        assert state(engine)["cumem_spare_pinned_bytes"] == 0
        assert state(engine)["cumem_backup_bytes"] == spare
        assert post(engine, "/wake_up") == 200
        assert text(engine) == before

        assert post(engine, "/sleep?level=2") == 200
        discarded = state(engine)
        assert discarded["resident_weight_bytes"] == 0
        assert discarded["cuda_memory_allocated"] < 16 * MIB
        assert post(engine, "/wake_up") == 200
        assert post(engine, "/reload_weights") == 200
        assert state(engine)["weights"] == "device"
        assert text(engine) == before
        assert checksum_of(engine) == checksum


def checksum_of(engine: EngineProcess) -> int:
    r = httpx.post(f"{engine.base_url}/collective_rpc", timeout=120,
                   json={"method": "weights_checksum"})
    assert r.status_code == 200, r.text
    value: int = r.json()["results"][0]
    return value


def test_enforce_eager_captures_no_graph(engine_env: EngineEnv) -> None:
    with start_engine("test-org/gpu-eager", weights_mb=16, extra_env=engine_env("torch"),
                      extra_args=["--enforce-eager", "--kv-cache-memory-bytes", "32M"]) as engine:
        described = state(engine)
        assert described["cuda_graphs"] is False
        assert described["cumem_kv_cache_mapped_bytes"] == 32 * MIB
        eager = text(engine)
    with start_engine("test-org/gpu-eager", weights_mb=16,
                      extra_env=engine_env("torch")) as engine:
        assert state(engine)["cuda_graphs"] is True
        assert text(engine) == eager  # the graph computes what eager mode does


def test_cumem_allocator_keeps_addresses_and_contents() -> None:
    """In this process: a sleep frees the GPU memory, a wake maps it at the same address."""
    import torch

    from llmux.shim.builtin.cumem import CuMemAllocator

    allocator = CuMemAllocator(0)
    allocator.create_pool("weights", 256 * MIB)
    allocator.create_pool("kv_cache", 64 * MIB)
    try:
        weights = allocator.tensor("weights", (64 * MIB,), torch.float32)
        kv = allocator.tensor("kv_cache", (64 * MIB,), torch.uint8)
        weights.copy_(torch.arange(64 * MIB, dtype=torch.float32, device="cuda"))
        kv.fill_(7)
        address, total = weights.data_ptr(), float(weights.sum().item())
        free_awake = torch.cuda.mem_get_info()[0]
        allocator.sleep(offload_tags=["weights"])
        assert allocator.mapped_bytes() == 0
        assert allocator.backup_bytes("weights") == 256 * MIB
        assert allocator.backup_bytes("kv_cache") == 0
        assert torch.cuda.mem_get_info()[0] - free_awake >= 300 * MIB
        allocator.wake_up()
        assert weights.data_ptr() == address
        assert float(weights.sum().item()) == total
        assert allocator.backup_bytes() == 0
        kv.fill_(1)  # mapped again, writable (its contents were dropped, as vLLM's are)
        assert int(kv.sum().item()) == 64 * MIB
    finally:
        allocator.free_pool("weights")
        allocator.free_pool("kv_cache")


def test_eight_readers_load_the_same_weights_as_one(engine_env: EngineEnv) -> None:
    """The parallel loader (LLMUX_BUILTIN_LOAD_THREADS): every chunk through its reader's
    pinned staging buffer and stream lands where one reader puts it, at start and at the
    reload after a level-2 sleep."""
    with start_engine("test-org/gpu-readers", weights_mb=512,
                      extra_env=engine_env("torch")) as engine:
        one = checksum_of(engine), text(engine)
    env = {**engine_env("torch"), "LLMUX_BUILTIN_LOAD_THREADS": "8"}
    with start_engine("test-org/gpu-readers", weights_mb=512, extra_env=env) as engine:
        assert (checksum_of(engine), text(engine)) == one
        assert post(engine, "/sleep?level=2") == 200
        assert post(engine, "/wake_up") == 200
        assert post(engine, "/reload_weights") == 200
        assert (checksum_of(engine), text(engine)) == one
