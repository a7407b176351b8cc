"""The llmux-host package on a real systemd: Debian 12 booted in podman, systemd as PID 1.

What an operator sees: the .deb installed with dpkg, llmuxd started by systemctl and by D-Bus
activation, its STATUS line, its API through busctl, the bus policy (root and group llmux
only), the watchdog restarting a frozen daemon, a quick clean stop, clean removal and purge.
Tests of one module share one booted container and run in file order; the last ones remove
the package.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from llmux.common.contract import (
    BUS_NAME,
    MANAGER_INTERFACE,
    OBJECT_PATH,
    POLICY_GROUP,
    ErrorName,
)
from tests.support.systemtest import Booted, Overlay, boot, remove_container, run

pytestmark = [pytest.mark.systemd, pytest.mark.podman]

UNIT = "llmuxd.service"
OUTSIDER = "llmux-outsider"
MEMBER = "llmux-member"
WATCHDOG_S = 3
PACKAGE_FILES = (
    "/usr/bin/llmuxd",
    "/usr/bin/llmux",
    "/usr/lib/systemd/system/llmuxd.service",
    "/usr/share/dbus-1/system.d/org.llmux.Host1.conf",
    "/usr/share/dbus-1/system-services/org.llmux.Host1.service",
    "/usr/lib/tmpfiles.d/llmux.conf",
    "/usr/lib/sysusers.d/llmux.conf",
    "/usr/lib/llmux/criu/criu",
    "/usr/lib/python3/dist-packages/llmux/service/main.py",
)
CONFFILE = "/etc/llmux/llmuxd.toml"
ENABLED_LINK = "/etc/systemd/system/multi-user.target.wants/llmuxd.service"

# A D-Bus client run inside the container by Debian's python3 and the package's own
# dependency (python3-dbus-next): prints the error name a call gets, or "ok".
CALL_AS = """
import asyncio, sys
from dbus_next import BusType, Message, MessageType, Variant
from dbus_next.aio import MessageBus

async def main(member, signature, args):
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    reply = await bus.call(Message(destination=sys.argv[1], path=sys.argv[2],
                                   interface=sys.argv[3], member=member,
                                   signature=signature, body=args))
    print(reply.error_name if reply.message_type == MessageType.ERROR else "ok")
    if reply.message_type == MessageType.ERROR:
        print(reply.body[0] if reply.body else "")

if sys.argv[4] == "Checkpoint":
    asyncio.run(main("Checkpoint", "sua{sv}", ["systest", 1, {}]))
else:
    asyncio.run(main(sys.argv[4], "", []))
