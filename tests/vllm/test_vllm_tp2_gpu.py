"""Tensor parallelism of 2 through a CUDA checkpoint: real vLLM on two GPUs (needs them).

A TP=2 engine holds NCCL communicators between its two workers; the driver's checkpoint
must bring both processes' CUDA state back with them working. Suspended and resumed, then
checkpointed and restored, it gives the same answer. --enforce-eager and
--disable-custom-all-reduce are required for it (the config refuses TP>1 with a host
strategy without them). Skips, saying why, without two GPUs or a CUDA build of vLLM.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.test_placement_gpu import gpu_count, gpus_of
from tests.support.llmuxd_harness import PrivateBus, criu_usable, running_llmuxd
from tests.support.shimproc import Shim

pytestmark = [
    # gpu only: the vllm, criu and dbus tiers are required in CI, where this one skips
    pytest.mark.gpu,
    pytest.mark.skipif(gpu_count() < 2,
                       reason=f"TP=2 needs 2 GPUs of one host; NVML finds {gpu_count()}"),
]

TP2 = ["--tensor-parallel-size", "2", "--enforce-eager", "--disable-custom-all-reduce"]


@pytest.mark.parametrize("eviction", ["retain+cuda_suspend", "retain+checkpoint"])
def test_a_tp2_model_comes_back_with_the_same_answer(
        start_vllm_shim: Callable[..., Shim], private_bus: PrivateBus, tmp_path: Path,
        eviction: str) -> None:
    if not criu_usable():
        pytest.skip("llmuxd needs root and CRIU")
    with running_llmuxd(private_bus, tmp_path / "llmuxd", cuda_mode="api") as daemon:
        shim = start_vllm_shim({"alpha": eviction}, bus=daemon.bus.address,
                               extra={"alpha": {"extra_args": TP2}})
        status = shim.model_status("alpha")
        first = shim.text("alpha")
        status = shim.model_status("alpha")
        assert status["gpus"] == [0, 1]
        assert gpus_of(status["pids"]) == {0, 1}
        for _ in range(2):
            sleep = shim.control("sleep", {"model": "alpha"})
            assert sleep.status_code == 200, sleep.text
            assert shim.model_status("alpha")["state"] in ("suspended", "checkpointed")
            assert shim.text("alpha") == first
        assert gpus_of(shim.model_status("alpha")["pids"]) == {0, 1}
