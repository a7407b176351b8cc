"""Test harness: a private system-style dbus-daemon with the project's policy, llmuxd on it.

The daemon's configuration copies Debian's system.conf defaults (deny method calls
and name ownership unless a policy opens them) and includes units/org.llmux.Host1.conf,
so the policy the package installs is the one exercised here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import pid_alive, wait_until

REPO = Path(__file__).resolve().parents[2]
LLMUXD = Path(sys.executable).with_name("llmuxd")
CRIU = os.environ.get("LLMUX_CRIU", "/opt/llmux/criu/criu")
#: where nothing is installed (the GPU machine), the carried bundle (packaging/dbus/)
DBUS_DAEMON = os.environ.get("LLMUX_DBUS_DAEMON", "dbus-daemon")
BUS_NAME = "org.llmux.Host1"
OBJECT_PATH = "/org/llmux/Host1"
ERROR_REPLY = re.compile(r"Got message type=error .*error-name=(\S+) error-message=(.*)$")

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""


def pid_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return ""


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


def kill_pid(pid: int) -> None:
    """Kills a process that may not be our child (a restored one) and waits for it to go."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    wait_until(lambda: not pid_alive(pid), 10, f"PID {pid} to die")


@dataclass
class BusCall:
    rc: int
    stdout: str
    stderr: str
    error_name: str = ""
    error_message: str = ""


@dataclass
class PrivateBus:
    address: str
    socket_path: str

    def busctl(
        self,
        *args: str,
        user: int | None = None,
        prefix: tuple[str, ...] = (),
        timeout: float = 60,
    ) -> BusCall:
        """busctl on this bus; the error *name* comes from sd-bus's debug log of the reply."""
        argv = [*prefix, "busctl", f"--address={self.address}", *args]
        if user is not None:
            argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
        env = {**os.environ, "SYSTEMD_LOG_LEVEL": "debug", "SYSTEMD_COLORS": "0"}
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
        call = BusCall(proc.returncode, proc.stdout, proc.stderr)
        for line in proc.stderr.splitlines():
            found = ERROR_REPLY.search(line)
            if found:
                call.error_name, call.error_message = found.group(1), found.group(2)
        return call