"""


def call_as(machine: Booted, user: str | None, member: str) -> tuple[str, str]:
    """(error name or "ok", message) of a call to org.llmux.Host1 made as ``user``."""
    proc = machine.exec("python3", "-c", CALL_AS, BUS_NAME, OBJECT_PATH, MANAGER_INTERFACE,
                        member, user=user)
    lines = [*proc.stdout.splitlines(), ""]
    return lines[0], lines[1]


def busctl_call(machine: Booted, member: str, *, user: str | None = None,
                check: bool = True) -> str:
    return machine.exec("busctl", "--json=short", "call", BUS_NAME, OBJECT_PATH,
                        MANAGER_INTERFACE, member, user=user, check=check).stdout


def is_active(props: dict[str, str]) -> bool:
    return props["ActiveState"] == "active" and props["SubState"] == "running"


# --------------------------------------------------------------------------------------
# The installed system


def test_installed_package_is_enabled_and_started_at_boot(installed: Booted) -> None:
    status = installed.exec("dpkg-query", "-W", "-f=${Status} ${Version}", "llmux-host").stdout
    assert status.startswith("install ok installed")
    for path in (*PACKAGE_FILES, CONFFILE, ENABLED_LINK):
        installed.exec("test", "-e", path)
    group = installed.exec("getent", "group", POLICY_GROUP).stdout
    assert group.startswith(f"{POLICY_GROUP}:x:")
    mode = installed.exec("stat", "-c", "%a %U", "/var/lib/llmux/checkpoints").stdout.split()
    assert mode == ["700", "root"]
    # enabled by postinst in the chroot, so multi-user.target started it at boot
    assert installed.exec("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    installed.wait_for(UNIT, "start at boot", is_active, 60)
    criu = installed.exec("/usr/lib/llmux/criu/criu", "--version").stdout
    assert "Version: 4." in criu


def test_start_reaches_active_with_ready_and_status(installed: Booted) -> None:
    installed.exec("systemctl", "stop", UNIT)
    started = time.monotonic()
    # For Type=notify, `systemctl start` returns only after READY=1 arrived.
    installed.exec("systemctl", "start", UNIT)
    elapsed = time.monotonic() - started
    props = installed.show(UNIT, "Type", "ActiveState", "SubState", "StatusText", "MainPID",
                           "WatchdogUSec", "NotifyAccess")
    print(f"\n[system] systemctl start llmuxd (until READY=1): {elapsed:.2f} s; {props}")
    assert props["Type"] == "notify"
    assert (props["ActiveState"], props["SubState"]) == ("active", "running")
    assert props["StatusText"], "llmuxd sent no STATUS= line"
    assert "checkpoint" in props["StatusText"]
    status = installed.exec("systemctl", "status", UNIT, "--no-pager", check=False).stdout
    assert f"Status: \"{props['StatusText']}\"" in status
    assert "Started" in installed.journal(UNIT)


def test_busctl_introspect_shows_the_api(installed: Booted) -> None:
    out = installed.exec("busctl", "introspect", "--no-pager", BUS_NAME, OBJECT_PATH).stdout
    for member in ("Checkpoint", "Restore", "Suspend", "Resume", "DeleteCheckpoint",
                   "ListCheckpoints", "WaitJob", "JobNew", "JobRemoved", "Version",
                   "CriuVersion", "StateDirectory", "FreeBytes"):
        assert f".{member} " in out, f"{member} missing from busctl introspect:\n{out}"
    assert "org.freedesktop.DBus.ObjectManager" in out


def test_root_calls_work(installed: Booted) -> None:
    listed = json.loads(busctl_call(installed, "ListCheckpoints"))
    assert listed == {"type": "a(so)", "data": [[]]}
    version = json.loads(installed.exec("busctl", "--json=short", "get-property", BUS_NAME,
                                        OBJECT_PATH, MANAGER_INTERFACE, "CriuVersion").stdout)
    assert version["data"].startswith("4.")


def test_user_outside_group_is_refused_by_policy(installed: Booted) -> None:
    installed.exec("sh", "-c", f"id {OUTSIDER} >/dev/null 2>&1 || useradd -M {OUTSIDER}")
    groups = installed.exec("id", "-nG", OUTSIDER).stdout.split()
    assert POLICY_GROUP not in groups
    name, message = call_as(installed, OUTSIDER, "ListCheckpoints")
    assert name == "org.freedesktop.DBus.Error.AccessDenied", message
    assert "Rejected send message" in message  # the bus refused it, llmuxd never saw it
    proc = installed.exec("busctl", "call", BUS_NAME, OBJECT_PATH, MANAGER_INTERFACE,
                          "ListCheckpoints", user=OUTSIDER, check=False)
    assert proc.returncode != 0
    assert "Access denied" in proc.stderr


def test_user_in_group_gets_through_the_policy(installed: Booted) -> None:
    installed.exec("sh", "-c",
                   f"id {MEMBER} >/dev/null 2>&1 || useradd -M -G {POLICY_GROUP} {MEMBER}")
    assert POLICY_GROUP in installed.exec("id", "-nG", MEMBER).stdout.split()
    assert call_as(installed, MEMBER, "ListCheckpoints") == ("ok", "")
    listed = json.loads(busctl_call(installed, "ListCheckpoints", user=MEMBER))
    assert listed["data"] == [[]]
    # Past the bus policy, llmuxd itself refuses a PID that is not the caller's own.
    name, message = call_as(installed, MEMBER, "Checkpoint")
    assert name == ErrorName.ACCESS_DENIED, message


def test_dbus_activation_starts_the_stopped_service(installed: Booted) -> None:
    installed.exec("systemctl", "stop", UNIT)
    assert installed.show(UNIT, "ActiveState")["ActiveState"] == "inactive"
    started = time.monotonic()
    listed = json.loads(busctl_call(installed, "ListCheckpoints"))
    print(f"\n[system] first call with llmuxd stopped (activation): "
          f"{time.monotonic() - started:.2f} s")
    assert listed["data"] == [[]]
    props = installed.show(UNIT, "ActiveState", "SubState", "MainPID")
    assert is_active(props), props
    assert "Activating via systemd: service name='org.llmux.Host1'" in installed.exec(
        "journalctl", "-u", "dbus.service", "--no-pager", "-o", "cat").stdout


def test_watchdog_restarts_a_frozen_daemon(installed: Booted) -> None:
    dropin = "/run/systemd/system/llmuxd.service.d/50-systest-watchdog.conf"
    installed.write(dropin, f"[Service]\nWatchdogSec={WATCHDOG_S}s\nRestartSec=1s\n")
    try:
        installed.exec("systemctl", "daemon-reload")
        installed.exec("systemctl", "restart", UNIT)
        before = installed.show(UNIT, "MainPID", "NRestarts", "WatchdogUSec")
        assert before["WatchdogUSec"] == f"{WATCHDOG_S}s"
        # It pings at half the interval: well inside the limit, it stays up.
        time.sleep(WATCHDOG_S * 1.5)
        assert installed.show(UNIT, "MainPID")["MainPID"] == before["MainPID"]
        frozen = time.monotonic()
        installed.exec("systemctl", "kill", "--kill-who=main", "-s", "SIGSTOP", UNIT)
        after = installed.wait_for(
            UNIT, "a watchdog restart",
            lambda p: is_active(p) and int(p["NRestarts"]) > int(before["NRestarts"]),
            timeout=WATCHDOG_S + 1 + 30,
        )
        print(f"\n[system] frozen llmuxd replaced after {time.monotonic() - frozen:.1f} s "
              f"(WatchdogSec={WATCHDOG_S}s, RestartSec=1s)")
        assert after["MainPID"] != before["MainPID"]
        assert "Watchdog timeout" in installed.journal(UNIT)
    finally:
        installed.exec("rm", "-f", dropin)
        installed.exec("systemctl", "daemon-reload")
        installed.exec("systemctl", "restart", UNIT)


def test_stop_is_clean_and_quick(installed: Booted) -> None:
    installed.exec("systemctl", "start", UNIT)
    pid = installed.show(UNIT, "MainPID")["MainPID"]
    started = time.monotonic()
    installed.exec("systemctl", "stop", UNIT)
    elapsed = time.monotonic() - started
    props = installed.show(UNIT, "ActiveState", "Result", "ExecMainStatus", "ExecMainCode")
    print(f"\n[system] systemctl stop llmuxd: {elapsed:.2f} s; {props}")
    assert props["ActiveState"] == "inactive"
    assert props["Result"] == "success"  # not 'timeout' (SIGKILL) nor 'exit-code'
    assert props["ExecMainStatus"] == "0"
    assert installed.exec("test", "-e", f"/proc/{pid}", check=False).returncode != 0
    assert f"Stopped {UNIT}" in installed.journal(UNIT) or "Stopped llmuxd" in installed.journal(
        UNIT)


def _wait_job(machine: Booted, reply: str) -> list[str]:
    job_id, job_path = json.loads(reply)["data"]
    assert job_path == f"{OBJECT_PATH}/job/{job_id}"
    done = machine.exec("busctl", "--json=short", "call", BUS_NAME, OBJECT_PATH,
                        MANAGER_INTERFACE, "WaitJob", "ud", str(job_id), "120").stdout
    result: list[str] = json.loads(done)["data"]
    return result


def test_checkpoint_and_restore_under_the_unit(installed: Booted) -> None:
    """CRIU through the installed bundle, from llmuxd as the unit runs it (its hardening)."""
    pid = installed.exec("sh", "-c", "sleep 600 </dev/null >/dev/null 2>&1 & echo $!"
                         ).stdout.strip()
    try:
        reply = installed.exec("busctl", "--json=short", "call", BUS_NAME, OBJECT_PATH,
                               MANAGER_INTERFACE, "Checkpoint", "sua{sv}", "systest-sleeper",
                               pid, "0").stdout
        assert _wait_job(installed, reply) == ["done", "", ""]
        assert installed.exec("test", "-e", f"/proc/{pid}", check=False).returncode != 0
        tree = installed.exec("busctl", "tree", "--list", BUS_NAME).stdout
        assert f"{OBJECT_PATH}/checkpoint/systest_2dsleeper" in tree.split()

        reply = installed.exec("busctl", "--json=short", "call", BUS_NAME, OBJECT_PATH,
                               MANAGER_INTERFACE, "Restore", "sa{sv}", "systest-sleeper",
                               "0").stdout
        assert _wait_job(installed, reply) == ["done", "", ""]
        assert installed.exec("ps", "-o", "args=", "-p", pid).stdout.strip() == "sleep 600"
        # The restored tree is not in llmuxd's cgroup: restarting the service spares it.
        cgroups = installed.exec("cat", f"/proc/{pid}/cgroup").stdout
        assert "llmuxd.service" not in cgroups, cgroups
        installed.exec("systemctl", "restart", UNIT)
        assert installed.exec("ps", "-o", "args=", "-p", pid).stdout.strip() == "sleep 600"
        installed.exec("busctl", "call", BUS_NAME, OBJECT_PATH, MANAGER_INTERFACE,
                       "DeleteCheckpoint", "s", "systest-sleeper")
    finally:
        installed.exec("kill", "-9", pid, check=False)


def test_a_checkpoint_survives_a_restart_of_the_machine(installed: Booted) -> None:
    """Checkpoint, reboot (the container that runs systemd restarted), restore: the state
    directory is on the machine's disk, llmuxd is activated again by the first call and
    reads the checkpoint back, and the restore journal is empty. The sleeper is put on a
    PID the boot does not reach (ns_last_pid), as a tree without a PID namespace of its own
    must get its PIDs back."""
    pid = installed.exec("sh", "-c", "echo 40000 > /proc/sys/kernel/ns_last_pid; "
                         "sleep 600 </dev/null >/dev/null 2>&1 & echo $!").stdout.strip()
    assert int(pid) > 40000, pid
    reply = busctl_call_args(installed, "Checkpoint", "sua{sv}", "systest-reboot", pid, "0")
    assert _wait_job(installed, reply) == ["done", "", ""]
    state = installed.exec("sh", "-c", "ls /var/lib/llmux/checkpoints/systest-reboot").stdout
    assert "manifest.json" in state.split(), state

    installed.restart()
    assert installed.exec("test", "-e", f"/proc/{pid}", check=False).returncode != 0
    # the first call activates llmuxd, which finds the checkpoint in its state directory
    listed = busctl_call(installed, "ListCheckpoints")
    assert "systest-reboot" in listed, listed
    leftovers = installed.exec("sh", "-c", "ls -A /var/lib/llmux/checkpoints | "
                               "grep -c '^[.]restoring' || true").stdout.strip()
    assert leftovers == "0", "a restore journal outlived the reboot"
    reply = busctl_call_args(installed, "Restore", "sa{sv}", "systest-reboot", "0")
    try:
        assert _wait_job(installed, reply) == ["done", "", ""]
        assert installed.exec("ps", "-o", "args=", "-p", pid).stdout.strip() == "sleep 600"
    finally:
        installed.exec("kill", "-9", pid, check=False)
        busctl_call_args(installed, "DeleteCheckpoint", "s", "systest-reboot", check=False)


def busctl_call_args(machine: Booted, member: str, *args: str, check: bool = True) -> str:
    return machine.exec("busctl", "--json=short", "call", BUS_NAME, OBJECT_PATH,
                        MANAGER_INTERFACE, member, *args, check=check).stdout


def test_systemd_analyze_verify_passes(installed: Booted) -> None:
    proc = installed.exec("systemd-analyze", "verify", f"/usr/lib/systemd/system/{UNIT}",
                          check=False)
    assert proc.returncode == 0, proc.stderr
    complaints = [line for line in proc.stderr.splitlines() if "llmux" in line]
    assert not complaints, complaints
    # the bus loaded the policy without complaint
    dbus_log = installed.exec("journalctl", "-u", "dbus.service", "--no-pager", "-o",
                              "cat").stdout
    assert "org.llmux.Host1.conf" not in dbus_log, dbus_log


def test_llmux_cli_on_debian_python(installed: Booted) -> None:
    """/usr/bin/llmux runs on Debian's python3 and its packages, and explains a refusal."""
    installed.exec("systemctl", "start", UNIT)
    info = json.loads(installed.exec("llmux", "host", "status", "--json").stdout)
    assert info["CriuVersion"].startswith("4.")
    assert info["StateDirectory"] == "/var/lib/llmux/checkpoints"
    assert json.loads(installed.exec("llmux", "checkpoints", "list", "--json",
                                     user=MEMBER).stdout) == []
    refused = installed.exec("llmux", "checkpoints", "list", user=OUTSIDER, check=False)
    assert refused.returncode == 1
    assert "org.freedesktop.DBus.Error.AccessDenied" in refused.stderr
    text = installed.exec("llmux", "host", "status", user=OUTSIDER).stdout
    assert "Checkpoints: (not permitted" in text


