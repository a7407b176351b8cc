"""Restore onto other GPUs: the shim's old-to-new GPU indices as the driver's device map.

The driver (580 and later) restores a process's CUDA state onto other GPUs when given a
UUID pair for every GPU the state was taken on (``cuCheckpointProcessRestore`` with
``CUcheckpointRestoreArgs.gpuPairs``; ``cuda-checkpoint --action restore --device-map
old=new,...``), and only onto a GPU of the same model with room for it. The shim names
GPUs by the host's NVML index; here each index becomes its UUID, and a map the driver
would refuse is refused first, by name: an index the host does not have, two GPUs mapped
onto one, GPUs of different models, a driver older than 580, a CUDA mode that cannot
remap (CRIU's plugin restores in place).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmux.common.errors import InvalidArgument, Unsupported

#: the first driver whose checkpoint API takes a device map
MIN_DRIVER_MAJOR = 580


@dataclass(frozen=True)
class GpuId:
    index: int
    #: NVML's "GPU-xxxxxxxx-..." (what the driver's device map names)
    uuid: str
    #: the product name: a checkpoint restores only onto a GPU of the same one
    name: str


@dataclass(frozen=True)
class DeviceMap:
    """(old UUID, new UUID) for every GPU of the state; empty: restore in place."""

    pairs: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def argument(self) -> str:
        """cuda-checkpoint's ``--device-map`` value."""
        return ",".join(f"{old}={new}" for old, new in self.pairs)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def read_gpus(nvml: Any) -> list[GpuId]:
    """The host's GPUs through ``nvml`` (an initialised pynvml). Raises NVMLError."""
    out = []
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        out.append(GpuId(i, _text(nvml.nvmlDeviceGetUUID(h)), _text(nvml.nvmlDeviceGetName(h))))
    return out


def host_gpus() -> list[GpuId]:
    """read_gpus with NVML opened and closed around it; [] without NVML or a GPU."""
    try:
        import pynvml  # type: ignore[import-untyped,unused-ignore]

        pynvml.nvmlInit()
    except Exception:  # ImportError, or pynvml.NVMLError: no driver, no device
        return []
    try:
        return read_gpus(pynvml)
    except Exception:  # pynvml.NVMLError
        return []
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def driver_can_remap(driver: str) -> bool:
    """Whether the driver ("580.65.06", or "cuda-13.0" where /proc does not say) takes a
    device map: 580 and later, which is CUDA 13."""
    if driver.startswith("cuda-"):
        major = driver.removeprefix("cuda-").split(".", 1)[0]
        return major.isdigit() and int(major) >= 13
    major = driver.split(".", 1)[0]
    return major.isdigit() and int(major) >= MIN_DRIVER_MAJOR


def resolve(gpu_map: Mapping[int, int], gpus: Sequence[GpuId], *, driver: str,
            cuda_mode: str) -> DeviceMap:
    """The device map for ``gpu_map`` (old index to new index) on a host with ``gpus`` and
    NVIDIA ``driver`` ("580.65.06"); InvalidArgument or Unsupported naming what is wrong.
    An identity map (or an empty one) is no map: the driver's default, in place."""
    if not gpu_map or all(old == new for old, new in gpu_map.items()):
        return DeviceMap()
    if cuda_mode not in ("api", "binary"):
        raise Unsupported(f"restoring onto other GPUs needs the CUDA mode api or binary; "
                          f"this llmuxd runs with {cuda_mode!r} (CRIU's CUDA plugin restores "
                          "onto the GPUs the checkpoint was taken on)")
    if not driver_can_remap(driver):
        raise Unsupported(f"restoring onto other GPUs needs NVIDIA driver {MIN_DRIVER_MAJOR} "
                          f"or later (its checkpoint API's device map); this host has "
                          f"{driver or 'none'}")
    if not gpus:
        raise Unsupported("restoring onto other GPUs: NVML finds no GPU on this host")
    by_index = {g.index: g for g in gpus}
    targets = list(gpu_map.values())
    doubled = sorted({t for t in targets if targets.count(t) > 1})
    if doubled:
        raise InvalidArgument(f"gpu_map maps several GPUs onto GPU {doubled[0]}: each GPU of "
                              "the state needs a GPU of its own")
    pairs = []
    for old, new in sorted(gpu_map.items()):
        for idx in (old, new):
            if idx not in by_index:
                raise InvalidArgument(f"gpu_map names GPU {idx}, but this host has GPUs "
                                      f"{sorted(by_index)}")
        a, b = by_index[old], by_index[new]
        if a.name != b.name:
            raise Unsupported(f"cannot restore from GPU {old} ({a.name}) onto GPU {new} "
                              f"({b.name}): the driver restores only onto a GPU of the same "
                              "model")
        pairs.append((a.uuid, b.uuid))
    return DeviceMap(tuple(pairs))
