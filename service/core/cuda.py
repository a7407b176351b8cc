"""CUDA suspend/resume of other processes: the GPU half of a checkpoint.

A process's CUDA state moves between three settled driver states:

    RUNNING --lock--> LOCKED --checkpoint--> CHECKPOINTED   (GPU memory freed)
    CHECKPOINTED --restore--> LOCKED --unlock--> RUNNING

Suspend drives every CUDA process of a tree down that path and resume drives it
back up, one phase at a time for all processes in parallel (lock all, then
checkpoint all), because the processes of one engine wait on each other and a
half-locked tree can deadlock. A failure rolls every process back to the state
it started from, so a failed suspend leaves the tree running and a failed resume
leaves it suspended (and retryable), never in between. Both directions start
from each process's current state, so they are idempotent: suspending a tree
that is already suspended (Suspend, then Checkpoint) does nothing more.

Three ways to reach the driver, chosen by configuration:

- ``api``: the driver's checkpoint API (``cuCheckpointProcess*``, driver 570+)
  through ctypes on libcuda.so.1. Signatures from the CUDA Driver API reference,
  "CUDA Checkpointing" (docs.nvidia.com/cuda/cuda-driver-api/group__CUDA__CHECKPOINT.html)
  and its structs (structCUcheckpointLockArgs.html, ...); the demo program
  NVIDIA/cuda-checkpoint src/r570-features.c drives the same calls.
- ``binary``: the same through NVIDIA's ``cuda-checkpoint`` program
  (``--action lock|checkpoint|restore|unlock --pid PID [--timeout MS]``,
  ``--get-state --pid PID``). ``--toggle`` is not used: it locks and
  checkpoints one process in one go, which defeats lock-all-first.
- ``plugin``: CRIU's CUDA plugin does it inside ``criu dump/restore``; suspend
  and resume are no-ops here and only the detection runs.
- ``off``: no CUDA at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Protocol, runtime_checkable

from llmux.common.errors import CudaFailed, InvalidArgument, NoSuchProcess, Unsupported
from llmux.service.core.gpumap import DeviceMap

IN_PLACE = DeviceMap()
"""No device map: the driver restores onto the GPUs the state was taken on."""

MODES = ("api", "binary", "plugin", "off")
DEFAULT_BINARY = "cuda-checkpoint"
DEFAULT_LOCK_TIMEOUT_MS = 30_000
"""How long a lock may wait for the target's in-flight CUDA API calls; 0 waits forever.

