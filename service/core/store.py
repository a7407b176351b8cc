"""The state directory: one complete checkpoint per model, never a half one.

Layout: <state>/<model>/{images/, files/, manifest.json}. A dump writes into
<state>/.tmp-<model>-<random>/ and is renamed into place only when complete (manifest
written and synced last); a replaced checkpoint goes to .old-<model>-<random>/ first. A
crash therefore leaves only dot-names behind, which prepare() removes at start-up. Images
are root-only: 0700 directories, 0600 files.

With the memory tier, ``images`` is a link to the images in a tmpfs; their durable copy is
written behind the dump to ``.tmp-images-<random>/`` and renamed to ``images.disk/`` once
complete and synced. Dropping the memory copy renames ``images.disk`` to ``images``. After
a reboot (the link dangles) ``images.disk`` becomes ``images``; a ``.tmp-images-*`` is an
incomplete copy, removed at start-up and written again from the memory copy.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import hashlib
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from llmux.common.contract import DEFAULT_STATE_DIR, valid_model_name
from llmux.common.errors import HostError, InvalidArgument, ManifestMismatch, NoSpace, NotFound
from llmux.service.core import memtier, zeropages
from llmux.service.core.durable import fsync_dir, write_durably
from llmux.service.core.manifest import Manifest

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PENDING = "pending.json"
JOURNAL = "journal.json"
IMAGES = "images"
TIER_OWNER = "state-dir"
"""In each state directory's folder of the memory tier: that state directory's path."""
DISK_COPY = "images.disk"
"""The durable copy of images kept in the memory tier, complete once it has this name."""
FILES = "files"
_TMP = ".tmp-"
_OLD = ".old-"
_MB = 1 << 20


#: how much of a refused name a message (and so the journal) repeats
_SHOWN_NAME_CHARS = 160


def check_model(model: str) -> str:
    if not isinstance(model, str) or not valid_model_name(model):
        shown = repr(model)
        if len(shown) > _SHOWN_NAME_CHARS:
            shown = f"{shown[:_SHOWN_NAME_CHARS]}... ({len(model)} characters)"
        raise InvalidArgument(
            f"invalid model name {shown}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return model


@dataclass(frozen=True)
class Staging:
    """A checkpoint being written."""

    model: str
    path: Path

    @property
    def images(self) -> Path:
        return self.path / IMAGES

    @property
    def files(self) -> Path:
        return self.path / FILES


_SYNC_FILE_RANGE_WRITE = 2
_SYNC_CHUNK = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER: the range is on disk
_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def start_writeback(path: Path) -> None:
    """Start (not wait for) writeback of every file under path.

    Called while CRIU is still writing, so that the disk works in parallel with the dump
    and the final fsync before the manifest only waits for the tail.
    """
    for dirpath, _dirnames, names in os.walk(path):
        for name in names:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                _libc.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
            finally:
                os.close(fd)


def prefetch(images: Path, total_bytes: int, threads: int = 0) -> None:
    """Bring the page images into the page cache while CRIU restores from them.

    With 0 ``threads`` the kernel is asked to read ahead (POSIX_FADV_WILLNEED); otherwise
    that many readers each read a slice at a time (the disk of the GPU machine reads 1.43
    GB/s with one reader, 1.70-1.86 GB/s with eight, but a restore beside them got slower:
    see EngineConfig.prefetch_threads). Skipped when the images would not fit in free memory.
    """
    if memtier.Memory.read().available < total_bytes * 5 // 4:
        return
    files = sorted(images.glob("pages-*.img"), key=lambda p: -p.stat().st_size)
    if threads <= 0:
        for p in files:
            try:
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        return
    pieces = [(p, offset) for p in files
              for offset in range(0, p.stat().st_size, _PREFETCH_PIECE)]
    with concurrent.futures.ThreadPoolExecutor(threads, "prefetch") as pool:
        list(pool.map(lambda piece: _read_piece(*piece), pieces))


_PREFETCH_PIECE = 64 << 20
_PREFETCH_READ = 4 << 20


def _read_piece(path: Path, offset: int) -> None:
    """Read one slice of a file (into a scratch buffer: only the page cache is wanted)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        buffer = bytearray(_PREFETCH_READ)
        done = 0
        while done < _PREFETCH_PIECE:
            n = os.preadv(fd, [buffer], offset + done)
            if n <= 0:
                return
            done += n
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Every image and saved file on disk before the manifest says the checkpoint is whole."""
    for dirpath, dirnames, names in os.walk(path):
        for name in names:
            p = os.path.join(dirpath, name)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for name in dirnames:
            fsync_dir(Path(dirpath) / name)


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, n)).st_size
    return total


FINAL_KILL = "Unfreezing tasks into 2"
"""What CRIU logs once every image is written and flushed, right before it kills the tree
(cr_dump_finish: pstree_switch_state(TASK_DEAD)); its last line comes after the kill."""
_LOG_SCAN_BYTES = 4 << 20


def dump_completed(images: Path) -> bool:
    """CRIU's own word that every image is written: the kill of the tree has begun (a CRIU
    killed from then on leaves a dead tree and complete images) or the dump finished."""
    try:
        with (images / "dump.log").open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _LOG_SCAN_BYTES))
            tail = f.read().decode(errors="replace")
    except OSError:
        return False
    lines = tail.rstrip().splitlines()
    if not lines:
        return False
    return "Dumping finished successfully" in lines[-1] or FINAL_KILL in tail


def image_sizes(images: Path) -> dict[str, int]:
    """CRIU's image files (``*.img``) and their sizes."""
    return {e.name: e.stat(follow_symlinks=False).st_size for e in os.scandir(images)
            if e.name.endswith(".img") and e.is_file(follow_symlinks=False)}


