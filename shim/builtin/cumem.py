"""GPU memory held the way vLLM's sleep mode holds it: CUDA virtual memory, tagged pools.

vLLM's ``CuMemAllocator`` (vllm/device_allocator/cumem.py with csrc/cumem_allocator.cpp)
backs every weight and KV-cache tensor with ``cuMemCreate`` + ``cuMemMap`` inside an
address range reserved by ``cuMemAddressReserve``. Sleeping unmaps and releases the
physical memory (after copying the ``weights`` tag to pinned host memory at level 1) but
keeps the virtual range, so waking maps new physical memory at the same addresses: every
tensor, and every CUDA graph that captured those addresses, stays valid.

This module does the same through ctypes on libcuda (no compiled extension travels to the
GPU machine). Tensors are made over the mapped range with ``__cuda_array_interface__``.
Copies to and from the pinned host backups run asynchronously on one side stream, a
segment at a time, and are waited for once.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# CUDA driver API enums (cuda.h)
_CU_MEM_ALLOCATION_TYPE_PINNED = 1
_CU_MEM_LOCATION_TYPE_DEVICE = 1
_CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
_CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 1
#: the largest physical allocation behind one mapping: several, so copies of one tag
#: overlap and a failed cuMemCreate costs little
SEGMENT_BYTES = 1 << 30
_ALIGN = 512


class CuMemError(RuntimeError):
    """A driver call of the allocator failed (names the call and CUDA's error)."""


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocationProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int),
                ("location", _Location), ("win32HandleMetaData", ctypes.c_void_p),
                ("allocFlags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


class _Driver:
    """The few libcuda entry points the allocator needs, with errors named."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]

    def __call__(self, name: str, *args: Any) -> None:
        code = getattr(self.lib, name)(*args)
        if code != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(code, ctypes.byref(text))
            reason = text.value.decode() if text.value else "unknown error"
            raise CuMemError(f"{name} failed: CUDA error {code} ({reason})")


@dataclass
class Segment:
    """One physical allocation mapped at ``address`` (an offset into its tag's range)."""

    address: int
    size: int
    handle: int = 0
    #: pinned host copy while asleep at level 1 (a torch tensor)
    backup: Any = None

    @property
    def mapped(self) -> bool:
        return self.handle != 0


@dataclass
class Pool:
    """Everything allocated under one tag ("weights", "kv_cache")."""

    tag: str
    base: int
    size: int
    segments: list[Segment] = field(default_factory=list)
    used: int = 0


class CuMemAllocator:
    """Tagged pools of CUDA virtual memory with vLLM's sleep/wake semantics."""

    def __init__(self, device_index: int = 0) -> None:
        import torch

        self.torch = torch
        self.device_index = device_index
        self.driver = _Driver()
        torch.cuda.init()  # type: ignore[no-untyped-call]
        self._context()
        self.prop = _AllocationProp()
        self.prop.type = _CU_MEM_ALLOCATION_TYPE_PINNED
        self.prop.location = _Location(_CU_MEM_LOCATION_TYPE_DEVICE, device_index)
        granularity = ctypes.c_size_t()
        self.driver("cuMemGetAllocationGranularity", ctypes.byref(granularity),
                    ctypes.byref(self.prop), _CU_MEM_ALLOC_GRANULARITY_RECOMMENDED)
        self.granularity = max(int(granularity.value), 1)
        self.access = _AccessDesc(_Location(_CU_MEM_LOCATION_TYPE_DEVICE, device_index),
                                  _CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
        self.pools: dict[str, Pool] = {}
        self.stream = torch.cuda.Stream(device_index)  # type: ignore[no-untyped-call]
        self._lock = threading.Lock()
        #: seconds of the phases of the last sleep and wake (for engine_state)
        self.timings: dict[str, float] = {}
        #: pinned host buffers of the last wake, by size, reused by the next sleep and never
        #: handed back: vLLM drops its backups at a wake into PyTorch's caching host
        #: allocator, which keeps them for the life of the process (a later checkpoint
        #: carries them; see the README's table of vLLM's traits)
        self._spares: dict[int, list[Any]] = {}

    def _context(self) -> None:
        """Make torch's primary context current for this thread's driver calls."""
        device = ctypes.c_int()
        self.driver("cuDeviceGet", ctypes.byref(device), self.device_index)
        context = ctypes.c_void_p()
        self.driver("cuDevicePrimaryCtxRetain", ctypes.byref(context), device)
        self.driver("cuCtxSetCurrent", context)

    # -- pools -----------------------------------------------------------------------------
    def _round(self, nbytes: int) -> int:
        g = self.granularity
        return max(g, (nbytes + g - 1) // g * g)

    def create_pool(self, tag: str, nbytes: int) -> Pool:
        """Reserve a virtual range for ``tag`` and map physical memory behind all of it."""
        if tag in self.pools:
            raise CuMemError(f"a pool tagged {tag!r} exists already")
        size = self._round(nbytes)
        base = ctypes.c_uint64()
        self.driver("cuMemAddressReserve", ctypes.byref(base), ctypes.c_size_t(size),
                    ctypes.c_size_t(0), ctypes.c_uint64(0), ctypes.c_uint64(0))
        pool = Pool(tag, int(base.value), size)
        offset = 0
        while offset < size:
            length = min(SEGMENT_BYTES, size - offset)
            pool.segments.append(Segment(pool.base + offset, length))
            offset += length
        self.pools[tag] = pool
        try:
            self._map(pool)
        except CuMemError:
            self.free_pool(tag)
            raise
        log.info("cumem pool %s: %.1f MiB at 0x%x in %d segment(s)", tag, size / (1 << 20),
                 pool.base, len(pool.segments))
        return pool

    def tensor(self, tag: str, shape: Sequence[int], dtype: Any) -> Any:
        """A new tensor carved out of ``tag``'s range (never freed alone, as in a pool)."""
        pool = self.pools[tag]
        element = self.torch.empty((), dtype=dtype).element_size()
        count = 1
        for dim in shape:
            count *= dim
        nbytes = count * element
        if pool.used + nbytes > pool.size:
            raise CuMemError(f"pool {tag!r} is full: {pool.used + nbytes} > {pool.size} bytes")
        address = pool.base + pool.used
        pool.used += (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
        raw = self.torch.as_tensor(_DeviceArray(address, max(nbytes, 1)),
                                   device=f"cuda:{self.device_index}")
        return raw[:nbytes].view(dtype).view(tuple(shape))

    def free_pool(self, tag: str) -> None:
        """Unmap and free ``tag``'s range (its tensors must not be used again)."""
        pool = self.pools.pop(tag)
        self.torch.cuda.synchronize(self.device_index)
        for segment in pool.segments:
            self._unmap(segment)
            segment.backup = None
        self.driver("cuMemAddressFree", ctypes.c_uint64(pool.base), ctypes.c_size_t(pool.size))

    # -- sleep / wake ------------------------------------------------------------------------
    def sleep(self, offload_tags: Iterable[str] = ("weights",),
              tags: Iterable[str] | None = None) -> None:
        """Unmap ``tags`` (default: all); those in ``offload_tags`` are first copied to
        pinned host memory. Mapped again by wake_up at the same addresses."""
        offload = set(offload_tags)
        chosen = self._chosen(tags)
        torch = self.torch
        with self._lock:
            t0 = time.perf_counter()
            torch.cuda.synchronize(self.device_index)  # the compute stream's last writes
            pinning = copying = 0.0
            with torch.cuda.stream(self.stream):
                for pool in chosen:
                    if pool.tag not in offload:
                        continue
                    for segment in pool.segments:
                        if segment.mapped:
                            t = time.perf_counter()
                            spares = self._spares.get(segment.size)
                            host = spares.pop() if spares else torch.empty(
                                segment.size, dtype=torch.uint8, pin_memory=True)
                            pinning += time.perf_counter() - t
                            host.copy_(self._view(segment), non_blocking=True)
                            segment.backup = host
            t = time.perf_counter()
            self.stream.synchronize()
            copying = time.perf_counter() - t
            t = time.perf_counter()
            for pool in chosen:
                for segment in pool.segments:
                    self._unmap(segment)
            self.timings = {"sleep_pin_secs": pinning, "sleep_copy_wait_secs": copying,
                            "sleep_unmap_secs": time.perf_counter() - t,
                            "sleep_secs": time.perf_counter() - t0}

    def wake_up(self, tags: Iterable[str] | None = None) -> None:
        """Map ``tags`` (default: all) again; restore their host backups if they have one."""
        chosen = self._chosen(tags)
        torch = self.torch
        with self._lock:
            t0 = time.perf_counter()
            for pool in chosen:
                self._map(pool)
            t1 = time.perf_counter()
            with torch.cuda.stream(self.stream):
                for pool in chosen:
                    for segment in pool.segments:
                        if segment.backup is not None:
                            self._view(segment).copy_(segment.backup, non_blocking=True)
            self.stream.synchronize()
            t2 = time.perf_counter()
            # kept for the next sleep, as PyTorch's host cache keeps vLLM's
            for pool in chosen:
                for segment in pool.segments:
                    if segment.backup is not None:
                        self._spares.setdefault(segment.size, []).append(segment.backup)
                    segment.backup = None
            tag_names = ",".join(p.tag for p in chosen)
            self.timings |= {f"wake_{tag_names}_map_secs": t1 - t0,
                             f"wake_{tag_names}_copy_secs": t2 - t1}

    @property
    def spare_bytes(self) -> int:
        return sum(size * len(buffers) for size, buffers in self._spares.items())

    def drop_backups(self, tag: str) -> None:
        """Forget ``tag``'s host copies (a level-2 sleep after a level-1 one: the weights
        come back from disk, not from host memory). The kept pinned buffers stay, as
        vLLM's stay in PyTorch's host cache."""
        with self._lock:
            for segment in self.pools[tag].segments if tag in self.pools else []:
                if segment.backup is not None:
                    self._spares.setdefault(segment.size, []).append(segment.backup)
                segment.backup = None

    def _chosen(self, tags: Iterable[str] | None) -> list[Pool]:
        names = list(self.pools) if tags is None else list(tags)
        return [self.pools[t] for t in names if t in self.pools]

    def mapped_bytes(self, tag: str | None = None) -> int:
        pools = self._chosen(None if tag is None else [tag])
        return sum(s.size for p in pools for s in p.segments if s.mapped)

    def backup_bytes(self, tag: str | None = None) -> int:
        pools = self._chosen(None if tag is None else [tag])
        return sum(s.size for p in pools for s in p.segments if s.backup is not None)

    # -- driver plumbing -------------------------------------------------------------------------
    def _map(self, pool: Pool) -> None:
        for segment in pool.segments:
            if segment.mapped:
                continue
            handle = ctypes.c_uint64()
            self.driver("cuMemCreate", ctypes.byref(handle), ctypes.c_size_t(segment.size),
                        ctypes.byref(self.prop), ctypes.c_uint64(0))
            try:
                self.driver("cuMemMap", ctypes.c_uint64(segment.address),
                            ctypes.c_size_t(segment.size), ctypes.c_size_t(0), handle,
                            ctypes.c_uint64(0))
            except CuMemError:
                self.driver("cuMemRelease", handle)
                raise
            segment.handle = int(handle.value)
            self.driver("cuMemSetAccess", ctypes.c_uint64(segment.address),
                        ctypes.c_size_t(segment.size), ctypes.byref(self.access),
                        ctypes.c_size_t(1))

    def _unmap(self, segment: Segment) -> None:
        if not segment.mapped:
            return
        self.driver("cuMemUnmap", ctypes.c_uint64(segment.address), ctypes.c_size_t(segment.size))
        self.driver("cuMemRelease", ctypes.c_uint64(segment.handle))
        segment.handle = 0

    def _view(self, segment: Segment) -> Any:
        return self.torch.as_tensor(_DeviceArray(segment.address, segment.size),
                                    device=f"cuda:{self.device_index}")


def release_pinned_cache() -> None:
    """Give freed pinned host memory back to the OS: torch's caching host allocator keeps
    it otherwise, and a later checkpoint would carry gigabytes of stale buffers."""
    import torch

    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


class _DeviceArray:
    """Bytes at a device address, for torch.as_tensor (CUDA array interface v3)."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (address, False),
            "strides": None, "version": 3,
        }
