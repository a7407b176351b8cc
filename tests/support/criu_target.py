"""A small process tree for CRIU tests, with the traits of a real engine.

Parent + child talk over a ZMQ ipc socket in /tmp (as vLLM's API server and engine core do),
the parent serves a listening TCP socket (a line protocol: "ping" -> "pong <pid> <child pid>
<n>" where n counts round trips through ZMQ), and both keep a log file open for appending.

Usage: python criu_target.py WORKDIR [BALLAST_MB]
BALLAST_MB of non-zero memory in the parent make a dump take long enough to be interrupted.
Writes WORKDIR/ready (JSON: pids, port) once serving. stdio must not be a pipe to a process
outside the tree (CRIU would restore a pipe with no reader): the tests use /dev/null.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import zmq


def child(ipc: str, log_path: Path) -> None:
    log = log_path.open("a", buffering=1)
    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)
    rep.connect(ipc)
    log.write(f"child {os.getpid()} up\n")
    n = 0
    while True:
        msg = rep.recv()
        n += 1
        rep.send(b"%s %d" % (msg, n))


def parent(workdir: Path, ballast_mb: int) -> None:
    ballast = bytearray(os.urandom(1 << 20)) * ballast_mb
    ipc = f"ipc:///tmp/llmux-test-{os.getpid()}-{time.monotonic_ns()}.ipc"
    log_path = workdir / "target.log"
    log = log_path.open("a", buffering=1)
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.bind(ipc)
    kid = os.fork()
    if kid == 0:
        ctx.destroy(linger=0)
        try:
            child(ipc, log_path)
        finally:
            os._exit(0)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]

    def on_term(*_: object) -> None:
        os.kill(kid, signal.SIGKILL)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    ready = {"pid": os.getpid(), "child": kid, "port": port, "ipc": ipc}
    tmp = workdir / "ready.tmp"
    tmp.write_text(json.dumps(ready))
    tmp.rename(workdir / "ready")
    log.write(f"parent {os.getpid()} serving on {port} with {len(ballast)} bytes of ballast\n")
    while True:
        conn, _ = srv.accept()
        with conn:
            data = conn.recv(100).strip()
            if data == b"ping":
                req.send(b"pong")
                answer = req.recv()
                parts = answer.split()
                conn.sendall(b"%s %d %d %s\n" % (parts[0], os.getpid(), kid, parts[1]))
                log.write(f"answered {answer!r}\n")
            else:
                conn.sendall(b"?\n")


if __name__ == "__main__":
    parent(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0)
