"""llmuxd as systemd runs it: notifications, logs, configuration, and the unit files."""

from __future__ import annotations

import configparser
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from llmux.service.journal import KeyValueFormatter, fields, journal_handler
from llmux.service.notify import watchdog_interval
from tests.support.llmuxd_harness import LLMUXD, REPO, Llmuxd, PrivateBus, criu_usable

UNITS = REPO / "units"


@pytest.mark.dbus
def test_ready_status_watchdog_and_stopping(private_bus: PrivateBus, tmp_path: Path) -> None:
    if not criu_usable():
        pytest.skip("llmuxd needs root and the CRIU bundle")
    (tmp_path / "llmuxd.toml").write_text("")
    daemon = Llmuxd(private_bus, tmp_path / "state", tmp_path, env={"WATCHDOG_USEC": "400000"})
    daemon.start()
    try:
        assert daemon.notify is not None and daemon.proc is not None
        ready = next(m for m in daemon.notify.messages if "READY=1" in m)
        assert ready.splitlines() == ["READY=1", "STATUS=idle; 0 checkpoints"]
        # READY only once the name is owned: a call answers right away
        assert daemon.ok("ListCheckpoints") == [[]]
        daemon.notify.wait_for(lambda line: line == "WATCHDOG=1")
        pings = 0
        while pings < 3:
            daemon.notify.drain(0.5)
            pings = daemon.notify.lines().count("WATCHDOG=1")
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(60) == 0
        daemon.notify.drain(0.2)
        assert "STOPPING=1" in daemon.notify.lines()
    finally:
        daemon.stop()
        if daemon.notify is not None:
            daemon.notify.close()


@pytest.mark.dbus
def test_refusals_are_logged_as_key_value_lines(llmuxd: Llmuxd) -> None:
    llmuxd.expect_error("org.llmux.Error.InvalidArgument", "Restore", "sa{sv}", "../x", 0)
    line = next(ln for ln in llmuxd.log().splitlines() if "Restore refused" in ln)
    assert "error=org.llmux.Error.InvalidArgument" in line
    assert "caller_pid=" in line and "caller_uid=0" in line