@contextlib.contextmanager
def running_bus(directory: Path) -> Iterator[PrivateBus]:
    """A system-style dbus-daemon with the project's policy, its socket in ``directory``."""
    sock = directory / "system_bus_socket"
    config = directory / "bus.conf"
    policy = REPO / "units" / "org.llmux.Host1.conf"
    config.write_text(BUS_CONFIG.format(socket=sock, policy=policy))
    proc = subprocess.Popen(
        [DBUS_DAEMON, f"--config-file={config}", "--nofork", "--print-address=1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    try:
        if not address.startswith("unix:"):
            raise RuntimeError(f"dbus-daemon did not start: {address!r}")
        yield PrivateBus(address=address, socket_path=str(sock))
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def private_bus() -> Iterator[PrivateBus]:
    # world-traversable, so that the `nobody` client reaches the socket and the *policy* refuses
    directory = tempfile.mkdtemp(prefix="llmux-bus-")
    os.chmod(directory, 0o755)
    try:
        with running_bus(Path(directory)) as bus:
            yield bus
    finally:
        subprocess.run(["rm", "-rf", directory], check=False)


class NotifySocket:
    """The NOTIFY_SOCKET end systemd would hold: a unix datagram socket the test binds."""

    def __init__(self, directory: Path):
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[str] = []

    def drain(self, wait: float = 0.1) -> None:
        self.sock.settimeout(wait)
        try:
            while True:
                self.messages.append(self.sock.recv(65536).decode())
                self.sock.settimeout(0.01)
        except (TimeoutError, BlockingIOError):
            pass

    def lines(self) -> list[str]:
        return [line for message in self.messages for line in message.splitlines()]

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines():
                if predicate(line):
                    return line
            self.drain(0.2)
        raise AssertionError(f"no matching notification in {self.lines()}")

    def close(self) -> None:
        self.sock.close()


@dataclass
class Llmuxd:
    bus: PrivateBus
    state_dir: Path
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    notify: NotifySocket | None = None
    log_path: Path | None = None
    #: argv of llmuxd itself (the installed entry point, or ``python -m`` where none is)
    command: list[str] = field(default_factory=lambda: [str(LLMUXD)])
    cuda_mode: str = "off"

    def start(self, wait_ready: bool = True) -> Llmuxd:
        if self.notify is not None:
            self.notify.close()
            os.unlink(self.notify.path)
        self.notify = NotifySocket(self.workdir)
        self.log_path = self.workdir / "llmuxd.log"
        env = {**os.environ, "NOTIFY_SOCKET": self.notify.path, **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *self.command,
                    "--bus",
                    self.bus.address,
                    "--state-dir",
                    str(self.state_dir),
                    "--criu",
                    CRIU,
                    "--cuda-mode",
                    self.cuda_mode,
                    "--config",
                    str(self.workdir / "llmuxd.toml"),
                    "--log-level",
                    "debug",
                ],
                stdout=log,
                stderr=log,
                env=env,
            )
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        assert self.notify is not None and self.proc is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"llmuxd exited {self.proc.returncode}:\n{self.log()}")
            self.notify.drain(0.2)
            if "READY=1" in self.notify.lines():
                return
        raise AssertionError(f"llmuxd never sent READY=1:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"llmuxd ignored SIGTERM:\n{self.log()}") from None

    def busctl(self, *args: str, **options: Any) -> BusCall:
        """PrivateBus.busctl on llmuxd's bus (user=, prefix=, timeout=)."""
        return self.bus.busctl(*args, **options)

    def call(self, method: str, signature: str = "", *args: object, **kw: Any) -> BusCall:
        """A method of org.llmux.Host1 on /org/llmux/Host1, JSON output."""
        return self.busctl(
            "--json=short",
            "call",
            "--",
            BUS_NAME,
            OBJECT_PATH,
            BUS_NAME,
            method,
            signature,
            *(str(a) for a in args),
            **kw,
        )

    def expect_error(
        self, name: str, method: str, signature: str = "", *args: object, **kw: Any
    ) -> str:
        """Calls and asserts the named error; its message must be for humans, not Python."""
        result = self.call(method, signature, *args, **kw)
        assert result.rc != 0, f"{method} succeeded: {result.stdout}"
        assert result.error_name == name, (result.error_name, result.error_message, result.stderr)
        assert "Traceback" not in result.error_message and 'File "' not in result.error_message
        return result.error_message

    def ok(self, method: str, signature: str = "", *args: object, **kw: Any) -> Any:
        result = self.call(method, signature, *args, **kw)
        assert result.rc == 0, (result.error_name, result.error_message)
        return json.loads(result.stdout)["data"] if result.stdout.strip() else None


def criu_usable() -> bool:
    return os.geteuid() == 0 and os.access(CRIU, os.X_OK)


@pytest.fixture
def llmuxd(private_bus: PrivateBus, tmp_path: Path) -> Iterator[Llmuxd]:
    if not criu_usable():
        pytest.skip(f"llmuxd needs root and CRIU at {CRIU} (packaging/criu/install-criu.sh)")
    with running_llmuxd(private_bus, tmp_path) as daemon:
        yield daemon


@contextlib.contextmanager
def running_llmuxd(bus: PrivateBus, workdir: Path, config: str = "", **options: Any,
                   ) -> Iterator[Llmuxd]:
    """llmuxd on ``bus``, its state and log under ``workdir``, ``config`` its llmuxd.toml,
    ``options`` fields of Llmuxd (command, cuda_mode, env); stopped afterwards (the fixture's
    and the benchmarks' one way to run it)."""
    (workdir / "llmuxd.toml").write_text(config or "# empty: the flags say it all\n")
    daemon = Llmuxd(bus=bus, state_dir=workdir / "state", workdir=workdir, **options)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        if daemon.notify is not None:
            daemon.notify.close()


TARGET = """
import os, sys, time
size = int(sys.argv[1]) << 20
ballast = b"\\xa5" * size if size else b""
i = 0
while True:
    i += 1
    print(i, flush=True)
    time.sleep(0.05)
"""


@dataclass
class Target:
    """A checkpointable process: own session, stdin /dev/null, counting into a log file."""

    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def last(self) -> int:
        lines = self.log.read_text().split()
        return int(lines[-1]) if lines else 0

    def reap(self) -> None:
        """CRIU kills the tree after a dump; our zombie must go before the PID is restored."""
        self.proc.wait(30)


@pytest.fixture
def spawn_counter(tmp_path: Path) -> Iterator[Callable[..., Target]]:
    started: list[Target] = []

    def spawn(megabytes: int = 0, name: str = "target") -> Target:
        log = tmp_path / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", TARGET, str(megabytes)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=tmp_path,
            )
        target = Target(proc, log)
        started.append(target)
        wait_until(lambda: target.last() > 0, 60, "the target to start counting")
        return target

    yield spawn
    for target in started:
        kill_pid(target.pid)
