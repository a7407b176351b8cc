"""Whether a checkpoint would restore into a caller's container: the restore's own checks.

One function for the restore's prepare step and for CheckRestore, so that "restorable here"
is what a restore would find: the checkpoint is there and the caller's, this host can take
it back (CRIU, kernel, NVIDIA driver), the caller's container can (its rootfs, its bind
mounts, the files the tree had open), and the checkpoint's own files are intact. It only
reads: nothing is claimed, no job is made, no file is written. What takes time to settle
(the tree's PIDs and ports being free) is the restore job's to check, not this.
"""

from __future__ import annotations

import asyncio
import os

from llmux.common import proctree
from llmux.common.errors import ManifestMismatch, NotFound, Unsupported
from llmux.service.core import authz, compat, devcopy, upperfiles
from llmux.service.core.authz import Caller
from llmux.service.core.container import ContainerContext
from llmux.service.core.criu import CriuTool
from llmux.service.core.cuda import driver_version
from llmux.service.core.manifest import Manifest
from llmux.service.core.store import CheckpointStore, check_images, check_model
from llmux.service.core.upperfiles import ViewRoot

#: what a checkpoint this service holds may fail for here: the answer to "would it
#: restore?" rather than an error of the request (name, existence, ownership)
NOT_RESTORABLE = (ManifestMismatch, Unsupported)


async def check_restore(
    store: CheckpointStore, criu: CriuTool, caller: Caller, model: str,
    remote: Manifest | None = None,
) -> tuple[Manifest, ContainerContext]:
    """The checkpoint of ``model`` and the caller's container it would restore into.

    Raises InvalidArgument, NotFound or AccessDenied for the request itself, and one of
    NOT_RESTORABLE, saying precisely why, for a checkpoint this container cannot take back.
    ``remote``: the manifest of a checkpoint still in the remote store (not downloaded:
    its files are checked as they arrive).
    """
    check_model(model)
    manifest = store.get(model) if remote is None else remote
    authz.check_owner(caller, manifest.owner_uid, model)
    if proctree.read_stat(caller.pid) is None:
        raise NotFound(f"caller PID {caller.pid} is gone")
    target = await asyncio.to_thread(lambda: ContainerContext.from_pid(
        caller.pid, userns=manifest.pid_namespace))
    await asyncio.to_thread(check_manifest, manifest, target, criu)
    if remote is None:
        await asyncio.to_thread(check_intact, store, manifest)
    await check_files_present(manifest, caller.pid if target.foreign else None)
    return manifest, target


def check_manifest(manifest: Manifest, target: ContainerContext, tool: CriuTool) -> None:
    """Refuse, precisely, a checkpoint this host or this container cannot take back."""
    criu = tool.version
    major = manifest.criu_version.split(".", 1)[0]
    if major != str(criu.major):
        raise ManifestMismatch(
            f"checkpoint {manifest.model!r} was dumped by CRIU {manifest.criu_version}; "
            f"this host runs CRIU {criu}"
        )
    lock = manifest.network_lock
    if lock and lock not in tool.network_locks:
        raise ManifestMismatch(
            f"checkpoint {manifest.model!r} was dumped under CRIU's {lock} network lock, "
            f"which its restore must undo; this host can use {', '.join(tool.network_locks)}"
        )
    kernel = os.uname().release
    if manifest.kernel_release != kernel:
        raise ManifestMismatch(
            f"checkpoint {manifest.model!r} was taken on kernel {manifest.kernel_release}; "
            f"this host runs {kernel}"
        )
    if manifest.cuda_pids:
        driver = driver_version()
        if manifest.driver_version != driver:
            raise ManifestMismatch(
                f"checkpoint {manifest.model!r} holds CUDA state from NVIDIA driver "
                f"{manifest.driver_version or 'none'}; this host has "
                f"{driver or 'no NVIDIA driver'}"
            )
    identity = target.rootfs_identity()
    if manifest.rootfs != identity:
        raise ManifestMismatch(
            f"checkpoint {manifest.model!r} was taken in a filesystem {manifest.rootfs}; "
            f"the caller's container has {identity} (another image?)"
        )
    if target.foreign and target.rootfs_host_path is None:
        raise Unsupported("the caller's container root filesystem is not visible on the host")
    if manifest.compat:
        compat.check(manifest.model, manifest.compat,
                     compat.host_facts(str(criu), identity), cuda=bool(manifest.cuda_pids))
    for ext in manifest.external_mounts:
        mine = target.external_for(ext.mount_point)
        if ext.mount_point in devcopy.MADE_HERE and manifest.pid_namespace:
            continue  # the restore makes what it binds there
        if mine is None or mine.host_source is None:
            raise ManifestMismatch(
                f"checkpoint {manifest.model!r} needs a bind mount at {ext.mount_point}, "
                "which the caller's container does not have"
            )


def check_intact(store: CheckpointStore, manifest: Manifest) -> None:
    """The checkpoint's files are the ones committed, by a cheap look (sizes, no links);
    the saved files' checksums are read by the restore job."""
    check_images(manifest.model, store.images_dir(manifest.model), manifest.image_sizes)
    upperfiles.check_present(manifest.files, store.files_dir(manifest.model))


async def check_files_present(manifest: Manifest, view_pid: int | None) -> None:
    """The files the tree had open or mapped, that the checkpoint does not carry (its
    libraries, the model's weights), exist in the target: CRIU would fail on the first
    missing one, after half the tree is back."""
    with ViewRoot(view_pid) as view:
        missing = await asyncio.to_thread(
            lambda: [p for p in manifest.external_files
                     if not (view.path / p.lstrip("/")).is_file()])
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ManifestMismatch(
            f"checkpoint {manifest.model!r} needs files the tree had open, which the "
            f"caller's container lacks: {', '.join(missing[:3])}{more}"
        )
