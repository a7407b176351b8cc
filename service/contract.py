"""The one contract between the shim and the host service: D-Bus names and shapes.

Both sides import this module and nothing else of each other, so a rename here
is a rename everywhere. It imports no D-Bus library: the core and the shim's
tests can read it without a bus.

Shape of the API (modelled on systemd-importd and udisks2 jobs):

Object ``/org/llmux/Host1``, interface ``org.llmux.Host1`` (also
``org.freedesktop.DBus.ObjectManager``):

  Checkpoint(s model, u root_pid, a{sv} options) -> (u job_id, o job_path)
      options: "leave_running" b (dump but keep the tree running),
               "weights_bytes" t (hint for the free-space check)
  Restore(s model, a{sv} options) -> (u job_id, o job_path)
      always restores into the caller's own container.
      options: "keep_images" b (default true)
  Suspend(s model, u root_pid, a{sv} options) -> (u job_id, o job_path)
      CUDA state of every process of the tree to host memory; tree stays alive.
  Resume(s model, u root_pid, a{sv} options) -> (u job_id, o job_path)
  DeleteCheckpoint(s model) -> ()
  ListCheckpoints() -> a(so)                       model name, object path
  WaitJob(u job_id, d timeout_s) -> (s result, s error_name, s message)
      blocking convenience: answers when the job ends or the timeout passes
      (then org.llmux.Error.Timeout; the job keeps running).
  Properties: Version s, CriuVersion s, KernelRelease s, DriverVersion s,
              StateDirectory s, FreeBytes t
  Signals: JobNew(u id, o path)
           JobRemoved(u id, o path, s result)      result is one of JOB_RESULTS

Job objects ``/org/llmux/Host1/job/<id>``, interface ``org.llmux.Host1.Job``:
  Properties: Id u, Operation s, Model s, State s, Progress d (0..1),
              Bytes t (bytes written or read so far), Rate d (bytes/s)
  Cancel() -> ()
  Signal Completed(b success, s error_name, s message), sent just before JobRemoved
  (as udisks2's Job.Completed); error_name is "" on success.

Checkpoint objects ``/org/llmux/Host1/checkpoint/<escaped model>``, interface
``org.llmux.Host1.Checkpoint``:
  Properties: Model s, Owner s, RootPid u, Pids au, Created d (unix time),
              SizeBytes t, DumpSeconds d, CriuVersion s, KernelRelease s,
              DriverVersion s, CudaPids au, Manifest s (the whole manifest, JSON)
"""

from __future__ import annotations

import re
from enum import StrEnum

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