A lock that times out leaves the process RUNNING (driver documentation), so a
bounded wait turns a stuck target into a clean CudaFailed instead of a hung job.
"""

BINARY_TIMEOUT_SECS = 600.0
"""Upper bound for one cuda-checkpoint run: a checkpoint of tens of GB takes seconds."""

LIBCUDA = "libcuda.so.1"
_LIBCUDA_FALLBACK_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/usr/local/nvidia/lib64",
    "/usr/lib/wsl/lib",
)
_DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")


class ProcessState(IntEnum):
    """CUprocessState (cuda.h): values fixed by the driver ABI."""

    RUNNING = 0
    LOCKED = 1
    CHECKPOINTED = 2
    FAILED = 3
    CHECKPOINTING = 4
    RESTORING = 5


_LEVEL = {ProcessState.RUNNING: 0, ProcessState.LOCKED: 1, ProcessState.CHECKPOINTED: 2}
"""How far down the suspend path a settled state is; other states are not settled."""


@dataclass(frozen=True)
class _Step:
    action: str  # lock | checkpoint | restore | unlock
    source: ProcessState
    target: ProcessState


_DOWN = (
    _Step("lock", ProcessState.RUNNING, ProcessState.LOCKED),
    _Step("checkpoint", ProcessState.LOCKED, ProcessState.CHECKPOINTED),
)
_UP = (
    _Step("restore", ProcessState.CHECKPOINTED, ProcessState.LOCKED),
    _Step("unlock", ProcessState.LOCKED, ProcessState.RUNNING),
)


@runtime_checkable
class CudaCheckpointer(Protocol):
    """What the checkpoint engine needs from the GPU side."""

    def cuda_pids(self, pids: Sequence[int]) -> list[int]:
        """The pids (of ``pids``, in order) that hold CUDA state; [] without a driver."""
        ...

    async def lock_and_checkpoint(self, pids: Sequence[int]) -> None:
        """Every pid to CHECKPOINTED (GPU memory freed), all in parallel; rolls back on failure."""
        ...

    async def restore_and_unlock(self, pids: Sequence[int],
                                 device_map: DeviceMap = IN_PLACE) -> None:
        """Every pid back to RUNNING, all in parallel; rolls back on failure. ``device_map``:
        onto other GPUs (llmux.service.core.gpumap)."""
        ...


@dataclass
class Timings:
    """Seconds each phase of the last suspend or resume took (0.0 when skipped)."""

    phases: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- input


def validate_pids(pids: Sequence[int]) -> list[int]:
    """Positive, distinct integers; anything else is a caller bug worth naming."""
    if isinstance(pids, str | bytes):
        raise InvalidArgument(f"pids must be a sequence of integers, not {type(pids).__name__}")
    out: list[int] = []
    seen: set[int] = set()
    for pid in pids:
        if isinstance(pid, bool) or not isinstance(pid, int):
            raise InvalidArgument(f"pid {pid!r} is not an integer")
        if pid <= 0 or pid > 0x3FFFFF:
            raise InvalidArgument(f"pid {pid} is out of range (1..4194303)")
        if pid in seen:
            raise InvalidArgument(f"pid {pid} is listed twice")
        seen.add(pid)
        out.append(pid)
    return out


def _require_alive(pids: Sequence[int]) -> None:
    gone = [pid for pid in pids if not Path(f"/proc/{pid}").exists()]
    if gone:
        raise NoSuchProcess(f"no such process: {', '.join(map(str, gone))}")


# --------------------------------------------------------------------------- /proc


def maps_mention_libcuda(maps_text: str) -> bool:
    """True when a /proc/PID/maps text maps the CUDA driver library (not libcudart).

    A substring test, so that "libcuda.so.1 (deleted)" after a driver upgrade counts too.
    """
    return any("/libcuda.so" in line for line in maps_text.splitlines())


def may_hold_cuda(pid: int) -> bool:
    """Cheap pre-filter from /proc: the process maps libcuda or holds a /dev/nvidia* fd.

    A suspended process has released its /dev/nvidia* handles but still maps
    libcuda, so both signs are checked. Unreadable entries count as "no".
    """
    try:
        if maps_mention_libcuda(Path(f"/proc/{pid}/maps").read_text(errors="replace")):
            return True
    except OSError:
        return False
    with contextlib.suppress(OSError):
        for fd in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(fd.path).startswith("/dev/nvidia"):
                    return True
    return False


def parse_driver_version(text: str) -> str:
    """The kernel module version from /proc/driver/nvidia/version ("580.159.04")."""
    match = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+(?:\.\d+)+)", text)
    if match:
        return match.group(1)
    match = re.search(r"\b(\d{3,}\.\d+(?:\.\d+)?)\b", text)
    return match.group(1) if match else ""


def driver_version() -> str:
    """The NVIDIA driver version, "" without a driver.

    The kernel module's version is what a checkpoint depends on; when /proc does
    not show it, the CUDA version the driver supports is given as "cuda-13.0".
    """
    with contextlib.suppress(OSError):
        version = parse_driver_version(_DRIVER_VERSION_FILE.read_text(errors="replace"))
        if version:
            return version
    lib = _load_libcuda()
    if lib is None:
        return ""
    number = ctypes.c_int(0)
    try:
        func = lib.cuDriverGetVersion
        func.argtypes = [ctypes.POINTER(ctypes.c_int)]
        func.restype = ctypes.c_int
        if func(ctypes.byref(number)) != 0 or number.value <= 0:
            return ""
    except AttributeError:
        return ""
    return f"cuda-{number.value // 1000}.{number.value % 1000 // 10}"


# --------------------------------------------------------------------------- ctypes


class _LockArgs(ctypes.Structure):
    """CUcheckpointLockArgs: unsigned timeoutMs; unsigned reserved0; cuuint64_t reserved1[7]."""

    _fields_ = [
        ("timeoutMs", ctypes.c_uint),
        ("reserved0", ctypes.c_uint),
        ("reserved1", ctypes.c_uint64 * 7),
    ]


class _ZeroArgs(ctypes.Structure):
    """CUcheckpointCheckpointArgs / RestoreArgs / UnlockArgs: 64 bytes, all zero = defaults.

    (RestoreArgs begins with an optional GPU-remap pointer and count; zero means
    "restore onto the same GPUs".)
    """

    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


class _GpuPair(ctypes.Structure):
    """CUcheckpointGpuPair: CUuuid oldUuid; CUuuid newUuid (16 bytes each)."""

    _fields_ = [("oldUuid", ctypes.c_char * 16), ("newUuid", ctypes.c_char * 16)]


class _RestoreArgs(ctypes.Structure):
    """CUcheckpointRestoreArgs: CUcheckpointGpuPair *gpuPairs; unsigned gpuPairsCount; the
    rest (padding, driver 580's customStorageInfo_out, reserved) zero."""

    _fields_ = [
        ("gpuPairs", ctypes.POINTER(_GpuPair)),
        ("gpuPairsCount", ctypes.c_uint),
        ("reserved", ctypes.c_char * 52),
    ]


def uuid_bytes(uuid: str) -> bytes:
    """NVML's "GPU-8f4022ba-e0cb-1298-286e-225c953a7feb" as the CUuuid's 16 bytes."""
    hexdigits = uuid.removeprefix("GPU-").replace("-", "")
    try:
        raw = bytes.fromhex(hexdigits)
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raise InvalidArgument(f"{uuid!r} is not a GPU UUID")
    return raw


def restore_args(device_map: DeviceMap) -> tuple[_RestoreArgs, ctypes.Array[_GpuPair] | None]:
    """The restore's arguments, and the pair array they point into (keep it alive)."""
    args = _RestoreArgs()
    if not device_map:
        return args, None
    pairs = (_GpuPair * len(device_map.pairs))()
    for i, (old, new) in enumerate(device_map.pairs):
        pairs[i].oldUuid = uuid_bytes(old)
        pairs[i].newUuid = uuid_bytes(new)
    args.gpuPairs = ctypes.cast(pairs, ctypes.POINTER(_GpuPair))
    args.gpuPairsCount = len(device_map.pairs)
    return args, pairs


assert ctypes.sizeof(_LockArgs) == 64
assert ctypes.sizeof(_ZeroArgs) == 64
assert ctypes.sizeof(_RestoreArgs) == 64

_EXECUTOR = ThreadPoolExecutor(max_workers=64, thread_name_prefix="cuda-checkpoint")
"""Driver calls block for seconds; one thread per process of a tree (asyncio's default
pool has only cpu+4 threads, which would serialise a large tree)."""


async def _in_thread(func: Callable[..., object], *args: object) -> object:
    return await asyncio.get_running_loop().run_in_executor(_EXECUTOR, func, *args)


_libcuda_cache: list[ctypes.CDLL | None] = []
_libcuda_lock = threading.Lock()


def _load_libcuda() -> ctypes.CDLL | None:
    """libcuda.so.1 through the loader's own search, then the usual driver folders."""
    with _libcuda_lock:
        if _libcuda_cache:
            return _libcuda_cache[0]
        candidates = [LIBCUDA]
        found = ctypes.util.find_library("cuda")
        if found:
            candidates.append(found)
        candidates += [os.path.join(d, LIBCUDA) for d in _LIBCUDA_FALLBACK_DIRS]
        lib: ctypes.CDLL | None = None
        for name in candidates:
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        _libcuda_cache.append(lib)
        return lib


class DriverError(Exception):
    """A CUresult other than CUDA_SUCCESS, with the driver's own name for it."""

    def __init__(self, call: str, code: int, name: str, text: str) -> None:
        self.call, self.code, self.name, self.text = call, code, name, text
        super().__init__(f"{call} returned {name} ({code}): {text}")


class CudaDriver:
    """The checkpoint entry points of libcuda.so.1, typed once; calls block, so use threads.

    ctypes releases the GIL during each foreign call, so calls for different
    pids from different threads run in parallel inside the driver.
    """

    def __init__(self, lib: ctypes.CDLL) -> None:
        c_int, c_uint, c_char_p = ctypes.c_int, ctypes.c_uint, ctypes.c_char_p
        self._lib = lib

        def bind(name: str, argtypes: list[type]) -> Callable[..., int]:
            func = getattr(lib, name)  # AttributeError: driver without the symbol
            func.argtypes = argtypes
            func.restype = c_int  # CUresult
            return func  # type: ignore[no-any-return]

        # CUresult cuInit(unsigned int Flags)
        self._init = bind("cuInit", [c_uint])
        # CUresult cuGetErrorName(CUresult error, const char **pStr)
        self._error_name = bind("cuGetErrorName", [c_int, ctypes.POINTER(c_char_p)])
        # CUresult cuGetErrorString(CUresult error, const char **pStr)
        self._error_string = bind("cuGetErrorString", [c_int, ctypes.POINTER(c_char_p)])
        # CUresult cuCheckpointProcessGetState(int pid, CUprocessState *state)
        self._get_state = bind("cuCheckpointProcessGetState", [c_int, ctypes.POINTER(c_int)])
        # CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args)
        self._lock = bind("cuCheckpointProcessLock", [c_int, ctypes.POINTER(_LockArgs)])
        # CUresult cuCheckpointProcessCheckpoint(int pid, CUcheckpointCheckpointArgs *args)
        self._checkpoint = bind("cuCheckpointProcessCheckpoint", [c_int, ctypes.POINTER(_ZeroArgs)])
        # CUresult cuCheckpointProcessRestore(int pid, CUcheckpointRestoreArgs *args)
        self._restore = bind("cuCheckpointProcessRestore", [c_int, ctypes.POINTER(_RestoreArgs)])
        # CUresult cuCheckpointProcessUnlock(int pid, CUcheckpointUnlockArgs *args)
        self._unlock = bind("cuCheckpointProcessUnlock", [c_int, ctypes.POINTER(_ZeroArgs)])
        self._initialized = False
        self._init_lock = threading.Lock()

    def describe(self, code: int) -> tuple[str, str]:
        """(name, text) for a CUresult, e.g. ("CUDA_ERROR_NOT_FOUND", "named symbol not found")."""
        name, text = ctypes.c_char_p(), ctypes.c_char_p()
        if self._error_name(code, ctypes.byref(name)) != 0 or not name.value:
            return f"CUresult {code}", "unknown error code"
        if self._error_string(code, ctypes.byref(text)) != 0 or not text.value:
            return name.value.decode(errors="replace"), ""
        return name.value.decode(errors="replace"), text.value.decode(errors="replace")

    def _check(self, call: str, code: int) -> None:
        if code != 0:
            name, text = self.describe(code)
            raise DriverError(call, code, name, text)

    def init(self) -> None:
        """cuInit(0) once per process: the checkpoint calls need it (restore especially)."""
        with self._init_lock:
            if not self._initialized:
                self._check("cuInit", self._init(0))
                self._initialized = True

    def get_state(self, pid: int) -> ProcessState:
        state = ctypes.c_int(-1)
        self._check("cuCheckpointProcessGetState", self._get_state(pid, ctypes.byref(state)))
        try:
            return ProcessState(state.value)
        except ValueError:
            raise DriverError(
                "cuCheckpointProcessGetState", 0, "CUDA_SUCCESS", f"unknown state {state.value}"
            ) from None

    def lock(self, pid: int, timeout_ms: int) -> None:
        args = _LockArgs(timeoutMs=timeout_ms)
        self._check("cuCheckpointProcessLock", self._lock(pid, ctypes.byref(args)))

    def checkpoint(self, pid: int) -> None:
        args = _ZeroArgs()
        self._check("cuCheckpointProcessCheckpoint", self._checkpoint(pid, ctypes.byref(args)))

    def restore(self, pid: int, device_map: DeviceMap = IN_PLACE) -> None:
        args, _pairs = restore_args(device_map)
        self._check("cuCheckpointProcessRestore", self._restore(pid, ctypes.byref(args)))

    def unlock(self, pid: int) -> None:
        args = _ZeroArgs()
        self._check("cuCheckpointProcessUnlock", self._unlock(pid, ctypes.byref(args)))


# --------------------------------------------------------------------------- binary


def binary_state_argv(binary: str, pid: int) -> list[str]:
    """argv asking cuda-checkpoint for one process's state."""
    return [binary, "--get-state", "--pid", str(pid)]


def binary_action_argv(binary: str, action: str, pid: int, timeout_ms: int = 0,
                       device_map: DeviceMap = IN_PLACE) -> list[str]:
    """argv for one transition; only "lock" takes a timeout (0: wait forever), only
    "restore" a device map (cuda-checkpoint 580's ``--device-map old=new,...``)."""
    if action not in ("lock", "checkpoint", "restore", "unlock"):
        raise InvalidArgument(f"unknown cuda-checkpoint action {action!r}")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise InvalidArgument(f"pid {pid!r} is not a positive integer")
    argv = [binary, "--action", action, "--pid", str(pid)]
    if action == "lock" and timeout_ms > 0:
        argv += ["--timeout", str(timeout_ms)]
    if action == "restore" and device_map:
        argv += ["--device-map", device_map.argument()]
    return argv


def parse_binary_state(output: str) -> ProcessState:
    """cuda-checkpoint --get-state prints one word: running, locked, checkpointed, failed."""
    word = output.strip().lower()
    for state in ProcessState:
        if word == state.name.lower():
            return state
    raise ValueError(f"unexpected cuda-checkpoint state output {output.strip()!r}")


# --------------------------------------------------------------------------- engines


class _Transitions:
    """The phase-by-phase walk and its rollback, independent of how the driver is reached."""

    lock_timeout_ms: int
    last_timings: Timings

    # The three primitives a concrete class provides.
    def problem(self) -> str:
        """Why this checkpointer cannot act ("" when it can)."""
        raise NotImplementedError

    async def _state(self, pid: int) -> ProcessState:
        raise NotImplementedError

    async def _act(self, action: str, pid: int, device_map: DeviceMap = IN_PLACE) -> None:
        raise NotImplementedError

    def _describe_failure(self, exc: BaseException) -> str:
        return str(exc)

    async def lock_and_checkpoint(self, pids: Sequence[int]) -> None:
        await _settle(self._converge(pids, ProcessState.CHECKPOINTED, "suspend"))

    async def restore_and_unlock(self, pids: Sequence[int],
                                 device_map: DeviceMap = IN_PLACE) -> None:
        await _settle(self._converge(pids, ProcessState.RUNNING, "resume", device_map))

    async def states(self, pids: Sequence[int]) -> dict[int, ProcessState]:
        """Each pid's CUDA state; CudaFailed names every pid the driver does not know."""
        pids = validate_pids(pids)
        _require_alive(pids)
        self._require_usable(pids)
        results = await asyncio.gather(*(self._state(p) for p in pids), return_exceptions=True)
        failures = {
            p: r for p, r in zip(pids, results, strict=True) if isinstance(r, BaseException)
        }
        if failures:
            raise CudaFailed(
                "; ".join(
                    f"pid {pid} holds no CUDA state the driver can checkpoint "
                    f"({self._describe_failure(exc)})"
                    for pid, exc in failures.items()
                )
            )
        return {p: r for p, r in zip(pids, results, strict=True) if isinstance(r, ProcessState)}

    def _require_usable(self, pids: Sequence[int]) -> None:
        problem = self.problem()
        if problem:
            raise CudaFailed(
                f"cannot checkpoint the CUDA state of pid {', '.join(map(str, pids))}: {problem}"
            )

    async def _converge(self, pids: Sequence[int], goal: ProcessState, verb: str,
                        device_map: DeviceMap = IN_PLACE) -> None:
        self.last_timings = Timings()
        pids = validate_pids(pids)
        if not pids:
            return
        start = await self.states(pids)
        unsettled = {p: s for p, s in start.items() if s not in _LEVEL}
        if unsettled:
            raise CudaFailed(
                f"cannot {verb}: "
                + ", ".join(f"pid {p} is in CUDA state {s.name}" for p, s in unsettled.items())
            )
        steps = _DOWN if goal is ProcessState.CHECKPOINTED else _UP
        reverse = _UP if goal is ProcessState.CHECKPOINTED else _DOWN
        current, failures = await self._walk(start, {p: goal for p in pids}, steps, record=True,
                                             device_map=device_map)
        if not failures:
            return
        # Roll back: every pid to the state it started in, re-reading where the failed ones are.
        for pid in current:
            with contextlib.suppress(Exception):
                current[pid] = await self._state(pid)
        settled = {p: s for p, s in current.items() if s in _LEVEL}
        _, rollback_failures = await self._walk(
            settled, {p: start[p] for p in settled}, reverse, record=False
        )
        details = "; ".join(f"pid {p}: {self._describe_failure(e)}" for p, e in failures.items())
        message = f"CUDA {verb} failed: {details}"
        stuck = [p for p, s in current.items() if s not in _LEVEL]
        if rollback_failures or stuck:
            message += "; rollback incomplete: " + "; ".join(
                [f"pid {p}: {self._describe_failure(e)}" for p, e in rollback_failures.items()]
                + [f"pid {p} is in CUDA state {current[p].name}" for p in stuck]
            )
        else:
            message += "; every process was returned to the CUDA state it started in"
        raise CudaFailed(message)

    async def _walk(
        self,
        current: dict[int, ProcessState],
        targets: Mapping[int, ProcessState],
        steps: Sequence[_Step],
        *,
        record: bool,
        device_map: DeviceMap = IN_PLACE,
    ) -> tuple[dict[int, ProcessState], dict[int, BaseException]]:
        """Run each step for every pid that needs it, in parallel; stop after a failing phase."""
        current = dict(current)
        failures: dict[int, BaseException] = {}
        for step in steps:
            movers = [
                p
                for p, s in current.items()
                if s is step.source and _crosses(s, step.target, targets[p])
            ]
            started = time.monotonic()
            results = await asyncio.gather(
                *(self._act(step.action, p, device_map) for p in movers), return_exceptions=True
            )
            if record:
                self.last_timings.phases[step.action] = time.monotonic() - started
            for pid, result in zip(movers, results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, Exception):
                        raise result  # cancellation and exits are not driver failures
                    failures[pid] = result
                else:
                    current[pid] = step.target
            if failures:
                break
        return current, failures


async def _settle(work: Coroutine[object, object, None]) -> None:
    """Run work to its end even if the caller is cancelled, then pass the cancellation on.

    Driver calls already in flight cannot be stopped; letting the walk (and its
    rollback) finish means a cancelled caller still leaves every process in a
    settled state, which the opposite call (both are idempotent) can undo.
    """
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await task
        raise


def _crosses(state: ProcessState, nxt: ProcessState, target: ProcessState) -> bool:
    """Whether moving state -> nxt goes toward target without passing it."""
    here, there, goal = _LEVEL[state], _LEVEL[nxt], _LEVEL[target]
    return (here < there <= goal) or (goal <= there < here)


class ApiCheckpointer(_Transitions):
    """cuCheckpointProcess* through ctypes; usable where libcuda.so.1 loads and cuInit works."""

    def __init__(self, lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS) -> None:
        self.lock_timeout_ms = lock_timeout_ms
        self.last_timings = Timings()
        self._driver: CudaDriver | None = None
        self._problem = ""
        lib = _load_libcuda()
        if lib is None:
            self._problem = f"{LIBCUDA} cannot be loaded (no NVIDIA driver on this host)"
            return
        try:
            self._driver = CudaDriver(lib)
        except AttributeError as exc:
            self._problem = (
                f"{LIBCUDA} lacks the checkpoint API ({exc}); NVIDIA driver 570 or newer is needed"
            )
            return
        self._ready()

    def _ready(self) -> CudaDriver | None:
        """The driver once cuInit(0) has worked; retried on each use, as the GPU may come late
        (a daemon started before the driver finished loading)."""
        driver = self._driver
        if driver is None:
            return None
        try:
            driver.init()
        except DriverError as exc:
            self._problem = f"cuInit(0) failed: {exc.name}: {exc.text}"
            return None
        self._problem = ""
        return driver

    def problem(self) -> str:
        self._ready()
        return self._problem

    def cuda_pids(self, pids: Sequence[int]) -> list[int]:
        pids = validate_pids(pids)
        driver = self._ready()
        if driver is None:
            return []
        out = []
        for pid in pids:
            if not may_hold_cuda(pid):
                continue
            with contextlib.suppress(DriverError):
                driver.get_state(pid)
                out.append(pid)
        return out

    async def _state(self, pid: int) -> ProcessState:
        assert self._driver is not None
        state = await _in_thread(self._driver.get_state, pid)
        assert isinstance(state, ProcessState)
        return state

    async def _act(self, action: str, pid: int, device_map: DeviceMap = IN_PLACE) -> None:
        driver = self._driver
        assert driver is not None
        if action == "lock":
            await _in_thread(driver.lock, pid, self.lock_timeout_ms)
        elif action == "restore":
            await _in_thread(driver.restore, pid, device_map)
        else:
            await _in_thread(getattr(driver, action), pid)


class BinaryCheckpointer(_Transitions):
    """The same transitions through NVIDIA's cuda-checkpoint program (argv lists only)."""

    def __init__(
        self, binary: str = DEFAULT_BINARY, lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS
    ) -> None:
        self.binary_name = binary
        self.lock_timeout_ms = lock_timeout_ms
        self.last_timings = Timings()
        self.binary = shutil.which(binary) or ""
        self._problem = (
            "" if self.binary else f"the cuda-checkpoint program {binary!r} is not found"
        )

    def problem(self) -> str:
        return self._problem

    def cuda_pids(self, pids: Sequence[int]) -> list[int]:
        pids = validate_pids(pids)
        if not self.binary:
            return []
        out = []
        for pid in pids:
            if not may_hold_cuda(pid):
                continue
            try:
                done = subprocess.run(
                    binary_state_argv(self.binary, pid),
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                    stdin=subprocess.DEVNULL,
                )
            except (OSError, subprocess.TimeoutExpired):
                continue
            if done.returncode == 0:
                with contextlib.suppress(ValueError):
                    parse_binary_state(done.stdout)
                    out.append(pid)
        return out

    async def _run(self, argv: list[str]) -> str:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), BINARY_TIMEOUT_SECS)
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        text = out.decode(errors="replace").strip()
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv[1:])} exited with status {proc.returncode}: {text[-500:]}"
            )
        return text

    async def _state(self, pid: int) -> ProcessState:
        return parse_binary_state(await self._run(binary_state_argv(self.binary, pid)))

    async def _act(self, action: str, pid: int, device_map: DeviceMap = IN_PLACE) -> None:
        await self._run(binary_action_argv(self.binary, action, pid, self.lock_timeout_ms,
                                           device_map))


