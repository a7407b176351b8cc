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

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
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
    STORE_FAILED = f"{ERROR_PREFIX}.StoreFailed"


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
        """(name, signature, value) of every option set to other than its default, for the
        client's variants: an llmuxd that predates an option (and refuses options it does
        not know) still takes a call that leaves it at its default."""
        defaults = type(self)()
        return [(name, sig, getattr(self, name)) for name, sig in self.signatures().items()
                if getattr(self, name) != getattr(defaults, name)]


@dataclass(frozen=True)
class NoOptions(Options):
    pass


@dataclass(frozen=True)
class CheckpointOptions(Options):
    leave_running: bool = _option("b", False)
    """Dump but keep the tree running."""
    weights_bytes: int = _option("t", 0)
    """Hint for the free-space check: weights still in the processes."""
    gpus: list[int] = field(default_factory=list, metadata={"dbus": ("", "au")})
    """The GPUs the tree's CUDA state is on, in the caller's numbering: kept with the
    checkpoint (its ``Gpus``) so that a caller started afresh knows where a restore lands
    and what ``gpu_map`` to ask for to move it."""


@dataclass(frozen=True)
class RestoreOptions(Options):
    keep_images: bool = _option("b", True)
    gpu_map: dict[int, int] = field(default_factory=dict, metadata={"dbus": ("", "a{uu}")})
    """Old GPU to new GPU (the host's NVML indices), every GPU of the CUDA state: the
    driver restores it onto the new ones, which must be of the same model. Empty: in
    place."""
    replica: bool = _option("b", False)
    """Restore even while trees restored from this checkpoint run (LiveTrees above 0):
    another replica, of a tree in namespaces of its own. Without it such a restore is
    refused (Busy, with the count); a PID-bound tree's gets PidInUse either way."""


@dataclass(frozen=True)
class ResumeOptions(Options):
    gpu_map: dict[int, int] = field(default_factory=dict, metadata={"dbus": ("", "a{uu}")})
    """As Restore's: resume the CUDA state on other GPUs of the same model."""


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
    gpus: list[int] = _dbus("Gpus", "au", factory=list)  # noqa: RUF009
    """The GPUs its CUDA state is on, as the caller said at the dump (Checkpoint's option
    ``gpus``, in the caller's numbering); empty when it did not say."""
    manifest: str = _dbus("Manifest", "s", "{}")
    """The whole manifest, JSON."""
    listen_ports: list[int] = _dbus("ListenPorts", "au", factory=list)  # noqa: RUF009
    """TCP ports the tree listened on: each must be free for a restore."""
    location: str = _dbus("Location", "s", "local")
    """Where the checkpoint is: "local" (this host's state directory), "remote" (only in
    the object store; a restore downloads it) or "both"."""
    live_trees: int = _dbus("LiveTrees", "u", 0)
    """How many trees restored from this checkpoint are running now (read when asked)."""
    storage: str = _dbus("Storage", "s", "")
    """Where this host holds the images: "disk"; "memory+disk" (llmuxd's memory tier, with
    the durable copy on disk); "memory" (the memory tier only: the copy to disk is still
    being written, or failed and is retried: see Problem); "" when only the remote store
    has the checkpoint."""
    problem: str = _dbus("Problem", "s", "")
    """What puts the checkpoint at risk, empty when nothing does: its copy to disk failed
    (a reboot would lose it), or its upload to the remote store failed (other hosts cannot
    restore it)."""



@dataclass(frozen=True)
class MemoryPart:
    """One kind of memory in a checkpoint: what it is, and how much of it need not be there."""

    kind: str
    """e.g. "heap", "thread stacks", "anonymous >= 1 MiB", "libraries (private)"."""
    mappings: int = 0
    stored_bytes: int = 0
    """Bytes of it in CRIU's pages images (or, for a saved file, what its copy takes:
    holes, never written, take nothing)."""
    zero_bytes: int = 0
    """Of those, bytes in pages that are all zeros."""
    file_equal_bytes: int = 0
    """Of those, bytes in pages equal to the file they map (checked where it is readable)."""
    duplicate_bytes: int = 0
    """Of those, bytes in non-zero pages whose contents an earlier page of the checkpoint
    (any process, processes in tree order) already holds: what deduplication would save."""
    mapped_bytes: int = 0
    """The mappings' whole size, stored or not."""


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    comm: str
    parts: list[MemoryPart] = field(default_factory=list)

    @property
    def stored_bytes(self) -> int:
        return sum(p.stored_bytes for p in self.parts)


