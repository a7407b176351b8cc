"""Jobs for real: CRIU dumps and restores driven through llmuxd over D-Bus.

The targets are small Python processes started by the test (own session,
stdin /dev/null, counting into an O_APPEND log): a restored one goes on counting
from the number it had reached, under the same PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from llmux.common.proctree import tracer_of
from llmux.service.core.store import DISK_COPY
from tests.support.dbus_jobs import counts_on, no_half_checkpoints
from tests.support.llmuxd_harness import (
    BUS_NAME,
    OBJECT_PATH,
    Llmuxd,
    children_of,
    kill_pid,
    pid_state,
)
from tests.support.procs import pid_alive, wait_until

pytestmark = [pytest.mark.dbus, pytest.mark.criu]

JOB = "org.llmux.Host1.Job"
CHECKPOINT = "org.llmux.Host1.Checkpoint"


def test_busctl_alone_drives_checkpoint_restore_and_reads_progress(
    llmuxd: Llmuxd, spawn_counter
) -> None:
    """As root on the host busctl is the administrator: it may act on the test's process."""
    target = spawn_counter(megabytes=16)
    job_id, job_path = llmuxd.ok("Checkpoint", "sua{sv}", "m1", target.pid, 0)
    assert job_path == f"{OBJECT_PATH}/job/{job_id}"
    assert llmuxd.ok("WaitJob", "ud", job_id, 120) == ["done", "", ""]
    root = llmuxd.busctl(
        "--json=short",
        "get-property",
        BUS_NAME,
        f"{OBJECT_PATH}/checkpoint/m1",
        CHECKPOINT,
        "RootPid",
    )
    assert json.loads(root.stdout)["data"] == target.pid
    shape = llmuxd.busctl("introspect", BUS_NAME, f"{OBJECT_PATH}/checkpoint/m1")
    for member in (
        CHECKPOINT,
        ".Model",
        ".Owner",
        ".RootPid",
        ".Pids",
        ".Created",
        ".SizeBytes",
        ".DumpSeconds",
        ".CriuVersion",
        ".CudaPids",
        ".Manifest",
        ".ListenPorts",
        ".Storage",
        ".Problem",
    ):
        assert member in shape.stdout

    def storage() -> list[str]:
        got = llmuxd.busctl("--json=short", "get-property", BUS_NAME,
                            f"{OBJECT_PATH}/checkpoint/m1", CHECKPOINT, "Storage", "Problem")
        return [json.loads(line)["data"] for line in got.stdout.splitlines()]

    # the default memory tier holds the images; their durable copy is written behind
    assert storage()[0] in ("memory", "memory+disk")
    wait_until(lambda: storage() == ["memory+disk", ""], 60, "the copy to disk")
    ports = llmuxd.busctl("--json=short", "get-property", BUS_NAME,
                          f"{OBJECT_PATH}/checkpoint/m1", CHECKPOINT, "ListenPorts")
    assert json.loads(ports.stdout)["data"] == json.loads(
        (llmuxd.state_dir / "m1" / "manifest.json").read_text())["listen_ports"]
    reached = target.last()

    # The dumped process is our zombie until we reap it, so its PID is not free: the
    # restore job waits for it (up to 10 s) and busctl can watch it.
    job_id, job_path = llmuxd.ok("Restore", "sa{sv}", "m1", 0)
    props = llmuxd.busctl(
        "--json=short",
        "get-property",
        BUS_NAME,
        job_path,
        JOB,
        "Operation",
        "Model",
        "State",
        "Progress",
        "Bytes",
        "Rate",
    )
    operation, model, state, progress, done_bytes, rate = (
        json.loads(line)["data"] for line in props.stdout.splitlines()
    )
    assert (operation, model, state) == ("restore", "m1", "running")
    assert 0.0 <= progress < 1.0 and done_bytes >= 0 and rate >= 0.0
    shape = llmuxd.busctl("introspect", BUS_NAME, job_path)
    assert JOB in shape.stdout and ".Cancel" in shape.stdout and ".Progress" in shape.stdout
    assert llmuxd.notify is not None
    llmuxd.notify.wait_for(lambda line: line.startswith("STATUS=restoring m1:"))
    target.reap()
    assert llmuxd.ok("WaitJob", "ud", job_id, 120) == ["done", "", ""]
    assert pid_alive(target.pid)
    counts_on(target, reached)
    llmuxd.notify.wait_for(lambda line: line == "STATUS=idle; 1 checkpoint")
    assert llmuxd.ok("DeleteCheckpoint", "s", "m1") is None
    assert llmuxd.ok("ListCheckpoints") == [[]]