class PluginCheckpointer:
    """CRIU's CUDA plugin moves the GPU state inside criu dump/restore; only detection runs here."""

    def __init__(self, binary: str = DEFAULT_BINARY) -> None:
        self.last_timings = Timings()
        api = ApiCheckpointer()
        self._detector: ApiCheckpointer | BinaryCheckpointer = (
            api if not api.problem() else BinaryCheckpointer(binary)
        )

    def cuda_pids(self, pids: Sequence[int]) -> list[int]:
        return self._detector.cuda_pids(pids)

    async def lock_and_checkpoint(self, pids: Sequence[int]) -> None:
        validate_pids(pids)

    async def restore_and_unlock(self, pids: Sequence[int],
                                 device_map: DeviceMap = IN_PLACE) -> None:
        validate_pids(pids)
        _in_place_only(device_map, type(self).__name__)


class NoCudaCheckpointer:
    """CUDA handling switched off: no process counts as a CUDA process."""

    def __init__(self) -> None:
        self.last_timings = Timings()

    def cuda_pids(self, pids: Sequence[int]) -> list[int]:
        validate_pids(pids)
        return []

    async def lock_and_checkpoint(self, pids: Sequence[int]) -> None:
        validate_pids(pids)

    async def restore_and_unlock(self, pids: Sequence[int],
                                 device_map: DeviceMap = IN_PLACE) -> None:
        validate_pids(pids)
        _in_place_only(device_map, type(self).__name__)


