"""What ``busctl introspect`` shows: the three interfaces of contract.py.

Method bodies here never run: dispatch.py answers every method call of these
interfaces before dbus-next's own dispatch (it must know the caller first).
The classes still declare the methods so that introspection lists the full
API, and serve the properties and signals through dbus-next.

D-Bus signatures are given to the decorators below as strings, so the Python
annotations stay real types for mypy. Property getters never raise: dbus-next
would put the traceback in the error text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from dbus_next.constants import PropertyAccess
from dbus_next.errors import DBusError
from dbus_next.service import ServiceInterface, method, signal
from dbus_next.service import dbus_property as _dbus_property
from dbus_next.signature import Variant

from llmux.service.contract import (
    CHECKPOINT_INTERFACE,
    JOB_INTERFACE,
    MANAGER_INTERFACE,
    ErrorName,
    JobState,
    Operation,
)
from llmux.service.core.engine import HostInfo

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def _annotate(fn: F, out: str, args: dict[str, str]) -> F:
    fn.__annotations__ = {**args, "return": out}
    return fn


def dbus_method(out: str = "", **args: str) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        return cast(F, method()(_annotate(fn, out, args)))

    return decorate


def dbus_signal(out: str) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        return cast(F, signal()(_annotate(fn, out, {})))

    return decorate


def read_only(out: str) -> Callable[[Callable[[Any], Any]], Any]:
    def decorate(fn: Callable[[Any], Any]) -> Any:
        return _dbus_property(access=PropertyAccess.READ)(_annotate(fn, out, {}))

    return decorate


def _not_dispatched() -> DBusError:
    """Reached only if dispatch.py failed to claim a call."""
    return DBusError(ErrorName.INTERNAL, "the call was not dispatched")  # type: ignore[no-untyped-call]


class ManagerInterface(ServiceInterface):  # type: ignore[misc]
    """org.llmux.Host1 on /org/llmux/Host1."""

    def __init__(self, host_info: Callable[[], HostInfo]):
        super().__init__(MANAGER_INTERFACE)
        self._host_info = host_info
        self._last: HostInfo | None = None

    def _info(self) -> HostInfo | None:
        try:
            self._last = self._host_info()
        except Exception:
            log.exception("reading host information failed; answering the last known values")
        return self._last

    def refresh(self) -> None:
        """Announces changed host properties (free space after a dump or a deletion)."""
        before = self._last
        after = self._info()
        if before is None or after is None:
            return
        names = {
            "Version": "version",
            "CriuVersion": "criu_version",
            "KernelRelease": "kernel_release",
            "DriverVersion": "driver_version",
            "StateDirectory": "state_dir",
            "FreeBytes": "free_bytes",
        }
        changed = {
            prop: getattr(after, name)
            for prop, name in names.items()
            if getattr(after, name) != getattr(before, name)
        }
        if changed:
            self.emit_properties_changed(changed)

    def _field(self, name: str, default: Any) -> Any:
        info = self._info()
        return default if info is None else getattr(info, name)

    @dbus_method("uo", model="s", root_pid="u", options="a{sv}")
    def Checkpoint(self, model: str, root_pid: int, options: dict[str, Variant]) -> list[Any]:
        raise _not_dispatched()

    @dbus_method("uo", model="s", options="a{sv}")
    def Restore(self, model: str, options: dict[str, Variant]) -> list[Any]:
        raise _not_dispatched()

    @dbus_method("uo", model="s", root_pid="u", options="a{sv}")
    def Suspend(self, model: str, root_pid: int, options: dict[str, Variant]) -> list[Any]:
        raise _not_dispatched()

    @dbus_method("uo", model="s", root_pid="u", options="a{sv}")
    def Resume(self, model: str, root_pid: int, options: dict[str, Variant]) -> list[Any]:
        raise _not_dispatched()

    @dbus_method("", model="s")
    def DeleteCheckpoint(self, model: str) -> None:
        raise _not_dispatched()

    @dbus_method("a(so)")
    def ListCheckpoints(self) -> list[Any]:
        raise _not_dispatched()

    @dbus_method("sss", job_id="u", timeout_s="d")
    def WaitJob(self, job_id: int, timeout_s: float) -> list[Any]:
        raise _not_dispatched()

    @read_only("s")
    def Version(self) -> str:
        return str(self._field("version", ""))

    @read_only("s")
    def CriuVersion(self) -> str:
        return str(self._field("criu_version", ""))

    @read_only("s")
    def KernelRelease(self) -> str:
        return str(self._field("kernel_release", ""))

    @read_only("s")
    def DriverVersion(self) -> str:
        return str(self._field("driver_version", ""))

    @read_only("s")
    def StateDirectory(self) -> str:
        return str(self._field("state_dir", ""))

    @read_only("t")
    def FreeBytes(self) -> int:
        return int(self._field("free_bytes", 0))

    @dbus_signal("uo")
    def JobNew(self, job_id: int, path: str) -> list[Any]:
        return [job_id, path]

    @dbus_signal("uos")
    def JobRemoved(self, job_id: int, path: str, result: str) -> list[Any]:
        return [job_id, path, result]


@dataclass
class JobView:
    """The job's state as its D-Bus object shows it; jobs.py owns the updates."""

    id: int
    operation: Operation
    model: str
    state: JobState = JobState.RUNNING
    progress: float = 0.0
    bytes: int = 0
    rate: float = 0.0
    status: str = "starting"