def test_upgrade_restarts_the_service_and_keeps_the_config(installed: Booted,
                                                           deb_path: Path) -> None:
    installed.exec("systemctl", "start", UNIT)
    before = installed.show(UNIT, "MainPID")["MainPID"]
    installed.exec("sh", "-c", f"echo '# local change' >>{CONFFILE}")
    run(["podman", "cp", str(deb_path), f"{installed.name}:/tmp/{deb_path.name}"])
    installed.exec("dpkg", "-i", f"/tmp/{deb_path.name}")  # same version: the upgrade path
    after = installed.wait_for(UNIT, "restart on upgrade", is_active, 60)
    assert after["MainPID"] != before
    assert "# local change" in installed.exec("cat", CONFFILE).stdout


def test_remove_and_purge_in_the_running_system(installed: Booted, deb_path: Path) -> None:
    installed.exec("systemctl", "start", UNIT)
    installed.exec("dpkg", "-r", "llmux-host")
    props = installed.show(UNIT, "LoadState", "ActiveState")
    assert props == {"LoadState": "not-found", "ActiveState": "inactive"}, props
    assert installed.exec("pgrep", "-f", "/usr/bin/llmuxd", check=False).returncode == 1
    for path in PACKAGE_FILES:
        assert installed.exec("test", "-e", path, check=False).returncode != 0, path
    installed.exec("test", "-e", CONFFILE)  # a removed package keeps its conffiles
    proc = installed.exec("busctl", "call", BUS_NAME, OBJECT_PATH, MANAGER_INTERFACE,
                          "ListCheckpoints", check=False)
    assert proc.returncode != 0  # the activation file went with the package

    installed.exec("dpkg", "-P", "llmux-host")
    for path in (CONFFILE, "/etc/llmux", "/var/lib/llmux", ENABLED_LINK):
        assert installed.exec("test", "-e", path, check=False).returncode != 0, path
    assert installed.exec("dpkg-query", "-W", "llmux-host", check=False).returncode != 0

    # and installing it again into the running system starts it right away
    run(["podman", "cp", str(deb_path), f"{installed.name}:/tmp/{deb_path.name}"])
    installed.exec("dpkg", "-i", f"/tmp/{deb_path.name}")
    installed.wait_for(UNIT, "start on install", is_active, 60)
    assert json.loads(busctl_call(installed, "ListCheckpoints"))["data"] == [[]]


