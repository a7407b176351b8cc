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
import contextlib
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Generic, TypeVar

from llmux.common import proctree, resources
from llmux.common.contract import CheckpointInfo, HostInfo, JobProgress
from llmux.common.errors import (
    Busy,
    CriuFailed,
    CudaFailed,
    HostError,
    InvalidArgument,
    NoSpace,
    PidInUse,
    PortInUse,
    Unsupported,
)
from llmux.service.core import authz, restorecheck, upperfiles
from llmux.service.core.authz import Caller, RestoredRegistry
from llmux.service.core.container import ContainerContext
from llmux.service.core.criu import CriuRun, CriuTool, DumpRequest, RestoreRequest
from llmux.service.core.cuda import CudaCheckpointer, driver_version, make_cuda_checkpointer
from llmux.service.core.cuda import device_bytes as cuda_device_bytes
from llmux.service.core.manifest import ExternalMountRecord, Manifest
from llmux.service.core.procerrors import no_such_process
from llmux.service.core.store import (
    CheckpointStore,
    Staging,
    check_model,
    dir_bytes,
    dump_completed,
    image_sizes,
    prefetch,
    start_writeback,
    write_journal,
)
from llmux.service.core.upperfiles import SavedFile, ViewRoot

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

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

PID_FREE_TIMEOUT_SECS = 10.0
#: how long a move to disk waits for the model's jobs to let go before it gives up
MOVE_WAIT_SECS = 600.0
"""How long a restore waits for dumped PIDs to be reaped before naming who holds them."""
REAP_AFTER_DUMP_SECS = 5.0
#: a link_remap.N file this old that nobody uses was left by an interrupted job
STALE_REMAP_AGE_SECS = 600.0
PROGRESS_INTERVAL_SECS = 0.25
#: how often the images written so far are handed to the disk during a dump
WRITEBACK_INTERVAL_SECS = 0.25
_SIZE_MARGIN = 1.05
_SIZE_SLACK = 16 << 20


def _service_version() -> str:
    try:
        return importlib.metadata.version("llmux")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


Progress = JobProgress
"""The core reports the contract's own JobProgress (its status is the phase)."""
ProgressSink = Callable[[JobProgress], None]


@dataclass(frozen=True)
class EngineConfig:
    state_dir: Path
    criu_path: str = "criu"
    cuda_mode: str = "api"
    """"api" | "binary" | "plugin" | "off"."""
    cuda_checkpoint_path: str = "cuda-checkpoint"
    cuda_plugin_dir: str = "/usr/lib/criu/"
    ghost_limit_bytes: int = 512 << 20
    memory_tier_dir: Path | None = None
    """A tmpfs folder for checkpoint images (the memory tier); see memory_tier_limit_bytes."""
    memory_tier_limit_bytes: int = 0
    """Most bytes of images in the memory tier (0: no memory tier). A dump that fits goes
    there, is restored from there while it is there, and moves to disk in the background."""
    prefetch_threads: int = 0
    """Readers that bring a checkpoint's page images into the page cache during a restore;
    0: only ask the kernel to read ahead (POSIX_FADV_WILLNEED). Measured on the H200
    machine, 8 readers made an 8 GB restore slower (13.0 s against 10.7 s), so 0 it is."""
    criu_timeout_secs: float = 120.0
    """A CRIU run is killed after this long, plus criu_timeout_secs_per_gib for each GiB
    of images it writes or reads: a stuck CRIU holds the tree frozen."""
    criu_timeout_secs_per_gib: float = 60.0

    def criu_bound_secs(self, nbytes: int) -> float:
        return self.criu_timeout_secs + self.criu_timeout_secs_per_gib * nbytes / (1 << 30)


@dataclass(frozen=True)
class _Tree:
    """A tree found fit to dump: its PIDs, its container, the space its dump needs."""

    pids: list[int]
    ctx: ContainerContext
    expected: int
    deleted_ids: set[tuple[int, int]]
    """Its deleted-but-open files, which CRIU will link-remap (none: no link-remaps)."""
    starts: dict[int, int]
    """Each PID's start time: what names these very processes in the job's journal."""


@dataclass(frozen=True)
class SuspendResult:
    model: str
    pids: list[int]
    cuda_pids: list[int]
    seconds: float


class _Reporter:
    """Sends Progress to a sink; never lets a sink's exception break a job."""

    def __init__(self, sink: ProgressSink | None) -> None:
        self.sink = sink

    def __call__(self, fraction: float, nbytes: int, rate: float, status: str) -> None:
        if self.sink is None:
            return
        try:
            self.sink(JobProgress(max(0.0, min(1.0, fraction)), nbytes, rate, status))
        except Exception:
            log.exception("progress sink failed")

    @contextlib.asynccontextmanager
    async def watching(
        self, measure: Callable[[], int], expected: int, status: str, lo: float, hi: float
    ) -> AsyncIterator[None]:
        """Report measure() against expected, mapped onto [lo, hi], while the body runs."""
        start = time.monotonic()

        async def loop() -> None:
            while True:
                await asyncio.sleep(PROGRESS_INTERVAL_SECS)
                try:
                    done = await asyncio.to_thread(measure)
                except OSError:
                    continue
                elapsed = max(time.monotonic() - start, 1e-6)
                part = min(done / expected, 0.99) if expected > 0 else 0.0
                self(lo + (hi - lo) * part, done, done / elapsed, status)

        task = asyncio.create_task(loop()) if self.sink is not None else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