class JobInterface(ServiceInterface):  # type: ignore[misc]
    """org.llmux.Host1.Job on /org/llmux/Host1/job/<id>."""

    def __init__(self, view: JobView):
        super().__init__(JOB_INTERFACE)
        self.view = view

    @dbus_method("")
    def Cancel(self) -> None:
        raise _not_dispatched()

    @read_only("u")
    def Id(self) -> int:
        return self.view.id

    @read_only("s")
    def Operation(self) -> str:
        return str(self.view.operation)

    @read_only("s")
    def Model(self) -> str:
        return self.view.model

    @read_only("s")
    def State(self) -> str:
        return str(self.view.state)

    @read_only("d")
    def Progress(self) -> float:
        return self.view.progress

    @read_only("t")
    def Bytes(self) -> int:
        return self.view.bytes

    @read_only("d")
    def Rate(self) -> float:
        return self.view.rate

    @dbus_signal("bss")
    def Completed(self, success: bool, error_name: str, message: str) -> list[Any]:
        """udisks-style: why the job ended, sent just before JobRemoved."""
        return [success, error_name, message]

    def changed(self, *names: str) -> None:
        values = {
            "State": str(self.view.state),
            "Progress": self.view.progress,
            "Bytes": self.view.bytes,
            "Rate": self.view.rate,
        }
        self.emit_properties_changed({name: values[name] for name in names})


@dataclass
class CheckpointView:
    """One checkpoint's manifest in the shapes contract.py gives its properties."""

    model: str
    owner: str = ""
    root_pid: int = 0
    pids: list[int] = field(default_factory=list)
    created: float = 0.0
    size_bytes: int = 0
    dump_seconds: float = 0.0
    criu_version: str = ""
    kernel_release: str = ""
    driver_version: str = ""
    cuda_pids: list[int] = field(default_factory=list)
    manifest_json: str = "{}"

    def properties(self) -> dict[str, Any]:
        return {
            "Model": self.model,
            "Owner": self.owner,
            "RootPid": self.root_pid,
            "Pids": self.pids,
            "Created": self.created,
            "SizeBytes": self.size_bytes,
            "DumpSeconds": self.dump_seconds,
            "CriuVersion": self.criu_version,
            "KernelRelease": self.kernel_release,
            "DriverVersion": self.driver_version,
            "CudaPids": self.cuda_pids,
            "Manifest": self.manifest_json,
        }


class CheckpointInterface(ServiceInterface):  # type: ignore[misc]
    """org.llmux.Host1.Checkpoint on /org/llmux/Host1/checkpoint/<escaped model>."""

    def __init__(self, view: CheckpointView):
        super().__init__(CHECKPOINT_INTERFACE)
        self.view = view

    def update(self, view: CheckpointView) -> None:
        old = self.view.properties()
        self.view = view
        new = view.properties()
        changed = {name: value for name, value in new.items() if old[name] != value}
        if changed:
            self.emit_properties_changed(changed)

    @read_only("s")
    def Model(self) -> str:
        return self.view.model

    @read_only("s")
    def Owner(self) -> str:
        return self.view.owner

    @read_only("u")
    def RootPid(self) -> int:
        return self.view.root_pid

    @read_only("au")
    def Pids(self) -> list[int]:
        return self.view.pids

    @read_only("d")
    def Created(self) -> float:
        return self.view.created

    @read_only("t")
    def SizeBytes(self) -> int:
        return self.view.size_bytes

    @read_only("d")
    def DumpSeconds(self) -> float:
        return self.view.dump_seconds

    @read_only("s")
    def CriuVersion(self) -> str:
        return self.view.criu_version

    @read_only("s")
    def KernelRelease(self) -> str:
        return self.view.kernel_release

    @read_only("s")
    def DriverVersion(self) -> str:
        return self.view.driver_version

    @read_only("au")
    def CudaPids(self) -> list[int]:
        return self.view.cuda_pids

    @read_only("s")
    def Manifest(self) -> str:
        return self.view.manifest_json
