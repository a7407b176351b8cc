"""Who holds what while a job runs: claims on models and root PIDs, the lock of CRIU's
link-remaps, the restores running; and what every job shares (Prepared, progress, the
shield of a job past its point of no return)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Generic, TypeVar

from llmux.common.contract import JobProgress
from llmux.common.errors import Busy

log = logging.getLogger(__name__)

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

PROGRESS_INTERVAL_SECS = 0.25

Progress = JobProgress
"""The core reports the contract's own JobProgress (its status is the phase)."""
ProgressSink = Callable[[JobProgress], None]


class Reporter:
    """Sends Progress to a sink; never lets a sink's exception break a job."""

    def __init__(self, sink: ProgressSink | None) -> None:
        self.sink = sink

    def __call__(self, fraction: float, nbytes: int, rate: float, status: str, *,
                 pids: Sequence[int] = ()) -> None:
        if self.sink is None:
            return
        try:
            self.sink(JobProgress(max(0.0, min(1.0, fraction)), nbytes, rate, status,
                                  root_pid=pids[0] if pids else 0, pids=list(pids)))
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


Body = Callable[[Reporter], Awaitable[T]]


class Prepared(Generic[T_co]):
    """An operation checked and holding its claim on the model (and root PID).

    ``run(progress)`` is the job: once, and it lets go of the claim when it ends.
    ``release()`` lets go of it without running (idempotent; run() calls it too).
    """

    def __init__(
        self,
        model: str,
        body: Callable[[Reporter], Awaitable[T_co]],
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
            return await self._body(Reporter(progress))
        finally:
            self.release()

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


async def uncancellable(coro: Awaitable[T]) -> T:
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


class Claims:
    """One job per model (and per root PID) at a time; a second one gets Busy."""

    def __init__(self) -> None:
        self.models: set[str] = set()
        self.pids: set[int] = set()
        self._remap_lock = asyncio.Lock()
        #: set while no restore runs: moves to disk wait on it (a restore is latency, a
        #: move is background work on the same memory and disks)
        self.no_restores = threading.Event()
        self.no_restores.set()
        self._restores = 0
        #: time.monotonic() when the last restore's CRIU ended (the copies to disk let the
        #: restored engine reach its first token before they go on)
        self.last_restore_end = 0.0
        #: models background work holds for a moment: a job for one waits, never Busy
        self._moments: dict[str, asyncio.Event] = {}
        #: set each time a model is let go (what a moment waits for)
        self._let_go = asyncio.Event()

    def claim(self, model: str, root_pid: int | None = None) -> Callable[[], None]:
        """Claims the model (and root PID) for one job; returns what lets go of it."""
        if model in self.models:
            raise Busy(f"a job for model {model!r} is already running")
        if root_pid is not None and root_pid in self.pids:
            raise Busy(f"a job for PID {root_pid} is already running")
        self.models.add(model)
        if root_pid is not None:
            self.pids.add(root_pid)

        def release() -> None:
            self.models.discard(model)
            if root_pid is not None:
                self.pids.discard(root_pid)
            self._let_go.set()

        return release

    async def prepare(
        self, model: str, root_pid: int | None, checks: Callable[[], Awaitable[Body[T]]],
    ) -> Prepared[T]:
        """Claim, then run ``checks`` (which return the job's body); a failed check lets go."""
        while (moment := self._moments.get(model)) is not None:
            await moment.wait()
        release = self.claim(model, root_pid)
        try:
            body = await checks()
        except BaseException:
            release()
            raise
        return Prepared(model, body, release)

    @contextlib.asynccontextmanager
    async def moment(self, model: str) -> AsyncIterator[None]:
        """Holds the model for a moment of background work (the renames of a zero-page
        pass), once no job holds it: a job asked for meanwhile waits for the moment to end
        instead of failing with Busy (background work never refuses the operator's)."""
        while model in self.models:
            self._let_go.clear()
            await self._let_go.wait()
        done = asyncio.Event()
        self._moments[model] = done
        self.models.add(model)
        try:
            yield
        finally:
            self.models.discard(model)
            del self._moments[model]
            done.set()
            self._let_go.set()

    @contextlib.asynccontextmanager
    async def remap_guard(self, needed: bool) -> AsyncIterator[None]:
        """One job at a time among those that use CRIU link-remaps: CRIU names them
        link_remap.<file id>, and the same engine's trees get the same ids, so a restore's
        put-back link_remap.237 in /dev/shm is another dump's link_remap.237."""
        if not needed:
            yield
            return
        async with self._remap_lock:
            yield

    @contextlib.contextmanager
    def restoring(self) -> Iterator[None]:
        """Marks a restore running CRIU: moves to disk give way meanwhile."""
        self._restores += 1
        self.no_restores.clear()
        try:
            yield
        finally:
            self._restores -= 1
            self.last_restore_end = time.monotonic()
            if not self._restores:
                self.no_restores.set()
