"""The one contract between the host service and its callers, written once as data.

llmuxd (llmux.service) on one side, its client (llmux.client) and the shim on the other,
import this leaf of llmux.common and nothing else of each other, so a rename here is a
rename everywhere. It imports no D-Bus library: the core, the client's tests and the shim can read
it without a bus. From these declarations

  - the service's D-Bus face (llmux.service.dbus) generates its three interfaces (what
    ``busctl introspect`` shows), routes each method call to the one handler that says
    ``@exports(<Method>)`` and reads the a{sv} options into the method's typed options;
  - the client (llmux.client) builds its calls (signature, options as variants) and
    reads properties into the typed records below (``from_properties``).

Shape of the API (modelled on systemd-importd and udisks2 jobs):

Object ``/org/llmux/Host1``, interface ``org.llmux.Host1`` (also
``org.freedesktop.DBus.ObjectManager``): ``MANAGER`` below, properties ``HostInfo``.
Long operations (Checkpoint, Restore, Suspend, Resume) answer (job id, job path) and
run as job objects ``/org/llmux/Host1/job/<id>`` (``JOB``): properties Id, Operation,
Model, State and ``JobProgress``; Cancel(); signal Completed(b success, s error_name,
s message) just before the manager's JobRemoved (as udisks2's Job.Completed).
WaitJob(u job_id, d timeout_s) -> (s result, s error_name, s message) answers when the
job ends or the timeout passes (then org.llmux.Error.Timeout; the job keeps running).

Checkpoint objects ``/org/llmux/Host1/checkpoint/<escaped model>`` (``CHECKPOINT``):
properties ``CheckpointInfo``. Every failure is one of ``ErrorName``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from enum import StrEnum
from typing import Any, TypeVar

BUS_NAME = "org.llmux.Host1"
OBJECT_PATH = "/org/llmux/Host1"
MANAGER_INTERFACE = "org.llmux.Host1"
JOB_INTERFACE = "org.llmux.Host1.Job"
CHECKPOINT_INTERFACE = "org.llmux.Host1.Checkpoint"
JOB_PATH_PREFIX = f"{OBJECT_PATH}/job"
CHECKPOINT_PATH_PREFIX = f"{OBJECT_PATH}/checkpoint"

ERROR_PREFIX = "org.llmux.Error"

DEFAULT_STATE_DIR = "/var/lib/llmux/checkpoints"
POLICY_GROUP = "llmux"


class Operation(StrEnum):
    CHECKPOINT = "checkpoint"
    RESTORE = "restore"
    SUSPEND = "suspend"
    RESUME = "resume"


class JobState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


JOB_RESULTS = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class ErrorName(StrEnum):
    """Every error the service can answer; one name per condition."""

    NOT_FOUND = f"{ERROR_PREFIX}.NotFound"
    ACCESS_DENIED = f"{ERROR_PREFIX}.AccessDenied"
    INVALID_ARGUMENT = f"{ERROR_PREFIX}.InvalidArgument"
    NO_SPACE = f"{ERROR_PREFIX}.NoSpace"
    PID_IN_USE = f"{ERROR_PREFIX}.PidInUse"
    PORT_IN_USE = f"{ERROR_PREFIX}.PortInUse"
    CRIU_FAILED = f"{ERROR_PREFIX}.CriuFailed"
    CUDA_FAILED = f"{ERROR_PREFIX}.CudaFailed"
    MANIFEST_MISMATCH = f"{ERROR_PREFIX}.ManifestMismatch"
    BUSY = f"{ERROR_PREFIX}.Busy"
    CANCELLED = f"{ERROR_PREFIX}.Cancelled"
    TIMEOUT = f"{ERROR_PREFIX}.Timeout"
    UNSUPPORTED = f"{ERROR_PREFIX}.Unsupported"
    NO_SUCH_PROCESS = f"{ERROR_PREFIX}.NoSuchProcess"
    INTERNAL = f"{ERROR_PREFIX}.Internal"


_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def valid_model_name(name: str) -> bool:
    """Model names become directory names and object paths: no path tricks."""
    return bool(_MODEL_NAME.match(name)) and ".." not in name


def escape_path_element(name: str) -> str:
    """systemd-style escaping of a model name into one object path element."""
    out = []
    for i, ch in enumerate(name):
        if ch.isascii() and (ch.isalpha() or (ch.isdigit() and i > 0)):
            out.append(ch)
        else:
            out.append(f"_{ord(ch):02x}")
    return "".join(out) or "_"


def unescape_path_element(element: str) -> str:
    out = []
    i = 0
    while i < len(element):
        if element[i] == "_" and i + 3 <= len(element):
            out.append(chr(int(element[i + 1 : i + 3], 16)))
            i += 3
        else:
            out.append(element[i])
            i += 1
    return "".join(out)


def checkpoint_path(model: str) -> str:
    return f"{CHECKPOINT_PATH_PREFIX}/{escape_path_element(model)}"


def job_path(job_id: int) -> str:
    return f"{JOB_PATH_PREFIX}/{job_id}"


# ---------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Arg:
    name: str
    signature: str


@dataclass(frozen=True)
class Property:
    """A read-only property: its D-Bus name, signature and the record field it shows."""

    name: str
    signature: str
    attr: str = ""


@dataclass(frozen=True)
class Signal:
    interface: str
    name: str
    args: tuple[Arg, ...]

    @property
    def signature(self) -> str:
        return "".join(arg.signature for arg in self.args)


def _dbus(name: str, signature: str, default: Any = MISSING,
          factory: Callable[[], Any] | None = None) -> Any:
    """A record field shown on the bus as property ``name`` of type ``signature``."""
    meta = {"dbus": (name, signature)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _option(signature: str, default: Any) -> Any:
    """An a{sv} option: named as the field, typed ``signature``."""
    return field(default=default, metadata={"dbus": ("", signature)})


R = TypeVar("R", bound="Record")


class Record:
    """A dataclass whose ``_dbus`` fields are D-Bus properties; the rest stay off the bus."""

    @classmethod
    def properties(cls) -> tuple[Property, ...]:
        return tuple(
            Property(f.metadata["dbus"][0], f.metadata["dbus"][1], f.name)
            for f in fields(cls)  # type: ignore[arg-type]
            if "dbus" in f.metadata
        )

    @classmethod
    def from_properties(cls: type[R], props: Mapping[str, Any], **extra: Any) -> R:
        """From a GetAll or PropertiesChanged dict (plain values); absent ones take defaults."""
        values = {p.attr: props[p.name] for p in cls.properties() if p.name in props}
        return cls(**values, **extra)

    def to_properties(self) -> dict[str, Any]:
        return {p.name: getattr(self, p.attr) for p in self.properties()}


class Options:
    """A method's a{sv} options as a dataclass: one field per option, with its default."""

    @classmethod
    def signatures(cls) -> dict[str, str]:
        return {f.name: f.metadata["dbus"][1] for f in fields(cls)}  # type: ignore[arg-type]

    def items(self) -> list[tuple[str, str, Any]]:
        """(name, signature, value) of every option, for the client's variants."""
        return [(name, sig, getattr(self, name)) for name, sig in self.signatures().items()]


