"""Long operations as job objects, the way systemd-importd and udisks2 do them.

The method handler has the core prepare the operation first (names, PIDs, ownership,
manifest, free space, the model's claim): a refusal there (a foreign PID, a full disk,
a busy model) is the call's own named error and no job appears. What it prepared
becomes a job at once, and the call answers (job id, path); a failure from then on
ends the job: the job's Completed signal carries the error name, then
JobRemoved(id, path, result) follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from dbus_next.aio.message_bus import MessageBus

from llmux.common import contract, errors
from llmux.common.contract import ErrorName, JobProgress, JobState, Operation, job_path
from llmux.service.core.engine import Caller, Prepared
from llmux.service.dbus.interfaces import ContractObject, JobObject, JobView
from llmux.service.journal import fields

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_SECS = 0.25
FINISHED_KEPT = 256


@dataclass(frozen=True)
class JobOutcome:
    result: JobState
    error_name: str = ""
    message: str = ""


class Job:
    def __init__(self, job_id: int, operation: Operation, model: str, caller: Caller):
        self.view = JobView(id=job_id, operation=operation, model=model)
        self.caller = caller
        self.path = job_path(job_id)
        self.interface = JobObject(self.view.properties)
        self.finished = asyncio.Event()
        self.task: asyncio.Task[JobOutcome] | None = None
        self.outcome: JobOutcome | None = None
        self.cancelled_by: str = ""
        self.exported = False
        self._last_emit = -math.inf
        self._pending_emit: asyncio.TimerHandle | None = None

    @property
    def id(self) -> int:
        return int(self.view.id)

    def log_fields(self) -> dict[str, Any]:
        found: dict[str, Any] = fields(
            job_id=self.id,
            operation=self.view.operation,
            model=self.view.model,
            caller_pid=self.caller.pid,
            caller_uid=self.caller.uid,
        )
        return found


class JobTable:
    def __init__(
        self,
        bus: MessageBus,
        manager: ContractObject,
        on_change: Callable[[], None],
        on_finished: Callable[[Job], None],
    ):
        self._bus = bus
        self._manager = manager
        self._on_change = on_change
        self._on_finished = on_finished
        self._next_id = 1
        self._running: dict[int, Job] = {}
        self._finished: OrderedDict[int, JobOutcome] = OrderedDict()
        self._completions: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._closing = False

    def running(self) -> list[JobView]:
        return [job.view for job in self._running.values()]

    def start(self, operation: Operation, caller: Caller, prepared: Prepared[object]) -> Job:
        """Makes ``prepared`` a job (exported, JobNew sent) that runs it from now on."""
        if self._closing:
            prepared.release()
            raise errors.Cancelled("llmuxd is stopping")
        job = Job(self._next_id, operation, prepared.model, caller)
        self._next_id += 1
        self._running[job.id] = job
        job.task = asyncio.create_task(self._work(job, prepared), name=f"llmux-job-{job.id}")
        # a task cancelled before its first step never enters run(), which lets go itself
        job.task.add_done_callback(lambda _task: prepared.release())
        self._bus.export(job.path, job.interface)
        job.exported = True
        self._manager.emit(contract.JOB_NEW, job.id, job.path)
        log.info("job %d started: %s %s", job.id, operation, job.view.model,
                 extra=job.log_fields())
        self._on_change()
        return job

    def announce(self, job: Job) -> None:
        """The (id, path) reply is on its way: from now on the job may end in public."""
        completion = asyncio.create_task(self._complete(job))
        self._completions.add(completion)
        completion.add_done_callback(self._completions.discard)

    def cancel(self, job_id: int, caller: Caller) -> None:
        job = self._running.get(job_id)
        if job is None or job.task is None:
            raise errors.NotFound(f"no running job {job_id}")
        if caller.uid not in (0, job.caller.uid):
            raise errors.AccessDenied(f"job {job_id} belongs to another user")
        job.cancelled_by = f"cancelled by PID {caller.pid}"
        job.task.cancel()

    async def wait(self, job_id: int, timeout_secs: float) -> JobOutcome:
        if not math.isfinite(timeout_secs) or timeout_secs < 0:
            raise errors.InvalidArgument(
                f"timeout_s must be a finite number >= 0, not {timeout_secs}")
        if (outcome := self._finished.get(job_id)) is not None:
            return outcome
        job = self._running.get(job_id)
        if job is None:
            raise errors.NotFound(f"no job {job_id} (job ids are not kept across restarts)")
        try:
            await asyncio.wait_for(job.finished.wait(), timeout_secs)
        except TimeoutError:
            raise errors.Timeout(
                f"job {job_id} still running after {timeout_secs:g} s (it goes on)"
            ) from None
        assert job.outcome is not None
        return job.outcome

    async def shutdown(self) -> None:
        """Cancels every job (the core puts its processes back) and waits for their end."""
        self._closing = True
        for job in list(self._running.values()):
            if job.task is not None and not job.task.done():
                job.cancelled_by = "cancelled: llmuxd is stopping"
                job.task.cancel()
        tasks = [job.task for job in self._running.values() if job.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*self._completions, return_exceptions=True)

    # -- inside the job's own task -------------------------------------------------

    async def _work(self, job: Job, prepared: Prepared[object]) -> JobOutcome:
        def sink(progress: JobProgress) -> None:
            if threading.get_ident() == self._loop_thread:
                self._progress(job, progress)
            else:
                self._loop.call_soon_threadsafe(self._progress, job, progress)

        try:
            await prepared.run(sink)
        except asyncio.CancelledError:
            message = job.cancelled_by or "cancelled"
            return JobOutcome(JobState.CANCELLED, ErrorName.CANCELLED, message)
        except errors.HostError as exc:
            return JobOutcome(JobState.FAILED, exc.dbus_name, str(exc))
        except Exception:
            log.exception("job %d failed unexpectedly", job.id, extra=job.log_fields())
            return JobOutcome(JobState.FAILED, ErrorName.INTERNAL, _internal_message(job.id))
        return JobOutcome(JobState.DONE)

    def _progress(self, job: Job, progress: JobProgress) -> None:
        view = job.view
        view.progress = replace(
            progress,
            fraction=min(max(progress.fraction, 0.0), 1.0),
            bytes=max(progress.bytes, 0),
            rate=max(progress.rate, 0.0),
            job_id=job.id,
        )
        if not job.exported or job.finished.is_set() or job._pending_emit is not None:
            return
        wait = job._last_emit + PROGRESS_INTERVAL_SECS - self._loop.time()
        if wait <= 0:
            self._emit_progress(job)
        else:
            job._pending_emit = self._loop.call_later(wait, self._emit_progress, job)

    def _emit_progress(self, job: Job) -> None:
        job._pending_emit = None
        if job.finished.is_set() or not job.exported:
            return
        job._last_emit = self._loop.time()
        job.interface.refresh("Progress", "Bytes", "Rate")
        self._on_change()

    async def _complete(self, job: Job) -> None:
        assert job.task is not None
        await asyncio.wait({job.task})
        if job.task.cancelled():  # cancelled before its first step: nothing was touched
            message = job.cancelled_by or "cancelled"
            outcome = JobOutcome(JobState.CANCELLED, ErrorName.CANCELLED, message)
        else:
            outcome = job.task.result()
        job.outcome = outcome
        if job._pending_emit is not None:
            job._pending_emit.cancel()
            job._pending_emit = None
        job.view.state = outcome.result
        if outcome.result == JobState.DONE:
            job.view.progress = replace(job.view.progress, fraction=1.0)
        job.interface.refresh("State", "Progress", "Bytes", "Rate", "RootPid", "Pids")
        try:
            self._on_finished(job)
        except Exception:
            log.exception("updating objects after job %d failed", job.id, extra=job.log_fields())
        job.interface.emit(
            contract.COMPLETED, outcome.result == JobState.DONE, outcome.error_name, outcome.message
        )
        self._manager.emit(contract.JOB_REMOVED, job.id, job.path, str(outcome.result))
        with contextlib.suppress(Exception):
            self._bus.unexport(job.path)
        del self._running[job.id]
        self._finished[job.id] = outcome
        while len(self._finished) > FINISHED_KEPT:
            self._finished.popitem(last=False)
        job.finished.set()
        if not self._running:
            await asyncio.to_thread(_trim_heap)
        level = logging.INFO if outcome.result == JobState.DONE else logging.WARNING
        extra = job.log_fields()
        if outcome.error_name:
            extra["journal_fields"]["ERROR"] = outcome.error_name
        log.log(
            level,
            "job %d %s: %s %s%s",
            job.id,
            outcome.result,
            job.view.operation,
            job.view.model,
            f": {outcome.message}" if outcome.message else "",
            extra=extra,
        )
        self._on_change()


_libc = ctypes.CDLL(None)


def _trim_heap() -> None:
    """Give the memory of a finished job back to the system: glibc keeps the malloc arena
    of each worker thread at its high-water mark (llmuxd's RSS climbed ~30 MiB over 60
    dump/restore cycles without this, test_cycles)."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _internal_message(job_id: int) -> str:
    return f"internal error in llmuxd (job {job_id}); the daemon's log has the details"