class Prepared(Generic[T_co]):
    """An operation checked and holding its claim on the model (and root PID).

    ``run(progress)`` is the job: once, and it lets go of the claim when it ends.
    ``release()`` lets go of it without running (idempotent; run() calls it too).
    """

    def __init__(
        self,
        model: str,
        body: Callable[[_Reporter], Awaitable[T_co]],
        release: Callable[[], None],
    ) -> None:
        self.model = model
        self._body = body
        self._release: Callable[[], None] | None = release
        self._ran = False

    async def run(self, progress: ProgressSink | None = None) -> T_co:
        if self._ran or self._release is None:
            raise RuntimeError(f"the operation on {self.model!r} was already run or released")
        self._ran = True
        try:
            return await self._body(_Reporter(progress))
        finally:
            self.release()

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


@contextlib.asynccontextmanager
async def _writing_back(images: Path) -> AsyncIterator[None]:
    """Keep the disk busy while CRIU fills the page cache: dump and writeback overlap."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(WRITEBACK_INTERVAL_SECS)
            await asyncio.to_thread(start_writeback, images)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _uncancellable(coro: Awaitable[T]) -> T:
    """Run to completion even if the caller is cancelled meanwhile (past the point of no
    return: the tree is already dumped and gone, the checkpoint must be kept)."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        current = asyncio.current_task()
        if current is not None:
            current.uncancel()
        log.warning("cancellation arrived after the dump completed; the checkpoint is kept")
    return result


RESTORING = ".restoring-"
"""A running restore's journal in the state directory: <RESTORING><model>.json."""


def _write_json(path: Path, value: object) -> None:
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


RESTORE_FINISHED = "Restore finished successfully"


def _kill_half_restored(pids: Sequence[int], since: object, images: Path | None = None,
                        ) -> list[int]:
    """SIGKILL what a CRIU restore that did not finish left: the processes among ``pids``
    born after it began (made by it, not a PID reused before), and its own helper tasks,
    which stay stopped when CRIU dies (clones of CRIU: its argv, these ``images``). Waits a
    while for them to go."""
    if not isinstance(since, int):
        return []
    hit = []
    for pid in pids:
        st = proctree.read_stat(pid)
        if st is not None and st.state not in ("Z", "X") and st.start_time >= since:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                hit.append(pid)
    if images is not None:
        for pid in proctree.criu_clones("restore", images, since):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                hit.append(pid)
    deadline = time.monotonic() + 10
    while any(proctree.exists(p) for p in hit) and time.monotonic() < deadline:
        time.sleep(0.05)
    if hit:
        log.warning("killed PIDs %s, restored in part by a CRIU that did not finish", hit)
    return hit


def _session_outside(pids: Sequence[int]) -> bool:
    """A tree whose session or process group leader is outside it needs --shell-job."""
    members = set(pids)
    for pid in pids:
        st = proctree.read_stat(pid)
        if st is not None and (st.session not in members or st.pgrp not in members):
            return True
    return False