@pytest.mark.dbus
def test_without_criu_llmuxd_fails_clearly(private_bus: PrivateBus, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(LLMUXD),
            "--bus",
            private_bus.address,
            "--state-dir",
            str(tmp_path / "s"),
            "--criu",
            str(tmp_path / "no-criu"),
            "--config",
            "/dev/null",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "no-criu" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("config", "complaint"),
    [
        ('bus = "system"\nstate_dirr = "/x"\n', "unknown key 'state_dirr'"),
        ('ghost_limit_bytes = "big"\n', "ghost_limit_bytes must be a int"),
        ('cuda_mode = "gpu"\n', "cuda_mode must be one of"),
        ("criu_timeout_secs = 0\n", "criu_timeout_secs must be positive"),
        ('criu_timeout_secs_per_gib = "1m"\n', "criu_timeout_secs_per_gib must be a float"),
        ("bus = \n", "not valid TOML"),
    ],
)
def test_a_bad_configuration_is_refused_naming_the_key(
    tmp_path: Path, config: str, complaint: str
) -> None:
    path = tmp_path / "llmuxd.toml"
    path.write_text(config)
    result = subprocess.run(
        [str(LLMUXD), "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert str(path) in result.stderr and complaint in result.stderr


def test_a_missing_configuration_file_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(LLMUXD), "--config", str(tmp_path / "none.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    own = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(own) == 1.0


@pytest.fixture
def journal_entries(monkeypatch: pytest.MonkeyPatch):
    """Entries as systemd.journal hands them to sd_journal_sendv (KEY=value lines)."""
    systemd_journal = pytest.importorskip("systemd.journal")
    sent: list[dict[str, str]] = []

    def sendv(*lines: str | bytes) -> None:
        entry = {}
        for line in lines:
            text = line.decode() if isinstance(line, bytes) else line
            key, value = text.split("=", 1)
            entry[key] = value
        sent.append(entry)

    monkeypatch.setattr(systemd_journal, "sendv", sendv)
    handler = journal_handler()
    logger = logging.getLogger("llmuxd-journal-test")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield sent, logger
    logger.removeHandler(handler)
    handler.close()


def test_journal_records_carry_the_fields_an_operator_greps(journal_entries) -> None:
    sent, logger = journal_entries
    extra = fields(
        model="qwen3-0.6b",
        job_id=7,
        operation="checkpoint",
        caller_pid=4242,
    )
    extra["journal_fields"]["ERROR"] = "org.llmux.Error.NoSpace"  # added late, as jobs.py does
    logger.warning("job 7 failed: checkpoint qwen3-0.6b", extra=extra)
    entry = sent.pop()
    assert entry["MESSAGE"] == "job 7 failed: checkpoint qwen3-0.6b"
    assert entry["PRIORITY"] == "4"
    assert entry["SYSLOG_IDENTIFIER"] == "llmuxd"
    assert (entry["MODEL"], entry["JOB_ID"], entry["OPERATION"], entry["CALLER_PID"]) == (
        "qwen3-0.6b",
        "7",
        "checkpoint",
        "4242",
    )
    assert entry["ERROR"] == "org.llmux.Error.NoSpace"

    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("unexpected")
    entry = sent.pop()
    assert entry["PRIORITY"] == "3"
    assert entry["MESSAGE"].startswith("unexpected\nTraceback") and "boom" in entry["MESSAGE"]
    assert "MODEL" not in entry


def test_records_are_key_value_lines_outside_the_journal() -> None:
    record = logging.LogRecord("llmuxd", logging.INFO, __file__, 1, "resumed", None, None)
    record.__dict__.update(fields(model="qwen3 0.6b", job_id=7))
    line = KeyValueFormatter().format(record)
    assert line.endswith(' INFO llmuxd: resumed model="qwen3 0.6b" job_id=7')


def _unit_with_exec(tmp_path: Path, exec_path: str) -> Path:
    unit = (UNITS / "llmuxd.service").read_text().replace("/usr/bin/llmuxd", exec_path)
    path = tmp_path / "llmuxd.service"
    path.write_text(unit)
    return path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_unit_verifies_cleanly(tmp_path: Path) -> None:
    """/usr/bin/llmuxd exists only once packaged: verify a copy that runs the venv's llmuxd.

    The llmuxd(8) man page, too, is installed by the package only (tests/system verifies the
    installed unit with its Documentation= links); here they are not checked.
    """
    unit = _unit_with_exec(tmp_path, str(LLMUXD))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "llmuxd.service" not in result.stderr, result.stderr


def _ini(path: Path, strict: bool = True) -> configparser.ConfigParser:
    """A unit-style file, keys as written (case kept)."""
    parser = configparser.ConfigParser(strict=strict, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def test_unit_and_activation_file_agree() -> None:
    service = _ini(UNITS / "llmuxd.service", strict=False)["Service"]
    assert service["Type"] == "notify"
    assert service["BusName"] == "org.llmux.Host1"
    assert service["WatchdogSec"] == "30"
    assert service["StateDirectory"] == "llmux/checkpoints"
    assert service["StateDirectoryMode"] == "0700"
    entry = _ini(UNITS / "org.llmux.Host1.service")["D-BUS Service"]
    assert entry["Name"] == "org.llmux.Host1"
    assert entry["SystemdService"] == "llmuxd.service"
    assert entry["User"] == "root"
    assert entry["Exec"] == service["ExecStart"]


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("systemd-tmpfiles") is None,
    reason="needs root and systemd-tmpfiles",
)
def test_tmpfiles_creates_a_root_only_state_directory(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(UNITS / "llmux.tmpfiles.conf")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    checkpoints = (tmp_path / "var/lib/llmux/checkpoints").stat()
    assert stat.S_IMODE(checkpoints.st_mode) == 0o700 and checkpoints.st_uid == 0


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("systemd-sysusers") is None,
    reason="needs root and systemd-sysusers",
)
def test_sysusers_creates_the_llmux_group(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(UNITS / "llmux.sysusers.conf")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    groups = (tmp_path / "etc/group").read_text().splitlines()
    assert any(line.startswith("llmux:x:") for line in groups)


def test_the_console_script_is_llmuxd() -> None:
    result = subprocess.run([str(LLMUXD), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for flag in ("--bus", "--state-dir", "--criu", "--cuda-mode", "--config", "--log-level"):
        assert flag in result.stdout
    assert Path(sys.executable).with_name("llmuxd") == LLMUXD
