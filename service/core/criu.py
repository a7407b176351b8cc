"""Driving the criu binary: version check, dump, restore, and readable failures.

CRIU is run as a subprocess with argv lists (never a shell). Its verbose log goes to a file
in the images directory; on failure the lines that explain it are cut out of that log and
carried by CriuFailed. A cancelled run, or one past its time bound (Timeout), kills CRIU.
What a killed CRIU leaves (measured, test_faults): a dump killed before it logs "Unfreezing
tasks into 2" leaves the tree running (ptrace detaches, the parasite returns through its
sigreturn), except inside the short window where it injects a syscall into a task (a task
then dies of the trap: seen once in 45 staged kills); killed after it, the images are
complete and the tree dead or dying (store.dump_completed). A restore killed midway leaves
its restored processes waiting in CRIU's restorer forever: the engine kills them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import shutil
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llmux.common.errors import CriuFailed, Timeout, Unsupported

MIN_MAJOR = 4
BUNDLE_PATH = "/opt/llmux/criu/criu"
"""Where packaging/criu/install-criu.sh puts the bundle; used when 'criu' is not on PATH."""

INSTALL_HINT = "packaging/criu/install-criu.sh installs CRIU 4.2.1 into /opt/llmux/criu"

_HARMLESS = ("RLIMIT_NOFILE",)
"""Log lines CRIU prints on every run on hosts without CAP_SYS_RESOURCE."""

_VERSION = re.compile(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class CriuVersion:
    major: int
    minor: int
    sublevel: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.sublevel}"


def parse_version(text: str) -> CriuVersion | None:
    m = _VERSION.search(text)
    if m is None:
        return None
    return CriuVersion(int(m[1]), int(m[2]), int(m[3] or 0))


def log_excerpt(log: str, max_lines: int = 25) -> str:
    """The lines of a CRIU log that say why it failed.

    Every "Error"/"Warn" line with the two lines before it, else the tail of the log.
    """
    lines = [ln for ln in log.splitlines() if not any(h in ln for h in _HARMLESS)]
    picked: list[int] = []
    for i, line in enumerate(lines):
        if "Error" in line or "error" in line.split(")", 1)[-1][:40] or "Warn" in line:
            picked.extend(range(max(0, i - 2), i + 1))
    if not picked:
        tail = lines[-max_lines:]
        return "\n".join(tail)
    keep = sorted(set(picked))[-max_lines:]
    return "\n".join(lines[i] for i in keep)


@dataclass(frozen=True)
class DumpRequest:
    pid: int
    images_dir: Path
    leave_running: bool = False
    ghost_limit_bytes: int = 512 << 20
    external_mounts: Sequence[tuple[str, str]] = ()
    """(mount point inside the tree's mount namespace, key) pairs."""
    shell_job: bool = False
    foreign_mntns: bool = False
    plugin_dir: str | None = None
    log_name: str = "dump.log"


@dataclass(frozen=True)
class RestoreRequest:
    images_dir: Path
    pidfile: Path
    root: Path | None = None
    """The target container's merged rootfs as a host path; None for the host's own root."""
    external_mounts: Sequence[tuple[str, str]] = ()
    """(key, host path) pairs."""
    shell_job: bool = False
    foreign_mntns: bool = False
    plugin_dir: str | None = None
    cgroup_procs: Sequence[Path] = ()
    """cgroup.procs files CRIU is moved into before it forks the tree, which inherits them."""
    log_name: str = "restore.log"


@dataclass
class CriuRun:
    """A CRIU process in flight; pid is what restore progress watches."""

    argv: list[str]
    pid: int = 0
    returncode: int | None = None
    output: str = ""
    log_path: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)


_COMMON = ("--tcp-established", "--ext-unix-sk", "--link-remap", "--file-locks")


_SBIN_PATH = "/usr/sbin:/sbin:/usr/local/sbin"


NETWORK_LOCKS = ("nftables", "iptables", "skip")
"""CRIU's ways of keeping packets away from a tree's TCP connections while it dumps or
restores them (--network-lock), fastest first."""
AUTO = "auto"


def iptables_restore_found(search_path: str | None = None) -> bool:
    """Whether CRIU finds iptables-restore (on PATH or in the sbin directories)."""
    path = search_path if search_path is not None else (
        os.environ.get("PATH", "") + os.pathsep + _SBIN_PATH)
    return shutil.which("iptables-restore", path=path) is not None


