"""org.llmux.Host1 over the checkpoint engine: each method converts, calls, answers.

No checkpoint logic lives here: model names, authorization of target PIDs, manifests,
busy models, CRIU and CUDA are the core's (llmux.service.core.engine). A job's method
has the core prepare the operation, so that its refusals are the call's own errors,
then makes what was prepared a job. This module owns what is D-Bus-shaped: job
objects, one object per checkpoint.
Each method of contract.py has one handler here, marked ``@exports(contract.X)``;
its arguments arrive unpacked and its options typed (exports.py). The objects'
properties come from the contract's records (HostInfo, CheckpointInfo, JobProgress).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import NameFlag, RequestNameReply
from dbus_next.errors import DBusError

from llmux.common import contract, errors
from llmux.common.contract import (
    BUS_NAME,
    OBJECT_PATH,
    CheckpointInfo,
    CheckpointOptions,
    NoOptions,
    Operation,
    RestoreOptions,
    ResumeOptions,
    checkpoint_path,
)
from llmux.service.core.engine import Caller, CheckpointEngine, Prepared
from llmux.service.core.restorecheck import NOT_RESTORABLE
from llmux.service.dbus.bus import connected
from llmux.service.dbus.dispatch import Dispatcher, Reply
from llmux.service.dbus.exports import Call, exports, routes
from llmux.service.dbus.interfaces import CheckpointObject, ContractObject, ManagerObject
from llmux.service.dbus.jobs import Job, JobTable
from llmux.service.journal import fields

log = logging.getLogger(__name__)

VERBS = {
    Operation.CHECKPOINT: "checkpointing",
    Operation.RESTORE: "restoring",
    Operation.SUSPEND: "suspending",
    Operation.RESUME: "resuming",
}


class HostServer:
    def __init__(
        self,
        engine: CheckpointEngine,
        bus: MessageBus,
        on_status: Callable[[str], None] = lambda _status: None,
    ):
        self.engine = engine
        self._bus = bus
        self._on_status = on_status
        self.manager = ManagerObject(lambda: engine.info().to_properties())
        self.jobs = JobTable(bus, self.manager, self._status_changed, self._job_finished)
        self._checkpoints: dict[str, tuple[ContractObject, CheckpointInfo]] = {}
        if engine.uploads is not None:  # an upload done: the checkpoint is "both" now
            engine.uploads.on_change = self.sync_checkpoints
        # the work behind a dump: a smaller image, its copy on disk, memory given back
        engine.mover.on_change = self.sync_checkpoints
        self.dispatcher = Dispatcher(bus)
        # every method of contract.py, each to the one handler marked @exports(...) below
        for on_path, route in routes(self):
            self.dispatcher.add(on_path, route)

    # -- lifetime -------------------------------------------------------------------

    async def start(self) -> None:
        """Exports the objects, then owns the name: a first call finds everything in place."""
        self._bus.export(OBJECT_PATH, self.manager)
        self.sync_checkpoints()
        self._bus.add_message_handler(self.dispatcher.handle)
        try:
            reply = await self._bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        except DBusError as exc:
            raise errors.AccessDenied(f"cannot own {BUS_NAME}: {exc.type}: {exc.text}") from None
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise errors.Busy(f"{BUS_NAME} is owned by another process (another llmuxd?)")
        log.info("owning %s; %s", BUS_NAME, self.status_line())

    async def stop(self) -> None:
        """Cancels running jobs (the core puts their processes back) and uploads (the local
        copies stay; the next dump uploads again), then lets go of the name."""
        if self.engine.uploads is not None:
            self.engine.uploads.cancel_all()
        await self.jobs.shutdown()
        try:
            await asyncio.wait_for(self.dispatcher.drain(), 5)
        except TimeoutError:
            log.warning("some calls were still being answered at shutdown")
        if connected(self._bus):
            try:
                await self._bus.release_name(BUS_NAME)
            except DBusError as exc:
                log.warning("releasing %s failed: %s", BUS_NAME, exc)

    def status_line(self) -> str:
        running = self.jobs.running()
        if running:
            return "; ".join(
                f"{VERBS[view.operation]} {view.model}: {int(view.progress.fraction * 100)}%"
                for view in running
            )
        count = len(self._checkpoints)
        return f"idle; {count} checkpoint{'' if count == 1 else 's'}"

    def _status_changed(self) -> None:
        self._on_status(self.status_line())

    def _job_finished(self, _job: Job) -> None:
        self.sync_checkpoints()

    def sync_checkpoints(self) -> None:
        """One object per checkpoint on disk; InterfacesAdded/Removed as they come and go."""
        infos = {info.model: info for info in self.engine.checkpoint_infos()}
        for model in [m for m in self._checkpoints if m not in infos]:
            self._bus.unexport(checkpoint_path(model))
            del self._checkpoints[model]
        for model, info in infos.items():
            if model in self._checkpoints:
                interface, _old = self._checkpoints[model]
                self._checkpoints[model] = (interface, info)
                interface.refresh()
            else:
                interface = CheckpointObject(functools.partial(self._checkpoint_props, model))
                self._checkpoints[model] = (interface, info)
                interface.values()
                self._bus.export(checkpoint_path(model), interface)
        self.manager.refresh()
        self._status_changed()

    def _checkpoint_props(self, model: str) -> dict[str, Any]:
        info = self._checkpoints[model][1]
        return self.engine.current(info).to_properties()

    def _job(self, operation: Operation, caller: Caller, prepared: Prepared[object]) -> Reply:
        """The prepared operation as a job; the reply (id, path) announces it."""
        try:
            job = self.jobs.start(operation, caller, prepared)
        except BaseException:
            prepared.release()
            raise
        return Reply(body=(job.id, job.path), after=lambda: self.jobs.announce(job))

    # -- org.llmux.Host1: one handler per method of contract.MANAGER -------------------

    @exports(contract.CHECKPOINT)
    async def checkpoint(
        self, call: Call, model: str, root_pid: int, options: CheckpointOptions
    ) -> Reply:
        prepared = await self.engine.prepare_checkpoint(
            call.caller, model, root_pid, leave_running=options.leave_running,
            weights_bytes=options.weights_bytes, gpus=options.gpus,
        )
        return self._job(Operation.CHECKPOINT, call.caller, prepared)

    @exports(contract.RESTORE)
    async def restore(self, call: Call, model: str, options: RestoreOptions) -> Reply:
        prepared = await self.engine.prepare_restore(
            call.caller, model, keep_images=options.keep_images, gpu_map=options.gpu_map,
            replica=options.replica)
        return self._job(Operation.RESTORE, call.caller, prepared)

    @exports(contract.CHECK_RESTORE)
    async def check_restore(self, call: Call, model: str) -> tuple[bool, str]:
        try:
            await self.engine.check_restore(call.caller, model)
        except NOT_RESTORABLE as exc:
            return (False, exc.message)
        return (True, "")

    @exports(contract.EXPLAIN_CHECKPOINT)
    async def explain_checkpoint(self, call: Call, model: str) -> tuple[str]:
        breakdown = await self.engine.explain_checkpoint(call.caller, model)
        return (breakdown.to_json(),)

    @exports(contract.SUSPEND)
    async def suspend(self, call: Call, model: str, root_pid: int, _options: NoOptions) -> Reply:
        prepared = await self.engine.prepare_suspend(call.caller, model, root_pid)
        return self._job(Operation.SUSPEND, call.caller, prepared)

    @exports(contract.RESUME)
    async def resume(self, call: Call, model: str, root_pid: int,
                     options: ResumeOptions) -> Reply:
        prepared = await self.engine.prepare_resume(call.caller, model, root_pid,
                                                    options.gpu_map)
        return self._job(Operation.RESUME, call.caller, prepared)

    @exports(contract.DELETE_CHECKPOINT)
    async def delete_checkpoint(self, call: Call, model: str) -> None:
        await asyncio.to_thread(self.engine.delete_checkpoint, call.caller, model)
        log.info(
            "checkpoint of %s deleted", model,
            extra=fields(model=model, caller_pid=call.caller.pid),
        )
        self.sync_checkpoints()

    @exports(contract.LIST_CHECKPOINTS)
    async def list_checkpoints(self, call: Call) -> tuple[list[list[str]]]:
        await self.engine.refresh_remote()
        self.sync_checkpoints()
        models = [info.model for info in self.engine.checkpoint_infos()]
        return ([[model, checkpoint_path(model)] for model in models],)

    @exports(contract.WAIT_JOB)
    async def wait_job(self, call: Call, job_id: int, timeout_secs: float) -> tuple[str, str, str]:
        outcome = await self.jobs.wait(job_id, timeout_secs)
        return (str(outcome.result), outcome.error_name, outcome.message)

    # -- org.llmux.Host1.Job -------------------------------------------------------------

    @exports(contract.CANCEL)
    async def cancel_job(self, call: Call) -> None:
        element = call.path.rsplit("/", 1)[-1]
        if not element.isdigit():
            raise errors.NotFound(f"no job at {call.path}")
        self.jobs.cancel(int(element), call.caller)
