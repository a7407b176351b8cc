"""Cross-container restore end to end: a model checkpointed in container A comes
back, warm, in container B, then C, with llmuxd on the host doing CRIU's part.

Real parts only: a private dbus-daemon with the project's policy, llmuxd (CRIU 4.2, no
CUDA), podman + runc containers started with the README's flags (host PID/network/IPC
namespaces, no --privileged, no --init), `llmux serve` inside with the built-in engine as
model qwen3-0.6b (eviction discard + checkpoint), HTTP on loopback, busctl.

The built-in engine has both traits behind "ZMQ IPC hangs after a cross-container
restore": its ZMQ ipc sockets are in /tmp and it keeps a JIT log open
under ~/.cache, both only in the container's writable layer; the test checks that the
checkpoint carried them, that the restored tree is adopted by the new shim (same PIDs,
watched through pidfds, never killed as a stray) and that it lives in the new container's
cgroups, so that it dies with it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from llmux.service.core.container import ContainerContext
from llmux.service.core.pidns import inner_pids
from tests.support.llmuxd_harness import Llmuxd
from tests.support.podman_shim import (
    MODEL,
    Reaper,
    ShimContainer,
    ShimFactory,
    pidfd_targets,
    read_cgroups,
)
from tests.support.procs import pid_alive, processes_tagged, wait_until

pytestmark = [pytest.mark.podman, pytest.mark.criu, pytest.mark.dbus]

SLEEP_WAKE_ROUNDS = 3


# ------------------------------------------------------------------------------- helpers


def listed_checkpoints(daemon: Llmuxd) -> list[str]:
    """Model names `busctl ... ListCheckpoints` answers, as an operator would ask."""
    call = daemon.busctl("--json=short", "call", "org.llmux.Host1", "/org/llmux/Host1",
                         "org.llmux.Host1", "ListCheckpoints")
    assert call.rc == 0, f"ListCheckpoints failed: {call.error_name} {call.error_message}"
    return [str(entry[0]) for entry in json.loads(call.stdout)["data"][0]]


def manifest_of(daemon: Llmuxd) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((daemon.state_dir / MODEL / "manifest.json").read_text())
    return data


def gone(pids: list[int]) -> bool:
    return not any(pid_alive(p) for p in pids)


def upperdir_of(pid: int) -> str:
    ctx = ContainerContext.from_pid(pid)
    assert ctx.foreign and ctx.overlay is not None, f"PID {pid} is not in an overlay container"
    return str(ctx.overlay.upperdir)


def engine_log(pid: int) -> str:
    """The engine's stdout log (its fd 1), read from the host."""
    return Path(f"/proc/{pid}/fd/1").read_text(errors="replace")


def cold_start(shim: ShimContainer, reaper: Reaper) -> tuple[str, list[int]]:
    """Step 2: a chat completion cold-starts the model; (answer, engine PIDs)."""
    text = shim.answer()
    status = shim.model_status()
    assert status["state"] == "running" and status["last_wake"] == "cold", status
    pids = list(status["pids"])
    assert len(pids) >= 2, f"the built-in engine is an API server plus an engine core: {pids}"
    reaper.watch(pids)
    return text, pids


def check_in_container(shim: ShimContainer, pids: list[int]) -> None:
    """The engine tree lives in the shim's container: its writable layer and its cgroups,
    a mount namespace that is not the host's."""
    host_ns = os.readlink("/proc/self/ns/mnt")
    shim_cgroups = read_cgroups(shim.shim_pid)
    assert any(shim.cid in path for path in shim_cgroups.values()), shim_cgroups
    upper = upperdir_of(shim.shim_pid)
    for pid in pids:
        assert os.readlink(f"/proc/{pid}/ns/mnt") != host_ns, f"PID {pid} is in the host's mntns"
        assert read_cgroups(pid) == shim_cgroups, (
            f"PID {pid} is not in container {shim.name}'s cgroups: {read_cgroups(pid)} vs "
            f"{shim_cgroups}")
        assert upperdir_of(pid) == upper, f"PID {pid} is not on {shim.name}'s writable layer"


