"""The restore job: a checkpoint checked against its target and restored by CRIU into the
caller's container (its rootfs, its bind mounts, its cgroups).

A failed restore keeps the checkpoint and carries CRIU's log excerpt; what it put into the
target is taken back, and what CRIU restored in part is killed. Its journal (recovery.py)
lets start-up do the same for a restore cut short by the service's death.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from llmux.common import proctree, resources
from llmux.common.errors import (
    Busy,
    CriuFailed,
    CudaFailed,
    HostError,
    NotFound,
    PidInUse,
    PortInUse,
)
from llmux.service.core import devcopy, pidns, restorecheck, upperfiles
from llmux.service.core.authz import Caller
from llmux.service.core.claims import Prepared, Reporter, uncancellable
from llmux.service.core.container import ContainerContext
from llmux.service.core.criu import CriuRun, RestoreRequest
from llmux.service.core.cuda import IN_PLACE
from llmux.service.core.cudajobs import device_map_for
from llmux.service.core.gone import wait_gone_async
from llmux.service.core.gpumap import DeviceMap
from llmux.service.core.jobbase import JobBase
from llmux.service.core.manifest import Manifest
from llmux.service.core.recovery import RestoreJournal, kill_half_restored
from llmux.service.core.remote import RemoteRecord, RemoteStore, fetch
from llmux.service.core.store import check_model, prefetch
from llmux.service.core.upperfiles import SavedFile, ViewRoot

log = logging.getLogger(__name__)

PID_FREE_TIMEOUT_SECS = 10.0
"""How long a restore waits for dumped PIDs to be reaped before naming who holds them."""


@dataclass
class Restore:
    """One restore's state, from its checks to the restored tree."""

    caller: Caller
    manifest: Manifest
    target: ContainerContext
    keep_images: bool
    report: Reporter
    started: float
    journal: RestoreJournal | None = None
    criu_runs: list[CriuRun] = field(default_factory=list)
    """The CRIU run, once started (what progress measures)."""
    noted: list[asyncio.Future[None]] = field(default_factory=list)
    """The journal's note of CRIU's start, in flight."""
    device_map: DeviceMap = IN_PLACE
    """Onto other GPUs than the checkpoint's (llmux.service.core.gpumap)."""

    @property
    def model(self) -> str:
        return self.manifest.model

    @property
    def view_pid(self) -> int | None:
        """Whose view of the filesystem the target's paths are in (None: the host's)."""
        return self.caller.pid if self.target.foreign else None


def _half_restored_pids(manifest: Manifest, pidfile: Path) -> list[int]:
    """What a CRIU cut short may have restored: the dump's PIDs, or for a tree in a PID
    namespace of its own the namespace's init when CRIU named it (killing the init ends the
    whole namespace; CRIU's helpers are found by their argv)."""
    if not manifest.pid_namespace:
        return manifest.pids
    try:
        return [int(pidfile.read_text().strip())]
    except (OSError, ValueError):
        return []


async def _no_room_needed(*_args: object, **_kw: object) -> None:
    """No memory tier to make room in."""