# --------------------------------------------------------------------------------------
# The package alone, in a chroot (as in an image build: no systemd running)


def _snapshot(root: Path) -> set[str]:
    skip = ("proc/", "dev/", "sys/", "run/", "tmp/")
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if not str(p.relative_to(root)).startswith(skip)
    }


def test_chroot_install_remove_purge_leaves_nothing(overlay: Overlay, deb_path: Path) -> None:
    root = overlay.merged
    before = _snapshot(root)
    (root / "tmp" / deb_path.name).write_bytes(deb_path.read_bytes())
    overlay.chroot("dpkg", "-i", f"/tmp/{deb_path.name}")
    for path in (*PACKAGE_FILES, CONFFILE, ENABLED_LINK):
        assert (root / path.lstrip("/")).exists() or (root / path.lstrip("/")).is_symlink(), path
    assert any(line.startswith(f"{POLICY_GROUP}:")
               for line in (root / "etc/group").read_text().splitlines())
    # the byte-code postinst compiled is the package's to remove
    assert list((root / "usr/lib/python3/dist-packages/llmux").rglob("*.pyc"))

    overlay.chroot("dpkg", "-r", "llmux-host")
    assert (root / CONFFILE.lstrip("/")).exists()
    overlay.chroot("dpkg", "-P", "llmux-host")
    (root / "tmp" / deb_path.name).unlink()

    left = sorted(_snapshot(root) - before)
    # dpkg's own records, and the llmux group (kept on purge, as Debian does).
    expected = {"etc/group-", "etc/gshadow-", "var/lib/dpkg/triggers/Unincorp"}
    unexpected = [p for p in left if p not in expected and not p.startswith("var/lib/dpkg/")
                  and not p.startswith("var/log/")]
    assert not unexpected, f"left behind by install + purge: {unexpected}"
    gone = sorted(before - _snapshot(root))
    assert not gone, f"removed by install + purge: {gone}"


def test_boot_of_a_tree_without_the_package(debian_rootfs: Path) -> None:
    """The bare tree boots too (what the rootfs script promises on its own)."""
    name = f"llmux-systest-bare-{int(time.time())}"
    try:
        machine = boot(name, debian_rootfs, overlay=True)
        assert machine.exec("systemctl", "is-system-running", check=False).stdout.strip() in (
            "running", "degraded")
        assert machine.show(UNIT, "LoadState")["LoadState"] == "not-found"
    finally:
        remove_container(name)