class CheckpointEngine:
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
        self._busy_models: set[str] = set()
        self._remap_lock = asyncio.Lock()
        self._busy_pids: set[int] = set()
        self._suspended: dict[str, tuple[int, list[int]]] = {}
        self._version = _service_version()
        self.pid_free_timeout = PID_FREE_TIMEOUT_SECS
        self._movers: set[asyncio.Task[None]] = set()
        #: set while no restore runs: moves to disk wait on it (a restore is latency, a
        #: move is background work on the same memory and disks)
        self._no_restores = threading.Event()
        self._no_restores.set()
        self._restores = 0

    @classmethod
    async def open(cls, config: EngineConfig) -> CheckpointEngine:
        """Check CRIU's version, prepare the state directory (crash leftovers removed) and
        load the manifests of the checkpoints it holds."""
        if config.ghost_limit_bytes <= 0:
            raise InvalidArgument(f"ghost_limit_bytes must be positive: {config.ghost_limit_bytes}")
        if config.criu_timeout_secs <= 0 or config.criu_timeout_secs_per_gib < 0:
            raise InvalidArgument(
                "criu_timeout_secs must be positive and criu_timeout_secs_per_gib not "
                f"negative: {config.criu_timeout_secs}, {config.criu_timeout_secs_per_gib}")
        criu = await CriuTool.locate(config.criu_path)
        if config.memory_tier_limit_bytes < 0:
            raise InvalidArgument(
                f"memory_tier_limit_bytes must be >= 0: {config.memory_tier_limit_bytes}")
        if config.memory_tier_limit_bytes and config.memory_tier_dir is None:
            raise InvalidArgument("memory_tier_limit_bytes needs memory_tier_dir")
        store = CheckpointStore(config.state_dir, config.memory_tier_dir,
                                config.memory_tier_limit_bytes)
        cleaned = await asyncio.to_thread(store.prepare)
        if cleaned:
            log.info("removed leftovers of interrupted dumps: %s", ", ".join(cleaned))
        cuda = make_cuda_checkpointer(config.cuda_mode, config.cuda_checkpoint_path)
        engine = cls(config, criu, store, cuda)
        await asyncio.to_thread(engine.take_back_interrupted_restores)
        await asyncio.to_thread(engine.sweep_shm)
        return engine

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

    def get_checkpoint(self, model: str) -> Manifest:
        return self.store.get(model)

    def delete_checkpoint(self, caller: Caller, model: str) -> None:
        check_model(model)
        if model in self._busy_models:
            raise Busy(f"a job for model {model!r} is running")
        manifest = self.store.get(model)
        authz.check_owner(caller, manifest.owner_uid, model)
        self.store.delete(model)

    # ---- job bookkeeping ---------------------------------------------------------------

    def _claim(self, model: str, root_pid: int | None = None) -> Callable[[], None]:
        """Claims the model (and root PID) for one job; returns what lets go of it."""
        if model in self._busy_models:
            raise Busy(f"a job for model {model!r} is already running")
        if root_pid is not None and root_pid in self._busy_pids:
            raise Busy(f"a job for PID {root_pid} is already running")
        self._busy_models.add(model)
        if root_pid is not None:
            self._busy_pids.add(root_pid)

        def release() -> None:
            self._busy_models.discard(model)
            if root_pid is not None:
                self._busy_pids.discard(root_pid)

        return release

    async def _prepare(
        self,
        model: str,
        root_pid: int | None,
        checks: Callable[[], Awaitable[Callable[[_Reporter], Awaitable[T]]]],
    ) -> Prepared[T]:
        """Claim, then run ``checks`` (which return the job's body); a failed check lets go."""
        release = self._claim(model, root_pid)
        try:
            body = await checks()
        except BaseException:
            release()
            raise
        return Prepared(model, body, release)

    @staticmethod
    def _check_pid_arg(root_pid: int) -> None:
        if isinstance(root_pid, bool) or not isinstance(root_pid, int) or root_pid <= 0:
            raise InvalidArgument(f"root PID must be a positive integer, not {root_pid!r}")

    @staticmethod
    async def _tree(root_pid: int) -> list[int]:
        """The tree's PIDs (read in a thread); a gone root is the caller's NoSuchProcess."""
        with no_such_process():
            return await asyncio.to_thread(proctree.tree, root_pid)

    # ---- checkpoint ------------------------------------------------------------------

    async def checkpoint(
        self,
        caller: Caller,
        model: str,
        root_pid: int,
        *,
        leave_running: bool = False,
        weights_bytes: int = 0,
        progress: ProgressSink | None = None,
    ) -> Manifest:
        """prepare_checkpoint, then run it."""
        prepared = await self.prepare_checkpoint(
            caller, model, root_pid, leave_running=leave_running, weights_bytes=weights_bytes
        )
        return await prepared.run(progress)

    async def prepare_checkpoint(
        self,
        caller: Caller,
        model: str,
        root_pid: int,
        *,
        leave_running: bool = False,
        weights_bytes: int = 0,
    ) -> Prepared[Manifest]:
        """Checks a dump of ``root_pid``'s tree (the caller's right on it, what CRIU cannot
        dump, a container it could not go back to, free space) and claims model and PID."""
        check_model(model)
        self._check_pid_arg(root_pid)
        if (
            isinstance(weights_bytes, bool)
            or not isinstance(weights_bytes, int)
            or weights_bytes < 0
        ):
            raise InvalidArgument(
                f"weights_bytes must be a non-negative integer: {weights_bytes!r}"
            )

        async def checks() -> Callable[[_Reporter], Awaitable[Manifest]]:
            started = time.monotonic()
            await asyncio.to_thread(authz.check_target, caller, root_pid, self.restored)
            tree = await asyncio.to_thread(self._inspect_tree, model, root_pid, weights_bytes)

            async def body(report: _Reporter) -> Manifest:
                async with self._remap_guard(bool(tree.deleted_ids)):
                    found = tree
                    if tree.deleted_ids and await self._tree(root_pid) != found.pids:
                        # it changed while another dump held the link-remaps: check again
                        found = await asyncio.to_thread(
                            self._inspect_tree, model, root_pid, weights_bytes
                        )
                    return await self._checkpoint(
                        caller, model, root_pid, leave_running, found, report, started
                    )

            return body

        return await self._prepare(model, root_pid, checks)

    def _inspect_tree(self, model: str, root_pid: int, weights_bytes: int) -> _Tree:
        """The checks of a dump that read /proc (run in a thread)."""
        with no_such_process():
            pids = proctree.tree(root_pid)
        bad = resources.undumpable_fds(pids)
        if bad:
            raise Unsupported(
                f"the tree of PID {root_pid} cannot be checkpointed: {bad[0]}, which CRIU "
                "cannot dump"
                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                + "; engines started by llmux run with io_uring unavailable "
                "(python -m llmux.shim.launch)"
            )
        ctx = ContainerContext.from_pid(root_pid)
        if ctx.foreign and ctx.rootfs_host_path is None:
            raise Unsupported(
                f"PID {root_pid} lives in a mount namespace whose root filesystem is not "
                "visible on the host; it cannot be restored, so it is not dumped"
            )
        gpu = cuda_device_bytes(pids) if self.config.cuda_mode != "off" else 0
        expected = int((proctree.rss_bytes(pids) + gpu + weights_bytes) * _SIZE_MARGIN
                       ) + _SIZE_SLACK
        self.store.check_space(model, expected, gpu_bytes=gpu)
        return _Tree(pids, ctx, expected, resources.deleted_file_ids(pids),
                     proctree.start_times(pids))

    @contextlib.asynccontextmanager
    async def _remap_guard(self, needed: bool) -> AsyncIterator[None]:
        """One job at a time among those that use CRIU link-remaps: CRIU names them
        link_remap.<file id>, and the same engine's trees get the same ids, so a restore's
        put-back link_remap.237 in /dev/shm is another dump's link_remap.237."""
        if not needed:
            yield
            return
        async with self._remap_lock:
            yield

    async def _checkpoint(
        self,
        caller: Caller,
        model: str,
        root_pid: int,
        leave_running: bool,
        tree: _Tree,
        report: _Reporter,
        started: float,
    ) -> Manifest:
        pids, ctx, expected = tree.pids, tree.ctx, tree.expected
        await asyncio.to_thread(self.sweep_shm)
        tids = await asyncio.to_thread(proctree.all_threads, pids)
        listen_ports = await asyncio.to_thread(resources.listening_ports, pids)
        cuda_pids = await asyncio.to_thread(self.cuda.cuda_pids, pids)
        shell_job = await asyncio.to_thread(_session_outside, pids)
        rootfs = await asyncio.to_thread(ctx.rootfs_identity)

        pending = Manifest(
            model=model,
            owner=authz.user_name(caller.uid),
            owner_uid=caller.uid,
            root_pid=root_pid,
            pids=pids,
            tids=tids,
            cuda_pids=cuda_pids,
            criu_version=str(self.criu.version),
            kernel_release=os.uname().release,
            driver_version=driver_version(),
            created=0.0,
            rootfs=rootfs,
            foreign_mntns=ctx.foreign,
            shell_job=shell_job,
            external_mounts=[ExternalMountRecord(e.key, e.mount_point) for e in ctx.externals],
            source_cgroups=ctx.cgroup_identity,
            expected_bytes=expected,
            leave_running=leave_running,
            listen_ports=listen_ports,
        )
        staging = await asyncio.to_thread(self.store.begin, model, expected)
        view = await asyncio.to_thread(ViewRoot, root_pid if ctx.foreign else None)
        criu_started: list[asyncio.Future[None]] = []

        def journal_criu(run: CriuRun) -> None:
            criu_started.append(asyncio.ensure_future(asyncio.to_thread(
                write_journal, staging, criu=proctree.start_times([run.pid]))))

        try:
            # If the service dies mid-dump, start-up can still finish what CRIU completed,
            # or let the tree run again: what it needs is written before CRIU starts.
            await asyncio.to_thread(self.store.write_pending, staging, pending)
            await asyncio.to_thread(write_journal, staging, tree=tree.starts,
                                    leave_running=leave_running)
            live, deleted = await asyncio.to_thread(resources.open_paths, pids)
            shm = resources.shm_paths(live)

            def look_around() -> tuple[list[str], list[str]]:
                for directory in {str(Path(p).parent) for p in shm}:
                    view.hold(directory)
                remap_dirs = upperfiles.link_remap_dirs(deleted, view)
                stale = resources.stale(
                    [view.resolve(p) for p in upperfiles.list_link_remaps(remap_dirs, view)],
                    STALE_REMAP_AGE_SECS)
                if stale:
                    log.info("removing stale CRIU link-remap files: %s", stale)
                    upperfiles.remove_files(stale)
                return remap_dirs, [str(p) for p in stale]

            remap_dirs, _ = await asyncio.to_thread(look_around)
            upper = await asyncio.to_thread(upperfiles.find_upper_files, pids, ctx)
            # what the restore will need from the target as it is, not carried here
            carried = set(upper) | set(shm)
            pending = replace(pending, external_files=await asyncio.to_thread(
                resources.regular_files, [p for p in live if p not in carried], view.path))

            cuda_secs = 0.0
            if cuda_pids:
                report(0.0, 0, 0.0, "cuda-checkpoint")
                t = time.monotonic()
                await self.cuda.lock_and_checkpoint(cuda_pids)
                cuda_secs = time.monotonic() - t

            req = DumpRequest(
                pid=root_pid,
                images_dir=staging.images,
                leave_running=leave_running,
                ghost_limit_bytes=self.config.ghost_limit_bytes,
                external_mounts=[(e.mount_point, e.key) for e in ctx.externals],
                shell_job=shell_job,
                foreign_mntns=ctx.foreign,
                plugin_dir=self.config.cuda_plugin_dir
                if self.config.cuda_mode == "plugin"
                else None,
            )
            t = time.monotonic()
            late_failure: BaseException | None = None
            try:
                async with (
                    report.watching(
                        lambda: dir_bytes(staging.images), expected, "dumping", 0.0, 0.95
                    ),
                    _writing_back(staging.images),
                ):
                    await self.criu.dump(req, on_start=journal_criu,
                                         timeout_secs=self.config.criu_bound_secs(expected))
            except BaseException as exc:
                completed = await _uncancellable(
                    asyncio.to_thread(dump_completed, staging.images))
                if not completed or (leave_running and await _uncancellable(
                        asyncio.to_thread(proctree.exists, root_pid))):
                    await _uncancellable(self._thaw(pids, cuda_pids))
                    if isinstance(exc, CriuFailed):
                        await _uncancellable(self._end_if_damaged(model, tree.starts, exc))
                        free = await asyncio.to_thread(self.store.free_bytes)
                        if free < _SIZE_SLACK or "No space left" in str(exc):
                            raise NoSpace(
                                f"the state directory {self.store.root} filled up during the "
                                f"dump of {model!r} ({free >> 20} MiB free); the tree runs "
                                f"on and nothing was kept: {exc}") from exc
                    raise
                # CRIU wrote every image and began to kill the tree, then failed, was killed
                # or cancelled on its way out: the images are the tree now; keep them, and
                # finish what CRIU began (a tree half killed is no tree).
                if not leave_running:
                    killed = await _uncancellable(asyncio.to_thread(
                        proctree.kill_exact, tree.starts, signal.SIGKILL))
                    if killed:
                        log.warning("checkpoint %s: CRIU ended before it killed %s; killed",
                                    model, killed)
                late_failure = exc
                current = asyncio.current_task()
                if isinstance(exc, asyncio.CancelledError) and current is not None:
                    current.uncancel()
            dump_secs = time.monotonic() - t
        except BaseException:
            view.close()
            await _uncancellable(asyncio.gather(*criu_started, return_exceptions=True))
            await _uncancellable(asyncio.to_thread(self.store.abort, staging))
            raise
        await _uncancellable(asyncio.gather(*criu_started, return_exceptions=True))

        # Past the point of no return: unless leave_running, the tree is gone and only
        # these images hold it. Finish even if cancelled; never delete them.
        try:
            return await _uncancellable(
                self._finish_dump(
                    pending=pending,
                    model=model,
                    pids=pids,
                    cuda_pids=cuda_pids,
                    view=view,
                    upper=upper,
                    shm=shm,
                    remap_dirs=remap_dirs,
                    deleted_ids=tree.deleted_ids,
                    staging=staging,
                    leave_running=leave_running,
                    cuda_secs=cuda_secs,
                    dump_secs=dump_secs,
                    started=started,
                    report=report,
                    late_failure=late_failure,
                )
            )
        finally:
            view.close()

    async def _finish_dump(
        self,
        *,
        pending: Manifest,
        model: str,
        pids: list[int],
        cuda_pids: list[int],
        view: ViewRoot,
        upper: list[str],
        shm: list[str],
        remap_dirs: list[str],
        deleted_ids: set[tuple[int, int]],
        staging: Staging,
        leave_running: bool,
        cuda_secs: float,
        dump_secs: float,
        started: float,
        report: _Reporter,
        late_failure: BaseException | None = None,
    ) -> Manifest:
        """Save the files, release or reap the tree, commit: the manifest's last fields."""
        warnings: list[str] = []
        if late_failure is not None:
            what = (
                "cancelled"
                if isinstance(late_failure, asyncio.CancelledError)
                else (str(late_failure).splitlines()[0])
            )
            warnings.append(f"CRIU completed the dump but then ended badly ({what}); kept")
        report(0.95, await asyncio.to_thread(dir_bytes, staging.images), 0.0, "saving files")
        saved: list[SavedFile] = []
        try:
            saved = await asyncio.to_thread(upperfiles.save, upper, view.resolve, staging.files)
        except OSError as exc:
            warnings.append(f"files of the writable layer not saved: {exc}")
        try:
            # CRIU restores file-backed shared mappings from the file, not from its images,
            # and the engine deletes its segments on a clean stop: keep their contents here.
            saved += await asyncio.to_thread(
                upperfiles.save, shm, view.resolve, staging.files, "dev-shm", len(saved)
            )
        except OSError as exc:
            warnings.append(f"/dev/shm files not saved: {exc}")
        try:
            # only this tree's: another job's link-remaps may sit in the same directory
            remaps = [p for p in upperfiles.list_link_remaps(remap_dirs, view)
                      if resources.owned_by([view.resolve(p)], deleted_ids)]
            if remaps:
                saved += await asyncio.to_thread(
                    upperfiles.save, remaps, view.resolve, staging.files, "link-remap",
                    len(saved)
                )
                upperfiles.remove_files(view.resolve(p) for p in remaps)
        except (OSError, ValueError) as exc:
            warnings.append(f"link-remap files not saved: {exc}")
        for w in warnings:
            log.warning("checkpoint %s: %s", model, w)

        if leave_running and cuda_pids:
            report(0.97, 0, 0.0, "cuda-restore")
            try:
                await self.cuda.restore_and_unlock(cuda_pids)
            except HostError:
                log.exception("resuming CUDA after a leave-running dump failed")
        if not leave_running:
            left = await proctree.wait_gone(pids, REAP_AFTER_DUMP_SECS)
            if left:
                log.info("dumped PIDs not reaped yet: %s", left)
            # the tree is gone and its segments are in the checkpoint: free the memory
            kept = {f.path for f in saved if f.reason == "dev-shm"}
            removed = await asyncio.to_thread(
                resources.remove_unused, [view.resolve(p) for p in sorted(kept)]
            )
            if removed:
                log.info("checkpoint %s: removed %d /dev/shm file(s) of the dumped tree",
                         model, len(removed))

        images_bytes = await asyncio.to_thread(dir_bytes, staging.images)
        sizes = await asyncio.to_thread(image_sizes, staging.images)
        manifest = replace(
            pending,
            image_sizes=sizes,
            created=time.time(),
            images_bytes=images_bytes,
            files_bytes=sum(f.size for f in saved),
            dump_seconds=round(dump_secs, 3),
            cuda_seconds=round(cuda_secs, 3),
            total_seconds=round(time.monotonic() - started, 3),
            files=saved,
            warnings=warnings,
        )
        await asyncio.to_thread(self.store.commit, staging, manifest)
        report(1.0, images_bytes, images_bytes / max(dump_secs, 1e-6), "done")
        log.info(
            "checkpointed %s (PIDs %s) in %.2fs: %d MiB", model, pids, dump_secs, images_bytes >> 20
        )
        if self.store.in_memory(model):
            mover = asyncio.create_task(self._move_to_disk(model), name=f"move-{model}")
            self._movers.add(mover)
            mover.add_done_callback(self._movers.discard)
        return manifest

    async def _move_to_disk(self, model: str) -> None:
        """Put a checkpoint's images from the memory tier on disk, behind the job that made
        them: copied without holding the model (a restore may read them meanwhile), then
        swapped in while no job holds it."""
        moved = await asyncio.to_thread(self.store.copy_to_disk, model, self._give_way)
        if moved is None:
            return
        tier, copy = moved
        deadline = time.monotonic() + MOVE_WAIT_SECS
        while True:
            try:
                release = self._claim(model)
            except Busy:
                if time.monotonic() > deadline:
                    log.warning("%s stays in the memory tier: its jobs kept it busy", model)
                    await asyncio.to_thread(shutil.rmtree, copy, True)
                    return
                await asyncio.sleep(0.5)
                continue
            try:  # the model stays claimed across the await: no restore reads meanwhile
                swapped = await asyncio.to_thread(self.store.finish_move, model, tier, copy)
            finally:
                release()
            break
        if swapped:
            await asyncio.to_thread(self.store.drop_memory_copy, tier)
            log.info("moved the images of %s from the memory tier to disk", model)

    def _give_way(self) -> None:
        """Blocks a move's copy (in its thread) while a restore runs, up to MOVE_WAIT_SECS."""
        self._no_restores.wait(MOVE_WAIT_SECS)

    async def wait_moves(self) -> None:
        """Until every move to disk in flight is done (tests; a clean stop)."""
        while self._movers:
            await asyncio.gather(*self._movers, return_exceptions=True)

    async def _end_if_damaged(self, model: str, starts: dict[int, int],
                              exc: CriuFailed) -> None:
        """A dump that failed before its images were complete must leave the whole tree
        running. When part of it died (CRIU killed while it had a task infected: the task
        dies on CRIU's injected code; or the engine crashing under the dump), half an engine
        would be left answering nothing: the rest is ended, so that the model starts afresh,
        and the error says so."""
        alive = await asyncio.to_thread(proctree.same_processes, starts)
        dead = sorted(set(starts) - set(alive))
        if not dead or not alive:
            return
        await asyncio.to_thread(proctree.kill_exact, starts, signal.SIGKILL)
        log.warning("checkpoint %s: PIDs %s died during the failed dump; ended the rest %s",
                    model, dead, alive)
        raise CriuFailed(
            f"{exc}\nPIDs {dead} of the tree of {model!r} died during the failed dump (a CRIU "
            f"killed while it had them infected, or the engine crashing): the rest of the "
            f"tree ({alive}) was ended, so that the model starts afresh") from exc

    async def _thaw(self, pids: Sequence[int], cuda_pids: Sequence[int]) -> None:
        """Make a tree whose dump failed run again: no job-control stop, CUDA unlocked."""
        for pid in await asyncio.to_thread(proctree.stopped, pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if cuda_pids:
            alive = await asyncio.to_thread(lambda: [p for p in cuda_pids if proctree.exists(p)])
            try:
                await self.cuda.restore_and_unlock(alive)
            except HostError:
                log.exception("resuming CUDA after a failed dump failed")

    # ---- restore ---------------------------------------------------------------------

    async def restore(
        self,
        caller: Caller,
        model: str,
        *,
        keep_images: bool = True,
        progress: ProgressSink | None = None,
    ) -> Manifest:
        """prepare_restore, then run it."""
        prepared = await self.prepare_restore(caller, model, keep_images=keep_images)
        return await prepared.run(progress)

    async def prepare_restore(
        self, caller: Caller, model: str, *, keep_images: bool = True
    ) -> Prepared[Manifest]:
        """Checks a restore into the caller's container (the checkpoint is there and the
        caller's, this host and that container can take it back, the files it needs are
        there) and claims the model. Its PIDs and ports are checked by the run: a tree just
        dumped may take a moment to let go of them."""
        check_model(model)

        async def checks() -> Callable[[_Reporter], Awaitable[Manifest]]:
            started = time.monotonic()
            manifest, target = await restorecheck.check_restore(
                self.store, self.criu.version, caller, model)

            async def body(report: _Reporter) -> Manifest:
                return await self._restore(
                    caller, manifest, target, keep_images, report, started
                )

            return body

        return await self._prepare(model, None, checks)

    async def check_restore(self, caller: Caller, model: str) -> None:
        """The checks of prepare_restore alone (restorecheck): nothing claimed, no job, no
        file touched; raises what prepare_restore would."""
        await restorecheck.check_restore(self.store, self.criu.version, caller, model)

    async def _wait_pids_free(self, manifest: Manifest) -> None:
        wanted = sorted(set(manifest.pids) | set(manifest.tids))
        left = await proctree.wait_gone(wanted, self.pid_free_timeout)
        if left:
            holders = await asyncio.to_thread(lambda: [proctree.holder(p) for p in left[:3]])
            who = "; ".join(f"PID {p} is held by {h}" for p, h in zip(left, holders, strict=False))
            more = f" (and {len(left) - 3} more)" if len(left) > 3 else ""
            raise PidInUse(
                f"checkpoint {manifest.model!r} must restore PIDs {manifest.pids}, but {who}{more}"
            )

    async def _restore(
        self,
        caller: Caller,
        manifest: Manifest,
        target: ContainerContext,
        keep_images: bool,
        report: _Reporter,
        started: float,
    ) -> Manifest:
        model = manifest.model
        report(0.0, 0, 0.0, "waiting for PIDs")
        await self._wait_pids_free(manifest)
        await self._check_ports_free(manifest, caller.pid)

        files = self.store.files_dir(model)
        await asyncio.to_thread(upperfiles.verify, manifest.files, files)
        view_pid = caller.pid if target.foreign else None
        journal = self.store.root / f"{RESTORING}{model}.json"
        transient = [f.path for f in manifest.files if f.reason in ("dev-shm", "link-remap")]
        async with self._remap_guard(any(f.reason == "link-remap" for f in manifest.files)):
            # what a service killed mid-restore leaves in the target, for start-up to take
            # back where nothing uses it
            entry: dict[str, object] = {
                "view": proctree.start_times([view_pid]) if view_pid else None,
                "paths": transient, "pids": manifest.pids, "criu_start": None,
                # before CRIU starts: what is born from here on may be its work, even if the
                # service dies before criu_start is noted
                "floor": proctree.now_ticks(),
                "log": str(self.store.images_dir(model) / "restore.log")}
            await asyncio.to_thread(_write_json, journal, entry)
            try:
                with ViewRoot(view_pid) as view:
                    put_back = await asyncio.to_thread(self._put_back, manifest, files,
                                                       view.path)
                self._restores += 1
                self._no_restores.clear()
                try:
                    return await self._restore_tree(manifest, target, caller, keep_images,
                                                    report, started, journal, entry)
                except BaseException:
                    with contextlib.suppress(OSError), ViewRoot(view_pid) as view:
                        await _uncancellable(asyncio.to_thread(
                            resources.remove_unused,
                            [view.path / p.lstrip("/") for p in put_back]))
                    raise
                finally:
                    self._restores -= 1
                    if not self._restores:
                        self._no_restores.set()
            finally:
                with contextlib.suppress(FileNotFoundError):
                    await _uncancellable(asyncio.to_thread(journal.unlink))

    async def _check_ports_free(self, manifest: Manifest, caller_pid: int) -> None:
        """Each TCP port the tree listened on is free in the caller's network namespace."""
        holders = await asyncio.to_thread(resources.port_holders, manifest.listen_ports,
                                          caller_pid)
        if holders:
            who = "; ".join(f"port {port} is held by {h}" for port, h in holders.items())
            raise PortInUse(
                f"checkpoint {manifest.model!r} must listen again on TCP ports "
                f"{manifest.listen_ports}, but {who}"
            )

    def _put_back(self, manifest: Manifest, files: Path, view_root: Path) -> list[str]:
        """Write the saved files into the target; return the paths a failed restore should
        take back (link-remaps, /dev/shm segments). A /dev/shm file that a process uses is
        left alone; a missing or unused one gets the contents of dump time."""
        used = resources.in_use(view_root / f.path.lstrip("/")
                                for f in manifest.files if f.reason == "dev-shm")
        wanted: list[SavedFile] = []
        for f in manifest.files:
            if view_root / f.path.lstrip("/") in used:
                log.warning("restore %s: %s is in use; not replaced", manifest.model, f.path)
                continue
            wanted.append(f)
        upperfiles.put_back(wanted, files, view_root)
        return [f.path for f in wanted if f.reason in ("dev-shm", "link-remap")]

    def take_back_interrupted_restores(self) -> list[str]:
        """Files a restore put into its target before the service died under it (their
        journal says which): removed where nothing uses them. A restore that had finished
        has its tree using them; a target container that is gone took them along."""
        removed: list[str] = []
        # a journal write cut short: the complete version it was to replace (if any) is
        # beside it; a complete first version is taken as the journal, anything else goes
        for partial in sorted(self.store.root.glob(f"{RESTORING}*.json.new")):
            whole = partial.with_name(partial.name.removesuffix(".new"))
            try:
                if whole.exists():
                    raise ValueError("superseded")
                json.loads(partial.read_text())
                partial.rename(whole)
            except (OSError, ValueError):
                partial.unlink(missing_ok=True)
        for journal in sorted(self.store.root.glob(f"{RESTORING}*.json")):
            try:
                data = json.loads(journal.read_text())
                view = {int(k): int(v) for k, v in (data.get("view") or {}).items()}
                paths = [str(p) for p in data.get("paths", [])]
            except (OSError, ValueError, TypeError, AttributeError):
                data, view, paths = None, {}, []
            alive = proctree.same_processes(view) if view else []
            if data is not None:
                try:
                    with open(str(data.get("log")), "rb") as f:
                        f.seek(0, os.SEEK_END)
                        f.seek(max(0, f.tell() - 4096))
                        finished = RESTORE_FINISHED.encode() in f.read()
                except (OSError, TypeError):
                    finished = False
                if not finished:
                    _kill_half_restored([int(p) for p in data.get("pids", [])],
                                        data.get("criu_start") or data.get("floor"),
                                        Path(str(data.get("log"))).parent)
            if data is not None and (not view or alive):
                with contextlib.suppress(OSError), ViewRoot(alive[0] if alive else None) as v:
                    removed += [str(p) for p in resources.remove_unused(
                        v.path / p.lstrip("/") for p in paths)]
            journal.unlink(missing_ok=True)
        if removed:
            log.warning("removed files put back by interrupted restores: %s", removed)
        return removed

    def sweep_shm(self) -> list[str]:
        """Remove /dev/shm segments that a checkpoint holds a copy of and nothing uses
        (left by a restored tree that was killed, with its container for instance)."""
        paths = {
            f.path
            for m in self.store.manifests()
            if m.model not in self._busy_models  # a restore may have just put them back
            for f in m.files
            if f.reason == "dev-shm"
        }
        removed = resources.remove_unused(Path(p) for p in sorted(paths))
        if removed:
            log.info("removed %d unused /dev/shm file(s) kept in checkpoints", len(removed))
        return [str(p) for p in removed]

    async def _restore_tree(
        self,
        manifest: Manifest,
        target: ContainerContext,
        caller: Caller,
        keep_images: bool,
        report: _Reporter,
        started: float,
        journal: Path,
        entry: dict[str, object],
    ) -> Manifest:
        model = manifest.model
        images = self.store.images_dir(model)

        externals: list[tuple[str, str]] = []
        for ext in manifest.external_mounts:
            mine = target.external_for(ext.mount_point)
            if mine is not None and mine.host_source is not None:
                externals.append((ext.key, mine.host_source))
        root = target.rootfs_host_path if target.foreign else None
        pidfile = images / "restore.pid"
        for stale in (pidfile, images / "restore.log"):  # the journal reads the log's end
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(stale.unlink)
        cgroup_procs = await asyncio.to_thread(target.cgroup_procs_files)
        req = RestoreRequest(
            images_dir=images,
            pidfile=pidfile,
            root=Path(root) if root else None,
            external_mounts=externals,
            shell_job=manifest.shell_job,
            foreign_mntns=manifest.foreign_mntns or target.foreign,
            plugin_dir=self.config.cuda_plugin_dir if self.config.cuda_mode == "plugin" else None,
            cgroup_procs=cgroup_procs,
        )
        run_holder: list[CriuRun] = []
        noted: list[asyncio.Future[None]] = []

        def started_criu(run: CriuRun) -> None:
            run_holder.append(run)

            def note() -> None:
                entry["criu_start"] = proctree.start_times([run.pid]).get(run.pid)
                _write_json(journal, entry)

            noted.append(asyncio.ensure_future(asyncio.to_thread(note)))

        def measure() -> int:
            if not run_holder:
                return 0
            criu_pid = run_holder[0].pid
            done: int = proctree.io_read_bytes([criu_pid, *manifest.pids])
            return done

        t = time.monotonic()
        readahead = asyncio.create_task(
            asyncio.to_thread(prefetch, images, manifest.images_bytes,
                              self.config.prefetch_threads)
        )
        try:
            async with report.watching(measure, manifest.images_bytes, "restoring", 0.0, 0.9):
                await self.criu.restore(
                    req, on_start=started_criu,
                    timeout_secs=self.config.criu_bound_secs(manifest.images_bytes))
        except BaseException:
            # A CRIU killed (a timeout, a cancel, a signal) leaves what it had restored
            # waiting forever in its restorer, holding the PIDs: finish it off; the
            # checkpoint is kept.
            await _uncancellable(asyncio.gather(*noted, return_exceptions=True))
            if run_holder:
                await _uncancellable(asyncio.to_thread(
                    _kill_half_restored, manifest.pids,
                    entry.get("criu_start") or entry.get("floor"), images))
            raise
        finally:
            with contextlib.suppress(Exception):
                await readahead
            await _uncancellable(asyncio.gather(*noted, return_exceptions=True))
        restore_secs = time.monotonic() - t
        try:
            restored_root = int((await asyncio.to_thread(pidfile.read_text)).strip())
        except (OSError, ValueError):
            restored_root = manifest.root_pid
        if restored_root != manifest.root_pid:
            log.warning("restored root PID %s, expected %s", restored_root, manifest.root_pid)

        if manifest.cuda_pids:
            report(0.9, 0, 0.0, "cuda-restore")
            try:
                await self.cuda.restore_and_unlock(manifest.cuda_pids)
            except HostError as exc:
                raise CudaFailed(
                    f"CRIU restored {model!r} (PIDs {manifest.pids}) but its CUDA state could "
                    f"not be resumed: {exc}; the checkpoint is kept"
                ) from exc

        await asyncio.to_thread(self.restored.add, restored_root, target.cgroup_identity, model)
        if not keep_images:
            await asyncio.to_thread(self.store.delete, model)
        report(1.0, manifest.images_bytes, manifest.images_bytes / max(restore_secs, 1e-6), "done")
        log.info(
            "restored %s (PIDs %s) in %.2fs (%.2fs total)",
            model,
            manifest.pids,
            restore_secs,
            time.monotonic() - started,
        )
        return manifest

    # ---- CUDA suspend / resume -------------------------------------------------------

    async def suspend(
        self,
        caller: Caller,
        model: str,
        root_pid: int,
        progress: ProgressSink | None = None,
    ) -> SuspendResult:
        """prepare_suspend, then run it."""
        return await (await self.prepare_suspend(caller, model, root_pid)).run(progress)

    async def resume(
        self,
        caller: Caller,
        model: str,
        root_pid: int,
        progress: ProgressSink | None = None,
    ) -> SuspendResult:
        """prepare_resume, then run it."""
        return await (await self.prepare_resume(caller, model, root_pid)).run(progress)

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
                    f"(CUDA mode {self.config.cuda_mode!r}): nothing to suspend"
                )
            return cuda_pids

        return await self._cuda_job(caller, model, root_pid, cuda_of, self._suspend_tree)

    async def prepare_resume(
        self, caller: Caller, model: str, root_pid: int
    ) -> Prepared[SuspendResult]:
        """Checks that the caller may resume the tree."""
        return await self._cuda_job(caller, model, root_pid, None, self._resume_tree)

    async def _cuda_job(
        self,
        caller: Caller,
        model: str,
        root_pid: int,
        cuda_of: Callable[[list[int]], list[int]] | None,
        body: Callable[[str, int, list[int], list[int] | None, _Reporter], Awaitable[list[int]]],
    ) -> Prepared[SuspendResult]:
        """What suspend and resume share: checks, the model's claim, progress, timing."""
        check_model(model)
        self._check_pid_arg(root_pid)

        async def checks() -> Callable[[_Reporter], Awaitable[SuspendResult]]:
            started = time.monotonic()
            await asyncio.to_thread(authz.check_target, caller, root_pid, self.restored)
            pids = await self._tree(root_pid)
            found = await asyncio.to_thread(cuda_of, pids) if cuda_of is not None else None

            async def run(report: _Reporter) -> SuspendResult:
                cuda_pids = await body(model, root_pid, pids, found, report)
                report(1.0, 0, 0.0, "done")
                return SuspendResult(model, pids, cuda_pids, time.monotonic() - started)

            return run

        return await self._prepare(model, root_pid, checks)

    async def _suspend_tree(
        self,
        model: str,
        root_pid: int,
        pids: list[int],
        cuda_pids: list[int] | None,
        report: _Reporter,
    ) -> list[int]:
        assert cuda_pids  # prepare_suspend found them
        report(0.1, 0, 0.0, "cuda-checkpoint")
        try:
            await self.cuda.lock_and_checkpoint(cuda_pids)
        except BaseException:
            await _uncancellable(self._thaw(pids, cuda_pids))
            raise
        self._suspended[model] = (root_pid, cuda_pids)
        return cuda_pids

    async def _resume_tree(
        self,
        model: str,
        root_pid: int,
        pids: list[int],
        _found: list[int] | None,
        report: _Reporter,
    ) -> list[int]:
        known = self._suspended.get(model)
        if known is not None and known[0] == root_pid:
            cuda_pids = [p for p in known[1] if p in pids]
        else:
            cuda_pids = await asyncio.to_thread(self.cuda.cuda_pids, pids)
        if cuda_pids:
            report(0.1, 0, 0.0, "cuda-restore")
            await self.cuda.restore_and_unlock(cuda_pids)
        self._suspended.pop(model, None)
        return cuda_pids
