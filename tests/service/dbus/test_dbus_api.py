"""org.llmux.Host1 seen from busctl: the API, its properties, its named errors, the policy.

llmuxd runs as a real process on a private system-style bus whose policy is
units/org.llmux.Host1.conf. busctl is the client; its own process is the caller.
"""

from __future__ import annotations

import grp
import json
import os
import re

import pytest

from tests.support.llmuxd_harness import BUS_NAME, OBJECT_PATH, Llmuxd

pytestmark = pytest.mark.dbus

IFACE = "org.llmux.Host1"
NOBODY = 65534
BUS_ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"


def test_introspection_shows_the_whole_api(llmuxd: Llmuxd) -> None:
    out = llmuxd.busctl("introspect", BUS_NAME, OBJECT_PATH)
    assert out.rc == 0, out.stderr
    assert re.search(r"^\.Checkpoint\s+method\s+sua\{sv\}\s+uo\s", out.stdout, re.M)
    assert re.search(r"^\.Restore\s+method\s+sa\{sv\}\s+uo\s", out.stdout, re.M)
    assert re.search(r"^\.WaitJob\s+method\s+ud\s+sss\s", out.stdout, re.M)
    assert re.search(r"^\.JobRemoved\s+signal\s+uos\s", out.stdout, re.M)
    for member in (
        "Suspend",
        "Resume",
        "DeleteCheckpoint",
        "ListCheckpoints",
        "JobNew",
        "Version",
        "CriuVersion",
        "KernelRelease",
        "DriverVersion",
        "StateDirectory",
        "FreeBytes",
    ):
        assert re.search(rf"^\.{member}\s", out.stdout, re.M), member
    assert "org.freedesktop.DBus.ObjectManager" in out.stdout
    tree = llmuxd.busctl("tree", BUS_NAME)
    assert OBJECT_PATH in tree.stdout


def test_properties_describe_the_host(llmuxd: Llmuxd) -> None:
    out = llmuxd.busctl(
        "--json=short",
        "get-property",
        BUS_NAME,
        OBJECT_PATH,
        IFACE,
        "Version",
        "CriuVersion",
        "KernelRelease",
        "StateDirectory",
        "FreeBytes",
    )
    assert out.rc == 0, out.stderr
    version, criu, kernel, state_dir, free = (
        json.loads(line)["data"] for line in out.stdout.splitlines()
    )
    assert version
    assert int(criu.split(".")[0]) >= 4
    assert kernel == os.uname().release
    assert state_dir == str(llmuxd.state_dir)
    assert free > 0
    assert llmuxd.ok("ListCheckpoints") == [[]]


@pytest.mark.parametrize("model", ["../etc", "a/b", ".hidden", "x" * 200, "", "a..b"])
def test_a_bad_model_name_is_invalid_argument(llmuxd: Llmuxd, model: str) -> None:
    message = llmuxd.expect_error(
        "org.llmux.Error.InvalidArgument", "Checkpoint", "sua{sv}", model, os.getpid(), 0
    )
    assert "model name" in message
    llmuxd.expect_error("org.llmux.Error.InvalidArgument", "Restore", "sa{sv}", model, 0)
    llmuxd.expect_error("org.llmux.Error.InvalidArgument", "DeleteCheckpoint", "s", model)


def test_a_missing_checkpoint_is_not_found(llmuxd: Llmuxd) -> None:
    message = llmuxd.expect_error("org.llmux.Error.NotFound", "Restore", "sa{sv}", "nothing", 0)
    assert "nothing" in message
    llmuxd.expect_error("org.llmux.Error.NotFound", "DeleteCheckpoint", "s", "nothing")
    missing = llmuxd.busctl(
        "get-property",
        BUS_NAME,
        f"{OBJECT_PATH}/checkpoint/nothing",
        "org.llmux.Host1.Checkpoint",
        "Model",
    )
    assert missing.error_name == "org.freedesktop.DBus.Error.UnknownObject"


