"""The shim's host strategies carried out by llmuxd over a private D-Bus: the acceptance
"a request for model B checkpoints model A; a later request for A restores it instead of
cold-starting it", plus the control API's sleep/wake of A and cuda_suspend without a GPU.

Real parts throughout: dbus-daemon with the project's policy, llmuxd (--cuda-mode off) with
CRIU 4.2, `llmux serve` with two built-in engines, HTTP on loopback.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.support.llmuxd_harness import Llmuxd
from tests.support.procs import free_port, pid_alive, wait_until
from tests.support.shimproc import Shim

pytestmark = [pytest.mark.criu, pytest.mark.dbus]

A, B = "alpha", "beta"


def checkpoints(daemon: Llmuxd) -> list[str]:
    """Model names llmuxd lists (busctl, as an operator would ask)."""
    call = daemon.busctl("--json=short", "call", "org.llmux.Host1", "/org/llmux/Host1",
                         "org.llmux.Host1", "ListCheckpoints")
    assert call.rc == 0, f"ListCheckpoints failed: {call.error_name} {call.error_message}"
    data: dict[str, Any] = json.loads(call.stdout)
    return [str(entry[0]) for entry in data["data"][0]]


def gone(pids: list[int]) -> bool:
    return not any(pid_alive(p) for p in pids)


def cold_start_a(llmuxd: Llmuxd, start_shim: Any, eviction: str) -> tuple[Shim, str, list[int]]:
    """A shim on llmuxd with A (evicted by ``eviction``) and B (retain+stop), A cold-started:
    the shim, A's first answer and its PIDs."""
    shim = start_shim(llmuxd.bus.address, {A: eviction, B: "retain+stop"})
    first = shim.text(A)
    status = shim.model_status(A)
    assert status["state"] == "running", status
    assert status["last_wake"] == "cold", status
    pids = list(status["pids"])
    assert len(pids) >= 2, f"the built-in engine is an API server plus an engine core: {pids}"
    return shim, first, pids


def test_request_for_b_checkpoints_a_and_a_is_restored(
    llmuxd: Llmuxd, start_shim: Any
) -> None:
    shim, first, pids = cold_start_a(llmuxd, start_shim, "discard+checkpoint")

    # B's request makes the switcher evict A through llmuxd
    shim.text(B)
    status = shim.status()
    assert status["active"] == B
    a = status["models"][A]
    assert a["state"] == "checkpointed", f"{a}\n{shim.log()[-4000:]}"
    assert a["pids"] == []
    assert A in checkpoints(llmuxd)
    wait_until(lambda: gone(pids), 30, f"A's processes {pids} to be gone after the dump")
    assert (llmuxd.state_dir / A / "manifest.json").is_file()

    # A's request restores it: same PIDs, same answer, not a cold start
    again = shim.text(A)
    a = shim.model_status(A)
    assert a["state"] == "running", a
    assert a["last_wake"] == "restore", f"{a}\n{shim.log()[-4000:]}"
    assert sorted(a["pids"]) == sorted(pids)
    assert again == first
    assert shim.model_status(B)["state"] == "stopped"

    # and the cycle repeats: the restored tree is checkpointed again, then restored again
    shim.text(B)
    assert shim.model_status(A)["state"] == "checkpointed"
    assert shim.text(A) == first
    a = shim.model_status(A)
    assert a["last_wake"] == "restore" and sorted(a["pids"]) == sorted(pids), a


def test_a_restored_tree_of_a_killed_shim_is_ended_by_the_next_one(
    llmuxd: Llmuxd, start_shim: Any
) -> None:
    """A tree llmuxd restored is no child of the shim (in a container it also lives in a
    mount namespace of its own: tests/e2e): a SIGKILLed shim leaves it holding A's port.
    The next shim ends it before it serves, and A answers as before."""
    shim, first, pids = cold_start_a(llmuxd, start_shim, "discard+checkpoint")
    shim.text(B)
    assert shim.text(A) == first
    a = shim.model_status(A)
    assert a["last_wake"] == "restore" and sorted(a["pids"]) == sorted(pids), a

    shim.proc.kill()
    shim.proc.wait(30)
    assert all(pid_alive(p) for p in pids), "the restored tree should outlive the shim"

    second = start_shim(same_as=shim)
    wait_until(lambda: gone(pids), 30, f"the restored tree {pids} to be ended")
    assert "an earlier shim left running" in second.log()
    assert second.text(A) == first, second.log()[-4000:]
    assert second.model_status(A)["state"] == "running"