def test_cancel_keeps_the_checkpoint_and_the_state(llmuxd: Llmuxd, spawn_counter) -> None:
    target = spawn_counter()
    job_id, _ = llmuxd.ok("Checkpoint", "sua{sv}", "m2", target.pid, 0)
    assert llmuxd.ok("WaitJob", "ud", job_id, 120) == ["done", "", ""]
    # a restore job held by our unreaped zombie (its PID is not free), then cancelled
    job_id, job_path = llmuxd.ok("Restore", "sa{sv}", "m2", 0)
    stranger = llmuxd.busctl(
        "call", BUS_NAME, job_path, JOB, "Cancel", prefix=("unshare", "--mount")
    )
    assert stranger.rc == 0  # same uid (root) may cancel; the job belongs to uid 0
    result, error_name, message = llmuxd.ok("WaitJob", "ud", job_id, 60)
    assert (result, error_name) == ("cancelled", "org.llmux.Error.Cancelled")
    assert "cancelled" in message
    assert llmuxd.ok("ListCheckpoints") == [[["m2", f"{OBJECT_PATH}/checkpoint/m2"]]]
    target.reap()
    job_id, _ = llmuxd.ok("Restore", "sa{sv}", "m2", 0)
    assert llmuxd.ok("WaitJob", "ud", job_id, 120) == ["done", "", ""]
    assert pid_alive(target.pid)


def test_a_second_job_on_the_same_model_is_busy(llmuxd: Llmuxd, spawn_counter) -> None:
    target = spawn_counter()
    job_id, _ = llmuxd.ok("Checkpoint", "sua{sv}", "m3", target.pid, 0)
    assert llmuxd.ok("WaitJob", "ud", job_id, 120)[0] == "done"
    job_id, _ = llmuxd.ok("Restore", "sa{sv}", "m3", 0)  # waits for our zombie
    llmuxd.expect_error("org.llmux.Error.Busy", "Restore", "sa{sv}", "m3", 0)
    llmuxd.expect_error("org.llmux.Error.Busy", "DeleteCheckpoint", "s", "m3")
    target.reap()
    assert llmuxd.ok("WaitJob", "ud", job_id, 120)[0] == "done"


def test_sigterm_cancels_running_jobs_and_exits_cleanly(llmuxd: Llmuxd, spawn_counter) -> None:
    target = spawn_counter()
    job_id, _ = llmuxd.ok("Checkpoint", "sua{sv}", "m4", target.pid, 0)
    assert llmuxd.ok("WaitJob", "ud", job_id, 120)[0] == "done"
    llmuxd.ok("Restore", "sa{sv}", "m4", 0)  # held by our zombie
    assert llmuxd.proc is not None and llmuxd.notify is not None
    llmuxd.proc.send_signal(signal.SIGTERM)
    assert llmuxd.proc.wait(60) == 0
    llmuxd.notify.wait_for(lambda line: line == "STOPPING=1")
    assert "job 2 cancelled: restore m4" in llmuxd.log()
    owner = llmuxd.busctl(
        "call",
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "NameHasOwner",
        "s",
        BUS_NAME,
    )
    assert owner.stdout.strip() == "b false"
    # nothing lost: the checkpoint is there for the next llmuxd
    llmuxd.start()
    assert llmuxd.ok("ListCheckpoints") == [[["m4", f"{OBJECT_PATH}/checkpoint/m4"]]]
    target.reap()


#: what a task dies of when CRIU is killed while its parasite is in it (the injected trap)
CRIU_TRAP_SIGNALS = {signal.SIGTRAP, signal.SIGSEGV, signal.SIGILL, signal.SIGBUS}


