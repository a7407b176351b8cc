"""A checkpoint restores into any free PIDs: the engine's tree has a PID namespace of its
own (llmux.shim.pidns), which CRIU restores afresh.

Every host PID the checkpointed tree had is held by another process (the host's
ns_last_pid written, then a fork) before the next container wakes the model: the model is
restored, not cold-started, answers the same, and the holders keep their PIDs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from llmux.common.contract import BUS_NAME, CHECKPOINT_INTERFACE, checkpoint_path
from llmux.common.resources import connected_ports
from llmux.service.core.criu import usable_network_locks
from llmux.service.core.pidns import inner_pids, owns_network
from tests.support.llmuxd_harness import CRIU, Llmuxd
from tests.support.podman_shim import MODEL, Reaper, ShimFactory
from tests.support.procs import hold_pid, wait_until

pytestmark = [pytest.mark.podman, pytest.mark.criu, pytest.mark.dbus]


def test_restore_while_every_pid_of_the_tree_is_held(
    llmuxd: Llmuxd, shims: ShimFactory, reaper: Reaper
) -> None:
    a = shims.start("a")
    first = a.answer()
    status = a.model_status()
    pids = list(status["pids"])
    reaper.watch(pids)
    inner = inner_pids(pids)
    assert inner[0] == 1 and 2 in inner, f"not in a PID namespace of its own: {inner}"
    assert a.control("sleep")["state"] == "checkpointed"
    manifest = json.loads((llmuxd.state_dir / MODEL / "manifest.json").read_text())
    assert manifest["pid_namespace"] is True and sorted(manifest["pids"]) == sorted(pids)
    a.stop()
    a.remove()

    holders: list[subprocess.Popen[bytes]] = []
    try:
        for pid in manifest["pids"]:
            wait_until(lambda p=pid: not _exists(p), 30, f"PID {pid} to be free")
            held = hold_pid(pid)
            if held is None:
                pytest.skip(f"could not place a process on PID {pid} (busy machine)")
            holders.append(held)
        b = shims.start("b")
        assert b.answer() == first
        woke = b.model_status()
        assert woke["last_wake"] == "restore", f"{woke}\n{b.logs()}"
        assert not set(woke["pids"]) & set(manifest["pids"]), woke["pids"]
        assert sorted(inner_pids(woke["pids"])) == sorted(manifest["inner_pids"])
        assert all(h.poll() is None for h in holders), "a holder lost its PID"
        # the checkpoint (kept) counts the live tree restored from it, until it ends
        assert live_trees(llmuxd) == 1
        b.remove()
        wait_until(lambda: live_trees(llmuxd) == 0, 30, "the restored tree to be counted out")
    finally:
        for h in holders:
            h.kill()
            h.wait()


def _forwarder_of(init: int) -> int:
    """The init's child that is not the engine (PID 2 inside): its socket forwarder."""
    children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
    others = [int(c) for c in children if inner_pids([int(c)])[0] != 2]
    return others[0] if others else 0


def live_trees(daemon: Llmuxd) -> int:
    """The checkpoint's LiveTrees property, as `busctl get-property` reads it."""
    got = daemon.busctl("--json=short", "get-property", BUS_NAME, checkpoint_path(MODEL),
                        CHECKPOINT_INTERFACE, "LiveTrees")
    assert got.rc == 0, f"get-property failed: {got.error_name} {got.error_message}"
    return int(json.loads(got.stdout)["data"])


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat"):
            return True
    except FileNotFoundError:
        return False


def test_a_tree_with_open_tcp_connections_restores_in_its_own_network(
    llmuxd: Llmuxd, podman_rootfs: str, reaper: Reaper, tmp_path: Path
) -> None:
    """The built-in engine's torch backend keeps TCP connections open across the dump (its
    torch.distributed links). Its tree has a network namespace of its own (owned by its
    user namespace), so CRIU restores them by TCP repair there; the shim reaches the
    engine through the tree's unix socket, before and after."""
    shims = ShimFactory(
        rootfs=podman_rootfs, bus_dir=Path(llmuxd.bus.socket_path).parent,
        bus_address_in=f"unix:path=/run/llmux-bus/{Path(llmuxd.bus.socket_path).name}",
        workdir=tmp_path / "shared", backend="torch")
    try:
        a = shims.start("a")
        first = a.answer()
        pids = list(a.model_status()["pids"])
        reaper.watch(pids)
        assert inner_pids(pids)[0] == 1
        assert owns_network(pids[0]), "the tree has no network of its own"
        connected = connected_ports(pids)
        assert connected, "the torch backend holds no TCP connection: nothing is tested"
        body = a.control("sleep")
        assert body["state"] == "checkpointed", f"{body}\n{a.logs()}"
        manifest = json.loads((llmuxd.state_dir / MODEL / "manifest.json").read_text())
        assert manifest["net_namespace"] is True
        # locked by the fastest method this host has (nftables where CRIU and the kernel
        # can), recorded for the restore, which must undo the same
        assert manifest["network_lock"] == asyncio.run(usable_network_locks(CRIU))[0]
        assert a.answer() == first
        woke = a.model_status()
        assert woke["last_wake"] == "restore", f"{woke}\n{a.logs()}"
        assert connected_ports(list(woke["pids"])), "the torch links did not come back"
        assert a.answer() == first
        # the forwarder (the init's child beside the engine) ended: the init starts another
        init = woke["pids"][0]
        forwarder = _forwarder_of(init)
        os.kill(forwarder, signal.SIGKILL)
        wait_until(lambda: _forwarder_of(init) not in (0, forwarder), 30, "a new forwarder")
        assert a.answer() == first
        assert a.model_status()["last_wake"] == "restore", "the engine itself was restarted"
    finally:
        leftovers = shims.cleanup()
        assert not leftovers, leftovers


