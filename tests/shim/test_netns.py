"""The engine socket's forwarder (llmux.shim.netns) with real sockets on loopback: bytes
both ways and intact, its TCP connection gone once the shim's side closes (what a dump
waits for), and the engine client going through the socket where one is bound."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web

from llmux.common import resources
from llmux.shim import netns
from llmux.shim.config import config_from_dict
from llmux.shim.engineclient import EngineClient
from tests.support.procs import wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_forwarder(path: Path, port: int) -> subprocess.Popen[bytes]:
    code = ("import sys; from llmux.shim import netns; "
            "netns.forward(netns.listen(sys.argv[1]), int(sys.argv[2]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), str(port)])
    wait_until(path.exists, 30, "the forwarder's socket")
    return proc


@pytest.fixture
def echo() -> Iterator[int]:
    """A TCP server that sends back what it reads, then closes (the upstream)."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    code = ("import socket, sys\n"
            "srv = socket.socket(fileno=int(sys.argv[1]))\n"
            "while True:\n"
            "    c, _ = srv.accept()\n"
            "    while data := c.recv(65536):\n"
            "        c.sendall(data)\n"
            "    c.close()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(srv.fileno())],
                            pass_fds=(srv.fileno(),))
    srv.close()
    try:
        yield port
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def forwarder(echo: int, tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / netns.SOCKET_NAME
    proc = _start_forwarder(path, echo)
    try:
        yield path
    finally:
        proc.kill()
        proc.wait()


def test_bytes_pass_both_ways_intact_and_a_half_close_is_passed_on(
        forwarder: Path) -> None:
    payload = os.urandom(5 << 20)
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(str(forwarder))
        c.settimeout(30)
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)  # the echo server sees EOF, answers the rest, closes
        got = bytearray()
        while data := c.recv(1 << 20):
            got += data
    assert bytes(got) == payload


def test_its_tcp_connection_ends_when_the_shims_side_closes(
        forwarder: Path, echo: int) -> None:
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(str(forwarder))
        c.sendall(b"x")
        assert c.recv(1) == b"x"
        assert resources.connections_to(echo) >= 1
    # what prepare_dump waits for: no connection to the engine's port is left
    wait_until(lambda: resources.connections_to(echo) == 0, 10,
               "the forwarder's connection to the engine to close")


def test_an_engine_not_listening_closes_the_connection(tmp_path: Path) -> None:
    path = tmp_path / netns.SOCKET_NAME
    proc = _start_forwarder(path, _free_port())
    try:
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(10)
            c.connect(str(path))
            assert c.recv(1) == b"", "a connection to nothing is closed, not left hanging"
        assert proc.poll() is None, "the forwarder lives on"
    finally:
        proc.kill()
        proc.wait()


def test_why_not() -> None:
    assert netns.why_not("/tmp/llmux-engine-m-8001/engine.sock") is None
    assert "longer than" in (netns.why_not("/tmp/" + "x" * 120) or "")


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[int]:
    """A real HTTP engine stand-in on a port of its own."""
    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield port
    finally:
        await runner.cleanup()


async def test_the_engine_client_goes_through_the_socket_where_one_is_bound(
        upstream: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    port = _free_port()  # the model's port: nothing listens on it here
    cfg = config_from_dict({"models": {"m": {"model_path": "org/m", "port": port,
                                             "engine": "builtin"}}})
    client = EngineClient(cfg.models, connect_timeout=2.0)
    try:
        assert not await client.healthy("m"), "nothing listens on the model's port"
        await client.release("m")
        sock = netns.socket_path("m", port)
        sock.parent.mkdir()
        proc = await asyncio.to_thread(_start_forwarder, sock, upstream)
        try:
            assert await client.healthy("m"), "not through the engine's socket"
        finally:
            proc.kill()
            proc.wait()
    finally:
        await client.aclose()
