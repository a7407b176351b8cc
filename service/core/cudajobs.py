"""CUDA suspend and resume of a running tree (no CRIU): its GPU memory freed and back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from llmux.common.errors import Unsupported
from llmux.service.core import authz, gpumap, procerrors
from llmux.service.core.authz import Caller, RestoredRegistry
from llmux.service.core.claims import Claims, Prepared, Reporter, uncancellable
from llmux.service.core.cuda import IN_PLACE, CudaCheckpointer, driver_version
from llmux.service.core.dump import check_pid_arg, thaw
from llmux.service.core.store import check_model


@dataclass(frozen=True)
class SuspendResult:
    model: str
    pids: list[int]
    cuda_pids: list[int]
    seconds: float


def device_map_for(gpu_map: Mapping[int, int], cuda_mode: str) -> gpumap.DeviceMap:
    """``gpu_map`` (the shim's GPU indices) as the driver's device map, checked against this
    host's GPUs, driver and CUDA mode. Blocking (NVML)."""
    if not gpu_map or all(old == new for old, new in gpu_map.items()):
        return IN_PLACE
    return gpumap.resolve(gpu_map, gpumap.host_gpus(), driver=driver_version(),
                          cuda_mode=cuda_mode)


@dataclass(frozen=True)
class CudaJob:
    """One suspend or resume: its tree, and the CUDA PIDs its checks found (suspend)."""

    model: str
    root_pid: int
    pids: list[int]
    found: list[int] | None
    report: Reporter
    device_map: gpumap.DeviceMap = IN_PLACE


class CudaJobs:
    """Suspends and resumes; remembers which PIDs each suspended model had on the GPU."""

    def __init__(self, cuda: CudaCheckpointer, cuda_mode: str, claims: Claims,
                 restored: RestoredRegistry) -> None:
        self.cuda = cuda
        self.cuda_mode = cuda_mode
        self.claims = claims
        self.restored = restored
        self._suspended: dict[str, tuple[int, list[int]]] = {}

    async def prepare_suspend(
        self, caller: Caller, model: str, root_pid: int
    ) -> Prepared[SuspendResult]:
        """Checks that the caller may suspend the tree and that it holds CUDA state."""

        def cuda_of(pids: list[int]) -> list[int]:
            cuda_pids = self.cuda.cuda_pids(pids)
            if not cuda_pids:
                # Succeeding here would turn cuda_suspend into keep_running behind the
                # operator's back: the GPU memory they wanted freed would stay held.
                raise Unsupported(
                    f"no process of the tree {pids} holds CUDA state "
                    f"(CUDA mode {self.cuda_mode!r}): nothing to suspend"
                )
            return cuda_pids

        return await self._prepare(caller, model, root_pid, cuda_of, self._suspend)

    async def prepare_resume(
        self, caller: Caller, model: str, root_pid: int, gpu_map: Mapping[int, int] | None = None
    ) -> Prepared[SuspendResult]:
        """Checks that the caller may resume the tree (onto the GPUs ``gpu_map`` names, old
        index to new: refused by name where the driver could not)."""
        device_map = await asyncio.to_thread(self.device_map, gpu_map or {})
        return await self._prepare(caller, model, root_pid, None, self._resume, device_map)

    def device_map(self, gpu_map: Mapping[int, int]) -> gpumap.DeviceMap:
        return device_map_for(gpu_map, self.cuda_mode)

    async def _prepare(
        self,
        caller: Caller,
        model: str,
        root_pid: int,
        cuda_of: Callable[[list[int]], list[int]] | None,
        body: Callable[[CudaJob], Awaitable[list[int]]],
        device_map: gpumap.DeviceMap = IN_PLACE,
    ) -> Prepared[SuspendResult]:
        """What suspend and resume share: checks, the model's claim, progress, timing."""
        check_model(model)
        check_pid_arg(root_pid)

        async def checks() -> Callable[[Reporter], Awaitable[SuspendResult]]:
            started = time.monotonic()
            await asyncio.to_thread(authz.check_target, caller, root_pid, self.restored)
            pids = await asyncio.to_thread(procerrors.tree, root_pid)
            found = await asyncio.to_thread(cuda_of, pids) if cuda_of is not None else None

            async def run(report: Reporter) -> SuspendResult:
                cuda_pids = await body(CudaJob(model, root_pid, pids, found, report, device_map))
                report(1.0, 0, 0.0, "done")
                return SuspendResult(model, pids, cuda_pids, time.monotonic() - started)

            return run

        return await self.claims.prepare(model, root_pid, checks)

    async def _suspend(self, job: CudaJob) -> list[int]:
        cuda_pids = job.found
        assert cuda_pids  # prepare_suspend found them
        job.report(0.1, 0, 0.0, "cuda-checkpoint")
        try:
            await self.cuda.lock_and_checkpoint(cuda_pids)
        except BaseException:
            await uncancellable(thaw(self.cuda, job.pids, cuda_pids))
            raise
        self._suspended[job.model] = (job.root_pid, cuda_pids)
        return cuda_pids

    async def _resume(self, job: CudaJob) -> list[int]:
        known = self._suspended.get(job.model)
        if known is not None and known[0] == job.root_pid:
            cuda_pids = [p for p in known[1] if p in job.pids]
        else:
            cuda_pids = await asyncio.to_thread(self.cuda.cuda_pids, job.pids)
        if cuda_pids:
            job.report(0.1, 0, 0.0, "cuda-restore")
            await self.cuda.restore_and_unlock(cuda_pids, job.device_map)
        self._suspended.pop(job.model, None)
        return cuda_pids
