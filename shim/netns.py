"""An engine's own network namespace, and the unix socket the shim reaches it through.

The init of an engine's PID namespace (llmux.shim.pidns) also takes a network namespace,
owned by the engine's user namespace, with only its loopback up. Two things follow:

- CRIU restores the tree's connected TCP sockets (torch.distributed's links, for one) by
  TCP repair, which needs CAP_NET_ADMIN over their network namespace; the restored tree
  holds it over its own, never over the container's;
- the engine listens on 127.0.0.1:PORT of its own loopback: two trees restored from one
  checkpoint in two containers of one host do not collide on the port.

The shim cannot enter that namespace (``setns`` needs CAP_SYS_ADMIN in the container's user
namespace, which a container does not get), but a unix socket bound to a path is reachable
from any network namespace: the init keeps one listening at ``engine.sock`` in the engine's
TMPDIR, and a small forwarder process in the tree (``forward``) joins each connection to it
with a TCP connection to the engine's port. The forwarder is part of the checkpointed tree
(CRIU dumps the listening socket and binds it again at restore); the shim closes its
connections before a dump (engineclient.prepare_dump), which ends the forwarder's.

The engine has no other network: whatever it fetches (weights) must be local. Set
``LLMUX_NET_NAMESPACE=0`` in a model's ``env`` to keep it on the container's network
(its TCP links then keep its checkpoint from restoring in its PID namespace).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
import tempfile
from pathlib import Path

CLONE_NEWNET = 0x4000_0000

#: set to "0" in an engine's environment: it stays on the container's network
ENV_SWITCH = "LLMUX_NET_NAMESPACE"
#: the engine's port and socket path, told to the launcher by the supervisor (never seen
#: by the engine)
ENV_PORT = "LLMUX_ENGINE_PORT"
ENV_SOCKET = "LLMUX_ENGINE_SOCKET"

SOCKET_NAME = "engine.sock"
_SUN_PATH_MAX = 107
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_CHUNK = 256 << 10


def engine_tmp_dir(model: str, port: int) -> Path:
    """The engine's own TMPDIR: unique on the host (the port) and the same in every
    container that restores the engine (a restored engine keeps its port)."""
    return Path(tempfile.gettempdir()) / f"llmux-engine-{model}-{port}"


def socket_path(model: str, port: int) -> Path:
    """Where the engine's forwarder listens, when its tree has a network of its own."""
    return engine_tmp_dir(model, port) / SOCKET_NAME


def why_not(path: str) -> str | None:
    """None when the engine can get a network namespace (and ``path``) of its own."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"{ENV_SWITCH}=0"
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        return f"the engine socket path {path!r} is longer than a unix socket's name may be"
    return None


def loopback_up() -> None:
    """``ip link set lo up`` in this (new) network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


def listen(path: str) -> socket.socket:
    """The listening unix socket (a stale one from an earlier tree replaced)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)  # the shim runs as the engine's user
    sock.listen(128)
    return sock


async def _pump(src: socket.socket, dst: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    while True:
        data = await loop.sock_recv(src, _CHUNK)
        if not data:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            return
        await loop.sock_sendall(dst, data)


async def _join(client: socket.socket, port: int) -> None:
    loop = asyncio.get_running_loop()
    upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        upstream.setblocking(False)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(upstream, ("127.0.0.1", port))
        pumps = [asyncio.ensure_future(_pump(client, upstream)),
                 asyncio.ensure_future(_pump(upstream, client))]
        done, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
        if any(t.exception() is not None for t in done):
            for t in pending:
                t.cancel()
        else:  # one side ended: let the other finish what it carries
            await asyncio.gather(*pending, return_exceptions=True)
    except OSError:
        pass
    finally:
        # the shim's side first: once the engine's port has no connection, none is left
        client.close()
        upstream.close()


async def _serve(listener: socket.socket, port: int) -> None:
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    tasks: set[asyncio.Task[None]] = set()
    while True:
        client, _ = await loop.sock_accept(listener)
        client.setblocking(False)
        task = asyncio.ensure_future(_join(client, port))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def forward(listener: socket.socket, port: int) -> None:
    """The forwarder's life: each connection to ``listener`` joined to 127.0.0.1:port."""
    asyncio.run(_serve(listener, port))
