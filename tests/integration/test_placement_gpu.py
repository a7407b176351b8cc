"""Placement on real GPUs: the acceptance of several GPUs in one host (needs two GPUs).

Built-in engines on the torch backend (CUDA), llmuxd with the driver's checkpoint API
(``--cuda-mode api``), the shim placing them over the host's GPUs (found by NVML): two
models each on its own GPU serving at once; a third evicting on the GPU it is pinned to;
a CUDA suspend and a checkpoint taken on GPU 0 brought back on GPU 1 (the driver's device
map) with the same answer. Each test skips, saying why, on a host with fewer than two GPUs.
"""

from __future__ import annotations

import importlib.util
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.llmuxd_harness import Llmuxd, PrivateBus, criu_usable, running_llmuxd
from tests.support.procs import free_port
from tests.support.shimproc import Shim, shims_for_test


def gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def gpus_of(pids: list[int]) -> set[int]:
    """The GPUs NVML sees any of ``pids`` on."""
    import pynvml

    pynvml.nvmlInit()
    try:
        found = set()
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            if {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)} & set(pids):
                found.add(i)
        return found
    finally:
        pynvml.nvmlShutdown()


pytestmark = [
    # gpu only: the criu and dbus tiers are required in CI, where this one skips
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                       reason="the built-in engine's CUDA backend needs PyTorch"),
    pytest.mark.skipif(gpu_count() < 2,
                       reason=f"needs 2 GPUs of one host; NVML finds {gpu_count()}"),
]

A, B, C = "alpha", "beta", "gamma"


@pytest.fixture
def llmuxd_cuda(private_bus: PrivateBus, tmp_path: Path) -> Iterator[Llmuxd]:
    if not criu_usable():
        pytest.skip("llmuxd needs root and CRIU")
    with running_llmuxd(private_bus, tmp_path / "llmuxd", cuda_mode="api") as daemon:
        yield daemon


@pytest.fixture
def gpu_shim(tmp_path: Path, llmuxd_cuda: Llmuxd) -> Iterator[Callable[..., Shim]]:
    """start({name: (eviction, {more keys})}) -> a shim of CUDA built-in engines."""
    tag = secrets.token_hex(8)
    with shims_for_test(tmp_path, tag) as launch:

        def start(models: dict[str, tuple[str, dict[str, Any]]]) -> Shim:
            entries = {}
            for name, (eviction, more) in models.items():
                port = free_port()
                weights, process = eviction.split("+")
                entries[name] = {
                    "model_path": f"llmux-gpu/{name}", "port": port, "engine": "builtin",
                    "weights_mb": 512, "eviction": {"weights": weights, "process": process},
                    "startup_timeout_secs": 300,
                    "env": {"LLMUX_TEST_TAG": tag, "LLMUX_BUILTIN_BACKEND": "torch",
                            "HF_HOME": str(tmp_path / "hf"),
                            "XDG_CACHE_HOME": str(tmp_path / "cache")},
                    **more}
            return launch({"host": "127.0.0.1", "port": free_port(), "metrics_port": 0,
                           "log_dir": str(tmp_path / "engine-logs"),
                           "policy": {"min_active_secs": 0, "request_timeout_secs": 600},
                           "checkpoint": {"bus": llmuxd_cuda.bus.address,
                                          "job_timeout_secs": 600},
                           "models": entries})

        yield start


def test_two_models_on_two_gpus_and_a_third_evicts_on_its_own(
        gpu_shim: Callable[..., Shim]) -> None:
    shim = gpu_shim({A: ("retain+stop", {}), B: ("retain+stop", {}),
                     C: ("retain+stop", {"gpus": [1]})})
    shim.text(A)
    shim.text(B)
    status = shim.status()
    assert status["active_models"] == [A, B]
    assert gpus_of(status["models"][A]["pids"]) == {0}
    assert gpus_of(status["models"][B]["pids"]) == {1}
    shim.text(A)  # B is now the least recently used, and on C's GPU anyway
    shim.text(C)
    status = shim.status()
    assert status["active_models"] == [A, C]
    assert gpus_of(status["models"][C]["pids"]) == {1}


@pytest.mark.parametrize("eviction", ["retain+cuda_suspend", "retain+checkpoint"])
def test_cuda_state_taken_on_gpu_0_comes_back_on_gpu_1(
        gpu_shim: Callable[..., Shim], eviction: str) -> None:
    shim = gpu_shim({A: (eviction, {}), B: ("retain+stop", {}),
                     C: ("retain+stop", {"gpus": [0]})})
    first = shim.text(A)
    shim.text(B)
    shim.text(C)  # pinned to GPU 0: A is put away from there
    assert shim.model_status(A)["state"] in ("suspended", "checkpointed")
    shim.text(C)  # B (GPU 1) is now the least recently used
    again = shim.text(A)
    a = shim.model_status(A)
    assert a["gpus"] == [1] and a["last_wake"] in ("resume", "restore"), shim.log()[-3000:]
    assert gpus_of(a["pids"]) == {1}
    assert again == first
    assert "action=move_gpus map={0: 1}" in shim.log()
