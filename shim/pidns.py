"""An engine's own PID namespace: what lets its checkpoint restore into any free PIDs.

CRIU gives a restored process the PIDs it had when dumped. In the host's PID namespace those
PIDs are often taken by then (after a reboot, on another host, by a second replica); in a
namespace of the tree's own, CRIU makes a fresh one at restore and every PID in it is free.
The launcher (``llmux.shim.launch``) builds it without privilege, as ``unshare -Urpm`` does:

- ``unshare(CLONE_NEWUSER | CLONE_NEWPID)`` in the launcher, the container's ids mapped to
  themselves (``enter``): an unprivileged process may create a PID namespace inside a user
  namespace it owns, and the engine keeps its ids;
- the launcher's first child is PID 1 there (the *init*): it takes mount, UTS and cgroup
  namespaces of its own (copies of the container's: CRIU dumps a user namespace only when
  it owns every namespace of the tree that is not the host's), a network namespace with
  only its loopback (llmux.shim.netns: a forwarder beside the engine joins the shim's unix
  socket to the engine's port), and mounts a procfs of its
  PID namespace on ``/proc``. CRIU needs that: its parasite reads ``/proc/self`` inside the
  dumped init and, when it does not name the init itself, mounts a procfs there, which an
  unprivileged tree cannot ("can't dump unprivileged task whose /proc doesn't belong to
  it"). The engine then sees its namespace's own PIDs in ``/proc`` as in ``os.getpid()``;
- the init forks the engine (PID 2), reaps whatever is orphaned in the namespace, forwards
  the signals a supervisor sends, and exits with the engine's status (the kernel then ends
  whatever is left in the namespace).

The kernel lets a user namespace mount a procfs only where one is already fully visible
(``mount_too_revealing``): podman's masked ``/proc`` paths hide parts of the container's, so
a podman container needs one read-only bind of the host's ``/proc`` (``-v
/proc:/run/llmux/proc:ro``, see docs/deployment.md). Without one the launcher runs the engine
as before, in the container's PID namespace, and says so in the engine's log; so does an
engine of a shim that does not run in a container laid out by a container runtime
(``runtime_layout``: the host itself, or a container of bare namespaces).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from llmux.shim import netns

CLONE_NEWNS = 0x0002_0000
CLONE_NEWCGROUP = 0x0200_0000
CLONE_NEWUTS = 0x0400_0000
CLONE_NEWUSER = 0x1000_0000
CLONE_NEWPID = 0x2000_0000

_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REC = 0x4000
_MS_PRIVATE = 0x4_0000

#: set to "0" in an engine's environment: no namespace of its own (today's PID-bound restore)
ENV_SWITCH = "LLMUX_PID_NAMESPACE"
#: the inherited fd the launcher writes the init's PID to (the supervisor reads it)
ENV_REPORT_FD = "LLMUX_LAUNCH_REPORT_FD"

#: what the init forwards to the engine
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2, signal.SIGWINCH)

_IDENTITY = "0 0 4294967295"
"""Every id of the parent user namespace, mapped to itself."""

_PERMANENTLY_EMPTY = ("/sys/fs/binfmt_misc",)
"""Mount points inside a procfs that the kernel does not count against its visibility."""

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    enc = [None if s is None else s.encode() for s in (source, target, fstype)]
    _check(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), None),
           f"mount {fstype or source} on {target}")


def visible_procfs(mountinfo: str) -> bool:
    """Whether a procfs is fully visible in this mount namespace (mountinfo's text): a proc
    mount of its whole filesystem with nothing mounted inside it but on the directories the
    kernel keeps empty. The kernel asks the same before a user namespace mounts a procfs."""
    mounts: list[tuple[str, str, str, str]] = []  # id, parent id, root, type
    points: dict[str, str] = {}
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, after = left.split(), right.split()
        if len(fields) < 5 or not after:
            continue
        mounts.append((fields[0], fields[1], fields[3], after[0]))
        points[fields[0]] = fields[4]
    for mount_id, _parent, root, fstype in mounts:
        if fstype == "proc" and root == "/" and all(
                points[m[0]].endswith(_PERMANENTLY_EMPTY) for m in mounts if m[1] == mount_id):
            return True
    return False


def why_not() -> str | None:
    """None when an engine can get a PID namespace of its own here; else the reason."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"{ENV_SWITCH}=0"
    try:
        with open("/proc/self/mountinfo") as f:
            info = f.read()
    except OSError as e:
        return f"cannot read /proc/self/mountinfo: {e.strerror}"
    if not runtime_layout(info):
        return ("not a container runtime's layout (an overlay as / and a tmpfs on /dev), "
                "which a restore into a user namespace needs")
    if not visible_procfs(info):
        return ("no fully visible /proc in this container (podman masks parts of its /proc: "
                "add -v /proc:/run/llmux/proc:ro)")
    return None


def runtime_layout(mountinfo: str) -> bool:
    """Whether this mount namespace is laid out as podman, docker or runc lay a container
    out: an overlay as its root and a tmpfs of its own on /dev. A restore into a user
    namespace binds the root without what is mounted inside it and makes /dev anew; the
    host's own root has every other mount inside it ("mnt: Unable to mount
    /proc/self/fd/8: Invalid argument"), and a bind of the host's /dev its children."""
    last: dict[str, str] = {}
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, after = left.split(), right.split()
        if len(fields) >= 5 and after:
            last[fields[4]] = after[0]
    return last.get("/") == "overlay" and last.get("/dev") == "tmpfs"


def enter() -> None:
    """Make the next child the init of a new PID namespace in a new user namespace.

    Its ids are the container's own, mapped one to one by a helper left behind in the
    container's user namespace, where root holds CAP_SETUID and CAP_SETGID (a rootful
    container's default): the engine's files, its devpts (gid 5) and its uid stay what they
    were, and CRIU restores the mounts that name them. Without those capabilities only this
    process's own uid and gid are mapped (and setgroups denied), as ``unshare -r`` does."""
    ready_r, ready_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        os.close(ready_w)
        code = 1
        try:
            if os.read(ready_r, 1):
                for name in ("uid_map", "gid_map"):
                    with open(f"/proc/{os.getppid()}/{name}", "w") as f:
                        f.write(_IDENTITY)
                code = 0
        finally:
            os._exit(code)
    os.close(ready_r)
    try:
        unshare(CLONE_NEWUSER | CLONE_NEWPID)
        os.write(ready_w, b"1")
    finally:
        os.close(ready_w)
        _, status = os.waitpid(helper, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        return
    uid, gid = os.geteuid(), os.getegid()
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def _exit_code(status: int) -> int:
    """A wait status as a shell reports it: the code, or 128 + the signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


@dataclass(frozen=True)
class Forward:
    """The engine's network of its own (llmux.shim.netns): where its forwarder listens,
    the engine's port, and the fd the init closes once the socket is bound."""

    path: str
    port: int
    ready_fd: int

    def args(self) -> list[str]:
        return ["--forward", self.path, str(self.port), str(self.ready_fd)]


def init(argv: Sequence[str], forward: Forward | None = None) -> int:
    """The launcher's first child, PID 1 of the namespace: a mount namespace and /proc of
    its own (and with ``forward`` a network namespace), then itself again by exec
    (``python -m llmux.shim.pidns``) to run the engine.

    The exec and the reopened stdio matter to CRIU: it names each mapped file and open fd by
    its mount, which must be one of the dumped mount namespace's; what this process mapped
    or opened before it took one of its own is on the container's mounts."""
    os.setsid()  # CRIU dumps a tree whose session and group are inside it
    try:
        # CRIU dumps a user namespace only with every namespace of the tree's that is not
        # the host's owned by it: a container's UTS and cgroup namespaces are not
        unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWCGROUP
                | (netns.CLONE_NEWNET if forward is not None else 0))
        if forward is not None:
            netns.loopback_up()
        mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing leaks either way
        # read-only: the kernel demands it where the visible procfs is a read-only bind
        mount("proc", "/proc", "proc", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
        for fd in (0, 1, 2):
            _reopen(fd)
        keep = forward.ready_fd if forward is not None else 2
        if forward is not None:
            os.set_inheritable(forward.ready_fd, True)
        os.closerange(3, keep)  # the supervisor passes none
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    except OSError as e:
        print(f"llmux.shim.launch: cannot set up the engine's PID namespace: {e}",
              file=sys.stderr)
        return 126
    try:
        os.execv(sys.executable,  # noqa: S606 (an argv, never a shell)
                 [sys.executable, "-m", "llmux.shim.pidns",
                  *(forward.args() if forward is not None else []), "--", *argv])
    except OSError as e:
        print(f"llmux.shim.launch: cannot run {sys.executable}: {e.strerror}", file=sys.stderr)
    return 126


def _reopen(fd: int) -> None:
    """fd opened again by its path, with its flags, in this mount namespace."""
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return
    if not path.startswith("/"):  # a pipe or socket: no mount to name
        return
    with open(f"/proc/self/fdinfo/{fd}") as f:
        flags = int(next(ln for ln in f if ln.startswith("flags:")).split()[1], 8)
    keep = os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_SYNC | os.O_DSYNC
    new = os.open(path.removesuffix(" (deleted)"), flags & keep)
    os.dup2(new, fd, inheritable=True)
    os.close(new)


def _start_forwarder(listener: socket.socket, port: int) -> int:
    child = os.fork()
    if child == 0:
        code = 0
        try:
            for sig in FORWARDED:
                signal.signal(sig, signal.SIG_DFL)
            netns.forward(listener, port)
        except BaseException as e:  # a child: report and end, never return
            print(f"llmux.shim.launch: the engine's socket forwarder failed: {e!r}",
                  file=sys.stderr)
            code = 1
        finally:
            os._exit(code)
    return child


def serve(argv: Sequence[str], fwd: Forward | None = None) -> int:
    """PID 1's work: the engine as PID 2, every orphan reaped, signals forwarded; the
    engine's end is the namespace's. With ``forward``, the engine's socket bound first and
    its forwarder (started again should it end) run beside the engine."""
    engine = 0
    pending: list[int] = []
    listener: socket.socket | None = None
    if fwd is not None:
        try:
            listener = netns.listen(fwd.path)
        except OSError as e:
            print(f"llmux.shim.launch: cannot listen on {fwd.path}: {e}", file=sys.stderr)
            return 126
        finally:
            os.close(fwd.ready_fd)

    def forward(signum: int, _frame: object) -> None:
        if engine:
            with contextlib.suppress(ProcessLookupError):
                os.kill(engine, signum)
        else:
            pending.append(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    engine = os.fork()
    if engine == 0:
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execvp(argv[0], list(argv))  # noqa: S606 (an argv, never a shell)
        except OSError as e:
            print(f"llmux.shim.launch: cannot run {argv[0]!r}: {e.strerror}", file=sys.stderr)
            os._exit(127 if e.errno == errno.ENOENT else 126)
    for signum in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine, signum)
    forwarder, forwarder_started = 0, time.monotonic()
    if listener is not None and fwd is not None:
        forwarder = _start_forwarder(listener, fwd.port)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 0
        if pid == engine:
            return _exit_code(status)
        if pid == forwarder and listener is not None and fwd is not None:
            if time.monotonic() - forwarder_started < 1.0:
                time.sleep(1.0)  # one that fails at once is not started in a tight loop
            forwarder, forwarder_started = (_start_forwarder(listener, fwd.port),
                                            time.monotonic())


def wait_init(child: int) -> int:
    """The launcher's part once the init runs: pass signals on, end as the init ended (a
    code above 128 as the signal it stands for, which is how the init reports one)."""

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    _, status = os.waitpid(child, 0)
    code = _exit_code(status)
    if 128 < code < 128 + signal.NSIG:
        signum = code - 128
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    return code


def _main(args: list[str]) -> int:
    forward = None
    if args[:1] == ["--forward"]:
        forward = Forward(args[1], int(args[2]), int(args[3]))
        args = args[4:]
    return serve(args[1:] if args[:1] == ["--"] else args, forward)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
