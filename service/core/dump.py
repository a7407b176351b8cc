"""The dump job: a process tree checked, dumped by CRIU and committed as a checkpoint.

Failure is never loss: a failed or cancelled dump leaves the tree running (CRIU kills it
only on success; CUDA is restored and unlocked) and removes the half-written checkpoint.
Once CRIU has dumped and killed the tree, the checkpoint is committed even if the job is
cancelled meanwhile. Its journal (recovery.py) lets start-up cure a dump cut short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmux.common import gpumem, proctree, resources
from llmux.common.errors import CriuFailed, HostError, InvalidArgument, NoSpace, Unsupported
from llmux.service.core import authz, compat, pidns, procerrors, upperfiles
from llmux.service.core.authz import Caller
from llmux.service.core.claims import Prepared, Reporter, uncancellable
from llmux.service.core.container import ContainerContext
from llmux.service.core.criu import CriuRun, DumpRequest
from llmux.service.core.cuda import CudaCheckpointer, driver_version
from llmux.service.core.gone import wait_gone_async
from llmux.service.core.jobbase import JobBase
from llmux.service.core.manifest import ExternalMountRecord, Manifest
from llmux.service.core.recovery import sweep_shm, write_journal
from llmux.service.core.store import (
    Staging,
    check_model,
    dir_bytes,
    dump_completed,
    image_sizes,
    start_writeback,
)
from llmux.service.core.tiermove import TierMover
from llmux.service.core.upperfiles import SavedFile, ViewRoot

log = logging.getLogger(__name__)

REAP_AFTER_DUMP_SECS = 5.0
#: a link_remap.N file this old that nobody uses was left by an interrupted job
STALE_REMAP_AGE_SECS = 600.0
#: how often the images written so far are handed to the disk during a dump
WRITEBACK_INTERVAL_SECS = 0.25
_SIZE_MARGIN = 1.05
_SIZE_SLACK = 16 << 20


def check_pid_arg(root_pid: int) -> None:
    if isinstance(root_pid, bool) or not isinstance(root_pid, int) or root_pid <= 0:
        raise InvalidArgument(f"root PID must be a positive integer, not {root_pid!r}")


#: more GPU indices than any host has: a list this long is not a placement
_MAX_GPUS = 64


def check_gpus(gpus: Sequence[int]) -> list[int]:
    """The option ``gpus`` as the manifest keeps it; InvalidArgument naming what is wrong."""
    out = list(gpus)
    if len(out) > _MAX_GPUS:
        raise InvalidArgument(f"gpus lists {len(out)} GPUs; at most {_MAX_GPUS}")
    if any(isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < 1 << 16 for g in out):
        raise InvalidArgument(f"gpus must be GPU indices (0 to 65535): {out!r}")
    doubled = sorted({g for g in out if out.count(g) > 1})
    if doubled:
        raise InvalidArgument(f"gpus names GPU {doubled[0]} twice")
    return out


@dataclass(frozen=True)
class Tree:
    """A tree found fit to dump: its PIDs, its container, the space its dump needs."""

    pids: list[int]
    ctx: ContainerContext
    expected: int
    deleted_ids: set[tuple[int, int]]
    """Its deleted-but-open files, which CRIU will link-remap (none: no link-remaps)."""
    starts: dict[int, int]
    """Each PID's start time: what names these very processes in the job's journal."""


@dataclass
class Dump:
    """One dump's state, from the first look at the tree to the commit."""

    model: str
    root_pid: int
    leave_running: bool
    tree: Tree
    report: Reporter
    started: float
    pending: Manifest
    """The manifest as known before CRIU runs; the commit completes it."""
    staging: Staging
    view: ViewRoot
    criu_started: list[asyncio.Future[None]] = field(default_factory=list)
    upper: list[str] = field(default_factory=list)
    shm: list[str] = field(default_factory=list)
    remap_dirs: list[str] = field(default_factory=list)
    cuda_secs: float = 0.0
    dump_secs: float = 0.0
    late_failure: BaseException | None = None
    """CRIU completed the dump but then failed, was killed or cancelled: kept, warned."""
    warnings: list[str] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return self.tree.pids

    @property
    def cuda_pids(self) -> list[int]:
        return self.pending.cuda_pids


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


def _session_outside(pids: Sequence[int]) -> bool:
    """A tree whose session or process group leader is outside it needs --shell-job."""
    members = set(pids)
    for pid in pids:
        st = proctree.read_stat(pid)
        if st is not None and (st.session not in members or st.pgrp not in members):
            return True
    return False


