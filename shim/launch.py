"""Exec an engine with io_uring unavailable: ``python -m llmux.shim.launch -- ARGV...``.

CRIU cannot dump an io_uring instance, and vLLM's API server runs on uvloop, whose libuv
sets one up whatever ``UV_USE_IO_URING`` says. A seccomp filter installed here, before
exec, makes ``io_uring_setup`` fail with ENOSYS in the engine and in every process it
forks, so libuv (and anything else) falls back to epoll, as on a kernel without io_uring.
Everything else is allowed. The filter is inherited across fork and exec, cannot be
removed, and CRIU checkpoints and restores it with the process.

It also gives the engine a PID namespace of its own (llmux.shim.pidns), with a network of
its own reached through a unix socket (llmux.shim.netns): it stays as the init's parent,
and the supervisor learns the init's PID through the fd named by
``LLMUX_LAUNCH_REPORT_FD``; without a namespace it execs the engine itself, as before.

An exec wrapper rather than a ``preexec_fn``: code run between fork and exec in a
threaded parent (the shim) can deadlock; this process has one thread.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys
from collections.abc import Sequence

from llmux.shim import netns, pidns

#: io_uring_setup has this number on every architecture since the syscall tables were unified
NR_IO_URING_SETUP = 425
_X32_SYSCALL_BIT = 0x4000_0000
#: AUDIT_ARCH_* of the architectures whose number for io_uring_setup is 425
_ARCHES = (0xC000_003E, 0xC000_00B7, 0x4000_0003)  # x86_64, aarch64, i386

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_RET_ALLOW = 0x7FFF_0000
_RET_ERRNO = 0x0005_0000

# classic BPF opcodes
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_AND_K = 0x54
_RET_K = 0x06


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def io_uring_filter() -> bytes:
    """The BPF program: io_uring_setup -> ENOSYS, anything else allowed.

    seccomp_data: int nr at offset 0, u32 arch at offset 4.
    """
    x86_64, aarch64, i386 = _ARCHES
    return b"".join([
        _insn(_LD_W_ABS, 0, 0, 4),                          # 0: A = arch
        _insn(_JEQ_K, 2, 0, x86_64),                        # 1: -> 4
        _insn(_JEQ_K, 1, 0, aarch64),                       # 2: -> 4
        _insn(_JEQ_K, 0, 3, i386),                          # 3: -> 4, else allow (7)
        _insn(_LD_W_ABS, 0, 0, 0),                          # 4: A = nr
        _insn(_AND_K, 0, 0, ~_X32_SYSCALL_BIT & 0xFFFF_FFFF),  # 5: x32 numbers too
        _insn(_JEQ_K, 1, 0, NR_IO_URING_SETUP),             # 6: -> 8
        _insn(_RET_K, 0, 0, _RET_ALLOW),                    # 7
        _insn(_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS),     # 8
    ])


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def disable_io_uring() -> None:
    """Install the filter in this process (inherited by its children and across exec).

    no_new_privs is required for an unprivileged filter (the shim in a container without
    CAP_SYS_ADMIN); it only stops setuid binaries from gaining privileges, which an engine
    never needs.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    program = io_uring_filter()
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")


def launcher_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` run through this module: the engine's command as the supervisor spawns it."""
    return [sys.executable, "-m", "llmux.shim.launch", "--", *argv]


def main(args: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m llmux.shim.launch -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    try:
        disable_io_uring()
    except OSError as e:
        print(f"llmux.shim.launch: cannot make io_uring unavailable: {e}", file=sys.stderr)
        return 126
    report_fd = os.environ.pop(pidns.ENV_REPORT_FD, None)
    port = os.environ.pop(netns.ENV_PORT, None)
    sock = os.environ.pop(netns.ENV_SOCKET, None)
    why = pidns.why_not()
    if why is None:
        try:
            pidns.enter()
        except OSError as e:
            why = str(e)
    if why is None:
        net_why = "no port and socket given" if port is None or sock is None \
            else netns.why_not(sock)
        if net_why is not None and net_why != f"{netns.ENV_SWITCH}=0":
            print(f"llmux.shim.launch: the engine stays on this container's network "
                  f"({net_why}); its open TCP connections keep it from being checkpointed",
                  file=sys.stderr)
        ready_r, ready_w = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(ready_r)
            if report_fd is not None:
                os.close(int(report_fd))
            forward = None
            if net_why is None and port is not None and sock is not None:
                forward = pidns.Forward(sock, int(port), ready_w)
            else:
                os.close(ready_w)
            os._exit(pidns.init(argv, forward))
        os.close(ready_w)
        # the engine's socket is bound before the supervisor hears of the init: it picks
        # the way to the engine by the socket's presence
        while os.read(ready_r, 1):
            pass
        os.close(ready_r)
        if report_fd is not None:
            os.write(int(report_fd), f"{child}\n".encode())
            os.close(int(report_fd))
        return pidns.wait_init(child)
    if why != f"{pidns.ENV_SWITCH}=0":
        print(f"llmux.shim.launch: the engine runs in this container's PID namespace ({why}); "
              "its checkpoint restores only where all its PIDs are free", file=sys.stderr)
    if report_fd is not None:
        os.close(int(report_fd))
    try:
        os.execvp(argv[0], argv)  # noqa: S606 (an argv, never a shell)
    except OSError as e:
        print(f"llmux.shim.launch: cannot run {argv[0]!r}: {e.strerror}", file=sys.stderr)
        return 127 if e.errno == errno.ENOENT else 126


if __name__ == "__main__":
    sys.exit(main())