class Restorer(JobBase):
    """Checks and runs restores; records the restored trees (authz) for their container."""

    def __init__(self, base: JobBase) -> None:
        super().__init__(**vars(base))
        self.pid_free_timeout = PID_FREE_TIMEOUT_SECS
        self.remote: RemoteStore | None = None
        """The remote store: a checkpoint not on this host is downloaded from it."""
        self.make_room: Callable[..., Awaitable[object]] = _no_room_needed
        """The memory tier's: other checkpoints' memory copies dropped for the tree's sake."""

    async def prepare(self, caller: Caller, model: str, *, keep_images: bool,
                      gpu_map: Mapping[int, int] | None = None,
                      replica: bool = False) -> Prepared[Manifest]:
        """Checks a restore into the caller's container (the checkpoint is there and the
        caller's, this host and that container can take it back, the files it needs are
        there; no tree restored from it runs, unless ``replica``) and claims the model. Its
        PIDs and ports are checked by the run: a tree just dumped may take a moment to let
        go of them."""
        check_model(model)

        async def checks() -> Callable[[Reporter], Awaitable[Manifest]]:
            started = time.monotonic()
            record = await self.remote_record(model)
            manifest, target = await restorecheck.check_restore(
                self.store, self.criu, caller, model,
                remote=record.manifest if record is not None else None)
            # a replica needs a tree in namespaces of its own; a PID-bound one that runs
            # holds the very PIDs a second one needs (PidInUse, as ever)
            live = await asyncio.to_thread(self.restored.live, model) \
                if manifest.pid_namespace else 0
            if live and not replica:
                raise Busy(
                    f"checkpoint {model!r} has {live} live tree(s) restored from it; "
                    "restoring another is a replica (the Restore option replica, a model's "
                    "replicas_from_checkpoint = true in the shim's config)")
            # onto other GPUs: refused here, by name, where the driver could not (a tree
            # without CUDA state has nothing to remap)
            device_map = IN_PLACE if not manifest.cuda_pids else await asyncio.to_thread(
                device_map_for, gpu_map or {}, self.config.cuda_mode)

            async def body(report: Reporter) -> Manifest:
                keep = keep_images
                if record is not None and self.remote is not None:
                    await fetch(self.store, self.remote, record, report)
                    keep = keep_images and self.remote.config.keep_local
                return await self._run(
                    Restore(caller, manifest, target, keep, report, started,
                            device_map=device_map))

            return body

        return await self.claims.prepare(model, None, checks)

    async def remote_record(self, model: str) -> RemoteRecord | None:
        """The store's record of a checkpoint this host does not hold (None: it does, or
        there is no store); its manifest is checked here before any byte moves."""
        if self.remote is None or self.store.has(model):
            return None
        try:
            return await asyncio.to_thread(self.remote.record, model)
        except NotFound:
            raise NotFound(f"no checkpoint for model {model!r} in {self.store.root} nor in "
                           f"the store {self.remote.url}") from None

    async def _wait_pids_free(self, manifest: Manifest) -> None:
        if manifest.pid_namespace:
            return  # restored into a fresh PID namespace: every PID is free there
        wanted = sorted(set(manifest.pids) | set(manifest.tids))
        left = await wait_gone_async(lambda: proctree.taken(wanted), self.pid_free_timeout)
        if left:
            holders = await asyncio.to_thread(lambda: [proctree.holder(p) for p in left[:3]])
            who = "; ".join(f"PID {p} is held by {h}" for p, h in zip(left, holders, strict=False))
            more = f" (and {len(left) - 3} more)" if len(left) > 3 else ""
            raise PidInUse(
                f"checkpoint {manifest.model!r} must restore PIDs {manifest.pids}, but {who}{more}"
            )

    async def _check_ports_free(self, manifest: Manifest, caller_pid: int) -> None:
        """Each TCP port the tree listened on is free in the caller's network namespace
        (a tree with a network of its own listens in it, where every port is free)."""
        if manifest.net_namespace:
            return
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

    async def _run(self, r: Restore) -> Manifest:
        manifest = r.manifest
        r.report(0.0, 0, 0.0, "waiting for PIDs")
        await self._wait_pids_free(manifest)
        await self._check_ports_free(manifest, r.caller.pid)
        await self.make_room(manifest.images_bytes, keep=r.model)

        files = self.store.files_dir(r.model)
        await asyncio.to_thread(upperfiles.verify, manifest.files, files)
        transient = [f.path for f in manifest.files if f.reason in ("dev-shm", "link-remap")]
        async with self.claims.remap_guard(any(f.reason == "link-remap" for f in manifest.files)):
            r.journal = await asyncio.to_thread(
                RestoreJournal.begin, self.store.root, r.model, view_pid=r.view_pid,
                paths=transient, pids=[] if manifest.pid_namespace else manifest.pids,
                log_path=self.store.images_dir(r.model) / "restore.log")
            try:
                with ViewRoot(r.view_pid) as view:
                    put_back = await asyncio.to_thread(self._put_back, manifest, files,
                                                       view.path)
                with self.claims.restoring():
                    try:
                        return await self._restore_tree(r)
                    except BaseException:
                        with contextlib.suppress(OSError), ViewRoot(r.view_pid) as view:
                            await uncancellable(asyncio.to_thread(
                                resources.remove_unused,
                                [view.path / p.lstrip("/") for p in put_back]))
                        raise
            finally:
                await uncancellable(asyncio.to_thread(r.journal.end))

    @staticmethod
    def _mount_sources(r: Restore) -> dict[str, Path]:
        """For a tree in a user namespace of its own: /dev, /sys, /dev/mqueue made here."""
        if not r.manifest.pid_namespace:
            return {}
        wanted = {e.mount_point for e in r.manifest.external_mounts}
        made: dict[str, Path] = {}
        under = Path(tempfile.gettempdir())
        try:
            if devcopy.DEV in wanted:
                made[devcopy.DEV] = devcopy.prepare(r.caller.pid, under)
            for point, fstype in devcopy.FRESH.items():
                if point in wanted:
                    made[point] = devcopy.prepare_fs(fstype, under)
        except BaseException:
            for path in made.values():
                devcopy.release(path)
            raise
        return made

    def _request(self, r: Restore, images: Path, pidfile: Path,
                 cgroup_procs: list[Path], sources: dict[str, Path]) -> RestoreRequest:
        target = r.target
        externals: list[tuple[str, str]] = []
        for ext in r.manifest.external_mounts:
            mine = target.external_for(ext.mount_point)
            if ext.mount_point in sources:
                externals.append((ext.key, str(sources[ext.mount_point])))
            elif mine is not None and mine.host_source is not None:
                externals.append((ext.key, mine.host_source))
        root = target.rootfs_host_path if target.foreign else None
        return RestoreRequest(
            images_dir=images,
            pidfile=pidfile,
            root=Path(root) if root else None,
            external_mounts=externals,
            shell_job=r.manifest.shell_job,
            foreign_mntns=r.manifest.foreign_mntns or target.foreign,
            plugin_dir=self.config.cuda_plugin_dir if self.config.cuda_mode == "plugin" else None,
            cgroup_procs=cgroup_procs,
        )

    async def _criu_restore(self, r: Restore, req: RestoreRequest) -> None:
        """CRIU's restore, noted in the journal when it starts; what a CRIU that did not
        finish restored is killed (the checkpoint is kept)."""
        manifest, journal = r.manifest, r.journal
        assert journal is not None

        def started_criu(run: CriuRun) -> None:
            r.criu_runs.append(run)
            r.noted.append(asyncio.ensure_future(asyncio.to_thread(journal.note_criu, run.pid)))

        def measure() -> int:
            if not r.criu_runs:
                return 0
            done: int = proctree.io_read_bytes([r.criu_runs[0].pid, *manifest.pids])
            return done

        readahead = asyncio.create_task(asyncio.to_thread(
            prefetch, req.images_dir, manifest.images_bytes, self.config.prefetch_threads))
        try:
            async with r.report.watching(measure, manifest.images_bytes, "restoring", 0.0, 0.9):
                await self.criu.restore(
                    req, on_start=started_criu,
                    timeout_secs=self.config.criu_bound_secs(manifest.images_bytes))
        except BaseException:
            # A CRIU killed (a timeout, a cancel, a signal) leaves what it had restored
            # waiting forever in its restorer, holding the PIDs: finish it off.
            await uncancellable(asyncio.gather(*r.noted, return_exceptions=True))
            if r.criu_runs:
                await uncancellable(asyncio.to_thread(lambda: kill_half_restored(
                    _half_restored_pids(manifest, req.pidfile), journal.since,
                    req.images_dir)))
            raise
        finally:
            with contextlib.suppress(Exception):
                await readahead
            await uncancellable(asyncio.gather(*r.noted, return_exceptions=True))

    async def _restore_tree(self, r: Restore) -> Manifest:
        manifest, model = r.manifest, r.model
        images = self.store.images_dir(model)
        pidfile = images / "restore.pid"
        for stale in (pidfile, images / "restore.log"):  # the journal reads the log's end
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(stale.unlink)
        cgroup_procs = await asyncio.to_thread(r.target.cgroup_procs_files)
        sources = await asyncio.to_thread(self._mount_sources, r)
        log.info("restoring %s from %s", model,
                 "the memory tier" if images.is_symlink() else "disk")
        t = time.monotonic()
        try:
            await self._criu_restore(r, self._request(r, images, pidfile, cgroup_procs,
                                                      sources))
        finally:
            for made in sources.values():
                await uncancellable(asyncio.to_thread(devcopy.release, made))
        restore_secs = time.monotonic() - t
        try:
            restored_root = int((await asyncio.to_thread(pidfile.read_text)).strip())
        except (OSError, ValueError) as exc:
            if manifest.pid_namespace:  # its new root is known from CRIU only
                raise CriuFailed(f"criu restored {model!r} but its pidfile {pidfile} cannot "
                                 f"be read ({exc}); the checkpoint is kept") from exc
            restored_root = manifest.root_pid
        if restored_root != manifest.root_pid and not manifest.pid_namespace:
            log.warning("restored root PID %s, expected %s", restored_root, manifest.root_pid)
        pids, cuda_pids = manifest.pids, manifest.cuda_pids
        if manifest.pid_namespace:
            # new host PIDs: the namespace's own PIDs name the same processes as at dump
            pids, by_inner = await asyncio.to_thread(pidns.host_pids, restored_root)
            inner = dict(zip(manifest.pids, manifest.inner_pids, strict=False))
            cuda_pids = [by_inner[inner[p]] for p in manifest.cuda_pids
                         if inner.get(p) in by_inner]

        if cuda_pids:
            r.report(0.9, 0, 0.0, "cuda-restore")
            try:
                await self.cuda.restore_and_unlock(cuda_pids, r.device_map)
            except HostError as exc:
                raise CudaFailed(
                    f"CRIU restored {model!r} (PIDs {manifest.pids}) but its CUDA state could "
                    f"not be resumed: {exc}; the checkpoint is kept"
                ) from exc

        await asyncio.to_thread(self.restored.add, restored_root, r.target.cgroup_identity, model)
        if not r.keep_images:
            await asyncio.to_thread(self.store.delete, model)
        r.report(1.0, manifest.images_bytes,
                 manifest.images_bytes / max(restore_secs, 1e-6), "done", pids=pids)
        log.info("restored %s (PIDs %s) in %.2fs (%.2fs total)", model, pids,
                 restore_secs, time.monotonic() - r.started)
        return manifest