def _in_place_only(device_map: DeviceMap, who: str) -> None:
    if device_map:
        raise Unsupported(f"{who} cannot restore CUDA state onto other GPUs")


def make_cuda_checkpointer(
    mode: str, binary: str = DEFAULT_BINARY, *, lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS
) -> CudaCheckpointer:
    """The checkpointer for a configured mode; never fails for a missing driver or binary.

    What is missing is reported when a CUDA process is actually to be suspended
    (CudaFailed), and by ``problem()`` on the api and binary checkpointers.
    """
    if isinstance(lock_timeout_ms, bool) or not isinstance(lock_timeout_ms, int):
        raise InvalidArgument(f"lock_timeout_ms must be an integer, not {lock_timeout_ms!r}")
    if lock_timeout_ms < 0 or lock_timeout_ms > 0xFFFFFFFF:
        raise InvalidArgument(f"lock_timeout_ms {lock_timeout_ms} is out of range")
    if mode == "api":
        return ApiCheckpointer(lock_timeout_ms)
    if mode in ("binary", "plugin"):
        if not isinstance(binary, str) or not binary or "\0" in binary:
            raise InvalidArgument(
                f"cuda-checkpoint binary must be a program name or path: {binary!r}"
            )
        if mode == "binary":
            return BinaryCheckpointer(binary, lock_timeout_ms)
        return PluginCheckpointer(binary)
    if mode == "off":
        return NoCudaCheckpointer()
    raise InvalidArgument(
        f"unknown CUDA checkpoint mode {mode!r}; expected one of {', '.join(MODES)}"
    )


__all__ = [
    "DEFAULT_BINARY",
    "DEFAULT_LOCK_TIMEOUT_MS",
    "MODES",
    "ApiCheckpointer",
    "BinaryCheckpointer",
    "CudaCheckpointer",
    "CudaDriver",
    "DriverError",
    "NoCudaCheckpointer",
    "PluginCheckpointer",
    "ProcessState",
    "Timings",
    "binary_action_argv",
    "binary_state_argv",
    "driver_version",
    "make_cuda_checkpointer",
    "maps_mention_libcuda",
    "may_hold_cuda",
    "parse_binary_state",
    "parse_driver_version",
    "restore_args",
    "uuid_bytes",
    "validate_pids",
]
