"""The client of the host service (llmuxd, org.llmux.Host1): the shim's and the CLI's.

Every call is built from its declaration in common/contract.py (``call(contract.X,
...)``: signature, typed options as variants); properties come back as the contract's
records (HostInfo, CheckpointInfo, JobProgress).

Long operations are jobs: the client subscribes to JobRemoved and to the jobs'
PropertiesChanged *before* it starts one (a short job may end before the call's
reply is read), then waits for the JobRemoved of its job id. A failure raises the
service's own error class (llmux.common.errors: NotFound, NoSpace, ...) with the
service's message; what the bus itself answers is a BusError (llmux.client.errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import BusType, MessageType
from dbus_next.message import Message
from dbus_next.signature import Variant

from llmux.client.errors import ConnectionFailed, error_from_name
from llmux.common import contract, errors
from llmux.common.contract import (
    BUS_NAME,
    CHECKPOINT_INTERFACE,
    JOB_INTERFACE,
    JOB_PATH_PREFIX,
    MANAGER_INTERFACE,
    OBJECT_PATH,
    CheckpointInfo,
    CheckpointOptions,
    ErrorName,
    HostInfo,
    JobProgress,
    JobState,
    NoOptions,
    Options,
    RestoreOptions,
    ResumeOptions,
    checkpoint_path,
)

log = logging.getLogger(__name__)

PROPERTIES = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
_REMOVED_KEPT = 1024
CANCEL_SETTLE_SECS = 60.0


HostServiceError = errors.HostError
"""What every failure of a call is (``dbus_name``, ``message``): a service error class
(errors.NotFound, ...) or a client.errors.BusError."""

__all__ = ["HostClient", "HostServiceError", "JobProgress", "ProgressCallback"]

ProgressCallback = Callable[[JobProgress], None]


@dataclass(frozen=True)
class _JobEnd:
    result: str
    error_name: str
    message: str


def _plain(value: Any) -> Any:
    """Variants (and containers of them) to plain Python values."""
    if isinstance(value, Variant):
        return _plain(value.value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


class HostClient:
    def __init__(self, bus: str = "system"):
        """``bus``: "system", "session" or a D-Bus address (the shim's [checkpoint] bus)."""
        self.bus_spec = bus
        self._bus: MessageBus | None = None
        self._ended: OrderedDict[int, _JobEnd] = OrderedDict()
        self._completed: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._waiters: dict[int, asyncio.Future[_JobEnd]] = {}
        self._progress: dict[str, tuple[int, ProgressCallback]] = {}
        self._early_progress: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._in_flight = 0

    async def __aenter__(self) -> HostClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        if self._bus is not None:
            return
        try:  # dbus-next opens the socket in the constructor already
            if self.bus_spec == "system":
                bus = MessageBus(bus_type=BusType.SYSTEM)
            elif self.bus_spec == "session":
                bus = MessageBus(bus_type=BusType.SESSION)
            else:
                bus = MessageBus(bus_address=self.bus_spec)
            await bus.connect()
        except Exception as exc:
            raise ConnectionFailed(f"cannot connect to the {self.bus_spec} bus: {exc}") from exc
        bus.add_message_handler(self._on_message)
        self._bus = bus
        for rule in (
            f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}',"
            f"interface='{MANAGER_INTERFACE}',member='{contract.JOB_REMOVED.name}'",
            f"type='signal',sender='{BUS_NAME}',path_namespace='{JOB_PATH_PREFIX}',"
            f"interface='{JOB_INTERFACE}',member='{contract.COMPLETED.name}'",
            f"type='signal',sender='{BUS_NAME}',path_namespace='{JOB_PATH_PREFIX}',"
            f"interface='{PROPERTIES}',member='PropertiesChanged'",
        ):
            await self._call(
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "AddMatch",
                "s",
                [rule],
                destination="org.freedesktop.DBus",
            )

    async def close(self) -> None:
        if self._bus is not None:
            self._bus.disconnect()  # type: ignore[no-untyped-call]
            self._bus = None
        for waiter in self._waiters.values():
            waiter.cancel()

    # -- signals ----------------------------------------------------------------------

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type != MessageType.SIGNAL:
            return False
        if msg.member == contract.COMPLETED.name and msg.interface == JOB_INTERFACE:
            # sent just before JobRemoved on the same connection: why the job ended
            _success, error_name, message = msg.body
            self._completed[msg.path] = (error_name, message)
            while len(self._completed) > _REMOVED_KEPT:
                self._completed.popitem(last=False)
        elif msg.member == contract.JOB_REMOVED.name and msg.interface == MANAGER_INTERFACE:
            job_id, path, result = msg.body
            error_name, message = self._completed.pop(path, ("", ""))
            end = _JobEnd(result, error_name, message)
            waiter = self._waiters.get(job_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(end)
            elif self._in_flight:
                # our call's reply may not have been read yet: keep it for the waiter
                self._ended[job_id] = end
                while len(self._ended) > _REMOVED_KEPT:
                    self._ended.popitem(last=False)
        elif msg.member == "PropertiesChanged" and msg.interface == PROPERTIES:
            interface, changed, _invalidated = msg.body
            if interface != JOB_INTERFACE or "Progress" not in changed:
                return False
            if msg.path in self._progress:
                self._report(msg.path, changed)
            elif self._in_flight:
                # the reply naming this job may not have been read yet
                kept = self._early_progress.setdefault(msg.path, [])
                kept.append(changed)
                del kept[:-16]
                while len(self._early_progress) > _REMOVED_KEPT:
                    self._early_progress.popitem(last=False)
        return False

    def _report(self, path: str, changed: dict[str, Any]) -> None:
        job_id, callback = self._progress[path]
        try:
            callback(JobProgress.from_properties(_plain(changed), job_id=job_id))
        except Exception:
            log.exception("progress callback failed")

    # -- calls ------------------------------------------------------------------------

    async def _call(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        *,
        destination: str = BUS_NAME,
    ) -> list[Any]:
        if self._bus is None:
            await self.connect()
        assert self._bus is not None
        reply = await self._bus.call(
            Message(
                destination=destination,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=body or [],
            )
        )
        if reply is None:
            raise ConnectionFailed("the bus connection closed")
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            raise error_from_name(reply.error_name or ErrorName.INTERNAL, text)
        return list(reply.body)

    async def call(
        self,
        method: contract.Method,
        *args: Any,
        options: Options | None = None,
        path: str | None = None,
    ) -> list[Any]:
        """Calls a method as the contract declares it; its options go as typed a{sv}."""
        body = list(args)
        if method.options is not None:
            chosen = options if options is not None else method.options()
            if not isinstance(chosen, method.options):
                raise TypeError(f"{method.name} takes {method.options.__name__}")
            body.append({name: Variant(sig, value) for name, sig, value in chosen.items()})
        elif options is not None:
            raise TypeError(f"{method.name} takes no options")
        return await self._call(
            path or OBJECT_PATH, method.interface, method.name, method.in_signature, body
        )

    async def _run_job(
        self,
        method: contract.Method,
        args: list[Any],
        options: Options,
        progress: ProgressCallback | None,
        timeout: float | None,  # noqa: ASYNC109 - cancels the job too
    ) -> None:
        self._in_flight += 1
        job_id = 0
        path = ""
        try:
            job_id, path = await self.call(method, *args, options=options)
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[_JobEnd] = loop.create_future()
            if job_id in self._ended:
                waiter.set_result(self._ended.pop(job_id))
            self._waiters[job_id] = waiter
            early = self._early_progress.pop(path, [])
            if progress is not None:
                self._progress[path] = (job_id, progress)
                for changed in early:
                    self._report(path, changed)
            try:
                end = await asyncio.wait_for(asyncio.shield(waiter), timeout)
            except TimeoutError:
                await self._cancel_quietly(path)
                # let the service settle (tree thawed, job gone) before the caller retries
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(waiter), CANCEL_SETTLE_SECS)
                raise errors.Timeout(
                    f"{method.name} job {job_id} did not end within {timeout} s; cancelled"
                ) from None
            except asyncio.CancelledError:
                await self._cancel_quietly(path)
                raise
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._ended.clear()
                self._early_progress.clear()
            self._waiters.pop(job_id, None)
            self._progress.pop(path, None)
        if end.result != JobState.DONE:
            raise error_from_name(end.error_name or ErrorName.INTERNAL, end.message or end.result)

    async def _cancel_quietly(self, path: str) -> None:
        with contextlib.suppress(HostServiceError):
            await asyncio.shield(self.call(contract.CANCEL, path=path))

    # -- the API the shim uses ----------------------------------------------------------

    async def checkpoint(
        self,
        model: str,
        root_pid: int,
        *,
        leave_running: bool = False,
        weights_bytes: int = 0,
        gpus: Sequence[int] = (),
        progress: ProgressCallback | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - cancels the job too
    ) -> CheckpointInfo:
        """Dumps the tree under root_pid; returns the checkpoint's properties. ``gpus``:
        where its CUDA state is (kept as the checkpoint's Gpus)."""
        options = CheckpointOptions(leave_running=leave_running, weights_bytes=weights_bytes,
                                    gpus=list(gpus))
        await self._run_job(contract.CHECKPOINT, [model, root_pid], options, progress, timeout)
        found = await self.get_checkpoint(model)
        if found is None:
            raise errors.NotFound(f"checkpoint of {model} vanished")
        return found

    async def restore(
        self,
        model: str,
        *,
        keep_images: bool = True,
        gpu_map: Mapping[int, int] | None = None,
        replica: bool = False,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - cancels the job too
    ) -> CheckpointInfo:
        """Restores into the caller's container; returns the checkpoint's properties with
        root_pid and pids those of the restored tree (the job's last progress says them: a
        tree in a PID namespace of its own gets new host PIDs). ``replica``: even while
        trees restored from it run."""
        before = await self.get_checkpoint(model)
        if before is None:
            raise errors.NotFound(f"no checkpoint of {model}")
        options = RestoreOptions(keep_images=keep_images, gpu_map=dict(gpu_map or {}),
                                 replica=replica)
        restored: list[JobProgress] = []

        def seen(p: JobProgress) -> None:
            if p.root_pid > 0:
                restored.append(p)
            if progress is not None:
                progress(p)

        await self._run_job(contract.RESTORE, [model], options, seen, timeout)
        after = await self.get_checkpoint(model) if keep_images else None
        info = after or before
        if restored:
            info = replace(info, root_pid=restored[-1].root_pid,
                           pids=restored[-1].pids or [restored[-1].root_pid])
        return info

    async def check_restore(self, model: str) -> tuple[bool, str]:
        """(True, "") when a restore into the caller's container would pass llmuxd's checks;
        else (False, llmuxd's reason). Nothing is claimed or touched."""
        ok, why = await self.call(contract.CHECK_RESTORE, model)
        return bool(ok), str(why)

    async def explain_checkpoint(self, model: str) -> contract.CheckpointBreakdown:
        """What the checkpoint's bytes are (llmuxd reads its images; seconds for a GB)."""
        (text,) = await self.call(contract.EXPLAIN_CHECKPOINT, model)
        return contract.CheckpointBreakdown.from_json(str(text))

    async def suspend(
        self,
        model: str,
        root_pid: int,
        *,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - cancels the job too
    ) -> None:
        """Moves the tree's CUDA state to host memory; the processes stay alive."""
        await self._run_job(contract.SUSPEND, [model, root_pid], NoOptions(), progress, timeout)

    async def resume(
        self,
        model: str,
        root_pid: int,
        *,
        gpu_map: Mapping[int, int] | None = None,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - cancels the job too
    ) -> None:
        """``gpu_map``: resume on other GPUs (old index to new, every GPU it was on)."""
        await self._run_job(contract.RESUME, [model, root_pid],
                            ResumeOptions(gpu_map=dict(gpu_map or {})), progress, timeout)

    async def list_checkpoints(self) -> list[CheckpointInfo]:
        (objects,) = await self._call(OBJECT_PATH, OBJECT_MANAGER, "GetManagedObjects")
        found = [
            CheckpointInfo.from_properties(_plain(interfaces[CHECKPOINT_INTERFACE]))
            for interfaces in objects.values()
            if CHECKPOINT_INTERFACE in interfaces
        ]
        return sorted(found, key=lambda info: info.model)

    async def get_checkpoint(self, model: str) -> CheckpointInfo | None:
        try:
            (props,) = await self._call(
                checkpoint_path(model), PROPERTIES, "GetAll", "s", [CHECKPOINT_INTERFACE]
            )
        except errors.HostError as exc:
            if exc.dbus_name in (
                "org.freedesktop.DBus.Error.UnknownObject",
                "org.freedesktop.DBus.Error.UnknownInterface",
            ):
                return None
            raise
        return CheckpointInfo.from_properties(_plain(props))

    async def delete_checkpoint(self, model: str) -> None:
        await self.call(contract.DELETE_CHECKPOINT, model)

    async def info(self) -> HostInfo:
        (props,) = await self._call(OBJECT_PATH, PROPERTIES, "GetAll", "s", [MANAGER_INTERFACE])
        return HostInfo.from_properties(_plain(props))