def test_malformed_calls_are_invalid_argument(llmuxd: Llmuxd) -> None:
    bad = "org.llmux.Error.InvalidArgument"
    assert "sua{sv}" in llmuxd.expect_error(bad, "Checkpoint", "s", "m")
    assert "bogus" in llmuxd.expect_error(
        bad, "Checkpoint", "sua{sv}", "m", os.getpid(), 1, "bogus", "b", "true"
    )
    assert "leave_running" in llmuxd.expect_error(
        bad, "Checkpoint", "sua{sv}", "m", os.getpid(), 1, "leave_running", "s", "yes"
    )
    llmuxd.expect_error(bad, "Checkpoint", "sua{sv}", "m", 0, 0)
    llmuxd.expect_error(bad, "WaitJob", "ud", 1, -1)


def test_unknown_jobs_are_not_found(llmuxd: Llmuxd) -> None:
    llmuxd.expect_error("org.llmux.Error.NotFound", "WaitJob", "ud", 99, 1)
    cancel = llmuxd.busctl(
        "call", BUS_NAME, f"{OBJECT_PATH}/job/99", "org.llmux.Host1.Job", "Cancel"
    )
    assert cancel.error_name == "org.llmux.Error.NotFound"


def test_pids_that_are_not_the_callers_are_access_denied(llmuxd: Llmuxd) -> None:
    """busctl's own process is the caller: init and busctl's parent (us) are not its own."""
    denied = "org.llmux.Error.AccessDenied"
    assert "PID 1" in llmuxd.expect_error(denied, "Checkpoint", "sua{sv}", "m", 1, 0)
    llmuxd.expect_error(denied, "Checkpoint", "sua{sv}", "m", os.getpid(), 0)
    llmuxd.expect_error(denied, "Suspend", "sua{sv}", "m", os.getpid(), 0)
    llmuxd.expect_error(denied, "Resume", "sua{sv}", "m", 1, 0)


def test_a_caller_in_another_container_may_not_touch_our_processes(
    llmuxd: Llmuxd, spawn_counter
) -> None:
    """A caller in its own mount namespace is a container: a host process is foreign to it."""
    target = spawn_counter()
    message = llmuxd.expect_error(
        "org.llmux.Error.AccessDenied",
        "Checkpoint",
        "sua{sv}",
        "m",
        target.pid,
        0,
        prefix=("unshare", "--mount", "--propagation", "private"),
    )
    assert str(target.pid) in message
    assert target.proc.poll() is None


def test_an_unprivileged_user_is_refused_by_the_bus_policy(llmuxd: Llmuxd) -> None:
    for method, signature, args in (
        ("ListCheckpoints", "", ()),
        ("Checkpoint", "sua{sv}", ("m", 1, 0)),
        ("DeleteCheckpoint", "s", ("m",)),
        ("WaitJob", "ud", (1, 1)),
    ):
        llmuxd.expect_error(BUS_ACCESS_DENIED, method, signature, *args, user=NOBODY)
    objects = llmuxd.busctl(
        "call",
        BUS_NAME,
        OBJECT_PATH,
        "org.freedesktop.DBus.ObjectManager",
        "GetManagedObjects",
        user=NOBODY,
    )
    assert objects.error_name == BUS_ACCESS_DENIED
    # what the policy leaves open to everybody: the API's shape and the host's properties
    introspect = llmuxd.busctl("introspect", BUS_NAME, OBJECT_PATH, user=NOBODY)
    assert introspect.rc == 0 and ".Checkpoint" in introspect.stdout
    version = llmuxd.busctl(
        "get-property", BUS_NAME, OBJECT_PATH, IFACE, "CriuVersion", user=NOBODY
    )
    assert version.rc == 0 and version.stdout.startswith("s ")


def test_members_of_the_llmux_group_may_call(llmuxd: Llmuxd) -> None:
    try:
        gid = grp.getgrnam("llmux").gr_gid
    except KeyError:
        pytest.skip("no llmux group on this machine (the package's sysusers.d creates it)")
    result = llmuxd.busctl(
        "call",
        BUS_NAME,
        OBJECT_PATH,
        IFACE,
        "ListCheckpoints",
        prefix=("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", f"--groups={gid}"),
    )
    assert result.rc == 0, result.stderr
