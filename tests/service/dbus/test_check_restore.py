"""CheckRestore: llmuxd says whether Restore would take a checkpoint back into the caller's
container, by Restore's own checks, without claiming the model, making a job or touching a
file. busctl is the caller, as root on the host (the administrator).
"""

from __future__ import annotations

import grp
import json
import re
from pathlib import Path
from xml.etree import ElementTree

import pytest

from llmux.service.core.store import DISK_COPY, IMAGES
from tests.support.llmuxd_harness import BUS_NAME, OBJECT_PATH, Llmuxd
from tests.support.procs import pid_alive, wait_until

pytestmark = [pytest.mark.dbus, pytest.mark.criu]

NOBODY = 65534
MISMATCH = "org.llmux.Error.ManifestMismatch"


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: (size, mtime in ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_check_restore_is_introspectable(llmuxd: Llmuxd) -> None:
    out = llmuxd.busctl("introspect", BUS_NAME, OBJECT_PATH)
    assert out.rc == 0, out.stderr
    assert re.search(r"^\.CheckRestore\s+method\s+s\s+bs\s", out.stdout, re.M), out.stdout
    xml = llmuxd.busctl("--xml-interface", "introspect", BUS_NAME, OBJECT_PATH)
    (method,) = [m for i in ElementTree.fromstring(xml.stdout).iter("interface")
                 if i.get("name") == BUS_NAME for m in i.iter("method")
                 if m.get("name") == "CheckRestore"]
    args = [(a.get("type"), a.get("direction", "in")) for a in method.iter("arg")]
    assert args == [("s", "in"), ("b", "out"), ("s", "out")]
    assert method.find("arg").get("name") == "name"  # dbus-next names no out argument


def test_check_restore_answers_what_restore_would(llmuxd: Llmuxd, spawn_counter) -> None:
    target = spawn_counter()
    job_id, _ = llmuxd.ok("Checkpoint", "sua{sv}", "cr", target.pid, 0)
    assert job_id == 1
    assert llmuxd.ok("WaitJob", "ud", job_id, 120) == ["done", "", ""]

    # the memory tier's durable copy is written behind the dump: let it finish, so that
    # what changes below could only be the check's doing
    cr = llmuxd.state_dir / "cr"
    wait_until(lambda: (cr / DISK_COPY).is_dir() and not list(cr.glob(".tmp-images-*")), 60,
               "the checkpoint's disk copy to be complete")
    before = _tree(llmuxd.state_dir)
    assert llmuxd.ok("CheckRestore", "s", "cr") == [True, ""]
    assert _tree(llmuxd.state_dir) == before, "the check touched the checkpoint"

    # nothing claimed and no job made: the restore that follows is job 2, and runs
    target.reap()
    job_id, _ = llmuxd.ok("Restore", "sa{sv}", "cr", 0)
    assert job_id == 2
    assert llmuxd.ok("WaitJob", "ud", job_id, 120) == ["done", "", ""]
    assert pid_alive(target.pid)

    # one of its images gone: llmuxd's reason, the very one Restore refuses with
    manifest = json.loads((llmuxd.state_dir / "cr" / "manifest.json").read_text())
    image = sorted(manifest["image_sizes"])[0]
    (llmuxd.state_dir / "cr" / IMAGES / image).unlink()
    ok, why = llmuxd.ok("CheckRestore", "s", "cr")
    assert ok is False and image in why and "missing" in why, why
    assert llmuxd.expect_error(MISMATCH, "Restore", "sa{sv}", "cr", 0) == why
    assert llmuxd.ok("CheckRestore", "s", "cr") == [False, why], "still refused, unchanged"


def test_check_restore_refuses_the_request_with_named_errors(llmuxd: Llmuxd,
                                                            spawn_counter) -> None:
    """A bad name, no checkpoint, someone else's: errors of the call, as Restore's."""
    assert "model name" in llmuxd.expect_error(
        "org.llmux.Error.InvalidArgument", "CheckRestore", "s", "../etc")
    assert "nothing" in llmuxd.expect_error("org.llmux.Error.NotFound", "CheckRestore", "s",
                                            "nothing")
    assert "CheckRestore takes (s)" in llmuxd.expect_error(
        "org.llmux.Error.InvalidArgument", "CheckRestore", "su", "cr", 1)
    # the bus policy: nobody may not ask at all
    llmuxd.expect_error("org.freedesktop.DBus.Error.AccessDenied", "CheckRestore", "s", "cr",
                        user=NOBODY)
    try:
        gid = grp.getgrnam("llmux").gr_gid
    except KeyError:
        pytest.skip("no llmux group on this machine (the package's sysusers.d creates it)")
    target = spawn_counter()
    job_id, _ = llmuxd.ok("Checkpoint", "sua{sv}", "mine", target.pid, 1, "leave_running",
                          "b", True)
    assert llmuxd.ok("WaitJob", "ud", job_id, 120) == ["done", "", ""]
    message = llmuxd.expect_error(
        "org.llmux.Error.AccessDenied", "CheckRestore", "s", "mine",
        prefix=("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", f"--groups={gid}"))
    assert "belongs to uid 0" in message
