"""The memory budget on a real GPU: two built-in models of 8 GiB each resident together,
a third one evicting the least recently used, the memory as NVML reports it per process.

Run on the GPU machine (packaging/gpu/README.md): ``bash packaging/gpu/pytest-gpu.sh
tests/shim/test_memory_gpu.py``. The figures are printed (``-s``) for the closing note.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmux.shim.memory import MIB, MemoryMeter
from tests.support.proxy_fixtures import ShimFactory, chat_body

WEIGHTS_MB = 8192
#: the CUDA context and PyTorch's allocator come on top of the weights
ESTIMATE_MB = WEIGHTS_MB + 1024
#: holds two models, never three
BUDGET_MB = 2 * (WEIGHTS_MB + 1536)


def _gpu() -> bool:
    """Cheap at collection: PyTorch installed and an NVIDIA device node."""
    return importlib.util.find_spec("torch") is not None and Path("/dev/nvidiactl").exists()


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _gpu(), reason="no NVIDIA GPU (or no PyTorch) here"),
]


def _nvml_report(meter: MemoryMeter, pids: dict[str, list[int]], title: str) -> None:
    nvml = meter.nvml()
    assert nvml is not None, "NVML did not load (nvidia-ml-py and the driver's libnvidia-ml)"
    print(f"\n== {title}")
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        info = nvml.nvmlDeviceGetMemoryInfo(h)
        print(f"GPU {i} {nvml.nvmlDeviceGetName(h)}: used {int(info.used) // MIB} MiB, "
              f"free {int(info.free) // MIB} MiB of {int(info.total) // MIB} MiB")
        for p in nvml.nvmlDeviceGetComputeRunningProcesses(h):
            owner = next((m for m, ps in pids.items() if p.pid in ps), "-")
            used = p.usedGpuMemory
            print(f"  pid {p.pid:>8} model {owner:>6}: "
                  f"{'n/a' if used is None else int(used) // MIB} MiB")


async def test_two_8gb_models_share_the_gpu_and_a_third_evicts_the_lru(
        shim_factory: ShimFactory) -> None:
    each: dict[str, Any] = {
        # one model path: its 8 GiB of weights are written to disk once, loaded three times
        "model_path": "llmux-gpu/budget-8g", "weights_mb": WEIGHTS_MB,
        "memory_mb": ESTIMATE_MB, "extra_args": ["--device", "cuda"],
        "env": {"LLMUX_BUILTIN_BACKEND": "torch"}, "startup_timeout_secs": 900,
        "probe_timeout_secs": 300}
    shim = await shim_factory(["a", "b", "c"], eviction="retain+stop",
                              policy={"memory_budget_mb": BUDGET_MB,
                                      "request_timeout_secs": 1800},
                              a=each, b=each, c=each)
    meter = shim.lifecycle.meter
    async with httpx.AsyncClient(timeout=1800) as http:

        async def ask(model: str) -> None:
            r = await http.post(f"{shim.url}/v1/chat/completions", json=chat_body(model, "gpu"))
            assert r.status_code == 200, r.text
            assert r.json()["model"] == model

        async def status() -> dict[str, Any]:
            body: dict[str, Any] = (await http.get(f"{shim.url}/control/status")).json()
            return body

        await ask("a")
        await ask("b")
        st = await status()
        pids = {m: shim.supervisor.pids(m) for m in ("a", "b", "c")}
        _nvml_report(meter, pids, "a and b resident")
        print({m: (d["state"], d["memory_mb"], d["memory_source"])
               for m, d in st["models"].items()}, "used", st["memory_used_mb"], "budget",
              st["memory_budget_mb"])
        assert sorted(shim.switcher.active_models) == ["a", "b"]
        assert shim.switcher.evictions == 0 and shim.switcher.switches == 2
        for m in ("a", "b"):
            d = st["models"][m]
            assert d["state"] == "running" and d["memory_source"] == "nvml", d
            assert WEIGHTS_MB <= d["memory_mb"] <= WEIGHTS_MB + 4096, d
        assert st["memory_used_mb"] <= BUDGET_MB

        await ask("a")  # b is now the least recently used
        await ask("c")
        st = await status()
        pids = {m: shim.supervisor.pids(m) for m in ("a", "b", "c")}
        _nvml_report(meter, pids, "c evicted the least recently used (b)")
        print({m: (d["state"], d["memory_mb"], d["memory_source"])
               for m, d in st["models"].items()}, "used", st["memory_used_mb"])
        assert sorted(shim.switcher.active_models) == ["a", "c"]
        assert st["models"]["b"]["state"] == "stopped" and not pids["b"]
        assert st["models"]["c"]["memory_source"] == "nvml"
        assert st["memory_used_mb"] <= BUDGET_MB
        # b's GPU memory is really gone: nothing NVML lists belongs to it any more
        assert meter.gpu_bytes(pids["a"]) >= WEIGHTS_MB * MIB