async def usable_network_locks(binary: str, search_path: str | None = None) -> tuple[str, ...]:
    """The methods this host's CRIU can use, fastest first ("skip" always: without a lock
    CRIU fails on the first established connection, and an engine's torch.distributed
    store has one; the tree is frozen meanwhile and engines listen on loopback).

    nftables locks and unlocks in CRIU's own process (libnftables): 7-12 ms to unlock at
    the end of a restore, against 49-66 ms for iptables, which runs iptables-restore up
    to seven times (docs/performance.md). It needs a CRIU built with libnftables and a
    kernel with nf_tables set concatenation, which ``criu check`` answers.
    """
    code, _out = await _run_quick([binary, "check", "--feature", "network_lock_nftables"])
    found = ["nftables"] if code == 0 else []
    if iptables_restore_found(search_path):
        found.append("iptables")
    return (*found, "skip")


def _logged(log_name: str) -> list[str]:
    """Cgroups left alone, CRIU's verbose log into log_name (in the images directory)."""
    return ["--manage-cgroups=ignore", "-v4", "-o", log_name]


def _job_options(shell_job: bool, foreign_mntns: bool) -> list[str]:
    """What dump and restore both need for a tree on a terminal or in another mount ns."""
    argv = ["--shell-job"] if shell_job else []
    if foreign_mntns:
        argv += ["--enable-external-sharing", "--enable-external-masters"]
    return argv


def _plugins(plugin_dir: str | None) -> list[str]:
    return ["--libdir", plugin_dir] if plugin_dir else []


def dump_argv(binary: str, req: DumpRequest, network_lock: str) -> list[str]:
    """``network_lock`` (NETWORK_LOCKS): CRIU records it in the images and unlocks their
    restore by the same method (it ignores --network-lock at a restore)."""
    argv = [binary, "dump", "--tree", str(req.pid), "--images-dir", str(req.images_dir),
            *_COMMON, "--network-lock", network_lock,
            "--ghost-limit", str(req.ghost_limit_bytes), *_logged(req.log_name)]
    if req.leave_running:
        argv.append("--leave-running")
    argv += _job_options(req.shell_job, req.foreign_mntns)
    for mount_point, key in req.external_mounts:
        argv += ["--external", f"mnt[{mount_point}]:{key}"]
    return argv + _plugins(req.plugin_dir)


def restore_argv(binary: str, req: RestoreRequest) -> list[str]:
    argv = [binary, "restore", "--images-dir", str(req.images_dir), "--restore-detached",
            "--pidfile", str(req.pidfile), *_COMMON,
            *_logged(req.log_name)]
    argv += _job_options(req.shell_job, req.foreign_mntns)
    if req.root is not None:
        argv += ["--root", str(req.root)]
    for key, host_path in req.external_mounts:
        argv += ["--external", f"mnt[{key}]:{host_path}"]
    return argv + _plugins(req.plugin_dir)


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl


def _child_setup(cgroup_files: Sequence[Path]) -> Callable[[], None]:
    """A pre-exec hook: CRIU dies with the service, and joins cgroups before it forks.

    Dying with the service matters: a CRIU left running by a killed service would finish
    the dump, kill the tree, and leave images no manifest describes. Killed early, it lets
    the tree go on running. Joining the cgroups first makes a restored tree born in them.
    Only os-level calls on precomputed values: this runs between fork and exec.
    """
    encoded = [os.fsencode(f) for f in cgroup_files]
    parent = os.getpid()

    def setup() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the service died before prctl took effect
            os._exit(1)
        me = str(os.getpid()).encode()
        for path in encoded:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, me)
            finally:
                os.close(fd)

    return setup


