"""Helpers of the system tests: commands, an overlay over the cached tree, a booted container.

Everything runs argv lists (never a shell line built from input) and raises an AssertionError
that carries the command's output when it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT_S = 120.0


def run(argv: list[str], *, timeout: float = 600, check: bool = True, input: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs argv (never a shell line); on failure the error shows its output."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          input=input, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        )
    return proc


@dataclass
class Overlay:
    """A writable overlay over the cached tree; the tree itself is never written."""

    lower: Path
    base: Path

    @property
    def merged(self) -> Path:
        return self.base / "merged"

    def mount(self) -> None:
        for name in ("upper", "work", "merged"):
            (self.base / name).mkdir(parents=True, exist_ok=True)
        options = (f"lowerdir={self.lower},upperdir={self.base / 'upper'},"
                   f"workdir={self.base / 'work'}")
        run(["mount", "-t", "overlay", "overlay", "-o", options, str(self.merged)])

    def unmount(self) -> None:
        # Deleting through a still-attached overlay would only write whiteouts to our own
        # upper layer: the cached tree below is safe either way.
        if os.path.ismount(self.merged):
            run(["umount", str(self.merged)], check=False)
        if os.path.ismount(self.merged):
            run(["umount", "-l", str(self.merged)])
        shutil.rmtree(self.base, ignore_errors=True)

    def chroot(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C",
               "DEBIAN_FRONTEND": "noninteractive"}
        return run(["chroot", str(self.merged), *argv], check=check, env=env)


@dataclass
class Booted:
    """A container whose PID 1 is systemd; commands go through ``podman exec``."""

    name: str

    def exec(self, *argv: str, user: str | None = None, check: bool = True,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", user, "--"] if user else []
        return run(["podman", "exec", self.name, *prefix, *argv], check=check, timeout=timeout)

    def write(self, path: str, text: str) -> None:
        """Writes a file inside the container (podman exec forwards no stdin without -i)."""
        run(["podman", "exec", "-i", self.name, "sh", "-c", 'mkdir -p "$(dirname "$1")" && '
             'cat >"$1"', "sh", path], input=text)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.exec("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(self, unit: str, what: str, predicate: Callable[[dict[str, str]], bool],
                 timeout: float) -> dict[str, str]:
        """Polls the unit's properties until predicate(props) holds; returns them."""
        deadline = time.monotonic() + timeout
        props: dict[str, str] = {}
        while time.monotonic() < deadline:
            props = self.show(unit, "ActiveState", "SubState", "MainPID", "NRestarts",
                              "StatusText", "Result")
            if predicate(props):
                return props
            time.sleep(0.2)
        raise AssertionError(f"{unit}: {what} did not happen within {timeout:.0f} s; last {props}")

    def wait_up(self) -> None:
        """Until systemd says the system is up (running, or degraded)."""
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        state = ""
        while time.monotonic() < deadline:
            state = self.exec("systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.25)
        failed = self.exec("systemctl", "--failed", "--no-pager", check=False).stdout
        raise AssertionError(
            f"systemd did not come up in {BOOT_TIMEOUT_S:.0f} s: {state}\n{failed}")

    def restart(self) -> None:
        """The machine rebooted: its container stopped (every process ends) and started
        again on the same root filesystem; returns once systemd is up."""
        run(["podman", "restart", "--time", "30", self.name], timeout=180)
        self.wait_up()

    def journal(self, unit: str) -> str:
        return self.exec("journalctl", "-u", unit, "--no-pager", "-o", "cat").stdout


def boot(name: str, rootfs: Path, *, overlay: bool) -> Booted:
    """Starts systemd as PID 1 (own PID namespace) and waits until the system is up."""
    root = f"{rootfs}:O" if overlay else str(rootfs)
    run(["podman", "--runtime", "runc", "run", "-d", "--name", name, "--privileged",
         "--systemd=always", "--network=host", "--rootfs", root, "/lib/systemd/systemd"])
    machine = Booted(name)
    machine.wait_up()
    return machine


def remove_container(name: str) -> None:
    run(["podman", "rm", "-f", "-t", "0", name], check=False, timeout=120)
