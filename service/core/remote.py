"""Checkpoints in an object store, so that another host can restore them.

Layout under the store's URL (``s3://bucket/prefix`` or ``file:///path``)::

    <model>/manifest.json          the record: the manifest, the generation, each file's
                                   size and sha256; written last
    <model>/<generation>/images/…  CRIU's images
    <model>/<generation>/files/…   the files the images do not hold

A checkpoint is visible remotely only through its record, which is uploaded after every
file of its generation: an upload cut short (the store gone, llmuxd killed, a newer dump
of the same model superseding it) leaves objects no record names, swept by the next
upload of that model. A download streams each file into a staging folder, hashing it as
it comes; a size or sha256 that differs from the record is refused before CRIU reads
anything, and the local store only commits a checkpoint that arrived whole.

The stores themselves (file://, s3:// through boto3) are objectstore.py's. No D-Bus here:
the engine calls it, in threads.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmux.common.contract import valid_model_name
from llmux.common.errors import Cancelled, HostError, ManifestMismatch, NotFound
from llmux.service.core.claims import Reporter, uncancellable
from llmux.service.core.config import RemoteConfig
from llmux.service.core.manifest import Manifest
from llmux.service.core.objectstore import CHUNK, Backend, Cancel, backend_for
from llmux.service.core.store import CheckpointStore

log = logging.getLogger(__name__)

RECORD = "manifest.json"
#: written into an images folder by a restore, not part of the checkpoint
_NOT_UPLOADED = frozenset({"restore.log", "restore.pid"})

_GENERATION = re.compile(r"[0-9A-Za-z][0-9A-Za-z_-]{0,63}")


@dataclass(frozen=True)
class RemoteFile:
    size: int
    sha256: str


@dataclass(frozen=True)
class RemoteRecord:
    """What the store says of one checkpoint: the manifest and every file's checksum."""

    manifest: Manifest
    generation: str
    files: dict[str, RemoteFile]
    """Path relative to the checkpoint folder ("images/pages-1.img") to size and sha256."""
    uploaded: float = 0.0

    @property
    def model(self) -> str:
        return self.manifest.model

    def to_json(self) -> str:
        return json.dumps({
            "generation": self.generation,
            "uploaded": self.uploaded,
            "files": {k: {"size": v.size, "sha256": v.sha256}
                      for k, v in sorted(self.files.items())},
            "manifest": self.manifest.to_dict(),
        }, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> RemoteRecord:
        try:
            data = json.loads(text)
            files = {str(k): RemoteFile(int(v["size"]), str(v["sha256"]))
                     for k, v in data["files"].items()}
            generation = str(data["generation"])
            manifest = Manifest.from_dict(data["manifest"])
            uploaded = float(data.get("uploaded", 0.0))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestMismatch(f"the store's record {where} is malformed: {exc}") from exc
        if not _GENERATION.fullmatch(generation):
            raise ManifestMismatch(f"the store's record {where} has an invalid generation "
                                   f"{generation!r}")
        for rel in files:
            parts = Path(rel).parts
            if (Path(rel).is_absolute() or ".." in parts or not parts
                    or parts[0] not in ("images", "files")):
                raise ManifestMismatch(f"the store's record {where} names a file outside "
                                       f"the checkpoint: {rel!r}")
        return cls(manifest, generation, files, uploaded)


# ------------------------------------------------------------------------- the store


def _checkpoint_files(directory: Path) -> list[tuple[str, Path]]:
    """(relative name, path) of every regular file of a checkpoint, images first; the
    images folder may be a link to the memory tier."""
    found = []
    for part in ("images", "files"):
        base = (directory / part).resolve()
        if not base.is_dir():
            continue
        for dirpath, _dirs, names in os.walk(base):
            for name in sorted(names):
                path = Path(dirpath) / name
                if name in _NOT_UPLOADED or path.is_symlink() or not path.is_file():
                    continue
                found.append((f"{part}/{path.relative_to(base)}", path))
    return found


def _sha256(path: Path, cancelled: Cancel) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            if cancelled():
                raise Cancelled(f"upload of {path} superseded")
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


class RemoteStore:
    """The checkpoints of one store; the engine's index of them is ``records``."""

    def __init__(self, config: RemoteConfig, backend: Backend | None = None) -> None:
        self.config = config
        self.backend = backend if backend is not None else backend_for(config)
        self.records: dict[str, RemoteRecord] = {}
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.config.url

    def refresh(self) -> dict[str, RemoteRecord]:
        """Read every record in the store (raises StoreFailed when it cannot be read)."""
        found: dict[str, RemoteRecord] = {}
        for key in self.backend.list_keys(""):
            parts = key.split("/")
            if len(parts) != 2 or parts[1] != RECORD or not valid_model_name(parts[0]):
                continue
            try:
                record = RemoteRecord.from_json(self.backend.get_bytes(key), key)
            except NotFound:
                continue  # deleted meanwhile
            except ManifestMismatch as exc:
                log.warning("ignoring %s in %s: %s", key, self.url, exc)
                continue
            if record.model == parts[0]:
                found[record.model] = record
        with self._lock:
            self.records = found
        return found

    def record(self, model: str) -> RemoteRecord:
        """The store's record of ``model`` (NotFound when it has none), read afresh."""
        key = f"{model}/{RECORD}"
        record = RemoteRecord.from_json(self.backend.get_bytes(key), f"{self.url}/{key}")
        if record.model != model:
            raise ManifestMismatch(f"the store's record {key} is for {record.model!r}")
        with self._lock:
            self.records[model] = record
        return record

    def upload(self, model: str, directory: Path, manifest: Manifest,
               cancelled: Cancel = lambda: False) -> RemoteRecord:
        """Every file of the local checkpoint, then its record; older generations of the
        model (and what an upload cut short left) removed after."""
        generation = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
        files: dict[str, RemoteFile] = {}
        for rel, path in _checkpoint_files(directory):
            try:
                size, sha = _sha256(path, cancelled)
                self.backend.put_file(f"{model}/{generation}/{rel}", path, cancelled)
            except Cancelled:
                raise
            except (HostError, OSError) as exc:
                if path.exists():
                    raise
                # the file went away under the upload (the memory tier dropped its copy)
                raise FileNotFoundError(errno.ENOENT, "gone while it was uploaded",
                                        str(path)) from exc
            files[rel] = RemoteFile(size, sha)
        if cancelled():
            raise Cancelled(f"upload of {model} superseded")
        record = RemoteRecord(manifest, generation, files, time.time())
        self.backend.put_bytes(f"{model}/{RECORD}", record.to_json().encode())
        with self._lock:
            self.records[model] = record
        self._sweep(model, keep=generation)
        return record

    def _sweep(self, model: str, keep: str) -> None:
        try:
            stale = [k for k in self.backend.list_keys(f"{model}/")
                     if k != f"{model}/{RECORD}" and not k.startswith(f"{model}/{keep}/")]
            if stale:
                self.backend.delete_keys(stale)
        except HostError as exc:
            log.warning("removing old objects of %s from %s failed: %s", model, self.url, exc)

    def download(self, record: RemoteRecord, into: Path,
                 progress: Callable[[int], None] = lambda _n: None,
                 cancelled: Cancel = lambda: False) -> None:
        """Stream every file of ``record`` into the folder ``into`` (a staging folder),
        each checked against its size and sha256 as it arrives."""
        done = 0
        for rel, expected in sorted(record.files.items()):
            target = into / rel
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            digest = hashlib.sha256()
            size = 0
            key = f"{record.model}/{record.generation}/{rel}"
            with open(target, "wb") as out:
                os.fchmod(out.fileno(), 0o600)
                for chunk in self.backend.read_chunks(key):
                    if cancelled():
                        raise Cancelled(f"download of {record.model} cancelled")
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    done += len(chunk)
                    progress(done)
                out.flush()
                os.fsync(out.fileno())
            if size != expected.size or digest.hexdigest() != expected.sha256:
                raise ManifestMismatch(
                    f"checkpoint {record.model!r} in the store {self.url} is damaged: "
                    f"{rel} has {size} bytes with sha256 {digest.hexdigest()}, the record "
                    f"says {expected.size} bytes with sha256 {expected.sha256}")
        missing = [rel for rel in record.manifest.image_sizes
                   if f"images/{rel}" not in record.files]
        if missing:
            raise ManifestMismatch(f"checkpoint {record.model!r} in the store {self.url} "
                                   f"lacks images {missing[:3]}")

    def delete(self, model: str) -> None:
        keys = self.backend.list_keys(f"{model}/")
        record = f"{model}/{RECORD}"
        if record in keys:  # invisible first, then the rest
            self.backend.delete_keys([record])
        self.backend.delete_keys([k for k in keys if k != record])
        with self._lock:
            self.records.pop(model, None)


# ----------------------------------------------------------------- background uploads


@dataclass
class _Upload:
    task: asyncio.Task[None]
    superseded: threading.Event = field(default_factory=threading.Event)


class Uploader:
    """Uploads after dumps, in the background: one per model; a new dump of the same model
    supersedes the upload in progress (which stops at its next chunk)."""

    def __init__(self, remote: RemoteStore, directory: Callable[[str], Path],
                 manifest: Callable[[str], Manifest],
                 on_change: Callable[[], None] = lambda: None,
                 settled: Callable[[], Awaitable[None]] | None = None) -> None:
        self.remote = remote
        self._settled = settled
        """Awaited before an upload: the memory tier's moves to disk (the images' folder
        changes under a move)."""
        self._directory = directory
        self._manifest = manifest
        self.on_change = on_change
        self._uploads: dict[str, _Upload] = {}
        self.errors: dict[str, str] = {}
        """The last upload failure of each model (until one succeeds)."""

    def start(self, model: str) -> None:
        previous = self._uploads.get(model)
        if previous is not None:
            previous.superseded.set()
        event = threading.Event()
        task = asyncio.create_task(self._run(model, previous, event))
        self._uploads[model] = _Upload(task, event)

    async def _run(self, model: str, previous: _Upload | None,
                   superseded: threading.Event) -> None:
        if previous is not None:
            await asyncio.gather(previous.task, return_exceptions=True)
        if self._settled is not None:
            await self._settled()
        t = time.monotonic()
        try:
            manifest = self._manifest(model)
            try:
                record = await asyncio.to_thread(
                    self.remote.upload, model, self._directory(model), manifest,
                    superseded.is_set)
            except FileNotFoundError as exc:
                # the memory tier dropped its copy under the upload (the disk copy is
                # complete by then): once again, from wherever the images are now
                log.info("upload of %s: %s moved while it was read; starting again",
                         model, exc.filename)
                if self._settled is not None:
                    await self._settled()
                record = await asyncio.to_thread(
                    self.remote.upload, model, self._directory(model),
                    self._manifest(model), superseded.is_set)
        except Cancelled:
            log.info("upload of %s to %s superseded by a newer checkpoint", model,
                     self.remote.url)
            return
        except Exception as exc:  # HostError, OSError; anything else is a bug, logged
            self.errors[model] = str(exc)
            log.warning("upload of checkpoint %s to %s failed (the local copy is kept): %s",
                        model, self.remote.url, exc)
            return
        finally:
            if self._uploads.get(model) is not None and \
                    self._uploads[model].superseded is superseded:
                del self._uploads[model]
        self.errors.pop(model, None)
        size = sum(f.size for f in record.files.values())
        secs = time.monotonic() - t
        log.info("uploaded checkpoint %s to %s: %d MiB in %.2fs (%.0f MiB/s)", model,
                 self.remote.url, size >> 20, secs, size / (1 << 20) / max(secs, 1e-6))
        self.on_change()

    def busy(self, model: str) -> bool:
        return model in self._uploads

    async def wait(self, model: str | None = None) -> None:
        """Until the uploads in flight (of ``model``, or all) are done."""
        while True:
            tasks = [u.task for m, u in self._uploads.items() if model in (None, m)]
            if not tasks:
                return
            await asyncio.gather(*tasks, return_exceptions=True)

    def cancel_all(self) -> None:
        for upload in self._uploads.values():
            upload.superseded.set()


async def fetch(store: CheckpointStore, remote: RemoteStore, record: RemoteRecord,
                report: Reporter) -> None:
    """Download ``record`` into a staging folder of the local store and commit it there:
    the restore then reads it as any local checkpoint. A download that fails (or a file
    whose sha256 differs) leaves nothing behind locally and the store's copy as it was."""
    total = sum(f.size for f in record.files.values())
    report(0.0, 0, 0.0, "downloading")
    t = time.monotonic()
    staging = await asyncio.to_thread(store.begin, record.model, 0)

    loop = asyncio.get_running_loop()
    shown = [0]

    def progress(done: int) -> None:  # in the download's thread: the report in the loop's
        if done - shown[0] >= CHUNK * 8 or done == total:
            shown[0] = done
            rate = done / max(time.monotonic() - t, 1e-6)
            loop.call_soon_threadsafe(report, 0.0, done, rate, "downloading")

    stop = threading.Event()
    try:
        await asyncio.to_thread(remote.download, record, staging.path, progress, stop.is_set)
        await asyncio.to_thread(store.commit, staging, record.manifest)
    except BaseException:
        stop.set()
        await uncancellable(asyncio.to_thread(store.abort, staging))
        raise
    secs = time.monotonic() - t
    log.info("downloaded checkpoint %s from %s: %d MiB in %.2fs (%.0f MiB/s)", record.model,
             remote.url, total >> 20, secs, total / (1 << 20) / max(secs, 1e-6))