def test_a_tree_on_the_containers_network_with_tcp_connections_is_refused_by_name(
    llmuxd: Llmuxd, podman_rootfs: str, reaper: Reaper, tmp_path: Path
) -> None:
    """The same engine in a PID namespace of its own but on the container's network
    (LLMUX_NET_NAMESPACE=0): CRIU could dump its links but not restore them there (TCP
    repair needs CAP_NET_ADMIN over that network). Refused before CRIU runs, naming the
    ports; the model is stopped, nothing is lost."""
    shims = ShimFactory(
        rootfs=podman_rootfs, bus_dir=Path(llmuxd.bus.socket_path).parent,
        bus_address_in=f"unix:path=/run/llmux-bus/{Path(llmuxd.bus.socket_path).name}",
        workdir=tmp_path / "shared", backend="torch",
        engine_env={"LLMUX_NET_NAMESPACE": "0"})
    try:
        a = shims.start("a")
        first = a.answer()
        pids = list(a.model_status()["pids"])
        reaper.watch(pids)
        assert inner_pids(pids)[0] == 1 and not owns_network(pids[0])
        body = a.control("sleep")
        assert body["state"] == "stopped", body
        error = a.model_status()["last_error"] or ""
        assert "org.llmux.Error.Unsupported" in error, error
        assert "open TCP connections" in error and "not a network of its own" in error
        assert "LLMUX_NET_NAMESPACE=0" in error, error
        assert MODEL not in [p.name for p in llmuxd.state_dir.iterdir()]
        assert a.answer() == first  # started again, the same answer
    finally:
        leftovers = shims.cleanup()
        assert not leftovers, leftovers


def test_a_checkpoint_restores_under_the_network_lock_of_its_dump(
    llmuxd: Llmuxd, podman_rootfs: str, reaper: Reaper, tmp_path: Path
) -> None:
    """A checkpoint dumped under CRIU's iptables lock (an older llmuxd, or network_lock =
    "iptables") restores under an llmuxd that now picks its method itself (nftables here):
    CRIU unlocks it by the method in its images, its TCP links come back, no CRIU rule is
    left in its network (a lock left in place drops the forwarder's loopback traffic: no
    answer), and it answers the same."""
    config = llmuxd.workdir / "llmuxd.toml"
    shims = ShimFactory(
        rootfs=podman_rootfs, bus_dir=Path(llmuxd.bus.socket_path).parent,
        bus_address_in=f"unix:path=/run/llmux-bus/{Path(llmuxd.bus.socket_path).name}",
        workdir=tmp_path / "shared", backend="torch")
    try:
        llmuxd.stop()
        config.write_text('network_lock = "iptables"\n')
        llmuxd.start()
        a = shims.start("a")
        first = a.answer()
        reaper.watch(list(a.model_status()["pids"]))
        body = a.control("sleep")
        assert body["state"] == "checkpointed", f"{body}\n{a.logs()}"
        manifest = json.loads((llmuxd.state_dir / MODEL / "manifest.json").read_text())
        assert manifest["network_lock"] == "iptables" and manifest["net_namespace"] is True
        llmuxd.stop()
        config.write_text("")  # auto: the fastest method this host has
        llmuxd.start()
        assert a.answer() == first
        woke = a.model_status()
        assert woke["last_wake"] == "restore", f"{woke}\n{a.logs()}\n{llmuxd.log()}"
        pids = list(woke["pids"])
        assert connected_ports(pids), "the torch links did not come back"
        rules = subprocess.run(["nsenter", "-t", str(pids[0]), "-n", "iptables-save"],
                               capture_output=True, text=True, check=True).stdout
        assert "CRIU" not in rules, rules
        assert a.answer() == first
    finally:
        leftovers = shims.cleanup()
        assert not leftovers, leftovers
