"""The background work on a committed checkpoint: its zero pages out, its durable copy,
memory given back.

Behind the job that made a checkpoint, with the model not held (a restore reads the images
meanwhile) and giving way while any restore runs: first the zero-page pass (zeropages.py,
``drop_zero_pages``), held to the model only for its renames; then, for images in the
memory tier (a tmpfs; memtier.py says how much it may hold), their copy to disk. The memory
copy stays for the restores to come. It is dropped, the oldest checkpoints' first, when the
tier is over its ceiling or the host's available memory under the reserve: before a dump
or a restore that needs the memory, and every few seconds while the tier holds anything.
Only a copy with a complete twin on disk is dropped; a failed copy to disk keeps the memory
copy, says so in the log and in the checkpoint's ``write_errors``, and is tried again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from llmux.common.errors import Busy
from llmux.service.core import memtier, zeropages
from llmux.service.core.claims import Claims
from llmux.service.core.store import CheckpointStore

log = logging.getLogger(__name__)

#: how long a copy to disk gives way to restores (per chunk) before it goes on regardless
MOVE_WAIT_SECS = 600.0
#: how long after a restore a copy to disk waits before it goes on: the restored engine's
#: first token needs the CPU (on a 2-vCPU host the copy's writeback took 1-2 s of it)
AFTER_RESTORE_SECS = 3.0
#: how often the tier's use and the host's memory are measured while the tier holds images
WATCH_SECS = 2.0
#: how long after a failed copy to disk it is tried again
RETRY_SECS = 30.0


class TierMover:
    """The copies to disk in flight and the watch over the tier's memory."""

    def __init__(self, store: CheckpointStore, claims: Claims, *,
                 drop_zero_pages: bool = False) -> None:
        self.store = store
        self.claims = claims
        self.drop_zero_pages = drop_zero_pages
        self._movers: dict[str, asyncio.Task[None]] = {}
        self._watcher: asyncio.Task[None] | None = None
        self.write_errors: dict[str, str] = {}
        """Each checkpoint whose copy to disk failed: why (until one succeeds)."""
        self._failed_at: dict[str, float] = {}
        self._again: set[str] = set()
        """Models committed anew while their work was in flight."""
        self.on_change: Callable[[], None] = lambda: None
        """Called when this work changed what a checkpoint or the host shows (a smaller
        image, where the images are, the disk's free bytes): the bus announces it."""

    def start(self, model: str, *, committed: bool = True) -> None:
        """The background work on ``model``'s checkpoint: the zero-page pass of a checkpoint
        just ``committed``, the durable copy of images in memory only; keep watching the
        tier."""
        zero_pass = committed and self.drop_zero_pages
        if model in self._movers:
            if committed:  # a new checkpoint: if the work in flight ends without it, again
                self._again.add(model)
        elif zero_pass or self.store.in_memory(model):
            mover = asyncio.create_task(self._after_commit(model, zero_pass),
                                        name=f"after-commit-{model}")
            self._movers[model] = mover
            mover.add_done_callback(lambda _t: self._done(model))
        self._watch()

    def _done(self, model: str) -> None:
        self._movers.pop(model, None)
        self.on_change()
        if model in self._again:
            self._again.discard(model)
            if self.store.has(model):
                self.start(model)

    def resume(self) -> None:
        """At start-up: the copies to disk that a stop cut short, written again (a
        zero-page pass a stop cut short is not: the checkpoint keeps its zero pages)."""
        for model, on_disk in self.store.memory_copies():
            if not on_disk:
                self.start(model, committed=False)
        self._watch()

    async def _after_commit(self, model: str, zero_pass: bool) -> None:
        """The zero-page pass, then the copy to disk, of the checkpoint the model has now.
        A new dump of the model committed meanwhile drops this work with the old
        checkpoint and gets its own turn when this ends (``_done``)."""
        store = self.store
        if not store.has(model):
            return
        created = store.get(model).created
        self._again.discard(model)  # the checkpoint in hand now is the newest
        if zero_pass:
            await self._drop_zero_pages(model, created)
        if (store.has(model) and store.get(model).created == created
                and store.in_memory(model) and not store.on_disk(model)):
            await self._copy_to_disk(model)
        await self.make_room()

    async def _copy_to_disk(self, model: str) -> None:
        try:
            copied = await asyncio.to_thread(self.store.copy_to_disk, model, self._give_way)
        except OSError as exc:
            self.write_errors[model] = f"writing its images to disk failed: {exc}"
            self._failed_at[model] = time.monotonic()
            log.warning("checkpoint %s is in the memory tier only (a reboot would lose "
                        "it): writing its images to disk failed: %s; kept in memory, "
                        "tried again in %.0fs", model, exc, RETRY_SECS)
            return
        if copied is not None and await asyncio.to_thread(
                self.store.finish_disk_copy, model, *copied):
            self.write_errors.pop(model, None)
            self._failed_at.pop(model, None)
            log.info("wrote the images of %s to disk; its memory copy stays", model)

    async def _drop_zero_pages(self, model: str, created: float) -> None:
        """The pass over one checkpoint: its new images written beside the old ones, then
        put in place while this holds the model (after the job that holds it now)."""
        images = self.store.images_dir(model).resolve()  # the tier's folder, not the link
        t = time.monotonic()
        store = self.store
        try:
            need = await asyncio.to_thread(zeropages.room_needed, images)
            if store.in_memory(model):  # the new files take the tier's memory until the old go
                used = await asyncio.to_thread(store.memory_used_bytes)
                fits = memtier.fits(store.memory_limit_bytes, used, need, memtier.Memory.read())
                where = "in the memory tier"
            else:
                fits = need <= await asyncio.to_thread(store.free_bytes)
                where = "on the disk"
        except OSError:
            return  # the checkpoint went away
        if not fits:
            log.info("checkpoint %s keeps its zero pages: the pass needs up to %d MiB %s "
                     "beside its images", model, need >> 20, where)
            return
        dropped = await asyncio.to_thread(zeropages.prepare, images, self._give_way)
        if not dropped.bytes:
            return
        try:
            async with self.claims.moment(model):  # a restore waits for the renames
                manifest = await asyncio.to_thread(
                    store.install_zero_pages, model, created, images, dropped.bytes)
        except OSError as exc:
            log.warning("checkpoint %s keeps its zero pages: %s", model, exc)
            return
        if manifest is None:
            log.info("checkpoint %s was replaced during its zero-page pass", model)
            return
        log.info("checkpoint %s: %d MiB of zero pages dropped (%d process(es)) in %.2fs; "
                 "%d MiB of images", model, dropped.bytes >> 20, dropped.processes,
                 time.monotonic() - t, manifest.images_bytes >> 20)

    def _give_way(self) -> None:
        """Blocks a copy's chunk (in its thread) while a restore runs and AFTER_RESTORE_SECS
        after it, up to MOVE_WAIT_SECS in all."""
        deadline = time.monotonic() + MOVE_WAIT_SECS
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.claims.no_restores.wait(left):
                return
            quiet = self.claims.last_restore_end + AFTER_RESTORE_SECS - time.monotonic()
            if quiet <= 0:
                return
            time.sleep(min(quiet, left))

    async def make_room(self, need: int = 0, *, for_tier: bool = False,
                        keep: str = "") -> list[str]:
        """Drop memory copies, the oldest checkpoints' first (only those on disk too and
        not held by a job, never ``keep``'s), while the tier is over its ceiling or the
        host's memory less ``need`` under the reserve. ``for_tier``: ``need`` is a dump about
        to go to the tier (nothing is dropped for a dump that could not fit anyway).
        Returns the models whose memory copies were dropped."""
        store = self.store
        if store.memory_dir is None and not store.memory_copies():
            return []
        limit = store.memory_limit_bytes
        dropped: list[str] = []
        for model, on_disk in store.memory_copies():
            used = await asyncio.to_thread(store.memory_used_bytes)
            memory = memtier.Memory.read()
            if for_tier:
                if memtier.fits(limit, used, need, memory):
                    break
                if (need > memtier.ceiling(limit, used, memory)
                        or memory.available + used - need < memory.reserve):
                    break  # it goes to disk whatever is dropped
            elif not memtier.over(limit, used, memory, need) and store.memory_dir is not None:
                break
            if not on_disk or model == keep:
                continue
            try:
                release = self.claims.claim(model)
            except Busy:
                continue
            try:
                freed = await asyncio.to_thread(store.drop_memory_copy, model)
            finally:
                release()
            if freed:
                dropped.append(model)
                log.info("dropped the memory copy of %s (%d MiB; %d MiB available): the "
                         "tier gives memory back, its copy on disk stays", model,
                         freed >> 20, memory.available >> 20)
        if dropped:
            self.on_change()
        return dropped

    def _watch(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch_loop(), name="memory-tier-watch")

    async def _watch_loop(self) -> None:
        """While the tier holds images: give memory back when needed, retry failed copies."""
        while True:
            copies = self.store.memory_copies()
            if not copies:
                return
            try:
                await self.make_room()
            except OSError:
                log.exception("giving the memory tier's memory back failed")
            now = time.monotonic()
            for model, on_disk in copies:
                if on_disk or model in self._movers:
                    continue
                failed = self._failed_at.get(model)
                if failed is None or now - failed > RETRY_SECS:
                    self._failed_at.pop(model, None)
                    self.start(model, committed=False)
            await asyncio.sleep(WATCH_SECS)

    def busy(self) -> bool:
        """True while work behind a dump is in flight."""
        return bool(self._movers)

    async def wait(self) -> None:
        """Until every copy to disk in flight is done (tests; a clean stop)."""
        while self._movers:
            await asyncio.gather(*self._movers.values(), return_exceptions=True)

    async def close(self) -> None:
        """Stop watching (a clean stop); copies in flight finish or are redone at start-up."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
