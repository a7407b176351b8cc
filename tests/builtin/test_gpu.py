"""The torch backend on a real GPU: weights in CUDA memory, sleep levels free it."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmux.shim.builtin.testing import EngineProcess, start_engine

EngineEnv = Callable[[str], dict[str, str]]
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

        assert post(engine, "/sleep?level=1") == 200
        offloaded = state(engine)
        assert offloaded["weights"] == "host"
        assert offloaded["cuda_memory_allocated"] < 16 * MIB
        assert offloaded["cuda_memory_reserved"] < 64 * MIB
        assert post(engine, "/wake_up") == 200
        assert state(engine)["cuda_memory_allocated"] >= 1024 * MIB
        assert text(engine) == before

        assert post(engine, "/sleep?level=2") == 200
        discarded = state(engine)
        assert discarded["resident_weight_bytes"] == 0
        assert discarded["cuda_memory_allocated"] < 16 * MIB
        assert post(engine, "/wake_up") == 200
        assert post(engine, "/reload_weights") == 200
        assert state(engine)["weights"] == "device"
        assert text(engine) == before
