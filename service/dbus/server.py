"""org.llmux.Host1 over the checkpoint engine: each method checks, converts, calls, answers.

No checkpoint logic lives here: authorization of target PIDs, manifests,
CRIU and CUDA are the core's (llmux.service.core.engine). This module owns
what is D-Bus-shaped: argument checks, job objects, one object per checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import NameFlag, RequestNameReply
from dbus_next.errors import DBusError
from dbus_next.message import Message
from dbus_next.service import ServiceInterface
from dbus_next.signature import Variant

from llmux.service import errors
from llmux.service.contract import (
    BUS_NAME,
    JOB_INTERFACE,
    JOB_PATH_PREFIX,
    MANAGER_INTERFACE,
    OBJECT_PATH,
    Operation,
    checkpoint_path,
    valid_model_name,
)
from llmux.service.core.engine import Caller, CheckpointEngine
from llmux.service.core.manifest import Manifest
from llmux.service.dbus.dispatch import Dispatcher, Reply, Route
from llmux.service.dbus.interfaces import (
    CheckpointInterface,
    CheckpointView,
    JobInterface,
    JobView,
    ManagerInterface,
)
from llmux.service.dbus.jobs import Job, JobTable
from llmux.service.journal import fields

log = logging.getLogger(__name__)

VERBS = {
    Operation.CHECKPOINT: "checkpointing",
    Operation.RESTORE: "restoring",
    Operation.SUSPEND: "suspending",
    Operation.RESUME: "resuming",
}


def check_model(model: str) -> str:
    if not valid_model_name(model):
        raise errors.InvalidArgument(
            f"invalid model name {model!r}: 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return model


def check_pid(pid: int) -> int:
    if pid <= 0:
        raise errors.InvalidArgument(f"root_pid must be a process id, not {pid}")
    return pid


def read_options(
    method: str, raw: dict[str, Variant], known: dict[str, tuple[str, Any]]
) -> dict[str, Any]:
    """a{sv} options: unknown names and wrong types are refused, not ignored."""
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise errors.InvalidArgument(
            f"{method}: unknown option(s) {', '.join(unknown)}; known: {', '.join(known) or 'none'}"
        )
    values = {name: default for name, (_, default) in known.items()}
    for name, variant in raw.items():
        signature = known[name][0]
        if variant.signature != signature:
            raise errors.InvalidArgument(
                f"{method}: option {name!r} has type {signature}, not {variant.signature}"
            )
        values[name] = variant.value
    return values


def in_signatures(interface: ServiceInterface) -> dict[str, str]:
    return {
        method.name: "".join(str(arg.signature) for arg in method.in_args)
        for method in interface.introspect().methods
    }


def checkpoint_view(manifest: Manifest) -> CheckpointView:
    return CheckpointView(
        model=manifest.model,
        owner=manifest.owner,
        root_pid=manifest.root_pid,
        pids=list(manifest.pids),
        created=manifest.created,
        size_bytes=manifest.size_bytes,
        dump_seconds=manifest.dump_seconds,
        criu_version=manifest.criu_version,
        kernel_release=manifest.kernel_release,
        driver_version=manifest.driver_version,
        cuda_pids=list(manifest.cuda_pids),
        manifest_json=manifest.to_json(),
    )


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
        self.manager = ManagerInterface(engine.info)
        self.jobs = JobTable(bus, self.manager, self._status_changed, self._job_finished)
        self._checkpoints: dict[str, CheckpointInterface] = {}
        self.dispatcher = Dispatcher(bus)

        def manager(path: str) -> bool:
            return bool(path == OBJECT_PATH)

        def job(path: str) -> bool:
            return path.startswith(JOB_PATH_PREFIX + "/")

        # signatures come from the introspected interfaces: what busctl shows is what is served
        signatures = in_signatures(self.manager)
        for handler in (
            self.checkpoint,
            self.restore,
            self.suspend,
            self.resume,
            self.delete_checkpoint,
            self.list_checkpoints,
            self.wait_job,
        ):
            member = "".join(part.title() for part in handler.__name__.split("_"))
            route = Route(MANAGER_INTERFACE, member, signatures[member], handler)
            self.dispatcher.add(manager, route)
        cancel = in_signatures(JobInterface(JobView(0, Operation.CHECKPOINT, "")))["Cancel"]
        self.dispatcher.add(job, Route(JOB_INTERFACE, "Cancel", cancel, self.cancel_job))

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
        """Cancels running jobs (the core puts their processes back), then lets go of the name."""
        await self.jobs.shutdown()
        try:
            await asyncio.wait_for(self.dispatcher.drain(), 5)
        except TimeoutError:
            log.warning("some calls were still being answered at shutdown")
        if not self._bus._disconnected:
            try:
                await self._bus.release_name(BUS_NAME)
            except DBusError as exc:
                log.warning("releasing %s failed: %s", BUS_NAME, exc)

    def status_line(self) -> str:
        running = self.jobs.running()
        if running:
            return "; ".join(
                f"{VERBS[view.operation]} {view.model}: {int(view.progress * 100)}%"
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
        views = {view.model: view for view in map(checkpoint_view, self.engine.list_checkpoints())}
        for model in [m for m in self._checkpoints if m not in views]:
            self._bus.unexport(checkpoint_path(model))
            del self._checkpoints[model]
        for model, view in views.items():
            if model in self._checkpoints:
                self._checkpoints[model].update(view)
            else:
                interface = CheckpointInterface(view)
                self._bus.export(checkpoint_path(model), interface)
                self._checkpoints[model] = interface
        self.manager.refresh()
        self._status_changed()

    def _job_reply(self, job: Job) -> Reply:
        return Reply("uo", (job.id, job.path), after=lambda: self.jobs.announce(job))

    # -- org.llmux.Host1 ------------------------------------------------------------

    async def checkpoint(self, caller: Caller, msg: Message) -> Reply:
        model, root_pid, raw = msg.body
        check_model(model)
        check_pid(root_pid)
        opts = read_options(
            "Checkpoint", raw, {"leave_running": ("b", False), "weights_bytes": ("t", 0)}
        )
        job = await self.jobs.start(
            Operation.CHECKPOINT,
            model,
            caller,
            lambda sink: self.engine.checkpoint(
                caller,
                model,
                root_pid,
                leave_running=opts["leave_running"],
                weights_bytes=opts["weights_bytes"],
                progress=sink,
            ),
        )
        return self._job_reply(job)

    async def restore(self, caller: Caller, msg: Message) -> Reply:
        model, raw = msg.body
        check_model(model)
        opts = read_options("Restore", raw, {"keep_images": ("b", True)})
        job = await self.jobs.start(
            Operation.RESTORE,
            model,
            caller,
            lambda sink: self.engine.restore(
                caller, model, keep_images=opts["keep_images"], progress=sink
            ),
        )
        return self._job_reply(job)

    async def suspend(self, caller: Caller, msg: Message) -> Reply:
        return await self._cuda_job(Operation.SUSPEND, caller, msg)

    async def resume(self, caller: Caller, msg: Message) -> Reply:
        return await self._cuda_job(Operation.RESUME, caller, msg)

    async def _cuda_job(self, operation: Operation, caller: Caller, msg: Message) -> Reply:
        model, root_pid, raw = msg.body
        check_model(model)
        check_pid(root_pid)
        read_options(msg.member, raw, {})
        run = self.engine.suspend if operation == Operation.SUSPEND else self.engine.resume
        job = await self.jobs.start(
            operation,
            model,
            caller,
            lambda sink: run(caller, model, root_pid, progress=sink),
        )
        return self._job_reply(job)

    async def delete_checkpoint(self, caller: Caller, msg: Message) -> Reply:
        (model,) = msg.body
        check_model(model)
        self.jobs.ensure_idle(model)
        await asyncio.to_thread(self.engine.delete_checkpoint, caller, model)
        log.info(
            "checkpoint of %s deleted", model, extra=fields(model=model, caller_pid=caller.pid)
        )
        self.sync_checkpoints()
        return Reply()

    async def list_checkpoints(self, caller: Caller, msg: Message) -> Reply:
        models = [m.model for m in self.engine.list_checkpoints()]
        return Reply("a(so)", ([[model, checkpoint_path(model)] for model in models],))

    async def wait_job(self, caller: Caller, msg: Message) -> Reply:
        job_id, timeout_s = msg.body
        outcome = await self.jobs.wait(job_id, timeout_s)
        return Reply("sss", (str(outcome.result), outcome.error_name, outcome.message))

    # -- org.llmux.Host1.Job ---------------------------------------------------------

    async def cancel_job(self, caller: Caller, msg: Message) -> Reply:
        element = msg.path.rsplit("/", 1)[-1]
        if not element.isdigit():
            raise errors.NotFound(f"no job at {msg.path}")
        self.jobs.cancel(int(element), caller)
        return Reply()
