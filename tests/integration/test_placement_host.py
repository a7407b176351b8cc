"""A checkpoint taken on one GPU slot restored on another, through llmuxd.

Two declared GPU slots (``gpus = 2``), built-in engines, llmuxd (--cuda-mode off) with CRIU
over a private D-Bus: the shim places the restore where room is cheapest and asks llmuxd to
move it (Restore's ``gpu_map``); a tree without CUDA state has nothing for the driver to
remap, so llmuxd restores it as it is. The driver's remap itself needs two GPUs:
tests/vllm/test_placement_gpu.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.llmuxd_harness import BUS_NAME, OBJECT_PATH, Llmuxd

pytestmark = [pytest.mark.criu, pytest.mark.dbus]

A, B, C = "alpha", "beta", "gamma"


def test_a_checkpoint_from_gpu_0_is_restored_on_gpu_1(llmuxd: Llmuxd, start_shim: Any) -> None:
    shim = start_shim(llmuxd.bus.address, {A: "discard+checkpoint", B: "retain+stop",
                                           C: "retain+stop"}, gpus=2)
    first = shim.text(A)
    shim.text(B)
    status = shim.status()
    assert status["active_models"] == [A, B]  # one model per GPU, both serving
    assert (status["models"][A]["gpus"], status["models"][B]["gpus"]) == ([0], [1])
    shim.text(C)  # A is the least recently used: checkpointed, C takes GPU 0
    assert shim.model_status(A)["state"] == "checkpointed"
    assert shim.model_status(C)["gpus"] == [0]
    shim.text(C)  # now B (GPU 1) is the least recently used
    again = shim.text(A)
    a = shim.model_status(A)
    assert a["state"] == "running" and a["last_wake"] == "restore", f"{a}\n{shim.log()[-3000:]}"
    assert a["gpus"] == [1], a
    assert again == first
    assert shim.model_status(B)["state"] == "stopped"
    assert shim.model_status(C)["state"] == "running"
    assert "action=move_gpus map={0: 1}" in shim.log()


def test_a_shim_started_afresh_knows_the_gpu_of_a_checkpoint(
        llmuxd: Llmuxd, start_shim: Any) -> None:
    """The GPUs of the CUDA state travel with the checkpoint (its Gpus): a new shim places
    the restore where the state is, instead of somewhere the driver would not put it."""
    shim = start_shim(llmuxd.bus.address, {A: "discard+checkpoint", B: "retain+stop",
                                           C: "retain+stop"}, gpus=2)
    shim.text(B)
    first = shim.text(A)
    assert (shim.model_status(B)["gpus"], shim.model_status(A)["gpus"]) == ([0], [1])
    shim.text(B)
    shim.text(C)  # A is the least recently used: checkpointed from GPU 1
    assert shim.model_status(A)["state"] == "checkpointed"
    listed = llmuxd.busctl("get-property", BUS_NAME, f"{OBJECT_PATH}/checkpoint/alpha",
                           f"{BUS_NAME}.Checkpoint", "Gpus")
    assert listed.stdout.split() == ["au", "1", "1"], listed.stderr
    assert shim.stop() == 0

    again = start_shim(same_as=shim)
    a = again.model_status(A)
    assert a["state"] == "checkpointed" and a["gpus"] == [1], a
    assert again.text(A) == first  # both GPUs free: it comes back where its state is
    a = again.model_status(A)
    assert a["last_wake"] == "restore" and a["gpus"] == [1], a
    assert "move_gpus" not in again.log()