@dataclass(frozen=True)
class NoOptions(Options):
    pass


@dataclass(frozen=True)
class CheckpointOptions(Options):
    leave_running: bool = _option("b", False)
    """Dump but keep the tree running."""
    weights_bytes: int = _option("t", 0)
    """Hint for the free-space check: weights still in the processes."""


@dataclass(frozen=True)
class RestoreOptions(Options):
    keep_images: bool = _option("b", True)


@dataclass(frozen=True)
class Method:
    interface: str
    name: str
    args: tuple[Arg, ...] = ()
    returns: tuple[Arg, ...] = ()
    options: type[Options] | None = None
    """Set when the last argument is ``a{sv} options``: the typed options it carries."""

    @property
    def in_signature(self) -> str:
        return "".join(arg.signature for arg in self.args)

    @property
    def out_signature(self) -> str:
        return "".join(arg.signature for arg in self.returns)


@dataclass(frozen=True)
class Interface:
    name: str
    path: str
    """The object's path, or the prefix of its objects' paths when ``under``."""
    under: bool = False
    methods: tuple[Method, ...] = ()
    properties: tuple[Property, ...] = ()
    signals: tuple[Signal, ...] = ()

    def serves(self, path: str) -> bool:
        return path.startswith(self.path + "/") if self.under else path == self.path


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True)
class HostInfo(Record):
    """The manager's properties."""

    version: str = _dbus("Version", "s", "")
    criu_version: str = _dbus("CriuVersion", "s", "")
    kernel_release: str = _dbus("KernelRelease", "s", "")
    driver_version: str = _dbus("DriverVersion", "s", "")
    state_dir: str = _dbus("StateDirectory", "s", "")
    free_bytes: int = _dbus("FreeBytes", "t", 0)


@dataclass(frozen=True)
class JobProgress(Record):
    """How far a job is: the core reports it, the job object shows it, the client reads it."""

    fraction: float = _dbus("Progress", "d", 0.0)
    """0..1"""
    bytes: int = _dbus("Bytes", "t", 0)
    """Bytes written or read so far."""
    rate: float = _dbus("Rate", "d", 0.0)
    """Bytes per second since the phase began."""
    status: str = ""
    """The core's phase (off the bus): "dumping", "restoring", "cuda-checkpoint", "done"..."""
    job_id: int = 0
    """The job's id (off the bus: the client knows it from the call's reply)."""
    root_pid: int = _dbus("RootPid", "u", 0)
    """A restore's, once done: the restored tree's root PID as CRIU gave it (a tree in a PID
    namespace of its own gets new host PIDs; otherwise the checkpoint's)."""
    pids: list[int] = _dbus("Pids", "au", factory=list)  # noqa: RUF009
    """A restore's, once done: every process of the restored tree, root first."""