def check_images(model: str, images: Path, recorded: dict[str, int]) -> None:
    """The images are the ones committed: none missing, replaced by a link, or resized."""
    for name, size in sorted(recorded.items()):
        path = images / name
        try:
            st = path.lstat()
        except FileNotFoundError:
            raise ManifestMismatch(
                f"checkpoint {model!r} is damaged: image {path} is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise ManifestMismatch(
                f"checkpoint {model!r} is damaged: image {path} is not a regular file "
                "(a symbolic link planted?)")
        if st.st_size != size:
            raise ManifestMismatch(
                f"checkpoint {model!r} is damaged: image {path} has {st.st_size} bytes, "
                f"the dump wrote {size} (truncated?)")


def restrict(path: Path) -> None:
    """0700 for every directory, 0600 for every file (CRIU's logs and images included)."""
    os.chmod(path, 0o700)
    for dirpath, dirnames, names in os.walk(path):
        for d in dirnames:
            sub = os.path.join(dirpath, d)
            if not os.path.islink(sub):  # the images' link to the memory tier (0700 there)
                os.chmod(sub, 0o700)
        for n in names:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                os.chmod(p, 0o600)


class CheckpointStore:
    """Checkpoints on disk, one directory per model, with an optional memory tier.

    The memory tier (``memory_dir`` on a tmpfs, within ``memory_limit_bytes``, AUTO or a
    count, see memtier.py): a dump that fits writes its images there, and the checkpoint's
    ``images`` is a link to them; a restore reads them at memory speed while they are
    there. copy_to_disk + finish_disk_copy write their durable copy behind the dump (the
    memory copy stays); drop_memory_copy gives the memory back, the disk copy taking over.
    """

    def __init__(self, root: Path | str = DEFAULT_STATE_DIR, memory_dir: Path | None = None,
                 memory_limit_bytes: int = 0) -> None:
        self.root = Path(root)
        # one folder per state directory: a sweep never touches another llmuxd's images
        mine = hashlib.sha256(str(self.root.absolute()).encode()).hexdigest()[:12]
        self.memory_dir = memory_dir / f"state-{mine}" if (
            memory_dir is not None and memory_limit_bytes != 0) else None
        self.memory_limit_bytes = memory_limit_bytes
        self._manifests: dict[str, Manifest] = {}

    def prepare(self, cure: Callable[[Path], bool] = lambda tmp: False) -> list[str]:
        """Create the directory (0700), remove crash leftovers, load the manifests.

        ``cure(tmp)`` sees each interrupted dump first (the start-up cure, recovery.py's):
        True when it salvaged it. Returns what was cleaned, for the log.
        """
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        if os.geteuid() == 0:
            os.chown(self.root, 0, 0)
        cleaned = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(_TMP) and cure(entry):
                cleaned.append(f"{entry.name} (completed dump salvaged)")
            elif entry.name.startswith((_TMP, _OLD)):
                shutil.rmtree(entry, ignore_errors=True)
                cleaned.append(entry.name)
        self._manifests = {}
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            for partial in entry.glob(f"{_TMP}images-*"):  # a copy to disk cut short
                shutil.rmtree(partial, ignore_errors=True)
                cleaned.append(f"{partial} (an incomplete copy to disk, written again)")
            try:
                manifest = self._read_manifest(entry)
            except HostError as exc:
                log.warning("ignoring %s: %s", entry, exc)
                continue
            manifest = self._settle_zero_pages(entry, manifest)
            if not self._settle_tiers(entry, manifest, cleaned):
                continue
            self._manifests[manifest.model] = manifest
        cleaned += self._sweep_memory_tier()
        return cleaned

    def _settle_tiers(self, entry: Path, manifest: Manifest, cleaned: list[str]) -> bool:
        """At start-up: the memory copy found again if whole, else the disk copy takes
        over; False (the checkpoint removed) when the images are gone from both. A damaged
        memory copy without a disk copy stays, for a restore to refuse by name."""
        images, disk = entry / IMAGES, entry / DISK_COPY
        if not images.is_symlink():
            return True
        if images.exists():
            try:
                check_images(manifest.model, images, manifest.image_sizes)
                return True
            except ManifestMismatch as exc:
                if not disk.is_dir():
                    log.warning("checkpoint %s: %s", entry.name, exc)
                    return True
                reason = f"its memory copy is damaged ({exc})"
        else:
            reason = "its images in memory are gone (a reboot)"
        if disk.is_dir():
            tier = Path(os.readlink(images)).parent
            os.unlink(images)
            os.rename(disk, images)
            fsync_dir(entry)
            shutil.rmtree(tier, ignore_errors=True)
            log.warning("checkpoint %s: %s; its copy on disk is used", entry.name, reason)
            cleaned.append(f"{entry.name} (memory copy dropped: {reason})")
            return True
        log.warning("removing checkpoint %s: %s and it had no copy on disk yet",
                    entry.name, reason)
        shutil.rmtree(entry, ignore_errors=True)
        cleaned.append(f"{entry.name} (images in memory lost)")
        return False

    def _settle_zero_pages(self, entry: Path, manifest: Manifest) -> Manifest:
        """A zero-page pass the service died in (found at start-up) or that failed half way,
        finished (the manifest gets the new sizes) or undone."""
        images = entry / IMAGES
        if not images.is_dir():
            return manifest
        if not zeropages.recover(images):
            return manifest
        if image_sizes(images) != manifest.image_sizes:
            manifest = self._record_zero_pages(
                entry, manifest, manifest.images_bytes - dir_bytes(images))
            log.warning("checkpoint %s: finished the zero-page pass a stop cut short",
                        entry.name)
        zeropages.settle(images)
        return manifest

    def install_zero_pages(self, model: str, created: float, images: Path,
                           dropped: int) -> Manifest | None:
        """Put the new images of a zero-page pass in place and record their sizes (the
        caller holds the model: no restore reads the images meanwhile). None, the new files
        removed, when the checkpoint the pass read was replaced or deleted meanwhile."""
        manifest = self._manifests.get(model)
        if (manifest is None or manifest.created != created
                or self.images_dir(model).resolve() != images):
            zeropages.discard(images)
            return None
        try:
            zeropages.install(images)
            manifest = self._record_zero_pages(self.path(model), manifest,
                                               manifest.zero_bytes_dropped + dropped)
            zeropages.settle(images)
        except OSError:
            # half in place: finished as at start-up, or undone if the marker is not there
            with contextlib.suppress(OSError):
                self._settle_zero_pages(self.path(model), manifest)
            raise
        return manifest

    def _record_zero_pages(self, entry: Path, manifest: Manifest, dropped: int) -> Manifest:
        images = entry / IMAGES
        manifest = replace(manifest, images_bytes=dir_bytes(images),
                           image_sizes=image_sizes(images), zero_bytes_dropped=max(dropped, 0))
        write_durably(entry / MANIFEST, manifest.to_json())
        self._manifests[manifest.model] = manifest
        return manifest

    # ---- the memory tier -----------------------------------------------------------

    def _tier_targets(self) -> set[Path]:
        """Memory-tier folders some checkpoint (or dump in progress) links to."""
        found = set()
        for entry in self.root.iterdir():
            images = entry / IMAGES
            if images.is_symlink():
                found.add(Path(os.readlink(images)).parent)
        return found

    def _sweep_memory_tier(self) -> list[str]:
        if self.memory_dir is None:
            return []
        cleaned = sweep_orphaned_tiers(self.memory_dir.parent)
        if not self.memory_dir.is_dir():
            return cleaned
        wanted = self._tier_targets()
        for entry in sorted(self.memory_dir.iterdir()):
            if entry.name != TIER_OWNER and entry not in wanted:
                shutil.rmtree(entry, ignore_errors=True)
                cleaned.append(f"{entry} (unused in the memory tier)")
        return cleaned

    def memory_used_bytes(self) -> int:
        return dir_bytes(self.memory_dir) if self.memory_dir is not None else 0

    def _fits_in_memory(self, expected: int) -> bool:
        if self.memory_dir is None or expected <= 0:
            return False
        where = self.memory_dir
        while not where.exists() and where != where.parent:
            where = where.parent
        st = os.statvfs(where)  # the tmpfs's own size (/dev/shm: half the RAM by default)
        if expected > st.f_bavail * st.f_frsize:
            return False
        return memtier.fits(self.memory_limit_bytes, self.memory_used_bytes(), expected,
                            memtier.Memory.read())

    def in_memory(self, model: str) -> bool:
        """True while the checkpoint's images are in the memory tier."""
        return self.images_dir(model).is_symlink()

    def on_disk(self, model: str) -> bool:
        """True when the checkpoint has a complete copy on disk (it survives a reboot)."""
        return not self.in_memory(model) or (self.path(model) / DISK_COPY).is_dir()

    def memory_copies(self) -> list[tuple[str, bool]]:
        """(model, on disk too) of each checkpoint in the memory tier, the oldest first."""
        found = [(m.created, m.model) for m in self._manifests.values()
                 if self.in_memory(m.model)]
        return [(model, self.on_disk(model)) for _created, model in sorted(found)]

    def copy_to_disk(self, model: str, pause: Callable[[], None] = lambda: None,
                     ) -> tuple[Path, Path] | None:
        """Copy the images of ``model`` from the memory tier to a folder beside them on disk,
        synced; (tier folder, disk copy) for finish_disk_copy, None if there is nothing to
        copy (not in memory, on disk already, or the checkpoint went away). ``pause()`` is
        called before each chunk and may block: the copy is background work, and gives way.
        A failed copy (a full disk) is removed and its OSError raised: the memory copy stays.
        """
        images = self.images_dir(model)
        if not images.is_symlink() or self.on_disk(model):
            return None
        source = Path(os.readlink(images))
        copy = self.path(model) / f"{_TMP}images-{secrets.token_hex(4)}"
        try:
            copy.mkdir(mode=0o700)  # root-only from the first byte, not after the copy
            shutil.copytree(source, copy, symlinks=True, copy_function=_chunked_copy(pause),
                            dirs_exist_ok=True)
            restrict(copy)
            _fsync_tree(copy)
        except BaseException:
            shutil.rmtree(copy, ignore_errors=True)
            if self._linked_tier(model) != source.parent:
                return None  # deleted or replaced meanwhile: its folder went with it
            raise
        return source.parent, copy

    def _linked_tier(self, model: str) -> Path | None:
        try:
            return Path(os.readlink(self.images_dir(model))).parent
        except OSError:
            return None

    def finish_disk_copy(self, model: str, tier: Path, copy: Path) -> bool:
        """Name the complete disk copy ``images.disk`` (durably), if the checkpoint still
        links to ``tier``; False (the copy removed) if it was replaced or deleted."""
        images = self.images_dir(model)
        if self._linked_tier(model) != tier:
            shutil.rmtree(copy, ignore_errors=True)
            return False
        try:  # a checkpoint replaced meanwhile took ``copy`` away with its folder
            os.rename(copy, images.parent / DISK_COPY)
        except FileNotFoundError:
            return False
        fsync_dir(images.parent)
        return True

    def drop_memory_copy(self, model: str) -> int:
        """Give the memory copy back, the disk copy taking over (the caller holds the model:
        no restore reads it meanwhile); the bytes freed, 0 if it has no disk copy."""
        images = self.images_dir(model)
        disk = self.path(model) / DISK_COPY
        if not images.is_symlink() or not disk.is_dir():
            return 0
        tier = Path(os.readlink(images)).parent
        freed = dir_bytes(tier)
        os.unlink(images)
        os.rename(disk, images)
        fsync_dir(images.parent)
        shutil.rmtree(tier, ignore_errors=True)
        return freed

    @staticmethod
    def _tier_of(checkpoint_dir: Path) -> Path | None:
        images = checkpoint_dir / IMAGES
        return Path(os.readlink(images)).parent if images.is_symlink() else None

    def write_pending(self, staging: Staging, pending: Manifest) -> None:
        """What is known before CRIU runs, for salvage after a crash of the service."""
        write_durably(staging.path / PENDING, pending.to_json())

    def salvage(self, tmp: Path, runs: Callable[[Manifest], bool]) -> bool:
        """Finish a dump that CRIU completed while the service died before committing it.

        CRIU kills the tree only after writing every image; then these images are the
        only copy of it, so they must not be cleaned away. Files of a container's
        writable layer were not saved yet: a restore into the same container still works.
        ``runs(pending)`` says whether the dumped tree still runs (the journal knows).
        """
        log_path = tmp / IMAGES / "dump.log"
        try:
            pending = Manifest.from_json((tmp / PENDING).read_text())
        except (OSError, HostError):
            return False
        if not dump_completed(tmp / IMAGES) or not valid_model_name(pending.model):
            return False
        if not pending.leave_running and runs(pending):
            return False  # the tree still runs: nothing to salvage, just a leftover
        manifest = replace(
            pending,
            created=log_path.stat().st_mtime,
            images_bytes=dir_bytes(tmp / IMAGES),
            image_sizes=image_sizes(tmp / IMAGES),
            warnings=[
                *pending.warnings,
                "salvaged at start-up after the service stopped mid-dump; files of the "
                "container's writable layer were not saved",
            ],
        )
        (tmp / PENDING).unlink()
        staging = Staging(model=pending.model, path=tmp)
        try:
            self.commit(staging, manifest)
        except OSError:
            log.exception("could not salvage %s", tmp)
            return False
        log.warning("salvaged a completed dump of %s from %s", pending.model, tmp)
        return True

    def _read_manifest(self, path: Path) -> Manifest:
        mpath = path / MANIFEST
        try:
            text = mpath.read_text()
        except FileNotFoundError as exc:
            raise NotFound(f"{path} has no {MANIFEST}: not a complete checkpoint") from exc
        manifest = Manifest.from_json(text)
        if manifest.model != path.name:
            raise InvalidArgument(f"{mpath} is for model {manifest.model!r}, not {path.name!r}")
        return manifest

    def path(self, model: str) -> Path:
        return self.root / check_model(model)

    def images_dir(self, model: str) -> Path:
        return self.path(model) / IMAGES

    def files_dir(self, model: str) -> Path:
        return self.path(model) / FILES

    def manifests(self) -> list[Manifest]:
        return [self._manifests[m] for m in sorted(self._manifests)]

    def get(self, model: str) -> Manifest:
        check_model(model)
        try:
            return self._manifests[model]
        except KeyError:
            raise NotFound(f"no checkpoint for model {model!r} in {self.root}") from None

    def has(self, model: str) -> bool:
        return model in self._manifests

    def begin(self, model: str, expected_bytes: int = 0) -> Staging:
        """A staging folder; its images go to the memory tier when ``expected_bytes`` fit."""
        check_model(model)
        path = self.root / f"{_TMP}{model}-{secrets.token_hex(4)}"
        path.mkdir(mode=0o700)
        if self.memory_dir is not None and self._fits_in_memory(expected_bytes):
            self.memory_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.memory_dir.parent, 0o700)
            os.chmod(self.memory_dir, 0o700)
            owner = self.memory_dir / TIER_OWNER
            if not owner.exists():
                owner.write_text(str(self.root.absolute()))
            tier = self.memory_dir / path.name
            tier.mkdir(mode=0o700)
            (tier / IMAGES).mkdir(mode=0o700)
            os.symlink(tier / IMAGES, path / IMAGES)
        else:
            (path / IMAGES).mkdir(mode=0o700)
        (path / FILES).mkdir(mode=0o700)
        return Staging(model=model, path=path)

    def abort(self, staging: Staging) -> None:
        tier = self._tier_of(staging.path)
        shutil.rmtree(staging.path, ignore_errors=True)
        if tier is not None:
            shutil.rmtree(tier, ignore_errors=True)

    def commit(self, staging: Staging, manifest: Manifest) -> Path:
        """Manifest last, synced; then one rename makes the checkpoint exist."""
        for name in (PENDING, JOURNAL):
            with contextlib.suppress(FileNotFoundError):
                (staging.path / name).unlink()
        restrict(staging.path)
        # A power loss after the rename must not leave a manifest over missing pages.
        _fsync_tree(staging.path)
        write_durably(staging.path / MANIFEST, manifest.to_json())
        final = self.root / staging.model
        old = None
        old_tier = None
        if final.exists():
            old_tier = self._tier_of(final)
            old = self.root / f"{_OLD}{staging.model}-{secrets.token_hex(4)}"
            os.rename(final, old)
        os.rename(staging.path, final)
        fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if old_tier is not None:
            shutil.rmtree(old_tier, ignore_errors=True)
        self._manifests[staging.model] = manifest
        return final

    def delete(self, model: str) -> None:
        self.get(model)
        final = self.path(model)
        tier = self._tier_of(final)
        trash = self.root / f"{_OLD}{model}-{secrets.token_hex(4)}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(final, trash)
        self._manifests.pop(model, None)
        shutil.rmtree(trash, ignore_errors=True)
        if tier is not None:
            shutil.rmtree(tier, ignore_errors=True)

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def check_space(self, model: str, expected: int, *, gpu_bytes: int = 0) -> None:
        """Refuse a dump that would not fit (an existing checkpoint of the model is only
        replaced after the new one is complete, so it does not count as free).
        ``gpu_bytes``: the part of ``expected`` that a CUDA checkpoint brings from the GPU
        (weights, KV cache), named in the refusal: it is what an operator can shrink."""
        free = self.free_bytes()
        if expected > free:
            gpu = (f", {gpu_bytes // _MB} MiB of it GPU memory (weights and KV cache) that "
                   "the CUDA checkpoint brings into the image" if gpu_bytes else "")
            raise NoSpace(
                f"checkpoint of {model!r} needs about {expected // _MB} MiB{gpu}, but the "
                f"state directory {self.root} has only {free // _MB} MiB free"
            )


