"""Hostile input to org.llmux.Host1, from busctl (a real client) on the private system bus.

Every method with wrong types, empty and oversized strings, path-like names and PIDs that
are not the caller's: each is refused with a named org.llmux.Error.* (or the bus's own
AccessDenied for a caller the policy keeps out), never with Python's traceback text; nothing
is written to the state directory, llmuxd logs no unexpected failure and keeps serving.
A real checkpoint's files are readable by root alone.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.llmuxd_harness import BUS_NAME, OBJECT_PATH, Llmuxd, pid_state
from tests.support.procs import pid_alive, wait_until

pytestmark = pytest.mark.dbus

IFACE = "org.llmux.Host1"
JOB = "org.llmux.Host1.Job"
NOBODY = 65534
INVALID = "org.llmux.Error.InvalidArgument"
DENIED = "org.llmux.Error.AccessDenied"
BUS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"

#: (method, its signature, good arguments after the model) for the model-taking methods
MODEL_METHODS = {
    "Checkpoint": ("sua{sv}", ("1", "0")),
    "Restore": ("sa{sv}", ("0",)),
    "Suspend": ("sua{sv}", ("1", "0")),
    "Resume": ("sua{sv}", ("1", "0")),
    "DeleteCheckpoint": ("s", ()),
}

#: (method, wrong signature, its arguments): a value of the wrong D-Bus type everywhere
WRONG_TYPES: list[tuple[str, str, tuple[str, ...]]] = [
    ("Checkpoint", "", ()),
    ("Checkpoint", "s", ("m",)),
    ("Checkpoint", "su", ("m", "1")),
    ("Checkpoint", "usa{sv}", ("1", "m", "0")),
    ("Checkpoint", "ssa{sv}", ("m", "1", "0")),
    ("Checkpoint", "sia{sv}", ("m", "-1", "0")),
    ("Checkpoint", "sta{sv}", ("m", "1", "0")),
    ("Checkpoint", "sua{ss}", ("m", "1", "0")),
    ("Checkpoint", "suas", ("m", "1", "0")),
    ("Checkpoint", "sua{sv}s", ("m", "1", "0", "extra")),
    ("Restore", "", ()),
    ("Restore", "u", ("1",)),
    ("Restore", "s", ("m",)),
    ("Restore", "sa{ss}", ("m", "0")),
    ("Restore", "ab", ("0",)),
    ("Suspend", "s", ("m",)),
    ("Suspend", "sud", ("m", "1", "1.5")),
    ("Resume", "sa{sv}", ("m", "0")),
    ("Resume", "bua{sv}", ("true", "1", "0")),
    ("DeleteCheckpoint", "", ()),
    ("DeleteCheckpoint", "u", ("1",)),
    ("DeleteCheckpoint", "ss", ("a", "b")),
    ("DeleteCheckpoint", "o", ("/a",)),
    ("DeleteCheckpoint", "g", ("s",)),
    ("ListCheckpoints", "s", ("x",)),
    ("ListCheckpoints", "u", ("1",)),
    ("WaitJob", "", ()),
    ("WaitJob", "u", ("1",)),
    ("WaitJob", "uu", ("1", "1")),
    ("WaitJob", "sd", ("1", "1")),
    ("WaitJob", "du", ("1", "1")),
    ("WaitJob", "udd", ("1", "1", "1")),
]

#: option name -> values of a wrong variant type (signature, value)
WRONG_OPTIONS = {
    "Checkpoint": {"leave_running": [("s", "true"), ("u", "1"), ("i", "1"), ("as", "1 x")],
                   "weights_bytes": [("s", "1"), ("i", "-1"), ("b", "true"), ("d", "1.5"),
                                     ("u", "1")],
                   "gpus": [("u", "1"), ("as", "0 1"), ("au", "0 0"),
                            ("au", " ".join(map(str, range(65))))]},
    "Restore": {"keep_images": [("s", "false"), ("u", "0"), ("y", "1")]},
}

#: model names no method may take: path tricks, control characters, empty, huge
BAD_NAMES = ["", "/", "..", ".", "../x", "a/../b", "a/b", "/etc/passwd", "/var/lib/llmux/x",
             "a\nb", "\n", "a\tb", "a b", "-rf", "--help", ".hidden", "a..b", "x" * 129,
             "x" * 100_000, "\u202eab", "\u00e4", "a\\b", "a;b", "$(id)", "*"]


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` with its mode, size and mtime (what 'untouched' means)."""
    found: dict[str, tuple[int, int, int]] = {}
    if not root.exists():
        return found
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        found[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return found


def no_unexpected_failure(llmuxd: Llmuxd) -> None:
    log = llmuxd.log()
    assert "failed unexpectedly" not in log, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    assert llmuxd.proc is not None and llmuxd.proc.poll() is None
    assert llmuxd.ok("ListCheckpoints") is not None  # still serving


def refused(llmuxd: Llmuxd, method: str, signature: str, *args: str,
            names: tuple[str, ...] = (INVALID,), **kw: object) -> str:
    result = llmuxd.call(method, signature, *args, **kw)  # type: ignore[arg-type]
    assert result.rc != 0, f"{method}({signature}) {args!r:.200} succeeded: {result.stdout}"
    assert result.error_name in names, (method, signature, result.error_name,
                                        result.error_message, result.stderr[-500:])
    assert "Traceback" not in result.error_message and 'File "' not in result.error_message
    return result.error_message


def test_every_method_with_wrong_types(llmuxd: Llmuxd) -> None:
    before = snapshot(llmuxd.state_dir)
    for method, signature, args in WRONG_TYPES:
        message = refused(llmuxd, method, signature, *args)
        assert method in message and f"({signature})" in message
    for method, options in WRONG_OPTIONS.items():
        head = ("m", str(os.getpid())) if method == "Checkpoint" else ("m",)
        for name, values in options.items():
            for sig, value in values:
                value_args = ([str(len(value.split())), *value.split()]
                              if sig.startswith("a") else [value])
                message = refused(llmuxd, method, MODEL_METHODS[method][0], *head, "1", name,
                                  sig, *value_args)
                assert name in message
        # unknown option names, and the same name twice
        refused(llmuxd, method, MODEL_METHODS[method][0], *head, "1", "../x", "b", "true")
        refused(llmuxd, method, MODEL_METHODS[method][0], *head, "1", "", "b", "true")
    for method in ("Suspend", "Resume"):
        message = refused(llmuxd, method, "sua{sv}", "m", "1", "1", "leave_running", "b",
                          "true")
        assert "unknown option" in message
    # a job's Cancel with arguments; the manager's members on a job's path
    refused(llmuxd, "Cancel", "s", "x", names=(INVALID, "org.freedesktop.DBus.Error.UnknownMethod",
                                               "org.freedesktop.DBus.Error.UnknownInterface"))
    cancel = llmuxd.busctl("call", BUS_NAME, f"{OBJECT_PATH}/job/1", JOB, "Cancel", "s", "x")
    assert cancel.error_name == INVALID, cancel.stderr[-500:]
    # read-only properties cannot be set
    setting = llmuxd.busctl("set-property", BUS_NAME, OBJECT_PATH, IFACE, "StateDirectory",
                            "s", "/tmp/elsewhere")
    assert setting.rc != 0 and "Traceback" not in setting.stderr
    assert snapshot(llmuxd.state_dir) == before
    no_unexpected_failure(llmuxd)


def test_bad_names_for_every_model_method(llmuxd: Llmuxd, tmp_path: Path) -> None:
    before = snapshot(llmuxd.state_dir)
    for method, (signature, rest) in MODEL_METHODS.items():
        for name in BAD_NAMES:
            args = [name, *rest]
            if method in ("Checkpoint", "Suspend", "Resume"):
                args[1] = str(os.getpid())
            message = refused(llmuxd, method, signature, *args)
            assert "model name" in message
            assert len(message) < 1000  # a huge name is not echoed back whole
    # checkpoint object paths: escaped names that decode to path tricks are unknown objects
    for element in ("_2e_2e", "_2fetc", "a_2fb", "_0a", "x" * 300):
        got = llmuxd.busctl("get-property", BUS_NAME, f"{OBJECT_PATH}/checkpoint/{element}",
                            "org.llmux.Host1.Checkpoint", "Model")
        assert got.error_name == "org.freedesktop.DBus.Error.UnknownObject", got.stderr[-300:]
    assert snapshot(llmuxd.state_dir) == before
    assert not list(tmp_path.parent.glob("**/etc/passwd*"))
    no_unexpected_failure(llmuxd)


def test_job_ids_and_timeouts(llmuxd: Llmuxd) -> None:
    for job_id, timeout in (("0", "1"), ("4294967295", "1"), ("99", "0")):
        refused(llmuxd, "WaitJob", "ud", job_id, timeout, names=("org.llmux.Error.NotFound",))
    for timeout in ("-1", "nan", "inf", "-inf"):
        message = refused(llmuxd, "WaitJob", "ud", "1", timeout)
        assert "timeout_s" in message
    refused(llmuxd, "WaitJob", "ud", "1", "1e308", names=("org.llmux.Error.NotFound",))
    for element in ("0", "4294967295", "99999999999999999999", "x", "1_2e", "_2e_2e"):
        got = llmuxd.busctl("call", BUS_NAME, f"{OBJECT_PATH}/job/{element}", JOB, "Cancel")
        assert got.error_name in ("org.llmux.Error.NotFound",
                                  "org.freedesktop.DBus.Error.UnknownObject"), got.stderr[-300:]
    no_unexpected_failure(llmuxd)


def _pid_of(argv0: str) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().split(b"\0")[0].endswith(argv0.encode()):
                    return int(entry.name)
            except OSError:
                continue
    return None


def test_pids_that_may_not_be_targeted(llmuxd: Llmuxd, spawn_counter) -> None:
    """PID 1, llmuxd itself, the bus daemon's own parent chain, PIDs that do not exist, a
    zombie; and a target outside the caller's container (a mount namespace of its own)."""
    assert llmuxd.proc is not None
    before = snapshot(llmuxd.state_dir)
    daemon_pid = llmuxd.proc.pid
    for method in ("Checkpoint", "Suspend", "Resume"):
        assert "PID 1" in refused(llmuxd, method, "sua{sv}", "m", "1", "0", names=(DENIED,))
        message = refused(llmuxd, method, "sua{sv}", "m", str(daemon_pid), "0", names=(DENIED,))
        assert str(daemon_pid) in message
        # no such process: 0, beyond pid_max, and one that has exited
        for pid in ("0", "4294967295", "4194305"):
            refused(llmuxd, method, "sua{sv}", "m", pid, "0",
                    names=(INVALID, "org.llmux.Error.NoSuchProcess"))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    refused(llmuxd, "Checkpoint", "sua{sv}", "m", str(gone.pid), "0",
            names=("org.llmux.Error.NoSuchProcess",))
    # a zombie (exited, not reaped by its parent, the test)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_until(lambda: pid_state(zombie.pid) == "Z", 30, "the child to become a zombie")
    refused(llmuxd, "Checkpoint", "sua{sv}", "m", str(zombie.pid), "0",
            names=("org.llmux.Error.NoSuchProcess", "org.llmux.Error.InvalidArgument",
                   DENIED))
    zombie.wait()
    # from inside another container (its own mount namespace), a host process is foreign
    target = spawn_counter()
    for method in ("Checkpoint", "Suspend"):
        message = refused(llmuxd, method, "sua{sv}", "m", str(target.pid), "0",
                          names=(DENIED,),
                          prefix=("unshare", "--mount", "--propagation", "private"))
        assert str(target.pid) in message
        assert pid_state(target.pid) not in ("T", "t", "")  # not stopped, not frozen
    assert target.proc.poll() is None
    assert snapshot(llmuxd.state_dir) == before
    no_unexpected_failure(llmuxd)


@pytest.mark.criu
def test_a_target_that_exits_mid_call_leaves_nothing(llmuxd: Llmuxd, spawn_counter) -> None:
    target = spawn_counter(megabytes=256)  # a dump long enough to die during it
    job_id, _path = llmuxd.ok("Checkpoint", "sua{sv}", "dies", target.pid, 0)
    target.proc.kill()
    target.proc.wait()
    result, error_name, message = llmuxd.ok("WaitJob", "ud", job_id, 120)
    print("job of a target killed mid-dump:", result, error_name, message)
    if result == "done":
        # CRIU was faster than the kill: a whole checkpoint, which then is fine to keep
        assert (llmuxd.state_dir / "dies" / "manifest.json").exists()
        llmuxd.ok("DeleteCheckpoint", "s", "dies")
    else:
        assert result == "failed", (result, error_name, message)
        assert error_name.startswith("org.llmux.Error."), error_name
        assert "Traceback" not in message
    assert not (llmuxd.state_dir / "dies").exists()
    leftovers = [p.name for p in llmuxd.state_dir.iterdir()] if llmuxd.state_dir.exists() else []
    assert not [n for n in leftovers if "dies" in n], leftovers
    no_unexpected_failure(llmuxd)


def test_a_caller_outside_the_group_is_refused_everything(llmuxd: Llmuxd) -> None:
    before = snapshot(llmuxd.state_dir)
    answered = llmuxd.log().count(" refused: ")
    for method, signature, args in (
        ("ListCheckpoints", "", ()),
        ("Checkpoint", "sua{sv}", ("m", "1", "0")),
        ("Restore", "sa{sv}", ("m", "0")),
        ("Suspend", "sua{sv}", ("m", "1", "0")),
        ("Resume", "sua{sv}", ("m", "1", "0")),
        ("DeleteCheckpoint", "s", ("m",)),
        ("WaitJob", "ud", ("1", "1")),
        # wrong types too: the policy refuses before llmuxd sees anything
        ("Checkpoint", "s", ("../../etc",)),
    ):
        refused(llmuxd, method, signature, *args, names=(BUS_DENIED,), user=NOBODY)
    cancel = llmuxd.busctl("call", BUS_NAME, f"{OBJECT_PATH}/job/1", JOB, "Cancel",
                           user=NOBODY)
    assert cancel.error_name == BUS_DENIED
    assert snapshot(llmuxd.state_dir) == before
    assert llmuxd.log().count(" refused: ") == answered  # the bus stopped them: none reached it
    no_unexpected_failure(llmuxd)


HOLDER = """
import os, sys, time
# world-readable files the tree holds: a deleted one and a /dev/shm segment
path = sys.argv[1]
with open(path, "w") as f:
    f.write("secret " * 1000)
os.chmod(path, 0o644)
deleted = open(path)
os.unlink(path)
shm = open(sys.argv[2], "w+")
shm.write("shared " * 1000)
shm.flush()
os.chmod(sys.argv[2], 0o666)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


@pytest.mark.criu
def test_checkpoint_files_are_readable_by_root_alone(llmuxd: Llmuxd, tmp_path: Path) -> None:
    shm = Path(f"/dev/shm/llmux-test-modes-{os.getpid()}")
    log = tmp_path / "holder.log"
    with open(log, "wb") as out:
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "held"),
                                   str(shm)], stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True,
                                  cwd=tmp_path)
    try:
        wait_until(lambda: "ready" in log.read_text(), 60, "the holder to start")
        job_id, _ = llmuxd.ok("Checkpoint", "sua{sv}", "modes", holder.pid, 0)
        result = llmuxd.ok("WaitJob", "ud", job_id, 120)
        assert result == ["done", "", ""], (result, llmuxd.log()[-3000:])
        holder.wait(30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        shm.unlink(missing_ok=True)
    root = llmuxd.state_dir
    # the images may be in the memory tier (the checkpoint's "images" links there): those
    # files hold the same memory and must be as closed
    tier = (root / "modes" / "images").resolve()
    places = [root, *root.rglob("*")]
    if not tier.is_relative_to(root):
        places += [tier, *tier.rglob("*")]
    checked = 0
    for path in places:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        checked += 1
        assert st.st_uid == 0, path
        assert st.st_mode & 0o007 == 0, f"{path} is open to others: {oct(st.st_mode)}"
        if st.st_gid != 0:
            assert st.st_mode & 0o070 == 0, f"{path} is open to group {st.st_gid}"
    assert checked > 3
    # the held contents are in there (as images or saved files), and no one else may read them
    assert any(b"secret secret" in p.read_bytes() for p in places if p.is_file())
    # and a user who is not root cannot read one, nor list the directory
    manifest = root / "modes" / "manifest.json"
    assert json.loads(manifest.read_text())["root_pid"] == holder.pid
    for argv in (["cat", str(manifest)], ["ls", str(root / "modes")]):
        proc = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                               "--clear-groups", *argv], capture_output=True, timeout=30)
        assert proc.returncode != 0, argv
    llmuxd.ok("DeleteCheckpoint", "s", "modes")
    no_unexpected_failure(llmuxd)


def test_many_bad_calls_at_once_leave_it_serving(llmuxd: Llmuxd) -> None:
    """200 concurrent hostile calls (mixed wrong types and names): all refused, it serves."""
    procs = []
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "err"}
    for i in range(200):
        args = (["DeleteCheckpoint", "s", f"../{i}"] if i % 2 else
                ["WaitJob", "ss", "a", "b"])
        procs.append(subprocess.Popen(
            ["busctl", f"--address={llmuxd.bus.address}", "call", BUS_NAME, OBJECT_PATH, IFACE,
             *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env))
    t0 = time.monotonic()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode != 0
        assert b"Traceback" not in err
    assert time.monotonic() - t0 < 120
    no_unexpected_failure(llmuxd)
    assert pid_alive(llmuxd.proc.pid) if llmuxd.proc else False


PROPERTIES = "org.freedesktop.DBus.Properties"
SIGNATURE = ("org.freedesktop.DBus.Error.InvalidArgs", "org.freedesktop.DBus.Error.UnknownMethod")
BAD_PROPERTY_CALLS: list[tuple[str, str, tuple[str, ...], str | tuple[str, ...]]] = [
    ("Get", "s", (IFACE,), SIGNATURE),
    ("Get", "", (), SIGNATURE),
    ("Get", "ssv", (IFACE, "Version", "s", "x"), SIGNATURE),
    ("Get", "su", (IFACE, "1"), SIGNATURE),
    ("Get", "ss", (IFACE, "Nope"), "org.freedesktop.DBus.Error.UnknownProperty"),
    ("Get", "ss", ("org.nope", "Version"), "org.freedesktop.DBus.Error.UnknownInterface"),
    ("Get", "ss", ("", "Version"), ("org.freedesktop.DBus.Error.UnknownInterface",
                                    "org.freedesktop.DBus.Error.NotSupported")),
    ("GetAll", "", (), SIGNATURE),
    ("GetAll", "u", ("1",), SIGNATURE),
    ("GetAll", "s", ("org.nope",), "org.freedesktop.DBus.Error.UnknownInterface"),
    ("Set", "ssv", (IFACE, "Version", "s", "x"), "org.freedesktop.DBus.Error.PropertyReadOnly"),
    ("Set", "ssv", (IFACE, "StateDirectory", "u", "1"),
     "org.freedesktop.DBus.Error.PropertyReadOnly"),
    ("Set", "ss", (IFACE, "Version"), SIGNATURE),
]


@pytest.mark.parametrize("user", [None, NOBODY], ids=["root", "nobody"])
def test_properties_with_wrong_arguments(llmuxd: Llmuxd, user: int | None) -> None:
    """The properties are what the policy opens to everybody (Get, GetAll on the manager):
    wrong arguments get the standard errors, with no traceback in the answer or the log."""
    for member, signature, args, name in BAD_PROPERTY_CALLS:
        got = llmuxd.busctl("call", BUS_NAME, OBJECT_PATH, PROPERTIES, member, signature,
                            *args, user=user)
        assert got.rc != 0, (member, signature, args, got.stdout)
        if user is not None and member == "Set":
            assert got.error_name == BUS_DENIED  # the policy: Get and GetAll only
            continue
        names = name if isinstance(name, tuple) else (name,)
        assert got.error_name in names, (member, signature, args, got.error_name,
                                         got.error_message)
        assert "Traceback" not in got.error_message and 'File "' not in got.error_message
    good = llmuxd.busctl("call", BUS_NAME, OBJECT_PATH, PROPERTIES, "Get", "ss", IFACE,
                         "Version", user=user)
    assert good.rc == 0 and good.stdout.startswith("v s ")
    no_unexpected_failure(llmuxd)