def test_a_checkpoint_taken_on_another_engine_port_is_refused_and_kept(
    llmuxd: Llmuxd, start_shim: Any
) -> None:
    """A shim whose config moved A to another engine port finds A's checkpoint: restoring it
    would bring back an engine listening on the old port, where this shim does not look.
    The wake is refused before llmuxd restores anything, names both ports, starts A cold
    instead, and llmuxd keeps the checkpoint."""
    shim, first, pids = cold_start_a(llmuxd, start_shim, "discard+checkpoint")
    slept = shim.control("sleep", {"model": A})
    assert slept.status_code == 200 and slept.json()["state"] == "checkpointed", slept.text
    wait_until(lambda: gone(pids), 30, f"A's processes {pids} to be gone after the dump")
    shim.proc.terminate()
    shim.proc.wait(30)

    old_port = int(tomllib.loads(shim.config_path.read_text())["models"][A]["port"])
    new_port = free_port()
    second = start_shim(same_as=shim,
                        edit=lambda config: config["models"][A].update(port=new_port))
    assert second.model_status(A)["state"] == "checkpointed", second.model_status(A)
    assert second.text(A) == first
    a = second.model_status(A)
    assert a["state"] == "running" and a["last_wake"] == "cold", a
    assert f"port(s) [{old_port}]" in a["last_error"], a
    assert f"port {new_port}" in a["last_error"], a
    assert A in checkpoints(llmuxd), "the refused checkpoint was not kept"
    assert f"restored {A} " not in llmuxd.log(), "llmuxd restored the refused checkpoint"


def test_control_sleep_and_wake_checkpoint_a(llmuxd: Llmuxd, start_shim: Any) -> None:
    shim, first, pids = cold_start_a(llmuxd, start_shim, "discard+checkpoint")

    slept = shim.control("sleep", {"model": A})
    assert slept.status_code == 200, slept.text
    body = slept.json()
    assert body["state"] == "checkpointed", f"{body}\n{shim.log()[-4000:]}"
    assert body["strategy"] == "discard+checkpoint"
    assert A in checkpoints(llmuxd)
    wait_until(lambda: gone(pids), 30, f"A's processes {pids} to be gone after the dump")

    woke = shim.control("wake", {"model": A})
    assert woke.status_code == 200, woke.text
    body = woke.json()
    assert body["state"] == "running", body
    assert body["wake"] == "restore", f"{body}\n{shim.log()[-4000:]}"
    a = shim.model_status(A)
    assert a["last_wake"] == "restore" and sorted(a["pids"]) == sorted(pids), a
    assert shim.text(A) == first
    # the weights were discarded: their file was read ahead while the tree came back
    ahead = re.findall(rf"model={A} action=prefetch_weights files=(\d+) mib=(\d+)", shim.log())
    assert ahead and ahead[-1][0] == "1" and int(ahead[-1][1]) >= 8, shim.log()[-4000:]


def test_cuda_suspend_without_gpu_is_refused_and_escalates_to_stop(
    llmuxd: Llmuxd, start_shim: Any
) -> None:
    """llmuxd runs with --cuda-mode off and the engine holds no CUDA state: a suspend
    cannot free anything. The service says so with a named error, the lifecycle escalates
    the failed eviction to stop (the documented rule: a failed eviction frees the GPU by
    stopping), and the next request cold-starts the model."""
    shim, _, pids = cold_start_a(llmuxd, start_shim, "retain+cuda_suspend")

    slept = shim.control("sleep", {"model": A})
    assert slept.status_code == 200, slept.text
    a = shim.model_status(A)
    assert slept.json()["state"] == "stopped", (
        f"a cuda_suspend of an engine without CUDA state was reported as {slept.json()} "
        f"(status {a}); expected the service's named error and escalation to stop")
    error = a["last_error"] or ""
    assert "org.llmux.Error." in error and ("CudaFailed" in error or "Unsupported" in error), a
    wait_until(lambda: gone(pids), 30, f"A's processes {pids} to be stopped")

    shim.text(A)
    a = shim.model_status(A)
    assert a["state"] == "running" and a["last_wake"] == "cold", a
    assert not set(a["pids"]) & set(pids)


def test_cuda_suspend_on_switch_escalates_and_b_is_served(
    llmuxd: Llmuxd, start_shim: Any
) -> None:
    """The same through a request-driven switch: B is served, A ends stopped."""
    shim, _, pids = cold_start_a(llmuxd, start_shim, "offload+cuda_suspend")
    shim.text(B)
    a = shim.model_status(A)
    assert a["state"] == "stopped", f"{a}\n{shim.log()[-4000:]}"
    wait_until(lambda: gone(pids), 30, f"A's processes {pids} to be stopped")
    assert shim.model_status(B)["state"] == "running"


def test_llmuxd_state_dir_is_private(llmuxd: Llmuxd, start_shim: Any) -> None:
    """Checkpoint images are root-only (0700 directories, 0600 files)."""
    shim = start_shim(llmuxd.bus.address, {A: "discard+checkpoint", B: "retain+stop"})
    shim.text(A)
    shim.text(B)
    root: Path = llmuxd.state_dir / A
    assert root.is_dir()
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        if path.is_dir():
            assert mode == 0o700, f"{path}: {oct(mode)}"
        elif path.is_file():
            assert mode == 0o600, f"{path}: {oct(mode)}"
