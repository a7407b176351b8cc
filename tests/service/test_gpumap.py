"""Restore onto other GPUs, the parts a host without GPUs can check: the shim's GPU indices
turned into the driver's device map and refused by name where the driver could not take
it, the map as cuda-checkpoint's argument and as the API's struct, and the map reaching
the restore step (and only it). Real remapping is in tests/vllm/test_placement_gpu.py."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmux.common.errors import CudaFailed, InvalidArgument, Unsupported
from llmux.service.core import cuda, gpumap
from llmux.service.core.cuda import ProcessState, binary_action_argv
from llmux.service.core.gpumap import DeviceMap, GpuId
from tests.service.test_cuda import InMemoryDriver
from tests.support.llmuxd_harness import Llmuxd, PrivateBus, criu_usable, running_llmuxd

U0 = "GPU-eea0d83f-ebcd-ac27-6b3e-bec2a19724e6"
U1 = "GPU-8f4022ba-e0cb-1298-286e-225c953a7feb"
U2 = "GPU-5449fdd5-fb83-f4ed-37a3-ea1057d82160"
H100 = "NVIDIA H100 80GB HBM3"
HOST = [GpuId(0, U0, H100), GpuId(1, U1, H100), GpuId(2, U2, "NVIDIA L4")]


def _resolve(gpu_map: dict[int, int], *, driver: str = "580.65.06",
             mode: str = "api") -> DeviceMap:
    return gpumap.resolve(gpu_map, HOST, driver=driver, cuda_mode=mode)


def test_indices_become_uuid_pairs_for_every_gpu_of_the_state() -> None:
    m = _resolve({0: 1, 1: 0})
    assert m.pairs == ((U0, U1), (U1, U0))
    assert m.argument() == f"{U0}={U1},{U1}={U0}"
    assert _resolve({0: 0}) == DeviceMap() and not _resolve({})  # in place: no map at all
    assert _resolve({0: 1}, driver="cuda-13.0").pairs == ((U0, U1),)


@pytest.mark.parametrize(("gpu_map", "driver", "mode", "error", "words"), [
    ({0: 2}, "580.65.06", "api", Unsupported,
     f"from GPU 0 ({H100}) onto GPU 2 (NVIDIA L4): the driver restores only onto a GPU "
     "of the same model"),
    ({0: 1}, "570.86.10", "api", Unsupported, "needs NVIDIA driver 580 or later"),
    ({0: 1}, "cuda-12.8", "binary", Unsupported, "this host has cuda-12.8"),
    ({0: 1}, "", "api", Unsupported, "this host has none"),
    ({0: 1}, "580.65.06", "plugin", Unsupported, "CRIU's CUDA plugin restores onto the GPUs"),
    ({0: 1}, "580.65.06", "off", Unsupported, "this llmuxd runs with 'off'"),
    ({0: 7}, "580.65.06", "api", InvalidArgument, "names GPU 7, but this host has GPUs [0, 1, 2]"),
    ({0: 1, 2: 1}, "580.65.06", "api", InvalidArgument, "several GPUs onto GPU 1"),
])
def test_a_map_the_driver_would_refuse_is_refused_first_by_name(
        gpu_map: dict[int, int], driver: str, mode: str, error: type[Exception],
        words: str) -> None:
    with pytest.raises(error) as e:
        _resolve(gpu_map, driver=driver, mode=mode)
    assert words in str(e.value)


def test_no_gpu_on_the_host_is_refused() -> None:
    with pytest.raises(Unsupported, match="NVML finds no GPU"):
        gpumap.resolve({0: 1}, [], driver="580.65.06", cuda_mode="api")


class _Nvml:
    """The three pynvml calls read_gpus makes (NVML itself needs a driver this host lacks)."""

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> bytes:
        return (U0, U1)[h].encode()

    def nvmlDeviceGetName(self, h: int) -> str:
        return H100


def test_gpus_are_read_by_index_uuid_and_name() -> None:
    assert gpumap.read_gpus(_Nvml()) == HOST[:2]


def test_the_api_struct_carries_the_pairs_and_the_binary_the_flag() -> None:
    assert ctypes.sizeof(cuda._RestoreArgs) == 64
    args, pairs = cuda.restore_args(DeviceMap(((U0, U1),)))
    assert pairs is not None and args.gpuPairsCount == 1
    assert bytes(args.gpuPairs[0].oldUuid) == bytes.fromhex(U0[4:].replace("-", ""))
    assert bytes(args.gpuPairs[0].newUuid) == bytes.fromhex(U1[4:].replace("-", ""))
    empty, none = cuda.restore_args(cuda.IN_PLACE)
    assert none is None and empty.gpuPairsCount == 0 and not empty.gpuPairs
    with pytest.raises(InvalidArgument, match="is not a GPU UUID"):
        cuda.uuid_bytes("GPU-nothex")
    m = DeviceMap(((U0, U1),))
    assert binary_action_argv("cc", "restore", 42, 0, m) == [
        "cc", "--action", "restore", "--pid", "42", "--device-map", f"{U0}={U1}"]
    assert "--device-map" not in binary_action_argv("cc", "unlock", 42, 0, m)


async def test_the_map_reaches_every_restore_and_a_rollback_restores_in_place() -> None:
    m = DeviceMap(((U0, U1),))
    drv = InMemoryDriver({7: ProcessState.CHECKPOINTED, 8: ProcessState.CHECKPOINTED}, set())
    await drv.restore_and_unlock([7, 8], m)
    assert drv.maps == {7: m, 8: m} and drv.table == {7: ProcessState.RUNNING,
                                                      8: ProcessState.RUNNING}
    # a failed suspend rolls back through restore: onto the same GPUs
    drv = InMemoryDriver({7: ProcessState.RUNNING, 8: ProcessState.RUNNING},
                         {("checkpoint", 8)})
    with pytest.raises(CudaFailed, match="returned to the CUDA state it started in"):
        await drv.lock_and_checkpoint([7, 8])
    assert drv.maps == {7: cuda.IN_PLACE}


async def test_the_plugin_and_no_cuda_refuse_a_map() -> None:
    for c in (cuda.NoCudaCheckpointer(), cuda.PluginCheckpointer()):
        await c.restore_and_unlock([1], cuda.IN_PLACE)
        with pytest.raises(Unsupported, match="cannot restore CUDA state onto other GPUs"):
            await c.restore_and_unlock([1], DeviceMap(((U0, U1),)))


# ------------------------------------------------------------------ through llmuxd


@pytest.fixture
def llmuxd_api(private_bus: PrivateBus, tmp_path: Path) -> Iterator[Llmuxd]:
    if not criu_usable():
        pytest.skip("llmuxd needs root and CRIU")
    with running_llmuxd(private_bus, tmp_path, cuda_mode="api") as daemon:
        yield daemon


@pytest.mark.dbus
def test_resume_and_restore_on_other_gpus_are_refused_by_name(llmuxd: Llmuxd) -> None:
    """cuda_mode off: no way to remap; the refusal comes before anything is claimed."""
    import os

    message = llmuxd.expect_error("org.llmux.Error.Unsupported", "Resume", "sua{sv}", "m",
                                  os.getpid(), 1, "gpu_map", "a{uu}", 1, 0, 1)
    assert "CUDA mode api or binary" in message
    # Restore reads the checkpoint first: one without CUDA state has nothing to remap
    llmuxd.expect_error("org.llmux.Error.NotFound", "Restore", "sa{sv}", "m",
                        1, "gpu_map", "a{uu}", 1, 0, 1)
    assert "a{uu}" in llmuxd.expect_error("org.llmux.Error.InvalidArgument", "Resume",
                                          "sua{sv}", "m", os.getpid(), 1, "gpu_map", "u", 1)


@pytest.mark.dbus
def test_without_a_driver_the_api_mode_refuses_by_driver(llmuxd_api: Llmuxd) -> None:
    if cuda.driver_version():
        pytest.skip("this host has an NVIDIA driver: the GPU tier checks the real remap")
    import os

    message = llmuxd_api.expect_error("org.llmux.Error.Unsupported", "Resume", "sua{sv}", "m",
                                      os.getpid(), 1, "gpu_map", "a{uu}", 1, 0, 1)
    assert "needs NVIDIA driver 580 or later" in message and "this host has none" in message