def sleep_checkpoint(shim: ShimContainer, daemon: Llmuxd, pids: list[int]) -> None:
    """Step 3: weights discarded, tree dumped by llmuxd, engine processes gone, listed."""
    body = shim.control("sleep")
    assert body["state"] == "checkpointed", f"{body}\n{shim.logs()}"
    assert body["strategy"] == "discard+checkpoint", body
    status = shim.model_status()
    assert status["state"] == "checkpointed" and status["pids"] == [], status
    wait_until(lambda: gone(pids), 30, f"the engine's processes {pids} to be gone")
    assert MODEL in listed_checkpoints(daemon)
    manifest = manifest_of(daemon)
    assert sorted(manifest["pids"]) == sorted(pids), manifest["pids"]


def wake_restore(shim: ShimContainer, inner: list[int], *, via: str = "control") -> list[int]:
    """Step 5: restored (not cold-started) into a fresh PID namespace: new host PIDs, the
    same PIDs inside it (``inner``); adopted by this shim, in this container, weights
    reloaded through the engine's ZMQ channel. Returns the restored tree's host PIDs."""
    if via == "control":
        body = shim.control("wake")
        assert body["state"] == "running", body
        assert body["wake"] == "restore", f"{body}\n{shim.model_status()}\n{shim.logs()}"
    status = shim.model_status()
    assert status["state"] == "running", status
    assert status["last_wake"] == "restore", f"{status}\n{shim.logs()}"
    pids = list(status["pids"])
    assert sorted(inner_pids(pids)) == sorted(inner), (pids, inner_pids(pids), inner)
    # adopted: the shim watches the restored tree through pidfds (a non-child it neither
    # reaps nor treats as a stray)
    held = pidfd_targets(shim.shim_pid)
    assert set(pids) <= held, f"shim {shim.shim_pid} holds pidfds for {held}, not {pids}"
    check_in_container(shim, pids)
    # the engine's API server reaches its core over ZMQ: state from the core, weights back
    r = shim.engine("GET", "/engine_state")
    assert r.status_code == 200, r.text
    state = r.json()
    assert state["pid_core"] in inner, state
    assert state["weights"] == "device" and not state["sleeping"], state
    log = engine_log(pids[0])
    asleep = log.rfind("Engine asleep at level 2")
    assert asleep >= 0, "the engine never discarded its weights (sleep level 2)"
    assert log.find("Weights reloaded from", asleep) > asleep, (
        "no reload_weights after the last sleep:\n" + log[-3000:])
    return pids


# ------------------------------------------------------------------------------- the flow


