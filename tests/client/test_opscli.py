"""The operator commands (client/opscli.py) against a real llmuxd and a real shim.

llmuxd runs on the private system-style dbus-daemon of tests/service/dbus (the project's
policy included), with CRIU 4.2; the commands run as separate processes, as an operator
types them, with stdout and stderr read back (and a real pseudo-terminal for the bar).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import pty
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmux.client.opscli import ProgressReporter, add_client_commands, render_table
from llmux.common.contract import ErrorName
from tests.support.llmuxd_harness import Llmuxd, Target
from tests.support.procs import pid_alive, wait_until
from tests.support.proxy_fixtures import ShimFactory

NOBODY = 65534
BUS_ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"



def llmux_argv(*args: str) -> list[str]:
    """The ``llmux`` command (shim/cli.py, which wires in add_client_commands)."""
    return [sys.executable, "-m", "llmux.shim.cli", *args]


def llmux(*args: str, user: int | None = None, timeout: float = 120
          ) -> subprocess.CompletedProcess[str]:
    argv = llmux_argv(*args)
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def ok_json(*args: str) -> Any:
    proc = llmux(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def error_of(proc: subprocess.CompletedProcess[str]) -> str:
    """The error name the command printed (llmux: error: NAME: message)."""
    for line in proc.stderr.splitlines():
        if line.startswith("llmux: error: "):
            return line.removeprefix("llmux: error: ").split(":", 1)[0]
    return ""


# ------------------------------------------------------------------------------ the wiring


def test_llmux_has_the_client_commands() -> None:
    """shim/cli.py must call add_client_commands (the lead wires it)."""
    proc = subprocess.run([sys.executable, "-m", "llmux.shim.cli", "--help"],
                          capture_output=True, text=True, timeout=60)
    for command in ("host", "checkpoints", "checkpoint", "restore", "status"):
        assert command in proc.stdout, f"llmux --help lists no {command!r}:\n{proc.stdout}"


def test_help_and_usage_errors() -> None:
    proc = llmux("checkpoints")
    assert proc.returncode == 2
    assert "list, inspect, delete" in proc.stderr
    proc = llmux("checkpoint", "../etc", "--pid", "1234")
    assert proc.returncode == 2
    assert "invalid model name '../etc'" in proc.stderr
    proc = llmux("checkpoint", "m", "--pid", "1")
    assert proc.returncode == 2 and "--pid" in proc.stderr
    proc = llmux("checkpoint", "m")
    assert proc.returncode == 2 and "--pid" in proc.stderr  # argparse: required


def test_unreachable_bus_is_a_named_error(tmp_path: Path) -> None:
    proc = llmux("host", "status", "--bus", f"unix:path={tmp_path}/no-bus")
    assert proc.returncode == 1
    assert error_of(proc) == "org.llmux.Error.Client.ConnectionFailed"
    proc = llmux("host", "status", "--bus", f"unix:path={tmp_path}/no-bus", "--json")
    assert json.loads(proc.stdout)["error"]["name"] == "org.llmux.Error.Client.ConnectionFailed"


# ------------------------------------------------------------------------------ llmuxd


@pytest.mark.dbus
@pytest.mark.criu
def test_host_status(llmuxd: Llmuxd) -> None:
    address = llmuxd.bus.address
    proc = llmux("host", "status", "--bus", address)
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout)
    assert "CRIU: 4." in proc.stdout
    assert f"State directory: {llmuxd.state_dir}" in proc.stdout
    assert "Checkpoints: 0" in proc.stdout
    info = ok_json("host", "status", "--bus", address)
    assert info["StateDirectory"] == str(llmuxd.state_dir)
    assert info["CriuVersion"].startswith("4.")
    assert info["Checkpoints"] == 0
    assert info["FreeBytes"] > 0


@pytest.mark.dbus
@pytest.mark.criu
def test_policy_refusal_is_explained(llmuxd: Llmuxd) -> None:
    address = llmuxd.bus.address
    proc = llmux("checkpoints", "list", "--bus", address, user=NOBODY)
    assert proc.returncode == 1
    assert error_of(proc) == BUS_ACCESS_DENIED
    assert "group 'llmux'" in proc.stderr  # the hint
    # the policy lets anyone read the manager's properties, so status still answers
    proc = llmux("host", "status", "--bus", address, user=NOBODY)
    assert proc.returncode == 0, proc.stderr
    assert "Checkpoints: (not permitted" in proc.stdout


@pytest.mark.dbus
@pytest.mark.criu
def test_named_errors_from_the_service(llmuxd: Llmuxd) -> None:
    address = llmuxd.bus.address
    proc = llmux("checkpoints", "inspect", "nothing-here", "--bus", address)
    assert proc.returncode == 1
    assert error_of(proc) == ErrorName.NOT_FOUND
    proc = llmux("checkpoints", "delete", "nothing-here", "--bus", address, "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"]["name"] == ErrorName.NOT_FOUND
    proc = llmux("restore", "nothing-here", "--bus", address)
    assert proc.returncode == 1
    assert error_of(proc) == ErrorName.NOT_FOUND
    # a PID that is not there
    proc = llmux("checkpoint", "ghost", "--pid", "4194303", "--bus", address)
    assert proc.returncode == 1
    assert error_of(proc) in (ErrorName.NO_SUCH_PROCESS, ErrorName.INVALID_ARGUMENT)
    assert "Traceback" not in proc.stderr


@pytest.mark.dbus
@pytest.mark.criu
def test_checkpoint_list_inspect_restore_delete(
    llmuxd: Llmuxd, spawn_counter: Callable[..., Target]
) -> None:
    address = llmuxd.bus.address
    target = spawn_counter(megabytes=64)
    assert ok_json("checkpoints", "list", "--bus", address) == []
    assert llmux("checkpoints", "list", "--bus", address).stdout.strip() == "no checkpoints"

    # stderr is a pipe here: progress comes as plain lines, the result on stdout
    proc = llmux("checkpoint", "opscli-a", "--pid", str(target.pid), "--bus", address)
    assert proc.returncode == 0, proc.stderr
    print(proc.stderr + proc.stdout)
    progress = [line for line in proc.stderr.splitlines() if line.startswith("checkpoint ")]
    assert progress and progress[-1].startswith("checkpoint opscli-a: 100%"), proc.stderr
    assert "\r" not in proc.stderr
    assert proc.stdout.startswith(f"checkpointed opscli-a (PID {target.pid}")
    target.reap()

    table = llmux("checkpoints", "list", "--bus", address).stdout
    print(table)
    header, row = table.splitlines()[:2]
    assert header.split()[:3] == ["MODEL", "SIZE", "CREATED"]
    assert row.split()[0] == "opscli-a" and str(target.pid) in row
    assert header.split()[-3:] == ["WHERE", "STORAGE", "LIVE"], table
    assert row.split()[-3] == "local" and row.split()[-1] == "0", table
    assert row.split()[-2] in ("memory", "memory+disk"), table  # the default memory tier
    assert "warning:" not in table
    [listed] = ok_json("checkpoints", "list", "--bus", address)
    assert listed["Model"] == "opscli-a" and listed["RootPid"] == target.pid
    assert listed["SizeBytes"] > 64 << 20
    assert listed["Location"] == "local"

    shown = llmux("checkpoints", "inspect", "opscli-a", "--bus", address).stdout
    assert f"Root PID: {target.pid}" in shown and "Manifest:" in shown
    assert "Where: local" in shown
    inspected = ok_json("checkpoints", "inspect", "opscli-a", "--bus", address)
    assert inspected["Manifest"]["model"] == "opscli-a"
    assert inspected["Manifest"]["root_pid"] == target.pid

    counted = target.last()
    restored = ok_json("restore", "opscli-a", "--bus", address)
    assert restored["RootPid"] == target.pid and restored["ImagesKept"] is True
    wait_until(lambda: target.last() > counted, 30, "the restored target to count")

    proc = llmux("checkpoints", "delete", "opscli-a", "--bus", address)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "deleted the checkpoint of opscli-a"
    assert ok_json("checkpoints", "list", "--bus", address) == []


@pytest.mark.dbus
@pytest.mark.criu
def test_progress_bar_on_a_terminal(llmuxd: Llmuxd, spawn_counter: Callable[..., Target]) -> None:
    target = spawn_counter(megabytes=128)
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run(
            llmux_argv("checkpoint", "opscli-tty", "--pid", str(target.pid), "--leave-running",
                       "--bus", llmuxd.bus.address),
            stdout=subprocess.PIPE, stderr=terminal, text=True, timeout=120,
        )
        os.close(terminal)
        terminal = -1
        drawn = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        if terminal >= 0:
            os.close(terminal)
        os.close(controller)
    text = drawn.decode()
    print(repr(text[-400:]))
    assert proc.returncode == 0, text
    drawn_lines = _terminal_lines(text)
    assert any(line.startswith("checkpoint opscli-tty ") for line in drawn_lines), text
    assert re.search(r"checkpoint opscli-tty ━{30} +100%", drawn_lines[-1]), drawn_lines[-1]
    assert "left running" in proc.stdout
    assert pid_alive(target.pid)
    assert llmux("checkpoints", "delete", "opscli-tty", "--bus", llmuxd.bus.address
                 ).returncode == 0


# ------------------------------------------------------------------------------ the shim


async def _llmux_async(*args: str) -> tuple[int, str, str]:
    """The command as a process, without blocking the loop the shim runs in."""
    proc = await asyncio.create_subprocess_exec(
        *llmux_argv(*args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_shim_status_table_and_json(shim_factory: ShimFactory) -> None:
    shim = await shim_factory(["a", "b"])
    async with httpx.AsyncClient(timeout=120) as client:
        r = await client.post(f"{shim.url}/v1/chat/completions", json={
            "model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text
        direct = (await client.get(f"{shim.url}/control/status")).json()

    rc, out, err = await _llmux_async("status", "--url", shim.url)
    assert rc == 0, err
    print(out)
    lines = out.splitlines()
    assert lines[0].split() == ["MODEL", "STATE", "ACTIVE", "PIDS", "LAST", "WAKE", "IN",
                                "FLIGHT", "QUEUED"]
    rows = {line.split()[0]: line.split() for line in lines[1:3]}
    assert rows["a"][1] == direct["models"]["a"]["state"] == "running"
    assert rows["a"][2] == "*"
    assert str(direct["models"]["a"]["pids"][0]) in rows["a"][3]
    assert "active: a" in out

    rc, out, err = await _llmux_async("status", "--url", shim.url, "--json")
    assert rc == 0, err
    as_json = json.loads(out)
    assert as_json["active"] == "a"
    assert set(as_json["models"]) == {"a", "b"}
    assert as_json["models"]["a"]["pids"] == direct["models"]["a"]["pids"]


async def test_shim_unreachable(unused_tcp_port: int) -> None:
    rc, out, err = await _llmux_async("status", "--url", f"http://127.0.0.1:{unused_tcp_port}")
    assert rc == 1
    assert "cannot reach the shim" in err
    rc, out, _ = await _llmux_async("status", "--url", f"http://127.0.0.1:{unused_tcp_port}",
                                    "--json")
    assert json.loads(out)["error"]["name"] == "Unreachable"


# ------------------------------------------------------------------------------ pieces


def test_progress_reporter_plain_lines_and_bar() -> None:
    plain = io.StringIO()
    reporter = ProgressReporter("restore m", stream=plain, tty=False)
    for fraction in (0.0, 0.05, 0.12, 0.13, 0.5, 0.99, 1.0):
        reporter.update(fraction, 10 << 20, 5e8)
    assert plain.getvalue().splitlines() == [
        "restore m: 0% (10.0 MiB, 500 MB/s)",
        "restore m: 12% (10.0 MiB, 500 MB/s)",
        "restore m: 50% (10.0 MiB, 500 MB/s)",
        "restore m: 99% (10.0 MiB, 500 MB/s)",
        "restore m: 100% (10.0 MiB, 500 MB/s)",
    ]
    bar = io.StringIO()
    reporter = ProgressReporter("restore m", stream=bar, tty=True, width=10, min_interval=0)
    reporter.update(0.5)
    reporter.update(1.0)
    reporter.finish()
    drawn = bar.getvalue()
    assert re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn).endswith("\n")  # the line is ended
    lines = _terminal_lines(drawn)
    assert any(re.fullmatch(r"restore m ━{5}╺━{4} +50%", line) for line in lines), lines
    assert re.fullmatch(r"restore m ━{10} +100%", lines[-1])


def _terminal_lines(drawn: str) -> list[str]:
    """What a terminal shows line by line: each redraw (after \\r) without its styles."""
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn)
    return [part.strip() for part in re.split(r"[\r\n]", plain) if part.strip()]


def test_render_table_aligns_columns() -> None:
    text = render_table(["MODEL", "SIZE"], [["a-long-name", "1.0 GiB"], ["b", "12 B"]])
    assert text.splitlines() == ["MODEL        SIZE", "a-long-name  1.0 GiB", "b            12 B"]


def test_add_client_commands_parses_every_form() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="llmux")
    add_client_commands(parser.add_subparsers(dest="command"))
    forms: dict[str, list[str]] = {
        "host": ["host", "status", "--json", "--bus", "session"],
        "list": ["checkpoints", "list"],
        "inspect": ["checkpoints", "inspect", "m"],
        "delete": ["checkpoints", "delete", "m", "--json"],
        "checkpoint": ["checkpoint", "m", "--pid", "42", "--leave-running", "--timeout", "9"],
        "restore": ["restore", "m", "--delete-images"],
        "status": ["status", "--url", "http://127.0.0.1:1", "--json"],
    }
    for argv in forms.values():
        args = parser.parse_args(argv)
        assert callable(args.func)
    args = parser.parse_args(forms["checkpoint"])
    assert (args.model, args.pid, args.leave_running, args.timeout, args.bus) == (
        "m", 42, True, 9.0, os.environ.get("LLMUX_BUS", "system"))