@dataclass(frozen=True)
class CheckpointBreakdown:
    """What a checkpoint holds, byte by byte: ExplainCheckpoint's answer (as JSON)."""

    model: str
    images_bytes: int = 0
    files_bytes: int = 0
    processes: list[ProcessMemory] = field(default_factory=list)
    shared: list[MemoryPart] = field(default_factory=list)
    """Shared anonymous memory and memfd contents (CRIU stores them once, not per process)."""
    files: list[MemoryPart] = field(default_factory=list)
    """Files saved beside the images: /dev/shm segments, the writable layer's files."""
    other_images_bytes: int = 0
    """Images that are not pages: registers, mappings, file tables, CRIU's log."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def totals(self) -> list[MemoryPart]:
        """Every process's parts and the shared ones summed by kind, largest first."""
        by_kind: dict[str, MemoryPart] = {}
        for part in [q for p in self.processes for q in p.parts] + self.shared:
            have = by_kind.get(part.kind)
            by_kind[part.kind] = part if have is None else MemoryPart(
                kind=part.kind, mappings=have.mappings + part.mappings,
                stored_bytes=have.stored_bytes + part.stored_bytes,
                zero_bytes=have.zero_bytes + part.zero_bytes,
                file_equal_bytes=have.file_equal_bytes + part.file_equal_bytes,
                duplicate_bytes=have.duplicate_bytes + part.duplicate_bytes,
                mapped_bytes=have.mapped_bytes + part.mapped_bytes)
        return sorted(by_kind.values(), key=lambda p: (-p.stored_bytes, p.kind))

    @classmethod
    def from_json(cls, text: str) -> CheckpointBreakdown:
        data = json.loads(text)
        return cls(
            model=str(data["model"]),
            images_bytes=int(data.get("images_bytes", 0)),
            files_bytes=int(data.get("files_bytes", 0)),
            processes=[ProcessMemory(int(p["pid"]), str(p["comm"]),
                                     [MemoryPart(**q) for q in p.get("parts", [])])
                       for p in data.get("processes", [])],
            shared=[MemoryPart(**q) for q in data.get("shared", [])],
            files=[MemoryPart(**q) for q in data.get("files", [])],
            other_images_bytes=int(data.get("other_images_bytes", 0)),
        )


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
EXPLAIN_CHECKPOINT = Method(
    MANAGER_INTERFACE, "ExplainCheckpoint", (Arg("name", "s"),), (Arg("explanation", "s"),)
)
"""What the checkpoint's bytes are, read from its images (the caller must own it):
``CheckpointBreakdown`` as JSON. Per process, the pages CRIU stored by kind of mapping
(heap, stacks, malloc arenas, large anonymous blocks, private file pages...) with its
zero pages, the pages equal to the file they map and the duplicated pages; shared memory;
the saved files. Reads every page once: seconds for a GB. The JSON: ``{model,
images_bytes, files_bytes, other_images_bytes, processes: [{pid, comm, parts}], shared:
parts, files: parts}``, each part ``{kind, mappings, stored_bytes, zero_bytes,
file_equal_bytes, duplicate_bytes, mapped_bytes}``."""
SUSPEND = Method(
    MANAGER_INTERFACE, "Suspend", (Arg("model", "s"), Arg("root_pid", "u"), _OPTIONS), _JOB,
    NoOptions,
)
"""CUDA state of every process of the tree to host memory; the tree stays alive."""
RESUME = Method(
    MANAGER_INTERFACE, "Resume", (Arg("model", "s"), Arg("root_pid", "u"), _OPTIONS), _JOB,
    ResumeOptions,
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
             CHECK_RESTORE, EXPLAIN_CHECKPOINT,
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
