"""The CUDA checkpointer (service/core/cuda.py).

Without a GPU (CI): every mode is built and behaves as documented with no driver;
inputs are validated; the cuda-checkpoint argv is built as a pure function; the
/proc pre-filter looks at real processes. The phase walk and its rollback are
checked against an in-memory driver that follows the state machine of the
driver documentation, because no real driver runs here.

With a GPU (marker ``gpu``, skipped where libcuda.so.1 cannot be used): a real
PyTorch process is found, suspended (its GPU memory goes to 0) and resumed with
identical contents, through the driver API and, where installed, cuda-checkpoint.
These tests use asyncio.run, so on the GPU machine they need only pytest.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from llmux.common.errors import CudaFailed, InvalidArgument, NoSuchProcess
from llmux.service.core import cuda
from llmux.service.core.cuda import (
    MODES,
    ApiCheckpointer,
    BinaryCheckpointer,
    CudaCheckpointer,
    ProcessState,
    binary_action_argv,
    binary_state_argv,
    driver_version,
    make_cuda_checkpointer,
    maps_mention_libcuda,
    may_hold_cuda,
    parse_binary_state,
    parse_driver_version,
    validate_pids,
)

HAVE_DRIVER = not ApiCheckpointer().problem()
needs_gpu = pytest.mark.skipif(not HAVE_DRIVER, reason="no usable libcuda.so.1 / GPU here")
no_driver_only = pytest.mark.skipif(HAVE_DRIVER, reason="checks the behaviour without a driver")


def _spawn(code: str, *, stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=stdin,
        stdout=subprocess.PIPE,
        text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    for stream in (proc.stdin, proc.stdout):
        if stream:
            stream.close()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[str]]:
    """A live process without CUDA."""
    proc = _spawn("import time; print('up', flush=True); time.sleep(120)")
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    yield proc
    _stop(proc)


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not Path(f"/proc/{proc.pid}").exists()
    return proc.pid


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_builds_a_checkpointer(mode: str, sleeper: subprocess.Popen[str]) -> None:
    checkpointer = make_cuda_checkpointer(mode, "cuda-checkpoint")
    assert isinstance(checkpointer, CudaCheckpointer)
    assert checkpointer.cuda_pids([sleeper.pid]) == []  # a plain process never counts
    assert checkpointer.cuda_pids([]) == []


def test_unknown_mode_names_the_valid_ones() -> None:
    with pytest.raises(InvalidArgument, match=r"'gpu'.*api, binary, plugin, off"):
        make_cuda_checkpointer("gpu", "cuda-checkpoint")


@pytest.mark.parametrize("binary", ["", "cuda\0checkpoint"])
def test_bad_binary_argument(binary: str) -> None:
    with pytest.raises(InvalidArgument, match="cuda-checkpoint binary"):
        make_cuda_checkpointer("binary", binary)


@pytest.mark.parametrize("timeout", [-1, 2**32, True])
def test_bad_lock_timeout(timeout: int) -> None:
    with pytest.raises(InvalidArgument, match="lock_timeout_ms"):
        make_cuda_checkpointer("api", "cuda-checkpoint", lock_timeout_ms=timeout)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("pids", "message"),
    [
        ([0], "pid 0 is out of range"),
        ([-5], "pid -5 is out of range"),
        ([2**23], "out of range"),
        ([True], "pid True is not an integer"),
        (["12"], "pid '12' is not an integer"),
        ([1.5], "pid 1.5 is not an integer"),
        ([7, 7], "pid 7 is listed twice"),
        ("123", "not str"),
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_bad_pids_are_refused_in_every_mode(mode: str, pids: Sequence[int], message: str) -> None:
    checkpointer = make_cuda_checkpointer(mode, "cuda-checkpoint")
    with pytest.raises(InvalidArgument, match=message):
        checkpointer.cuda_pids(pids)
    with pytest.raises(InvalidArgument, match=message):
        asyncio.run(checkpointer.lock_and_checkpoint(pids))
    with pytest.raises(InvalidArgument, match=message):
        asyncio.run(checkpointer.restore_and_unlock(pids))


def test_validate_pids_keeps_order() -> None:
    assert validate_pids([30, 10, 20]) == [30, 10, 20]
    assert validate_pids(()) == []


@pytest.mark.parametrize("mode", ["api", "binary"])
def test_a_missing_process_is_named(mode: str, dead_pid: int) -> None:
    checkpointer = make_cuda_checkpointer(mode, "cuda-checkpoint")
    with pytest.raises(NoSuchProcess, match=f"no such process: {dead_pid}"):
        asyncio.run(checkpointer.lock_and_checkpoint([dead_pid]))
    with pytest.raises(NoSuchProcess, match=str(dead_pid)):
        asyncio.run(checkpointer.restore_and_unlock([dead_pid]))


@pytest.mark.parametrize("mode", MODES)
def test_no_pids_is_a_no_op(mode: str) -> None:
    checkpointer = make_cuda_checkpointer(mode, "/nonexistent/cuda-checkpoint")
    asyncio.run(checkpointer.lock_and_checkpoint([]))
    asyncio.run(checkpointer.restore_and_unlock([]))


# --------------------------------------------------------------------------- no driver


@no_driver_only
def test_api_without_driver_builds_and_explains(sleeper: subprocess.Popen[str]) -> None:
    checkpointer = make_cuda_checkpointer("api", "cuda-checkpoint")
    assert isinstance(checkpointer, ApiCheckpointer)
    assert "libcuda.so.1" in checkpointer.problem()
    assert checkpointer.cuda_pids([sleeper.pid, os.getpid()]) == []
    for operation in (checkpointer.lock_and_checkpoint, checkpointer.restore_and_unlock):
        with pytest.raises(CudaFailed) as caught:
            asyncio.run(operation([sleeper.pid]))
        assert str(sleeper.pid) in str(caught.value)
        assert "libcuda.so.1 cannot be loaded" in str(caught.value)
        assert caught.value.dbus_name == "org.llmux.Error.CudaFailed"
    assert sleeper.poll() is None  # the target was not touched


@no_driver_only
def test_driver_version_is_empty_without_a_driver() -> None:
    assert driver_version() == ""


def test_binary_mode_without_the_program(sleeper: subprocess.Popen[str]) -> None:
    checkpointer = make_cuda_checkpointer("binary", "/nonexistent/cuda-checkpoint")
    assert isinstance(checkpointer, BinaryCheckpointer)
    assert checkpointer.cuda_pids([sleeper.pid]) == []
    with pytest.raises(CudaFailed, match=r"'/nonexistent/cuda-checkpoint' is not found"):
        asyncio.run(checkpointer.lock_and_checkpoint([sleeper.pid]))
    assert sleeper.poll() is None


@pytest.mark.parametrize("mode", ["off", "plugin"])
def test_off_and_plugin_leave_processes_alone(mode: str, sleeper: subprocess.Popen[str]) -> None:
    checkpointer = make_cuda_checkpointer(mode, "cuda-checkpoint")
    asyncio.run(checkpointer.lock_and_checkpoint([sleeper.pid]))
    asyncio.run(checkpointer.restore_and_unlock([sleeper.pid]))
    assert sleeper.poll() is None


# --------------------------------------------------------------------------- pure helpers


def test_binary_argv_is_an_argument_list() -> None:
    binary = "/usr/local/bin/cuda-checkpoint"
    assert binary_state_argv(binary, 42) == [binary, "--get-state", "--pid", "42"]
    assert binary_action_argv(binary, "lock", 42, 5000) == [
        binary, "--action", "lock", "--pid", "42", "--timeout", "5000",
    ]  # fmt: skip
    assert binary_action_argv(binary, "lock", 42, 0) == [binary, "--action", "lock", "--pid", "42"]
    for action in ("checkpoint", "restore", "unlock"):  # only lock takes a timeout
        assert binary_action_argv(binary, action, 7, 5000) == [
            binary, "--action", action, "--pid", "7",
        ]  # fmt: skip


@pytest.mark.parametrize(
    ("action", "pid", "message"),
    [("toggle", 1, "unknown cuda-checkpoint action"), ("lock", 0, "pid 0"), ("lock", True, "pid")],
)
def test_binary_argv_refuses_bad_input(action: str, pid: int, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        binary_action_argv("cuda-checkpoint", action, pid)


def test_binary_state_output_is_parsed() -> None:
    assert parse_binary_state("running\n") is ProcessState.RUNNING
    assert parse_binary_state("  Locked ") is ProcessState.LOCKED
    assert parse_binary_state("checkpointed") is ProcessState.CHECKPOINTED
    assert parse_binary_state("failed") is ProcessState.FAILED
    with pytest.raises(ValueError, match="unexpected cuda-checkpoint state output 'banana'"):
        parse_binary_state("banana")


def test_driver_version_is_read_from_the_proc_text() -> None:
    proprietary = (
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  Thu Oct 30 2025\n"
        "GCC version:  gcc version 13.3.0 (Ubuntu 13.3.0-6ubuntu2~24.04)\n"
    )
    open_module = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release\n"
    assert parse_driver_version(proprietary) == "580.159.04"
    assert parse_driver_version(open_module) == "580.95.05"
    assert parse_driver_version("nothing here") == ""


def test_maps_text_is_scanned_for_libcuda() -> None:
    line = "7f00-7f10 r-xp 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/{}"
    assert maps_mention_libcuda(line.format("libcuda.so.580.159.04"))
    assert maps_mention_libcuda(line.format("libcuda.so.1"))
    assert maps_mention_libcuda(line.format("libcuda.so.580.159.04 (deleted)"))
    assert not maps_mention_libcuda(line.format("libcudart.so.12"))
    assert not maps_mention_libcuda("7f00-7f10 rw-p 00000000 00:00 0 ")


def test_proc_prefilter_sees_a_mapped_libcuda(
    tmp_path: Path, sleeper: subprocess.Popen[str]
) -> None:
    """A real process that maps a file named like the driver library passes the pre-filter."""
    lib = tmp_path / "libcuda.so.1"
    lib.write_bytes(b"\0" * 4096)
    holder = _spawn(
        f"""
        import mmap, time
        f = open({str(lib)!r}, "rb")
        m = mmap.mmap(f.fileno(), 4096, prot=mmap.PROT_READ)
        print("mapped", flush=True)
        time.sleep(120)
        """
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "mapped"
        assert may_hold_cuda(holder.pid)
        assert not may_hold_cuda(sleeper.pid)
        assert not may_hold_cuda(2**22 - 1) or Path(f"/proc/{2**22 - 1}").exists()
    finally:
        _stop(holder)


# --------------------------------------------------------------------------- the phase walk


class InMemoryDriver(cuda._Transitions):  # type: ignore[misc]
    """The driver's documented state machine, per pid, with injectable failures.

    lock: RUNNING -> LOCKED; checkpoint: LOCKED -> CHECKPOINTED;
    restore: CHECKPOINTED -> LOCKED; unlock: LOCKED -> RUNNING. Any other
    transition is CUDA_ERROR_ILLEGAL_STATE, and a failing call leaves the state as
    it was (a timed-out lock leaves the process RUNNING).
    """

    def __init__(self, states: dict[int, ProcessState], fail: set[tuple[str, int]]) -> None:
        self.lock_timeout_ms = 1000
        self.last_timings = cuda.Timings()
        self.table = dict(states)
        self.fail = fail
        self.calls: list[tuple[str, int]] = []
        #: the device map each restore was given
        self.maps: dict[int, cuda.DeviceMap] = {}

    def problem(self) -> str:
        return ""

    async def _state(self, pid: int) -> ProcessState:
        if pid not in self.table:
            raise RuntimeError("CUDA_ERROR_NOT_FOUND")
        return self.table[pid]

    async def _act(self, action: str, pid: int, device_map: cuda.DeviceMap = cuda.IN_PLACE
                   ) -> None:
        self.calls.append((action, pid))
        if action == "restore":
            self.maps[pid] = device_map
        await asyncio.sleep(0)
        moves = {
            "lock": (ProcessState.RUNNING, ProcessState.LOCKED),
            "checkpoint": (ProcessState.LOCKED, ProcessState.CHECKPOINTED),
            "restore": (ProcessState.CHECKPOINTED, ProcessState.LOCKED),
            "unlock": (ProcessState.LOCKED, ProcessState.RUNNING),
        }
        source, target = moves[action]
        if (action, pid) in self.fail:
            raise RuntimeError(f"{action} failed: CUDA_ERROR_OUT_OF_MEMORY")
        if self.table[pid] is not source:
            raise RuntimeError("CUDA_ERROR_ILLEGAL_STATE")
        self.table[pid] = target


@pytest.fixture
def pids(sleeper: subprocess.Popen[str]) -> list[int]:
    """Three live pids (the walk checks that they exist): this process, its parent, a child."""
    return [os.getpid(), os.getppid(), sleeper.pid]


R, L, C = ProcessState.RUNNING, ProcessState.LOCKED, ProcessState.CHECKPOINTED


def test_suspend_locks_all_before_checkpointing_any(pids: list[int]) -> None:
    driver = InMemoryDriver(dict.fromkeys(pids, R), set())
    asyncio.run(driver.lock_and_checkpoint(pids))
    assert driver.table == dict.fromkeys(pids, C)
    assert [a for a, _ in driver.calls] == ["lock"] * 3 + ["checkpoint"] * 3
    assert set(driver.last_timings.phases) == {"lock", "checkpoint"}
    asyncio.run(driver.restore_and_unlock(pids))
    assert driver.table == dict.fromkeys(pids, R)
    assert [a for a, _ in driver.calls[6:]] == ["restore"] * 3 + ["unlock"] * 3


def test_suspend_and_resume_are_idempotent(pids: list[int]) -> None:
    driver = InMemoryDriver({pids[0]: R, pids[1]: C, pids[2]: L}, set())
    asyncio.run(driver.lock_and_checkpoint(pids))
    assert driver.table == dict.fromkeys(pids, C)
    assert ("lock", pids[1]) not in driver.calls and ("lock", pids[2]) not in driver.calls
    driver.calls.clear()
    asyncio.run(driver.lock_and_checkpoint(pids))
    assert driver.calls == []
    asyncio.run(driver.restore_and_unlock(pids))
    asyncio.run(driver.restore_and_unlock(pids))
    assert driver.table == dict.fromkeys(pids, R)


def test_failed_checkpoint_rolls_every_process_back_to_running(pids: list[int]) -> None:
    driver = InMemoryDriver(dict.fromkeys(pids, R), {("checkpoint", pids[1])})
    with pytest.raises(CudaFailed) as caught:
        asyncio.run(driver.lock_and_checkpoint(pids))
    message = str(caught.value)
    assert f"pid {pids[1]}: checkpoint failed: CUDA_ERROR_OUT_OF_MEMORY" in message
    assert "returned to the CUDA state it started in" in message
    assert driver.table == dict.fromkeys(pids, R)


def test_failed_lock_unlocks_the_others(pids: list[int]) -> None:
    driver = InMemoryDriver(dict.fromkeys(pids, R), {("lock", pids[2])})
    with pytest.raises(CudaFailed, match=f"pid {pids[2]}: lock failed"):
        asyncio.run(driver.lock_and_checkpoint(pids))
    assert driver.table == dict.fromkeys(pids, R)
    assert not any(a == "checkpoint" for a, _ in driver.calls)


def test_failed_restore_leaves_the_tree_suspended(pids: list[int]) -> None:
    driver = InMemoryDriver(dict.fromkeys(pids, C), {("restore", pids[0])})
    with pytest.raises(CudaFailed, match="CUDA resume failed"):
        asyncio.run(driver.restore_and_unlock(pids))
    assert driver.table == dict.fromkeys(pids, C)  # retryable: nothing half-resumed
    driver.fail.clear()
    asyncio.run(driver.restore_and_unlock(pids))
    assert driver.table == dict.fromkeys(pids, R)


def test_a_failing_rollback_is_reported(pids: list[int]) -> None:
    driver = InMemoryDriver(dict.fromkeys(pids, R), {("checkpoint", pids[0]), ("unlock", pids[1])})
    with pytest.raises(CudaFailed, match=f"rollback incomplete: pid {pids[1]}: unlock failed"):
        asyncio.run(driver.lock_and_checkpoint(pids))


def test_an_unknown_pid_stops_before_any_transition(pids: list[int]) -> None:
    driver = InMemoryDriver({pids[0]: R, pids[1]: R}, set())
    with pytest.raises(CudaFailed, match=f"pid {pids[2]} holds no CUDA state"):
        asyncio.run(driver.lock_and_checkpoint(pids))
    assert driver.calls == []


def test_a_failed_process_stops_before_any_transition(pids: list[int]) -> None:
    driver = InMemoryDriver({pids[0]: R, pids[1]: ProcessState.FAILED, pids[2]: R}, set())
    with pytest.raises(CudaFailed, match=f"pid {pids[1]} is in CUDA state FAILED"):
        asyncio.run(driver.lock_and_checkpoint(pids))
    assert driver.calls == []


def test_a_cancelled_suspend_still_settles(pids: list[int]) -> None:
    driver = InMemoryDriver(dict.fromkeys(pids, R), set())

    async def cancel_midway() -> None:
        task = asyncio.create_task(driver.lock_and_checkpoint(pids))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    assert set(driver.table.values()) == {C}  # finished, not left half-locked


# --------------------------------------------------------------------------- real GPU

TORCH_HOLDER = """
import sys, torch
gen = torch.Generator().manual_seed(7)
x = torch.randn(64 * 2**20, generator=gen).cuda()  # 256 MiB
torch.cuda.synchronize()
def checksum():
    return int(x.view(torch.int32).to(torch.int64).sum().item())