@dataclass(frozen=True)
class CheckpointInfo(Record):
    """One checkpoint object's properties (the manifest in the shapes the bus shows)."""

    model: str = _dbus("Model", "s", "")
    owner: str = _dbus("Owner", "s", "")
    root_pid: int = _dbus("RootPid", "u", 0)
    pids: list[int] = _dbus("Pids", "au", factory=list)  # noqa: RUF009
    created: float = _dbus("Created", "d", 0.0)
    """Unix time."""
    size_bytes: int = _dbus("SizeBytes", "t", 0)
    dump_seconds: float = _dbus("DumpSeconds", "d", 0.0)
    criu_version: str = _dbus("CriuVersion", "s", "")
    kernel_release: str = _dbus("KernelRelease", "s", "")
    driver_version: str = _dbus("DriverVersion", "s", "")
    cuda_pids: list[int] = _dbus("CudaPids", "au", factory=list)  # noqa: RUF009
    manifest: str = _dbus("Manifest", "s", "{}")
    """The whole manifest, JSON."""
    listen_ports: list[int] = _dbus("ListenPorts", "au", factory=list)  # noqa: RUF009
    """TCP ports the tree listened on: each must be free for a restore."""
    live_trees: int = _dbus("LiveTrees", "u", 0)
    """How many trees restored from this checkpoint are running now (read when asked)."""


JOB_OBJECT_PROPERTIES = (
    Property("Id", "u", "id"),
    Property("Operation", "s", "operation"),
    Property("Model", "s", "model"),
    Property("State", "s", "state"),
)


# ---------------------------------------------------------------------------- the API

_JOB = (Arg("job_id", "u"), Arg("job_path", "o"))
_OPTIONS = Arg("options", "a{sv}")

CHECKPOINT = Method(
    MANAGER_INTERFACE, "Checkpoint",
    (Arg("model", "s"), Arg("root_pid", "u"), _OPTIONS), _JOB, CheckpointOptions,
)
RESTORE = Method(
    MANAGER_INTERFACE, "Restore", (Arg("model", "s"), _OPTIONS), _JOB, RestoreOptions
)
"""Always restores into the caller's own container."""
CHECK_RESTORE = Method(
    MANAGER_INTERFACE, "CheckRestore", (Arg("name", "s"),), (Arg("ok", "b"), Arg("why", "s"))
)
"""Whether Restore would take the checkpoint back into the caller's container, by the
checks Restore makes before its job (nothing claimed, no job, no file touched): (false,
llmuxd's reason) for one it would refuse; (true, "") otherwise. PIDs and ports still held
are found by the restore job only."""
SUSPEND = Method(
    MANAGER_INTERFACE, "Suspend", (Arg("model", "s"), Arg("root_pid", "u"), _OPTIONS), _JOB,
    NoOptions,
)
"""CUDA state of every process of the tree to host memory; the tree stays alive."""
RESUME = Method(
    MANAGER_INTERFACE, "Resume", (Arg("model", "s"), Arg("root_pid", "u"), _OPTIONS), _JOB,
    NoOptions,
)
DELETE_CHECKPOINT = Method(MANAGER_INTERFACE, "DeleteCheckpoint", (Arg("model", "s"),))
LIST_CHECKPOINTS = Method(
    MANAGER_INTERFACE, "ListCheckpoints", (), (Arg("checkpoints", "a(so)"),)
)
"""(model name, object path) of every checkpoint."""
WAIT_JOB = Method(
    MANAGER_INTERFACE, "WaitJob", (Arg("job_id", "u"), Arg("timeout_s", "d")),
    (Arg("result", "s"), Arg("error_name", "s"), Arg("message", "s")),
)
CANCEL = Method(JOB_INTERFACE, "Cancel")

JOB_NEW = Signal(MANAGER_INTERFACE, "JobNew", (Arg("id", "u"), Arg("path", "o")))
JOB_REMOVED = Signal(
    MANAGER_INTERFACE, "JobRemoved", (Arg("id", "u"), Arg("path", "o"), Arg("result", "s"))
)
"""result is one of JOB_RESULTS."""
COMPLETED = Signal(
    JOB_INTERFACE, "Completed",
    (Arg("success", "b"), Arg("error_name", "s"), Arg("message", "s")),
)
"""error_name is "" on success."""

MANAGER = Interface(
    MANAGER_INTERFACE, OBJECT_PATH,
    methods=(CHECKPOINT, RESTORE, SUSPEND, RESUME, DELETE_CHECKPOINT, LIST_CHECKPOINTS,
             CHECK_RESTORE,
             WAIT_JOB),
    properties=HostInfo.properties(),
    signals=(JOB_NEW, JOB_REMOVED),
)
JOB = Interface(
    JOB_INTERFACE, JOB_PATH_PREFIX, under=True,
    methods=(CANCEL,),
    properties=JOB_OBJECT_PROPERTIES + JobProgress.properties(),
    signals=(COMPLETED,),
)
CHECKPOINT_OBJECT = Interface(
    CHECKPOINT_INTERFACE, CHECKPOINT_PATH_PREFIX, under=True,
    properties=CheckpointInfo.properties(),
)
INTERFACES = (MANAGER, JOB, CHECKPOINT_OBJECT)
