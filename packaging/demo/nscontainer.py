"""A container made of the kernel's own parts, for machines without a container engine.

What it gives is what `podman run --rootfs /:O --pid=host --network=host --ipc=host -v SRC:DST`
gives, the flags the shim's image is documented with: a throw-away overlay over the host's
root as the container's root (its writable layer per container, gone with it), a mount
namespace of its own entered by pivot_root (so the overlay is the namespace's root, as runc
makes it), fresh /proc and /sys, the host's /dev (GPU device nodes and /dev/shm: the host's
IPC), host PID and network namespaces, and bind mounts of host paths. The host's other
mounts (a driver folder, a data disk) are bound at the same place, as podman's `-v` would.

What differs from podman: no cgroup of its own (the processes stay in the caller's), no
seccomp profile or dropped capabilities (it runs as root with all of them, like
--privileged), no image layers (the lower layer is the host's root), and /dev is the host's
devtmpfs bound whole rather than a tmpfs of selected nodes.

Used by packaging/demo/cross_container.py; needs root, util-linux's `unshare` and overlayfs.
`PodmanContainer` is the same interface over podman itself, where podman runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

#: never bound from the host: made fresh (/proc, /sys), bound whole (/dev), or per container
#: (/tmp and /run live in the writable layer, as in an image's rootfs)
_OWN = ("/proc", "/sys", "/dev", "/tmp", "/run")
_SYS_PIVOT_ROOT = 155  # x86_64
_MNT_DETACH = 2


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def host_mounts(skip_under: str) -> list[str]:
    """Mount points of the host to bind at the same place: all but its root, the
    container-owned trees and anything under the containers' own folder."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == "/" or point.startswith(skip_under):
            continue
        if any(point == own or point.startswith(own + "/") for own in _OWN):
            continue
        points.append(point)
    return sorted(set(points), key=len)


def _init(merged: str, binds: list[tuple[str, str]], argv: list[str]) -> None:
    """Runs inside the new mount namespace: lays the container out, pivots, execs."""
    root = Path(merged)
    _mount("--make-rprivate", "/")
    for target in ("dev", "proc", "sys"):
        (root / target).mkdir(exist_ok=True)
    _mount("--rbind", "/dev", str(root / "dev"))
    _mount("-t", "proc", "proc", str(root / "proc"))
    _mount("-t", "sysfs", "-o", "ro", "sysfs", str(root / "sys"))
    for src, dst in binds:
        target = root / dst.lstrip("/")
        if Path(src).is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch(exist_ok=True)
        _mount("--bind", src, str(target))
    os.chdir(root)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_PIVOT_ROOT, b".", b".") != 0:
        raise OSError(ctypes.get_errno(), "pivot_root")
    if libc.umount2(b".", _MNT_DETACH) != 0:
        raise OSError(ctypes.get_errno(), "umount2 of the old root")
    os.chdir("/")
    os.execvp(argv[0], argv)  # noqa: S606 (argv is the caller's list, no shell)


@dataclass
class NsContainer:
    """One container: its folder (writable layer, work dir, merged root) and its first
    process."""

    name: str
    base: Path
    binds: list[tuple[str, str]] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def folder(self) -> Path:
        return self.base / self.name

    @property
    def merged(self) -> Path:
        return self.folder / "merged"

    @property
    def upper(self) -> Path:
        return self.folder / "upper"

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"container {self.name} was not started"
        return self.proc.pid

    def start(self, argv: list[str], env: dict[str, str], log: Path) -> int:
        """Lay out the overlay, enter a new mount namespace and exec ``argv`` in it; its
        output goes to ``log``. Returns the first process's (host) PID."""
        for sub in ("upper", "work", "merged"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        _mount("-t", "overlay", "overlay", "-o",
               f"lowerdir=/,upperdir={self.upper},workdir={self.folder / 'work'}",
               str(self.merged))
        binds = [(p, p) for p in host_mounts(str(self.base))] + self.binds
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--",
                 sys.executable, __file__, "init", str(self.merged), json.dumps(binds), "--",
                 *argv],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                start_new_session=True)
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def processes(self) -> list[int]:
        """Every process in the container's mount namespace."""
        try:
            ns = os.readlink(f"/proc/{self.pid}/ns/mnt")
        except OSError:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.readlink(entry / "ns" / "mnt") == ns:
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found

    def remove(self) -> None:
        """`podman rm --force`: kill what runs in it, drop its writable layer."""
        pids = self.processes() if self.proc is not None and self.proc.poll() is None else []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        subprocess.run(["umount", "-l", str(self.merged)], check=False,
                       stderr=subprocess.DEVNULL)
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class PodmanContainer:
    """The same interface over `podman --runtime runc run -d --rootfs /:O` with the flags
    the shim's image is documented with (no --privileged, no --init)."""

    name: str
    base: Path
    binds: list[tuple[str, str]] = field(default_factory=list)
    _pid: int = 0
    _log: Path | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("podman") is not None and shutil.which("runc") is not None

    @property
    def pid(self) -> int:
        return self._pid

    def _podman(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(["podman", "--runtime", "runc", *args], capture_output=True,
                              text=True, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout.strip()

    def start(self, argv: list[str], env: dict[str, str], log: Path) -> int:
        volumes = [a for src, dst in self.binds for a in ("-v", f"{src}:{dst}")]
        envs = [a for k in ("PYTHONPATH", "HF_HUB_OFFLINE", "LLMUX_VLLM_COMMAND", "HOME")
                if k in env for a in ("--env", f"{k}={env[k]}")]
        self._podman("run", "-d", "--name", f"llmux-{self.base.name}-{self.name}",
                     "--network=host", "--pid=host", "--ipc=host", *volumes, *envs,
                     # a fully visible procfs: engines get PID namespaces of their own
                     "-v", "/proc:/run/llmux/proc:ro",
                     "--rootfs", "/:O", *argv)
        self._pid = int(self._podman("inspect", "--format", "{{.State.Pid}}",
                                     f"llmux-{self.base.name}-{self.name}"))
        self._log = log
        return self._pid

    def running(self) -> bool:
        return self._pid > 0 and Path(f"/proc/{self._pid}").exists()

    def remove(self) -> None:
        """`podman rm --force`: its cgroup's processes die with it (a restored tree too)."""
        name = f"llmux-{self.base.name}-{self.name}"
        if self._log is not None:
            self._log.write_text(self._podman("logs", name, check=False))
        self._podman("rm", "--force", "--time", "5", name, check=False)


if __name__ == "__main__" and len(sys.argv) > 4 and sys.argv[1] == "init":
    _sep = sys.argv.index("--")
    _init(sys.argv[2], [tuple(b) for b in json.loads(sys.argv[3])], sys.argv[_sep + 1 :])
