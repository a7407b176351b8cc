"""Moving a checkpoint's images from the memory tier to disk, in the background.

A dump that fits writes its images to the memory tier (a tmpfs); then they are copied to
disk behind the job that made them, without holding the model (a restore may read them
meanwhile), giving way while a restore runs, and swapped in while no job holds it.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time

from llmux.common.errors import Busy
from llmux.service.core.claims import Claims
from llmux.service.core.store import CheckpointStore

log = logging.getLogger(__name__)

#: how long a move to disk waits for the model's jobs to let go before it gives up
MOVE_WAIT_SECS = 600.0


class TierMover:
    """The moves to disk in flight; one per checkpoint just committed in the memory tier."""

    def __init__(self, store: CheckpointStore, claims: Claims) -> None:
        self.store = store
        self.claims = claims
        self._movers: set[asyncio.Task[None]] = set()

    def start(self, model: str) -> None:
        """Move ``model``'s images to disk in the background if they are in the tier."""
        if not self.store.in_memory(model):
            return
        mover = asyncio.create_task(self._move_to_disk(model), name=f"move-{model}")
        self._movers.add(mover)
        mover.add_done_callback(self._movers.discard)

    async def _move_to_disk(self, model: str) -> None:
        moved = await asyncio.to_thread(self.store.copy_to_disk, model, self._give_way)
        if moved is None:
            return
        tier, copy = moved
        deadline = time.monotonic() + MOVE_WAIT_SECS
        while True:
            try:
                release = self.claims.claim(model)
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
        self.claims.no_restores.wait(MOVE_WAIT_SECS)

    async def wait(self) -> None:
        """Until every move to disk in flight is done (tests; a clean stop)."""
        while self._movers:
            await asyncio.gather(*self._movers, return_exceptions=True)