def _namespace_fields(root_pid: int, pids: Sequence[int]) -> dict[str, Any]:
    """The manifest's pid_namespace and inner_pids (a tree in a PID namespace of its own)."""
    if not pidns.owns_namespace(root_pid):
        return {}
    return {"pid_namespace": True, "inner_pids": pidns.inner_pids(pids),
            "net_namespace": pidns.owns_network(root_pid)}


async def thaw(cuda: CudaCheckpointer, pids: Sequence[int], cuda_pids: Sequence[int]) -> None:
    """Make a tree whose dump failed run again: no job-control stop, CUDA unlocked."""
    for pid in await asyncio.to_thread(proctree.stopped, pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    if cuda_pids:
        alive = await asyncio.to_thread(lambda: [p for p in cuda_pids if proctree.exists(p)])
        try:
            await cuda.restore_and_unlock(alive)
        except HostError:
            log.exception("resuming CUDA after a failed dump failed")


class Dumper(JobBase):
    """Checks and runs dumps; commits them to the store and hands them to the mover."""

    def __init__(self, base: JobBase, mover: TierMover) -> None:
        super().__init__(**vars(base))
        self.mover = mover
        self.on_commit: Callable[[str], None] = lambda _model: None
        """Called with the model once a checkpoint is committed (the remote upload)."""

    async def prepare(self, caller: Caller, model: str, root_pid: int, *,
                      leave_running: bool, weights_bytes: int,
                      gpus: Sequence[int] = ()) -> Prepared[Manifest]:
        """Checks a dump of ``root_pid``'s tree (the caller's right on it, what CRIU cannot
        dump, a container it could not go back to, free space) and claims model and PID.
        ``gpus``: the caller's word for where the tree's CUDA state is, kept for its restore."""
        check_model(model)
        check_pid_arg(root_pid)
        gpus = check_gpus(gpus)
        if (
            isinstance(weights_bytes, bool)
            or not isinstance(weights_bytes, int)
            or weights_bytes < 0
        ):
            raise InvalidArgument(
                f"weights_bytes must be a non-negative integer: {weights_bytes!r}"
            )

        async def checks() -> Callable[[Reporter], Awaitable[Manifest]]:
            started = time.monotonic()
            await asyncio.to_thread(authz.check_target, caller, root_pid, self.restored)
            tree = await asyncio.to_thread(self.inspect_tree, model, root_pid, weights_bytes)

            async def body(report: Reporter) -> Manifest:
                async with self.claims.remap_guard(bool(tree.deleted_ids)):
                    found = tree
                    if tree.deleted_ids and await asyncio.to_thread(
                            procerrors.tree, root_pid) != found.pids:
                        # it changed while another dump held the link-remaps: check again
                        found = await asyncio.to_thread(
                            self.inspect_tree, model, root_pid, weights_bytes
                        )
                    return await self._run(caller, model, root_pid, leave_running, found,
                                           report, started, gpus)

            return body

        return await self.claims.prepare(model, root_pid, checks)

    def inspect_tree(self, model: str, root_pid: int, weights_bytes: int) -> Tree:
        """The checks of a dump that read /proc (run in a thread)."""
        pids = procerrors.tree(root_pid)
        bad = resources.undumpable_fds(pids)
        if bad:
            raise Unsupported(
                f"the tree of PID {root_pid} cannot be checkpointed: {bad[0]}, which CRIU "
                "cannot dump"
                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                + "; engines started by llmux run with io_uring unavailable "
                "(python -m llmux.shim.launch)"
            )
        own_ns = pidns.owns_namespace(root_pid)
        connected = (resources.connected_ports(pids)
                     if own_ns and not pidns.owns_network(root_pid) else [])
        if connected:
            raise Unsupported(
                f"the tree of PID {root_pid} runs in a user namespace of its own and holds "
                f"open TCP connections (local ports {connected}) in its container's "
                "network namespace, not a network of its own: "
                "CRIU cannot restore them inside that user namespace (TCP repair needs "
                "CAP_NET_ADMIN over that network: \"Can't turn TCP repair mode ON: "
                "Operation not permitted\"); let the engine have a network of its own (no "
                "LLMUX_NET_NAMESPACE=0 in its env), or start it with LLMUX_PID_NAMESPACE=0 "
                "to checkpoint it in the container's PID namespace")
        ctx = ContainerContext.from_pid(root_pid, userns=own_ns)
        if ctx.foreign and ctx.rootfs_host_path is None:
            raise Unsupported(
                f"PID {root_pid} lives in a mount namespace whose root filesystem is not "
                "visible on the host; it cannot be restored, so it is not dumped"
            )
        # a CUDA checkpoint brings the tree's GPU memory (weights, KV cache) into the image
        gpu = gpumem.tree_bytes(pids) if self.config.cuda_mode != "off" else 0
        expected = int((proctree.rss_bytes(pids) + gpu + weights_bytes) * _SIZE_MARGIN
                       ) + _SIZE_SLACK
        self.store.check_space(model, expected, gpu_bytes=gpu)
        return Tree(pids, ctx, expected, resources.deleted_file_ids(pids),
                    proctree.start_times(pids))

    async def _describe(self, caller: Caller, model: str, root_pid: int, leave_running: bool,
                        tree: Tree) -> Manifest:
        """The manifest as far as it is known before CRIU runs."""
        pids, ctx = tree.pids, tree.ctx
        rootfs = await asyncio.to_thread(ctx.rootfs_identity)
        return Manifest(
            model=model,
            owner=authz.user_name(caller.uid),
            owner_uid=caller.uid,
            root_pid=root_pid,
            pids=pids,
            tids=await asyncio.to_thread(proctree.all_threads, pids),
            cuda_pids=await asyncio.to_thread(self.cuda.cuda_pids, pids),
            criu_version=str(self.criu.version),
            kernel_release=os.uname().release,
            driver_version=driver_version(),
            created=0.0,
            rootfs=rootfs,
            compat=await asyncio.to_thread(compat.host_facts, str(self.criu.version), rootfs),
            network_lock=self.criu.network_lock,
            foreign_mntns=ctx.foreign,
            shell_job=await asyncio.to_thread(_session_outside, pids),
            external_mounts=[ExternalMountRecord(e.key, e.mount_point) for e in ctx.externals],
            source_cgroups=ctx.cgroup_identity,
            expected_bytes=tree.expected,
            leave_running=leave_running,
            listen_ports=await asyncio.to_thread(resources.listening_ports, pids),
            **await asyncio.to_thread(_namespace_fields, root_pid, pids),
        )

    async def _run(self, caller: Caller, model: str, root_pid: int, leave_running: bool,
                   tree: Tree, report: Reporter, started: float,
                   gpus: list[int]) -> Manifest:
        await asyncio.to_thread(sweep_shm, self.store, self.claims.models)
        pending = replace(await self._describe(caller, model, root_pid, leave_running, tree),
                          gpus=gpus)
        await self.mover.make_room(tree.expected, for_tier=True)  # the oldest copies go
        staging = await asyncio.to_thread(self.store.begin, model, tree.expected)
        view = await asyncio.to_thread(ViewRoot, root_pid if tree.ctx.foreign else None)
        d = Dump(model, root_pid, leave_running, tree, report, started, pending, staging, view)
        try:
            # If the service dies mid-dump, start-up can still finish what CRIU completed,
            # or let the tree run again: what it needs is written before CRIU starts.
            await asyncio.to_thread(self.store.write_pending, staging, pending)
            await asyncio.to_thread(write_journal, staging, tree=tree.starts,
                                    leave_running=leave_running)
            await self._look_around(d)
            if d.cuda_pids:
                report(0.0, 0, 0.0, "cuda-checkpoint")
                t = time.monotonic()
                await self.cuda.lock_and_checkpoint(d.cuda_pids)
                d.cuda_secs = time.monotonic() - t
            await self._dump(d)
        except BaseException:
            view.close()
            await uncancellable(asyncio.gather(*d.criu_started, return_exceptions=True))
            await uncancellable(asyncio.to_thread(self.store.abort, staging))
            raise
        await uncancellable(asyncio.gather(*d.criu_started, return_exceptions=True))
        # Past the point of no return: unless leave_running, the tree is gone and only
        # these images hold it. Finish even if cancelled; never delete them.
        try:
            return await uncancellable(self._finish(d))
        finally:
            view.close()

    async def _look_around(self, d: Dump) -> None:
        """The files the dump carries (writable layer, /dev/shm, link-remaps) and those the
        restore will need from the target as it is; stale link-remaps removed."""
        pids, view = d.pids, d.view
        live, deleted = await asyncio.to_thread(resources.open_paths, pids)
        d.shm = resources.shm_paths(live)

        def remaps() -> list[str]:
            for directory in {str(Path(p).parent) for p in d.shm}:
                view.hold(directory)
            remap_dirs = upperfiles.link_remap_dirs(deleted, view)
            stale = resources.stale(
                [view.resolve(p) for p in upperfiles.list_link_remaps(remap_dirs, view)],
                STALE_REMAP_AGE_SECS)
            if stale:
                log.info("removing stale CRIU link-remap files: %s", stale)
                upperfiles.remove_files(stale)
            return remap_dirs

        d.remap_dirs = await asyncio.to_thread(remaps)
        d.upper = await asyncio.to_thread(upperfiles.find_upper_files, pids, d.tree.ctx)
        carried = set(d.upper) | set(d.shm)
        d.pending = replace(d.pending, external_files=await asyncio.to_thread(
            resources.regular_files, [p for p in live if p not in carried], view.path))

    async def _dump(self, d: Dump) -> None:
        """CRIU's dump. A failure before the images were complete leaves the tree running
        (and raises); after, the images are the tree: noted in ``d.late_failure``."""
        ctx, images = d.tree.ctx, d.staging.images
        req = DumpRequest(
            pid=d.root_pid,
            images_dir=images,
            leave_running=d.leave_running,
            ghost_limit_bytes=self.config.ghost_limit_bytes,
            external_mounts=[(e.mount_point, e.key) for e in ctx.externals],
            shell_job=d.pending.shell_job,
            foreign_mntns=ctx.foreign,
            plugin_dir=self.config.cuda_plugin_dir if self.config.cuda_mode == "plugin" else None,
        )

        def journal_criu(run: CriuRun) -> None:
            d.criu_started.append(asyncio.ensure_future(asyncio.to_thread(
                write_journal, d.staging, criu=proctree.start_times([run.pid]))))

        t = time.monotonic()
        try:
            async with (
                d.report.watching(lambda: dir_bytes(images), d.tree.expected, "dumping",
                                  0.0, 0.95),
                _writing_back(images),
            ):
                await self.criu.dump(req, on_start=journal_criu,
                                     timeout_secs=self.config.criu_bound_secs(d.tree.expected))
        except BaseException as exc:
            await self._after_failed_criu(d, exc)
        d.dump_secs = time.monotonic() - t

    async def _after_failed_criu(self, d: Dump, exc: BaseException) -> None:
        """Re-raise ``exc`` with the tree running again, unless CRIU had completed the dump:
        then finish what it began (a tree half killed is no tree) and keep the images."""
        completed = await uncancellable(
            asyncio.to_thread(dump_completed, d.staging.images))
        if not completed or (d.leave_running and await uncancellable(
                asyncio.to_thread(proctree.exists, d.root_pid))):
            await uncancellable(thaw(self.cuda, d.pids, d.cuda_pids))
            await uncancellable(asyncio.to_thread(self._drop_own_remaps, d))
            if isinstance(exc, CriuFailed):
                await uncancellable(self._end_if_damaged(d.model, d.tree.starts, exc))
                free = await asyncio.to_thread(self.store.free_bytes)
                if free < _SIZE_SLACK or "No space left" in str(exc):
                    raise NoSpace(
                        f"the state directory {self.store.root} filled up during the "
                        f"dump of {d.model!r} ({free >> 20} MiB free); the tree runs "
                        f"on and nothing was kept: {exc}") from exc
            raise exc
        if not d.leave_running:
            killed = await uncancellable(asyncio.to_thread(
                proctree.kill_exact, d.tree.starts, signal.SIGKILL))
            if killed:
                log.warning("checkpoint %s: CRIU ended before it killed %s; killed",
                            d.model, killed)
        d.late_failure = exc
        current = asyncio.current_task()
        if isinstance(exc, asyncio.CancelledError) and current is not None:
            current.uncancel()

    @staticmethod
    def _drop_own_remaps(d: Dump) -> None:
        """The link-remaps a CRIU killed mid-dump made for this tree's deleted files (it
        removes them itself only when it ends on its own): left, each would keep a deleted
        /dev/shm segment's memory until a later dump found it stale."""
        try:
            # the files deleted since the look-around too (an engine unlinks segments as it
            # runs): CRIU remaps whatever is deleted when it reaches the fd
            _live, deleted = resources.open_paths(d.pids)
            dirs = sorted(set(d.remap_dirs) | set(upperfiles.link_remap_dirs(deleted, d.view)))
            ids = d.tree.deleted_ids | resources.deleted_file_ids(d.pids)
            mine = resources.owned_by(
                [d.view.resolve(p) for p in upperfiles.list_link_remaps(dirs, d.view)], ids)
        except (OSError, ValueError) as exc:
            log.warning("checkpoint %s: its link-remap files not looked for: %s", d.model, exc)
            return
        if mine:
            log.info("checkpoint %s: removing the link-remaps of the failed dump: %s",
                     d.model, [str(p) for p in mine])
            upperfiles.remove_files(mine)

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

    async def _save_files(self, d: Dump) -> list[SavedFile]:
        """The files the images do not hold, into the staging folder; what failed is a
        warning, never the end of a dump whose tree may be gone already."""
        view, into = d.view, d.staging.files
        saved: list[SavedFile] = []
        try:
            saved = await asyncio.to_thread(upperfiles.save, d.upper, view.resolve, into)
        except OSError as exc:
            d.warnings.append(f"files of the writable layer not saved: {exc}")
        try:
            # CRIU restores file-backed shared mappings from the file, not from its images,
            # and the engine deletes its segments on a clean stop: keep their contents here.
            saved += await asyncio.to_thread(
                upperfiles.save, d.shm, view.resolve, into, "dev-shm", len(saved)
            )
        except OSError as exc:
            d.warnings.append(f"/dev/shm files not saved: {exc}")
        try:
            # only this tree's: another job's link-remaps may sit in the same directory
            remaps = [p for p in upperfiles.list_link_remaps(d.remap_dirs, view)
                      if resources.owned_by([view.resolve(p)], d.tree.deleted_ids)]
            if remaps:
                saved += await asyncio.to_thread(
                    upperfiles.save, remaps, view.resolve, into, "link-remap", len(saved)
                )
                upperfiles.remove_files(view.resolve(p) for p in remaps)
        except (OSError, ValueError) as exc:
            d.warnings.append(f"link-remap files not saved: {exc}")
        return saved

    async def _let_go_of_tree(self, d: Dump, saved: list[SavedFile]) -> None:
        """A tree left running gets its CUDA back; a dumped one is reaped, and its /dev/shm
        segments (in the checkpoint now) freed."""
        if d.leave_running and d.cuda_pids:
            d.report(0.97, 0, 0.0, "cuda-restore")
            try:
                await self.cuda.restore_and_unlock(d.cuda_pids)
            except HostError:
                log.exception("resuming CUDA after a leave-running dump failed")
        if d.leave_running:
            return
        left = await wait_gone_async(lambda: proctree.taken(d.pids), REAP_AFTER_DUMP_SECS)
        if left:
            log.info("dumped PIDs not reaped yet: %s", left)
        kept = {f.path for f in saved if f.reason == "dev-shm"}
        removed = await asyncio.to_thread(
            resources.remove_unused, [d.view.resolve(p) for p in sorted(kept)]
        )
        if removed:
            log.info("checkpoint %s: removed %d /dev/shm file(s) of the dumped tree",
                     d.model, len(removed))

    async def _finish(self, d: Dump) -> Manifest:
        """Save the files, release or reap the tree, commit: the manifest's last fields."""
        if d.late_failure is not None:
            what = (
                "cancelled"
                if isinstance(d.late_failure, asyncio.CancelledError)
                else (str(d.late_failure).splitlines()[0])
            )
            d.warnings.append(f"CRIU completed the dump but then ended badly ({what}); kept")
        images = d.staging.images
        d.report(0.95, await asyncio.to_thread(dir_bytes, images), 0.0, "saving files")
        saved = await self._save_files(d)
        for w in d.warnings:
            log.warning("checkpoint %s: %s", d.model, w)
        await self._let_go_of_tree(d, saved)

        images_bytes = await asyncio.to_thread(dir_bytes, images)
        manifest = replace(
            d.pending,
            image_sizes=await asyncio.to_thread(image_sizes, images),
            created=time.time(),
            images_bytes=images_bytes,
            files_bytes=sum(f.held_bytes for f in saved),
            dump_seconds=round(d.dump_secs, 3),
            cuda_seconds=round(d.cuda_secs, 3),
            total_seconds=round(time.monotonic() - d.started, 3),
            files=saved,
            warnings=d.warnings,
        )
        await asyncio.to_thread(self.store.commit, d.staging, manifest)
        d.report(1.0, images_bytes, images_bytes / max(d.dump_secs, 1e-6), "done")
        log.info("checkpointed %s (PIDs %s) in %.2fs: %d MiB", d.model, d.pids, d.dump_secs,
                 images_bytes >> 20)
        self.mover.start(d.model)
        self.on_commit(d.model)
        return manifest
