"""What a model's engine uses in memory, and what the device has free: measured, one place.

A process tree that holds GPU memory is measured by NVML (nvidia-ml-py), summing the
per-process figures of its PIDs over every device; otherwise by its proportional set
size from /proc (each shared page counted once in the tree). Free memory is NVML's free
figure of the GPUs for a model on the GPU, /proc/meminfo's MemAvailable for one on the
host. Without an NVIDIA driver (no libnvidia-ml) NVML is simply absent: everything is
host memory. Every call here reads the kernel or the driver and may take milliseconds:
the shim calls them through ``asyncio.to_thread``, never on the event loop.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from llmux.common import gpumem, proctree

log = logging.getLogger(__name__)

MIB = 1 << 20


class MemorySource(StrEnum):
    NVML = "nvml"
    PSS = "pss"
    CONFIG = "config"


@dataclass(frozen=True)
class Measurement:
    mb: int
    source: MemorySource


@dataclass(frozen=True)
class FreeMemory:
    mb: int
    #: what the figure is, for messages: "GPU memory free (NVML)" or "MemAvailable"
    what: str


def _mb(n_bytes: int) -> int:
    """Bytes to MiB, rounded up (a budget must not be undercounted)."""
    return -(-n_bytes // MIB)


class MemoryMeter:
    """Measures trees and free memory; NVML is loaded once, on first use, if it can be."""

    def __init__(self, meminfo: Path = Path("/proc/meminfo")) -> None:
        self._meminfo = meminfo
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._tried = False

    def nvml(self) -> Any:
        """The initialised pynvml module, or None where there is no NVIDIA driver."""
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    n = pynvml.nvmlDeviceGetCount()
                except ImportError:
                    log.info("nvidia-ml-py is not installed: memory is measured as PSS")
                except Exception as e:  # pynvml.NVMLError: no driver, no device
                    log.info("NVML unavailable (%s): memory is measured as PSS", e)
                else:
                    if n > 0:
                        self._nvml = pynvml
                        log.info("NVML: %d GPU(s); GPU memory is measured per process", n)
            return self._nvml

    @property
    def has_gpu(self) -> bool:
        return self.nvml() is not None

    def _handles(self, nvml: Any) -> list[Any]:
        return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]

    def gpu_bytes(self, pids: list[int]) -> int:
        """GPU memory NVML attributes to ``pids``, over every device (0 without NVML)."""
        nvml = self.nvml()
        if nvml is None or not pids:
            return 0
        try:
            return gpumem.process_bytes(nvml, pids)
        except Exception as e:  # pynvml.NVMLError
            log.warning("NVML: cannot read per-process GPU memory: %s", e)
            return 0

    def measure(self, pids: list[int]) -> Measurement | None:
        """The tree's GPU memory when it holds any, else its PSS; None if it is gone."""
        gpu = self.gpu_bytes(pids)
        if gpu > 0:
            return Measurement(_mb(gpu), MemorySource.NVML)
        pss = proctree.pss_bytes(pids)
        if pss > 0:
            return Measurement(_mb(pss), MemorySource.PSS)
        return None

    def free(self, gpu: bool, devices: list[int] | None = None) -> FreeMemory:
        """Free memory where a model will live: the GPUs' (NVML; only ``devices``, by
        index, when it is placed on some) or the host's."""
        nvml = self.nvml() if gpu else None
        if nvml is not None:
            try:
                handles = self._handles(nvml)
                if devices is not None:
                    handles = [handles[i] for i in devices if i < len(handles)]
                free = sum(int(nvml.nvmlDeviceGetMemoryInfo(h).free) for h in handles)
                where = "" if devices is None else f" on GPU {','.join(map(str, devices))}"
                return FreeMemory(free // MIB, f"GPU memory free{where} (NVML)")
            except Exception as e:  # pynvml.NVMLError
                log.warning("NVML: cannot read free GPU memory (%s); using MemAvailable", e)
        return FreeMemory(self.mem_available_bytes() // MIB, "host MemAvailable")

    def mem_available_bytes(self) -> int:
        with open(self._meminfo, "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"{self._meminfo} has no MemAvailable line")