def test_checkpoint_in_a_restores_in_b_and_c(
    llmuxd: Llmuxd, shims: ShimFactory, reaper: Reaper
) -> None:
    # 1-2: container A, cold start, a valid answer
    a = shims.start("a")
    assert a.model_status()["state"] == "stopped"
    first, pids = cold_start(a, reaper)
    check_in_container(a, pids)
    inner = inner_pids(pids)
    assert inner[0] == 1, f"the tree's root is not the init of its PID namespace: {inner}"
    core_pid = a.engine("GET", "/engine_state").json()["pid_core"]
    jit_log = a.engine("GET", "/engine_state").json()["jit_log"]
    a_upper = Path(upperdir_of(a.shim_pid))
    assert (a_upper / jit_log.lstrip("/")).is_file(), f"{jit_log} is not in A's writable layer"

    # 3: sleep -> checkpointed by llmuxd, processes gone, listed by busctl
    sleep_checkpoint(a, llmuxd, pids)
    # the files only A's writable layer had were carried in the checkpoint
    saved = {f["path"]: f for f in manifest_of(llmuxd)["files"]}
    assert jit_log in saved and saved[jit_log]["reason"] == "upper", sorted(saved)
    assert "/tmp" in saved, f"the ipc socket directory was not carried: {sorted(saved)}"
    assert manifest_of(llmuxd)["foreign_mntns"] is True

    # 4: A stopped and removed (its writable layer with it); B from the same rootfs
    a.stop()
    a.remove()
    assert not a_upper.exists(), f"A's writable layer {a_upper} outlived it"
    b = shims.start("b")
    in_b = Path(f"/proc/{b.shim_pid}/root") / jit_log.lstrip("/")
    a_line = f"engine core pid {core_pid} starting"
    assert not in_b.exists() or a_line not in in_b.read_text(), "B started with A's JIT log"
    assert b.model_status()["state"] == "checkpointed", "the shim did not find the checkpoint"

    # 5-6: wake -> restored into a fresh PID namespace, same answer
    pids = wake_restore(b, inner)
    assert b.engine("GET", "/engine_state").json()["pid_core"] == core_pid
    assert b.answer() == first

    # 7: sleep/wake several times in B
    for _ in range(SLEEP_WAKE_ROUNDS):
        sleep_checkpoint(b, llmuxd, pids)
        pids = wake_restore(b, inner)
        assert b.answer() == first

    # 7: a restart of llmuxd between sleep and wake: the checkpoint survives it
    sleep_checkpoint(b, llmuxd, pids)
    llmuxd.stop()
    llmuxd.start()
    assert MODEL in listed_checkpoints(llmuxd)
    pids = wake_restore(b, inner)
    assert b.answer() == first
    # the restored tree keeps running, adopted, across requests (no stray-kill)
    time.sleep(1)
    assert not gone(pids) and sorted(b.model_status()["pids"]) == sorted(pids)

    # 8: B ends (SIGKILL: the shim cannot stop anything) while its restored engine runs:
    # the engine dies with B's cgroups, no process is left behind
    b.kill()
    wait_until(lambda: gone(pids), 60, f"the restored engine {pids} to die with container B")
    b.remove()
    assert processes_tagged(shims.tag) == []

    # 7/8: B -> C: the kept images restore into C, lazily on the first request
    assert MODEL in listed_checkpoints(llmuxd)
    c = shims.start("c")
    assert c.model_status()["state"] == "checkpointed"
    assert c.answer() == first
    pids = wake_restore(c, inner, via="request")

    # and C can hand it on again
    sleep_checkpoint(c, llmuxd, pids)
    wake_restore(c, inner)
    assert c.answer() == first


# --------------------------------------------------------------------- a foreign manifest


@pytest.mark.parametrize("field", ["kernel_release", "rootfs"])
def test_mismatched_manifest_is_refused_and_kept(
    llmuxd: Llmuxd, shims: ShimFactory, reaper: Reaper, field: str
) -> None:
    a = shims.start("a")
    first, pids = cold_start(a, reaper)
    sleep_checkpoint(a, llmuxd, pids)
    a.stop()
    a.remove()

    # the checkpoint now claims another kernel, or another image
    path = llmuxd.state_dir / MODEL / "manifest.json"
    manifest = json.loads(path.read_text())
    if field == "kernel_release":
        manifest["kernel_release"] = "0.0.1-other"
        expect = "0.0.1-other"
    else:
        manifest["rootfs"] = {"kind": "overlay", "lowerdirs": ["/var/lib/other-image"]}
        expect = "another image"
    path.write_text(json.dumps(manifest))
    llmuxd.stop()
    llmuxd.start()  # manifests are read at start-up

    b = shims.start("b")
    assert b.model_status()["state"] == "checkpointed"
    # the first request tries the restore, is refused, and falls back to a cold start
    assert b.answer() == first
    status = b.model_status()
    assert status["state"] == "running" and status["last_wake"] == "cold", status
    assert not set(status["pids"]) & set(pids), "a cold start got the checkpoint's PIDs"
    error = status["last_error"] or ""
    assert "org.llmux.Error.ManifestMismatch" in error and expect in error, status
    # kept for inspection
    assert MODEL in listed_checkpoints(llmuxd)
    assert json.loads(path.read_text())[field] == manifest[field]
    assert any((llmuxd.state_dir / MODEL / "images").iterdir())