print("ready", checksum(), flush=True)
for line in sys.stdin:
    print(checksum(), flush=True)
"""


@pytest.fixture
def torch_gpu() -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = _spawn(TORCH_HOLDER, stdin=subprocess.PIPE)
    assert proc.stdout is not None
    ready = proc.stdout.readline().split()
    assert ready and ready[0] == "ready", f"the torch process did not start: {ready}"
    yield proc, ready[1]
    _stop(proc)


def _ask(proc: subprocess.Popen[str]) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("sum\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def _gpu_mib(pid: int) -> int | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    out = subprocess.run(
        [smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return sum(
        int(used)
        for row in out.splitlines()
        for p, used in [row.split(",")]
        if p.strip() == str(pid)
    )


def _suspend_resume_roundtrip(
    checkpointer: CudaCheckpointer, proc: subprocess.Popen[str], checksum: str
) -> None:
    before = _gpu_mib(proc.pid)  # None or 0 where nvidia-smi lists no processes
    asyncio.run(checkpointer.lock_and_checkpoint([proc.pid]))
    assert checkpointer.cuda_pids([proc.pid]) == [proc.pid]  # still known while suspended
    if before:
        assert _gpu_mib(proc.pid) == 0
    asyncio.run(checkpointer.lock_and_checkpoint([proc.pid]))  # idempotent
    asyncio.run(checkpointer.restore_and_unlock([proc.pid]))
    if before:
        assert (_gpu_mib(proc.pid) or 0) > 0
    assert _ask(proc) == checksum


@pytest.mark.gpu
@needs_gpu
def test_gpu_api_suspend_resume(
    torch_gpu: tuple[subprocess.Popen[str], str], sleeper: subprocess.Popen[str]
) -> None:
    proc, checksum = torch_gpu
    checkpointer = make_cuda_checkpointer("api", "cuda-checkpoint")
    assert checkpointer.cuda_pids([sleeper.pid, proc.pid]) == [proc.pid]
    assert driver_version()
    started = time.monotonic()
    _suspend_resume_roundtrip(checkpointer, proc, checksum)
    print(f"api suspend+resume of 256 MiB: {time.monotonic() - started:.3f} s")


@pytest.mark.gpu
@needs_gpu
def test_gpu_api_refuses_a_process_without_cuda(
    torch_gpu: tuple[subprocess.Popen[str], str], sleeper: subprocess.Popen[str]
) -> None:
    proc, checksum = torch_gpu
    checkpointer = make_cuda_checkpointer("api", "cuda-checkpoint")
    with pytest.raises(CudaFailed) as caught:
        asyncio.run(checkpointer.lock_and_checkpoint([proc.pid, sleeper.pid]))
    assert f"pid {sleeper.pid}" in str(caught.value)
    assert "CUDA_ERROR_" in str(caught.value)  # the driver's own name for the CUresult
    assert isinstance(checkpointer, ApiCheckpointer)
    assert asyncio.run(checkpointer.states([proc.pid])) == {proc.pid: ProcessState.RUNNING}
    assert _ask(proc) == checksum


@pytest.mark.gpu
@needs_gpu
@pytest.mark.skipif(not shutil.which("cuda-checkpoint"), reason="cuda-checkpoint not installed")
def test_gpu_binary_suspend_resume(torch_gpu: tuple[subprocess.Popen[str], str]) -> None:
    proc, checksum = torch_gpu
    checkpointer = make_cuda_checkpointer("binary", "cuda-checkpoint")
    assert checkpointer.cuda_pids([proc.pid]) == [proc.pid]
    _suspend_resume_roundtrip(checkpointer, proc, checksum)


def _on_gpus(pid: int) -> set[int]:
    """The GPUs NVML lists ``pid`` on."""
    import pynvml

    pynvml.nvmlInit()
    try:
        return {i for i in range(pynvml.nvmlDeviceGetCount())
                if pid in {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(
                    pynvml.nvmlDeviceGetHandleByIndex(i))}}
    finally:
        pynvml.nvmlShutdown()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("mode", ["api", "binary"])
def test_gpu_restore_takes_a_device_map(torch_gpu: tuple[subprocess.Popen[str], str],
                                        mode: str) -> None:
    """The restore's device map as the driver takes it, on one GPU: GPU 0's own pair (the
    struct's layout, the binary's --device-map), the answer unchanged."""
    if mode == "binary" and not shutil.which("cuda-checkpoint"):
        pytest.skip("cuda-checkpoint not installed")
    from llmux.service.core import gpumap

    proc, checksum = torch_gpu
    gpus = gpumap.host_gpus()
    assert gpus and gpumap.driver_can_remap(driver_version()), (gpus, driver_version())
    checkpointer = make_cuda_checkpointer(mode, "cuda-checkpoint")
    asyncio.run(checkpointer.lock_and_checkpoint([proc.pid]))
    same = gpumap.DeviceMap(((gpus[0].uuid, gpus[0].uuid),))
    asyncio.run(checkpointer.restore_and_unlock([proc.pid], same))
    assert _ask(proc) == checksum
    assert _on_gpus(proc.pid) == {0}


def _two_gpus() -> bool:
    from llmux.service.core import gpumap

    gpus = gpumap.host_gpus()
    return len(gpus) >= 2 and gpus[0].name == gpus[1].name


@pytest.mark.gpu
@needs_gpu
@pytest.mark.skipif(not _two_gpus(), reason="needs 2 GPUs of the same model in one host")
def test_gpu_restore_onto_the_other_gpu() -> None:
    """Suspended on GPU 0, resumed on GPU 1 (the map the shim asks for as {0: 1})."""
    from llmux.service.core import gpumap

    proc = _spawn(TORCH_HOLDER, stdin=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        checksum = proc.stdout.readline().split()[1]
        assert _on_gpus(proc.pid) == {0}
        checkpointer = make_cuda_checkpointer("api", "cuda-checkpoint")
        asyncio.run(checkpointer.lock_and_checkpoint([proc.pid]))
        moved = gpumap.resolve({0: 1}, gpumap.host_gpus(), driver=driver_version(),
                               cuda_mode="api")
        asyncio.run(checkpointer.restore_and_unlock([proc.pid], moved))
        assert _on_gpus(proc.pid) == {1}
        assert _ask(proc) == checksum
    finally:
        _stop(proc)
