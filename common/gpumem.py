"""GPU memory per process, as NVML (nvidia-ml-py) attributes it: what a tree holds on GPUs.

The shim's memory budget measures engines by it; llmuxd counts it before a dump, since a
CUDA checkpoint brings all of it (weights, KV cache, graphs' pools) into the CRIU image.
Without an NVIDIA driver there is no NVML, and no process holds GPU memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

#: NVML reports "not available" (a container, MIG) as this or as None
NVML_NOT_AVAILABLE = (1 << 64) - 1


def process_bytes(nvml: Any, pids: Iterable[int]) -> int:
    """GPU memory ``nvml`` (an initialised pynvml) attributes to ``pids`` over every device,
    each process counted once per device. Raises pynvml's NVMLError."""
    wanted = set(pids)
    total = 0
    for i in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        seen: set[int] = set()
        for getter in (nvml.nvmlDeviceGetComputeRunningProcesses,
                       nvml.nvmlDeviceGetGraphicsRunningProcesses):
            for p in getter(handle):
                used = p.usedGpuMemory
                if (p.pid in wanted and p.pid not in seen and used is not None
                        and used != NVML_NOT_AVAILABLE):
                    seen.add(p.pid)
                    total += int(used)
    return total


def tree_bytes(pids: Iterable[int]) -> int:
    """process_bytes with NVML opened and closed around it; 0 without NVML, a driver or a
    GPU, or when NVML fails (the caller's estimate then rests on host memory alone)."""
    try:
        import pynvml  # type: ignore[import-untyped,unused-ignore]

        pynvml.nvmlInit()
    except Exception:  # ImportError, or pynvml.NVMLError: no driver, no device
        return 0
    try:
        return process_bytes(pynvml, pids)
    except Exception:  # pynvml.NVMLError
        return 0
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