class CriuTool:
    """One criu binary whose version was checked, and the network lock its dumps use.

    ``network_locks``: every method this host's CRIU can use (a restore unlocks by its
    dump's), ``network_lock`` first.
    """

    def __init__(self, path: str, version: CriuVersion,
                 network_locks: tuple[str, ...] = ("skip",)) -> None:
        self.path = path
        self.version = version
        self.network_locks = network_locks

    @property
    def network_lock(self) -> str:
        """The method new dumps use."""
        return self.network_locks[0]

    @classmethod
    async def locate(cls, path: str = "criu", network_lock: str = AUTO) -> CriuTool:
        """Find the binary and refuse anything older than CRIU 4.0, saying what to do;
        ``network_lock`` (AUTO: the fastest this host has) must be usable here."""
        found = path if "/" in path else shutil.which(path)
        if found is None and path == "criu" and os.access(BUNDLE_PATH, os.X_OK):
            found = BUNDLE_PATH
        if found is None or not os.access(found, os.X_OK):
            raise Unsupported(f"CRIU binary {path!r} not found ({INSTALL_HINT})")
        code, out = await _run_quick([found, "--version"])
        version = parse_version(out)
        if code != 0 or version is None:
            raise Unsupported(
                f"{found} --version did not report a CRIU version "
                f"(exit {code}): {out.strip()[:200]}"
            )
        if version.major < MIN_MAJOR:
            raise Unsupported(
                f"CRIU {version} at {found} is too old: llmux needs CRIU {MIN_MAJOR}.0 or later "
                f"(CRIU 3.x cannot dump on current kernels); {INSTALL_HINT}"
            )
        usable = await usable_network_locks(found)
        if network_lock != AUTO:
            if network_lock not in usable:
                raise Unsupported(
                    f"network_lock = {network_lock!r} cannot be used on this host: "
                    f"{found} can use {', '.join(usable)} (nftables needs a CRIU built with "
                    "libnftables and the kernel's nf_tables; iptables needs iptables-restore)")
            usable = (network_lock, *(m for m in usable if m != network_lock))
        return cls(found, version, usable)

    async def check(self) -> tuple[bool, str]:
        code, out = await _run_quick([self.path, "check"])
        text = "\n".join(ln for ln in out.splitlines() if not any(h in ln for h in _HARMLESS))
        return code == 0, text.strip()

    async def dump(
        self,
        req: DumpRequest,
        on_start: Callable[[CriuRun], None] | None = None,
        timeout_secs: float | None = None,
    ) -> CriuRun:
        return await self._run(
            dump_argv(self.path, req, self.network_lock), req.images_dir, req.log_name, "dump",
            on_start, (), timeout_secs,
        )

    async def restore(
        self,
        req: RestoreRequest,
        on_start: Callable[[CriuRun], None] | None = None,
        timeout_secs: float | None = None,
    ) -> CriuRun:
        return await self._run(
            restore_argv(self.path, req),
            req.images_dir,
            req.log_name,
            "restore",
            on_start,
            req.cgroup_procs,
            timeout_secs,
        )

    async def _run(
        self,
        argv: list[str],
        images_dir: Path,
        log_name: str,
        what: str,
        on_start: Callable[[CriuRun], None] | None,
        cgroup_procs: Sequence[Path],
        timeout_secs: float | None = None,
    ) -> CriuRun:
        """Run CRIU to its end; past ``timeout_secs`` it is killed (a stuck CRIU holds the
        tree frozen) and Timeout is raised."""
        run = CriuRun(argv=argv, log_path=images_dir / log_name)
        # Output to a file, not a pipe: a helper CRIU started (an action script) could hold a
        # pipe open after CRIU is killed, and asyncio waits for its pipes to close.
        out_path = images_dir / f"{what}.out"
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                cwd=images_dir,
                umask=0o077,
                preexec_fn=_child_setup(cgroup_procs),
                start_new_session=True,
            )
        finally:
            os.close(fd)
        run.pid = proc.pid
        if on_start is not None:
            on_start(run)
        try:
            await asyncio.wait_for(proc.wait(), timeout_secs)
        except TimeoutError:
            await _kill(proc)
            raise Timeout(
                f"criu {what} did not finish within {timeout_secs:.0f}s and was killed "
                f"(criu_timeout_secs, criu_timeout_secs_per_gib in llmuxd.toml; "
                f"log: {run.log_path})"
            ) from None
        except asyncio.CancelledError:
            await _kill(proc)
            raise
        run.returncode = proc.returncode
        with contextlib.suppress(OSError):
            run.output = out_path.read_text(errors="replace")
        if proc.returncode != 0:
            raise CriuFailed(self.failure_message(run, what))
        return run

    @staticmethod
    def failure_message(run: CriuRun, what: str) -> str:
        log = ""
        if run.log_path is not None:
            with contextlib.suppress(OSError):
                log = run.log_path.read_text(errors="replace")
        excerpt = log_excerpt(log or run.output)
        where = f" (full log: {run.log_path})" if run.log_path is not None else ""
        return f"criu {what} failed with exit code {run.returncode}{where}:\n{excerpt}"


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill CRIU with its helpers (action scripts; its own process group) and wait for it,
    even if the caller is being cancelled again. The dumped tree is not in that group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGKILL)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(proc.wait())


async def _run_quick(argv: list[str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    except (asyncio.CancelledError, TimeoutError):
        await _kill(proc)
        raise
    return proc.returncode or 0, out.decode(errors="replace")