def sweep_orphaned_tiers(tier_root: Path, under: Path | None = None) -> list[str]:
    """Remove the memory tier's folders of state directories that no longer exist (or, with
    ``under``, of any state directory below it): their images serve no llmuxd."""
    cleaned: list[str] = []
    if not tier_root.is_dir():
        return cleaned
    for folder in sorted(tier_root.glob("state-*")):
        try:
            owner = Path((folder / TIER_OWNER).read_text())
        except OSError:
            continue
        if (under is not None and owner.is_relative_to(under)) or not owner.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            cleaned.append(f"{folder} (the memory tier of {owner}, which is gone)")
    return cleaned


_COPY_CHUNK = 64 << 20


def _chunked_copy(pause: Callable[[], None]) -> Callable[[str, str], str]:
    """shutil's copy function, in chunks of 64 MiB (sendfile: no copy through user space),
    with ``pause()`` before each, and each chunk on disk before the next: the kernel's
    writeback of the copy never runs far ahead of it, so a restore that makes it pause does
    not share the CPU and the disk with a backlog of dirty pages being written."""

    def copy(src: str, dst: str) -> str:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            size = os.fstat(fin.fileno()).st_size
            done = 0
            while done < size:
                pause()
                sent = os.sendfile(fout.fileno(), fin.fileno(), done,
                                   min(_COPY_CHUNK, size - done))
                if not sent:
                    raise OSError(f"{src}: ended at byte {done} of {size}")
                if _libc.sync_file_range(fout.fileno(), done, sent, _SYNC_CHUNK) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"writing {dst}: {os.strerror(err)}")
                done += sent
        shutil.copystat(src, dst)
        return dst

    return copy
