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

from tests.support.llmuxd_harness import Llmuxd

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
