"""The checkpoint engine: CRIU dump/restore and CUDA suspend/resume of process trees.

The facade the D-Bus face calls; usable without D-Bus. Guarantees:

- Failure is never loss. A failed or cancelled dump leaves the tree running (CRIU kills it
  only on success; CUDA is restored and unlocked) and removes the half-written checkpoint.
  A failed restore keeps the checkpoint and carries CRIU's log excerpt. Once CRIU has dumped
  and killed the tree, the checkpoint is committed even if the job is cancelled meanwhile.
- One job per model (and per root PID) at a time: a second one gets Busy.
- Each operation is prepared, then run. ``prepare_*`` checks the request (names, the
  caller's rights on the PIDs, the manifest against the target, free space) and claims its
  model and PID; its errors are the request's own, and nothing has been touched. The
  returned Prepared's ``run(progress)`` is the job (it may still fail, for what takes time
  to find out: PIDs still held, ports taken, CRIU), and releases the claim when it ends;
  ``release()`` lets go of a Prepared that is never run.
- The caller acts only within its own container (authz); a restore goes into the caller's
  container: its rootfs, its bind mounts, its cgroups.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace

from llmux.common.contract import CheckpointBreakdown, CheckpointInfo, HostInfo, JobProgress
from llmux.common.errors import Busy, HostError, InvalidArgument
from llmux.service.core import authz, explain, recovery, restorecheck
from llmux.service.core.authz import Caller, RestoredRegistry
from llmux.service.core.claims import Claims, Prepared, Progress, ProgressSink
from llmux.service.core.config import EngineConfig
from llmux.service.core.container import ContainerContext
from llmux.service.core.criu import CriuTool
from llmux.service.core.cuda import CudaCheckpointer, driver_version, make_cuda_checkpointer
from llmux.service.core.cudajobs import CudaJobs, SuspendResult
from llmux.service.core.dump import Dumper
from llmux.service.core.jobbase import JobBase
from llmux.service.core.manifest import Manifest
from llmux.service.core.remote import RemoteStore, Uploader
from llmux.service.core.restore import Restorer
from llmux.service.core.store import CheckpointStore, check_model
from llmux.service.core.tiermove import TierMover

__all__ = [
    "Caller",
    "CheckpointEngine",
    "CheckpointInfo",
    "EngineConfig",
    "HostInfo",
    "JobProgress",
    "Manifest",
    "Prepared",
    "Progress",
    "ProgressSink",
    "SuspendResult",
]

log = logging.getLogger(__name__)

REMOTE_LIST_TIMEOUT_SECS = 10.0
"""How long a listing of the remote store may take before the index is left as it was."""


def _service_version() -> str:
    try:
        return importlib.metadata.version("llmux")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


class CheckpointEngine:
    """The core's face: each job is its module's (dump, restore, cudajobs, tiermove), the
    claims they share are claims.py's, crash recovery is recovery.py's."""

    def __init__(
        self,
        config: EngineConfig,
        criu: CriuTool,
        store: CheckpointStore,
        cuda: CudaCheckpointer,
    ) -> None:
        self.config = config
        self.criu = criu
        self.store = store
        self.cuda = cuda
        self.restored = RestoredRegistry(store.root / ".restored.json")
        self.claims = Claims()
        self._version = _service_version()
        self.mover = TierMover(store, self.claims, drop_zero_pages=config.drop_zero_pages)
        base = JobBase(config, criu, store, cuda, self.claims, self.restored)
        self.dumper = Dumper(base, self.mover)
        self.restorer = Restorer(base)
        self.restorer.make_room = self.mover.make_room
        self.cuda_jobs = CudaJobs(cuda, config.cuda_mode, self.claims, self.restored)
        self.remote: RemoteStore | None = None
        self.uploads: Uploader | None = None
        if config.remote is not None:
            self.attach_remote(RemoteStore(config.remote))

    def attach_remote(self, remote: RemoteStore) -> None:
        """Keep checkpoints in ``remote`` too: uploaded after each dump, downloaded by a
        restore of one this host does not hold."""
        self.remote = remote
        self.uploads = Uploader(remote, self.store.path, self.store.get,
                                settled=self.mover.wait)
        self.dumper.on_commit = self.uploads.start
        self.restorer.remote = remote

    @classmethod
    async def open(cls, config: EngineConfig) -> CheckpointEngine:
        """Check the configuration and CRIU's version, prepare the state directory (the
        start-up cure of interrupted jobs, crash leftovers removed) and load the manifests
        of the checkpoints it holds."""
        problems = config.problems()
        if problems:
            raise InvalidArgument("; ".join(why for _key, why in problems))
        criu = await CriuTool.locate(config.criu_path, config.network_lock)
        store = CheckpointStore(config.state_dir, config.memory_tier_dir,
                                config.memory_tier_limit_bytes)
        await asyncio.to_thread(recovery.recover, store)
        cuda = make_cuda_checkpointer(config.cuda_mode, config.cuda_checkpoint_path)
        engine = cls(config, criu, store, cuda)
        engine.mover.resume()
        await engine.refresh_remote()
        return engine

    @property
    def pid_free_timeout(self) -> float:
        """How long a restore waits for the checkpoint's PIDs to be free."""
        return self.restorer.pid_free_timeout

    @pid_free_timeout.setter
    def pid_free_timeout(self, secs: float) -> None:
        self.restorer.pid_free_timeout = secs

    @property
    def _no_restores(self) -> threading.Event:
        """Set while no restore runs (tests stand in for a restore with it)."""
        return self.claims.no_restores

    # ---- queries -------------------------------------------------------------------

    def info(self) -> HostInfo:
        return HostInfo(
            version=self._version,
            criu_version=str(self.criu.version),
            kernel_release=os.uname().release,
            driver_version=driver_version(),
            state_dir=str(self.store.root),
            free_bytes=self.store.free_bytes(),
        )

    def list_checkpoints(self) -> list[Manifest]:
        found: list[Manifest] = self.store.manifests()
        return found

    def checkpoint_infos(self) -> list[CheckpointInfo]:
        """Every checkpoint, on this host or in the remote store, with where it is."""
        local = {m.model: m for m in self.store.manifests()}
        remote = dict(self.remote.records) if self.remote is not None else {}
        infos = []
        for model in sorted(local.keys() | remote.keys()):
            if model in local:
                where = "both" if model in remote else "local"
                infos.append(self.current(local[model].info(where)))
            else:
                infos.append(remote[model].manifest.info("remote"))
        return infos

    def current(self, info: CheckpointInfo) -> CheckpointInfo:
        """``info`` with the properties that change while the checkpoint exists read now:
        the trees restored from it, where this host holds its images and what puts it at
        risk."""
        model = info.model
        storage = ""
        if self.store.has(model):
            storage = "disk" if not self.store.in_memory(model) else (
                "memory+disk" if self.store.on_disk(model) else "memory")
        problems = [self.mover.write_errors.get(model, "") if storage == "memory" else ""]
        if self.uploads is not None and info.location == "local":
            problems.append(self.uploads.errors.get(model, ""))
        return replace(info, live_trees=self.restored.live(model), storage=storage,
                       problem="; ".join(p for p in problems if p))

    async def refresh_remote(self, timeout_secs: float = REMOTE_LIST_TIMEOUT_SECS) -> None:
        """Re-read the remote store's index (what other hosts uploaded); a store that does
        not answer in time is logged, and the index kept as it was."""
        if self.remote is None:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(self.remote.refresh), timeout_secs)
        except (HostError, TimeoutError) as exc:
            log.warning("listing the remote store %s failed: %s", self.remote.url,
                        exc or "timed out")

    def get_checkpoint(self, model: str) -> Manifest:
        return self.store.get(model)

    def delete_checkpoint(self, caller: Caller, model: str) -> None:
        """The checkpoint on this host and in the remote store (run in a thread)."""
        check_model(model)
        if model in self.claims.models:
            raise Busy(f"a job for model {model!r} is running")
        remote = self.remote.records.get(model) if self.remote is not None else None
        if remote is None or self.store.has(model):
            manifest = self.store.get(model)
        else:
            manifest = remote.manifest
        authz.check_owner(caller, manifest.owner_uid, model)
        if self.store.has(model):
            self.store.delete(model)
        if self.remote is not None and remote is not None:
            self.remote.delete(model)

    async def explain_checkpoint(self, caller: Caller, model: str) -> CheckpointBreakdown:
        """What the caller's checkpoint holds, byte by byte (explain.py)."""
        return await explain.explain_checkpoint(self.store, caller, model)

    def check_manifest(self, manifest: Manifest, target: ContainerContext) -> None:
        """Refuse, precisely, a checkpoint this host or this container cannot take back."""
        restorecheck.check_manifest(manifest, target, self.criu)

    async def check_restore(self, caller: Caller, model: str) -> None:
        """The checks of prepare_restore alone (restorecheck): nothing claimed, no job, no
        file touched; raises what prepare_restore would."""
        check_model(model)
        record = await self.restorer.remote_record(model)
        await restorecheck.check_restore(self.store, self.criu, caller, model,
                                         remote=record.manifest if record else None)

    def take_back_interrupted_restores(self) -> list[str]:
        """What restores cut short by the service's death put into their targets."""
        return recovery.take_back_interrupted_restores(self.store.root)

    def sweep_shm(self) -> list[str]:
        """/dev/shm segments a checkpoint holds a copy of and nothing uses, removed."""
        return recovery.sweep_shm(self.store, self.claims.models)

    async def wait_moves(self) -> None:
        """Until every move to disk in flight is done (tests; a clean stop)."""
        await self.mover.wait()

    async def close(self, within: float) -> list[str]:
        """A clean stop: the work behind the last dumps finished (``within`` seconds at
        most: a checkpoint in the memory tier only would not survive a reboot), the
        tier's watch stopped. Returns the models still in memory only."""
        if self.mover.busy():
            log.info("stopping: finishing the work behind the last dump(s) (their copies "
                     "to disk)")
            try:
                await asyncio.wait_for(self.mover.wait(), within)
            except TimeoutError:
                log.error("the copies to disk did not end within %.0f s", within)
        await self.mover.close()
        return [model for model, on_disk in self.store.memory_copies() if not on_disk]

    # ---- jobs: prepare_* checks and claims, Prepared.run is the job ----------------------

    async def prepare_checkpoint(
        self, caller: Caller, model: str, root_pid: int, *,
        leave_running: bool = False, weights_bytes: int = 0, gpus: Sequence[int] = (),
    ) -> Prepared[Manifest]:
        """Checks a dump of ``root_pid``'s tree and claims model and PID (dump.py)."""
        return await self.dumper.prepare(caller, model, root_pid, leave_running=leave_running,
                                         weights_bytes=weights_bytes, gpus=gpus)

    async def checkpoint(
        self, caller: Caller, model: str, root_pid: int, *, leave_running: bool = False,
        weights_bytes: int = 0, gpus: Sequence[int] = (),
        progress: ProgressSink | None = None,
    ) -> Manifest:
        """prepare_checkpoint, then run it."""
        prepared = await self.prepare_checkpoint(
            caller, model, root_pid, leave_running=leave_running, weights_bytes=weights_bytes,
            gpus=gpus,
        )
        return await prepared.run(progress)

    async def prepare_restore(
        self, caller: Caller, model: str, *, keep_images: bool = True,
        gpu_map: Mapping[int, int] | None = None, replica: bool = False,
    ) -> Prepared[Manifest]:
        """Checks a restore into the caller's container and claims the model (restore.py)."""
        return await self.restorer.prepare(caller, model, keep_images=keep_images,
                                           gpu_map=gpu_map, replica=replica)

    async def restore(
        self, caller: Caller, model: str, *, keep_images: bool = True,
        progress: ProgressSink | None = None,
    ) -> Manifest:
        """prepare_restore, then run it."""
        prepared = await self.prepare_restore(caller, model, keep_images=keep_images)
        return await prepared.run(progress)

    async def prepare_suspend(
        self, caller: Caller, model: str, root_pid: int
    ) -> Prepared[SuspendResult]:
        """Checks that the caller may suspend the tree and that it holds CUDA state."""
        return await self.cuda_jobs.prepare_suspend(caller, model, root_pid)

    async def prepare_resume(
        self, caller: Caller, model: str, root_pid: int,
        gpu_map: Mapping[int, int] | None = None,
    ) -> Prepared[SuspendResult]:
        """Checks that the caller may resume the tree (onto other GPUs: ``gpu_map``)."""
        return await self.cuda_jobs.prepare_resume(caller, model, root_pid, gpu_map)

    async def suspend(
        self, caller: Caller, model: str, root_pid: int, progress: ProgressSink | None = None,
    ) -> SuspendResult:
        """prepare_suspend, then run it."""
        return await (await self.prepare_suspend(caller, model, root_pid)).run(progress)

    async def resume(
        self, caller: Caller, model: str, root_pid: int, progress: ProgressSink | None = None,
    ) -> SuspendResult:
        """prepare_resume, then run it."""
        return await (await self.prepare_resume(caller, model, root_pid)).run(progress)
