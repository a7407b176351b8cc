"""The cross-container flow with real vLLM: checkpoint in container A, restore in B and C.

llmuxd on the host (CRIU 4.2), `llmux serve` in podman containers with the README's flags
(host PID/network/IPC namespaces, no --privileged), real vLLM (CPU) as the engine with
`retain+checkpoint`. The vLLM tree (API server on uvloop, EngineCore, worker, resource
tracker; ZMQ ipc sockets in the container's /tmp; psm_* segments in /dev/shm) comes back in
another container, in a fresh PID namespace (new host PIDs, the same ones inside it), with the
same greedy answer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from llmux.service.core.pidns import inner_pids
from tests.support.podman_shim import MODEL, Reaper, ShimContainer, ShimFactory
from tests.support.procs import pid_alive, wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.podman, pytest.mark.criu, pytest.mark.dbus]

Llmuxd = Any


def gone(pids: list[int]) -> bool:
    return not any(pid_alive(p) for p in pids)


def listed(daemon: Llmuxd) -> list[str]:
    call = daemon.busctl("--json=short", "call", "org.llmux.Host1", "/org/llmux/Host1",
                         "org.llmux.Host1", "ListCheckpoints")
    assert call.rc == 0, f"ListCheckpoints failed: {call.error_name} {call.error_message}"
    return [str(e[0]) for e in json.loads(call.stdout)["data"][0]]


def sleep(shim: ShimContainer, daemon: Llmuxd, pids: list[int]) -> None:
    body = shim.control("sleep")
    assert body["state"] == "checkpointed", f"{body}\n{shim.status()}\n{shim.logs()}"
    wait_until(lambda: gone(pids), 60, f"the vLLM tree {pids} to be gone after the dump")
    assert MODEL in listed(daemon)


def restored(shim: ShimContainer, inner: list[int], first: str) -> list[int]:
    """Restored into a fresh PID namespace: the same PIDs inside it (``inner``), new host
    PIDs (returned)."""
    assert shim.answer() == first
    status = shim.model_status()
    assert status["state"] == "running" and status["last_wake"] == "restore", (
        f"{status}\n{shim.logs()}")
    pids = list(status["pids"])
    assert sorted(inner_pids(pids)) == sorted(inner), (pids, inner_pids(pids), inner)
    shim_cgroups = Path(f"/proc/{shim.shim_pid}/cgroup").read_text()
    for pid in pids:
        assert Path(f"/proc/{pid}/cgroup").read_text() == shim_cgroups, (
            f"restored PID {pid} is not in {shim.name}'s cgroups")
    return pids


def test_real_vllm_checkpoint_in_a_restores_in_b_and_c(
        llmuxd: Llmuxd, podman_rootfs: str, reaper: Reaper, vllm_bed: Any, tmp_path: Path) -> None:
    bus_dir = Path(llmuxd.bus.socket_path).parent
    model = vllm_bed.model("alpha", 0, "retain+checkpoint", "")
    model.pop("port")
    model["env"] = {"HF_HUB_OFFLINE": "1"}
    shims = ShimFactory(
        rootfs=podman_rootfs, bus_dir=bus_dir,
        bus_address_in=f"unix:path=/run/llmux-bus/{Path(llmuxd.bus.socket_path).name}",
        workdir=tmp_path / "shared", model=model,
        top={"vllm_command": str(vllm_bed.vllm)})
    try:
        a = shims.start("a")
        first = a.answer()
        status = a.model_status()
        assert status["state"] == "running" and status["last_wake"] == "cold", status
        pids = list(status["pids"])
        assert len(pids) >= 3, pids
        reaper.watch(pids)
        host_ns = os.readlink("/proc/self/ns/mnt")
        assert all(os.readlink(f"/proc/{p}/ns/mnt") != host_ns for p in pids)
        inner = inner_pids(pids)
        assert inner[0] == 1 and 2 in inner, f"vLLM is not in a PID namespace of its own: {inner}"

        sleep(a, llmuxd, pids)
        a.stop()
        a.remove()

        # B: the checkpoint is found at start-up and restored on wake
        b = shims.start("b")
        assert b.model_status()["state"] == "checkpointed"
        pids = restored(b, inner, first)

        # a restart of llmuxd between sleep and wake; this dump is of a restored tree, whose
        # mount namespace (and its /dev/shm bind) ends with it: its segments are carried too
        sleep(b, llmuxd, pids)
        manifest = json.loads((llmuxd.state_dir / MODEL / "manifest.json").read_text())
        shm = [f["path"] for f in manifest["files"] if f["reason"] == "dev-shm"]
        assert any(Path(p).name.startswith("psm_") for p in shm), manifest["files"]
        assert not [p for p in shm if Path(p).exists()], "segments left in /dev/shm"
        llmuxd.stop()
        llmuxd.start()
        assert MODEL in listed(llmuxd)
        pids = restored(b, inner, first)

        # B killed: the restored engine dies with its container
        b.kill()
        wait_until(lambda: gone(pids), 60, "the restored vLLM tree to die with container B")
        b.remove()

        # C restores the kept checkpoint on its first request
        c = shims.start("c")
        assert c.model_status()["state"] == "checkpointed"
        restored(c, inner, first)
    finally:
        leftovers = shims.cleanup()
        assert not leftovers, f"processes left after the containers were removed: {leftovers}"