@pytest.mark.parametrize("delay", [0.0, 0.2, 0.6, 1.2])
@pytest.mark.parametrize("how", ["like-systemd", "daemon-only"])
def test_llmuxd_killed_mid_dump_loses_nothing(
    llmuxd: Llmuxd, spawn_counter, how: str, delay: float
) -> None:
    """like-systemd: the unit's cgroup dies with llmuxd (KillMode=mixed SIGKILLs CRIU too);
    daemon-only: llmuxd alone is killed (CRIU dies with it: PR_SET_PDEATHSIG). ``delay``
    after CRIU started: a kill after CRIU began to kill the tree once threw away complete
    images (the tree dead: lost); start-up must keep them."""
    target = spawn_counter(megabytes=1024)
    job_id, _ = llmuxd.ok("Checkpoint", "sua{sv}", "big", target.pid, 0)
    assert llmuxd.proc is not None
    proc = llmuxd.proc
    # the call answers once the dump is prepared: the job starts CRIU right after
    wait_until(lambda: bool(children_of(proc.pid)), 60, "llmuxd to start CRIU")
    time.sleep(delay)
    helpers = children_of(proc.pid)  # CRIU, mid-dump
    llmuxd.proc.kill()
    if how == "like-systemd":
        for pid in helpers:
            # a helper may be gone already: CRIU dies with llmuxd (PR_SET_PDEATHSIG), or ended
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    llmuxd.proc.wait(30)
    for pid in helpers:
        wait_until(lambda pid=pid: not pid_alive(pid), 120, f"llmuxd's helper {pid} to end")
    llmuxd.start()
    listed = llmuxd.ok("ListCheckpoints")
    no_half_checkpoints(llmuxd.state_dir)
    if pid_alive(target.pid):
        assert pid_state(target.pid) not in ("T", "t"), "target left stopped"
        assert tracer_of(target.pid) == 0, "target left traced"
        before = target.last()
        wait_until(lambda: target.last() > before + 3, 30, "the target to run on")
        assert listed in ([[]], [[["big", f"{OBJECT_PATH}/checkpoint/big"]]])
    else:
        status = target.proc.wait(30)
        if listed == [[]] and -status in CRIU_TRAP_SIGNALS:
            # CRIU killed inside its parasite's window: the task dies on the trap CRIU
            # injected (docs/testing.md, "Known limit"); no half checkpoint was left (above)
            pytest.xfail(f"known CRIU limit: the target died of signal {-status} when CRIU "
                         "was killed while infecting it")
        # the dump had completed: the checkpoint must be complete and restorable
        assert listed == [[["big", f"{OBJECT_PATH}/checkpoint/big"]]], (
            f"target gone (exit status {status}) and no checkpoint: lost\n{llmuxd.log()}"
        )
        job_id, _ = llmuxd.ok("Restore", "sa{sv}", "big", 0)
        assert llmuxd.ok("WaitJob", "ud", job_id, 120) == ["done", "", ""]
        assert pid_alive(target.pid)


SIGTERM_BOUND_SECS = 10.0


@pytest.mark.parametrize("state", ["idle", "dumping", "restoring", "restore-waiting"])
def test_sigterm_is_honoured_within_the_bound_in_every_job_state(
    llmuxd: Llmuxd, spawn_counter, state: str
) -> None:
    """Whatever llmuxd is doing, SIGTERM ends it within 10 s, exit 0, and loses nothing:
    the tree runs (not stopped, not traced) or its checkpoint is there for the next start."""
    assert llmuxd.proc is not None
    proc = llmuxd.proc
    target = spawn_counter(megabytes=0 if state == "idle" else 768)
    if state in ("restoring", "restore-waiting"):
        job_id, _ = llmuxd.ok("Checkpoint", "sua{sv}", "t", target.pid, 0)
        assert llmuxd.ok("WaitJob", "ud", job_id, 120)[0] == "done"
        if state == "restoring":
            target.reap()
        llmuxd.ok("Restore", "sa{sv}", "t", 0)  # "restore-waiting": held by our zombie
    elif state == "dumping":
        llmuxd.ok("Checkpoint", "sua{sv}", "t", target.pid, 0)
    if state in ("dumping", "restoring"):
        wait_until(lambda: bool(children_of(proc.pid)), 60, "llmuxd to start CRIU")
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    took = time.monotonic() - began
    assert took < SIGTERM_BOUND_SECS, f"SIGTERM took {took:.1f}s in state {state}"
    llmuxd.start()
    listed = llmuxd.ok("ListCheckpoints")
    no_half_checkpoints(llmuxd.state_dir)
    if pid_alive(target.pid):
        assert pid_state(target.pid) not in ("T", "t") and tracer_of(target.pid) == 0
    else:
        assert listed == [[["t", f"{OBJECT_PATH}/checkpoint/t"]]], "tree gone, no checkpoint"
    if state.startswith("restore"):
        assert listed == [[["t", f"{OBJECT_PATH}/checkpoint/t"]]], "a restore lost it"


def test_signals_reach_root_but_not_an_unprivileged_user(
    llmuxd: Llmuxd, spawn_counter, tmp_path: Path
) -> None:
    """The policy keeps job and checkpoint signals (models, PIDs, owners) from strangers."""
    monitors = {}
    for who, prefix in (
        ("root", []),
        ("nobody", ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]),
    ):
        out = open(tmp_path / f"monitor-{who}.txt", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [*prefix, "gdbus", "monitor", "--address", llmuxd.bus.address, "--dest", BUS_NAME],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        monitors[who] = (proc, out)
    try:
        for who in monitors:
            wait_until(
                lambda who=who: (
                    "Monitoring signals" in (tmp_path / f"monitor-{who}.txt").read_text()
                ),
                30,
                f"{who}'s monitor",
            )
        target = spawn_counter()
        job_id, _ = llmuxd.ok("Checkpoint", "sua{sv}", "secret-model", target.pid, 0)
        assert llmuxd.ok("WaitJob", "ud", job_id, 120)[0] == "done"
        wait_until(
            lambda: "JobRemoved" in (tmp_path / "monitor-root.txt").read_text(),
            30,
            "root's monitor to see JobRemoved",
        )
        llmuxd.ok("ListCheckpoints")  # one more round trip through the bus
        seen_by_root = (tmp_path / "monitor-root.txt").read_text()
        assert "JobNew" in seen_by_root and "InterfacesAdded" in seen_by_root
        assert "secret-model" not in (tmp_path / "monitor-nobody.txt").read_text()
        target.reap()
    finally:
        for proc, out in monitors.values():
            proc.terminate()
            proc.wait(10)
            out.close()


def test_a_refused_request_is_the_calls_own_error_and_makes_no_job(
    llmuxd: Llmuxd, spawn_counter
) -> None:
    """The core prepares the operation inside the call: what it refuses (here, CUDA mode
    off: nothing to suspend) fails the call at once, and no job object appears."""
    target = spawn_counter()
    began = time.monotonic()
    message = llmuxd.expect_error(
        "org.llmux.Error.Unsupported", "Suspend", "sua{sv}", "s1", target.pid, 0
    )
    assert "nothing to suspend" in message
    llmuxd.expect_error("org.llmux.Error.NotFound", "Restore", "sa{sv}", "s1", 0)
    assert time.monotonic() - began < 5
    job_id, job_path = llmuxd.ok("Checkpoint", "sua{sv}", "s1", target.pid, 1, "leave_running",
                                 "b", True)
    assert (job_id, job_path) == (1, f"{OBJECT_PATH}/job/1"), "refusals made no jobs"
    assert llmuxd.ok("WaitJob", "ud", job_id, 120) == ["done", "", ""]
    assert pid_alive(target.pid)


def test_sigterm_right_after_a_dump_finishes_its_copy_to_disk_first(
    llmuxd: Llmuxd, spawn_counter
) -> None:
    """A reboot may follow llmuxd's stop at once. A checkpoint whose images are still only
    in the memory tier (a tmpfs) would not survive it: SIGTERM waits for the copy to disk.
    The reboot is then played by removing the tier's folder: llmuxd, started again, lists
    the checkpoint and restores the process from the disk."""
    target = spawn_counter(megabytes=256)
    job_id, _path = llmuxd.ok("Checkpoint", "sua{sv}", "m1", target.pid, 0)
    assert llmuxd.ok("WaitJob", "ud", job_id, 120) == ["done", "", ""]
    images = llmuxd.state_dir / "m1" / "images"
    assert images.is_symlink(), "the default memory tier should hold the images"
    tier = images.resolve()
    assert llmuxd.stop() == 0, llmuxd.log()[-3000:]
    assert (llmuxd.state_dir / "m1" / DISK_COPY).is_dir(), llmuxd.log()[-3000:]
    assert "in the memory tier only" not in llmuxd.log()

    shutil.rmtree(tier)  # the reboot: tmpfs is empty again
    target.reap()
    llmuxd.start()
    assert [c[0] for c in llmuxd.ok("ListCheckpoints")[0]] == ["m1"], llmuxd.log()[-3000:]
    reached = target.last()
    job_id, _path = llmuxd.ok("Restore", "sa{sv}", "m1", 0)
    assert llmuxd.ok("WaitJob", "ud", job_id, 120) == ["done", "", ""], llmuxd.log()[-3000:]
    wait_until(lambda: target.last() > reached, 30, "the restored counter to go on")
    kill_pid(target.pid)
