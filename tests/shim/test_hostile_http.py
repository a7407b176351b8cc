"""Hostile HTTP input against a running shim with built-in engines.

Malformed and huge bodies, wrong types, path-like and huge model names, slow clients
(slow loris) and thousands of connections: each gets a clear 4xx or 503 within a bound,
a refused request never starts an engine or a switch, and other clients are served.
"""

from __future__ import annotations

import asyncio
import json
import resource
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmux.shim.app import Shim
from llmux.shim.httpbounds import MAX_HEADER_BYTES
from tests.support.procs import free_ports, wait_until
from tests.support.proxy_fixtures import ShimFactory, chat_body, switches, untouched
from tests.support.shimproc import Shim as ShimProc
from tests.support.shimproc import shims_for_test

#: what "within a bound" means for an answer to a refused request
ANSWER_BOUND_S = 10.0


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err: dict[str, Any] = r.json()["error"]
    assert err["message"] and err["type"]
    assert "Traceback" not in r.text
    if param is not None:
        assert err["param"] == param, err
    return err


async def raw_exchange(port: int, data: bytes, *, read_for: float = ANSWER_BOUND_S) -> bytes:
    """Send ``data`` on a fresh connection, read until the server closes (or read_for)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), read_for)
    finally:
        writer.close()


# ------------------------------------------------------------------------------ bodies


async def test_malformed_and_huge_bodies(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"], top={"max_body_bytes": 65536})
    url = f"{shim.url}/v1/chat/completions"
    cases: list[tuple[bytes, dict[str, str], int]] = [
        (b"", {}, 400),
        (b"{", {}, 400),
        (b"null", {}, 400),
        (b"[1, 2]", {}, 400),
        (b'"model"', {}, 400),
        (b"\xff\xfe{}", {}, 400),
        (b'{"model": "a", "messages": [' + b"[" * 100000 + b"]" * 100000 + b"]}", {}, 413),
        (b"[" * 30000 + b"]" * 30000, {}, 400),  # nesting deeper than the parser's stack
        (b'{"model": 1e999999}', {}, 400),
        (b'{"model": ' + b"9" * 5000 + b"}", {}, 400),  # past int's digit limit
        (b'{"model": "a"}', {"content-type": "text/plain"}, 415),
        (b'{"model": "a"}', {"content-type": "multipart/form-data; boundary=x"}, 415),
        (b'{"model": "a", "x": "' + b"y" * 70000 + b'"}', {}, 413),
    ]
    for body, headers, status in cases:
        t0 = time.monotonic()
        r = await http.post(url, content=body, headers=headers)
        assert time.monotonic() - t0 < ANSWER_BOUND_S
        assert_error(r, status)
    # a huge chunked body (no Content-Length) is cut off at max_body_bytes
    async def chunks() -> Any:
        for _ in range(64):
            yield b'{"model": "a", "pad": "' + b"x" * 8192

    r = await http.post(url, content=chunks())
    assert_error(r, 413)
    # Content-Length above the limit: refused before the body is sent; or not a number
    port = shim.config.port
    for length, status in ((b"1000000000000", b"413"), (b"abc", b"400"), (b"-5", b"400")):
        answer = await raw_exchange(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Length: " + length + b"\r\n\r\n{}",
                                    read_for=ANSWER_BOUND_S)
        assert answer.startswith(b"HTTP/1.1 " + status), (length, answer[:300])
    # control routes: same kinds of bodies
    for body in (b"{", b"[" * 30000 + b"]" * 30000, b"null", b'{"model": 3}'):
        r = await http.post(f"{shim.url}/control/switch", content=body)
        assert 400 <= r.status_code < 500, r.text
        assert "Traceback" not in r.text
    untouched(shim)
    assert (await http.get(f"{shim.url}/health")).status_code == 200


#: chat/completions fields and the values among WRONG the shim must refuse (None is the
#: default and is always fine)
CHAT_FIELDS: dict[str, list[Any]] = {
    "messages": [True, -1, 0, 1.5, "x", [], {}, [1]],
    "stream": [-1, 0, 1.5, "x", [], {}, [1], {"a": 1}],
    "max_tokens": [True, -1, 0, 1.5, "x", [], {}, [1], {"a": 1}],
    "max_completion_tokens": [True, -1, 0, 1.5, "x", [], {}, [1], {"a": 1}],
    "n": [True, -1, 0, 1.5, "x", [], {}, [1], {"a": 1}],
    "temperature": [True, "x", [], {}, [1], {"a": 1}],
    "top_p": [True, "x", [], {}, [1], {"a": 1}],
    "presence_penalty": [True, "x", [], {}, [1]],
    "frequency_penalty": [True, "x", [], {}, [1]],
    "seed": [True, 1.5, "x", [], {}, [1]],
    "stop": [True, -1, 1.5, {}, [1], {"a": 1}],
    "stream_options": [True, -1, 1.5, "x", [], [1]],
    "user": [True, -1, 1.5, [], {}, [1]],
}
COMPLETION_FIELDS: dict[str, list[Any]] = {
    "prompt": [True, -1, 0, 1.5, [], {}, {"a": 1}],
    **{k: v for k, v in CHAT_FIELDS.items() if k not in ("messages", "max_completion_tokens")},
}


async def test_wrong_types_for_every_field_are_refused_before_a_switch(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"])
    good_chat = chat_body("a", "hi")
    good_comp = {"model": "a", "prompt": "once", "max_tokens": 4}
    for path, good, fields in (("/v1/chat/completions", good_chat, CHAT_FIELDS),
                               ("/v1/completions", good_comp, COMPLETION_FIELDS)):
        for field, bad_values in fields.items():
            for value in bad_values:
                r = await http.post(f"{shim.url}{path}", json={**good, field: value})
                err = assert_error(r, 400, param=field)
                assert field in err["message"]
        # the model itself
        for value in (True, 1, 1.5, [], {}, ["a"]):
            assert_error(await http.post(f"{shim.url}{path}", json={**good, "model": value}),
                         400, param="model")
    r = await http.post(f"{shim.url}/v1/chat/completions",
                        json={"model": "a", "max_tokens": 3})
    assert_error(r, 400, param="messages")
    untouched(shim)

    # what the shim cannot judge (the engine's limits) is the engine's 400, once running
    for extra in ({"max_tokens": 10**9}, {"max_tokens": 2**63}, {"n": 10**6},
                  {"messages": [{"role": 5}]}):
        r = await http.post(f"{shim.url}/v1/chat/completions", json={**good_chat, **extra})
        assert_error(r, 400)
    assert switches(shim) == 1  # the one to a (the first request that reached an engine)
    r = await http.post(f"{shim.url}/v1/chat/completions", json=good_chat)
    assert r.status_code == 200, r.text
    # an integer written as a float (what Python clients send after a division) is fine
    r = await http.post(f"{shim.url}/v1/chat/completions", json={**good_chat, "max_tokens": 4.0})
    assert r.status_code == 200, r.text


async def test_unknown_and_path_like_model_names(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"])
    long_name = "m" * 100_000
    names = ["../a", "a/b", "/etc/passwd", "a\nb", "a\x00", "a\r\nX-Injected: 1", "..",
             "%2e%2e%2fa", "a ", " a", "A", long_name, "ä" * 1000]
    for name in names:
        r = await http.post(f"{shim.url}/v1/chat/completions", json=chat_body(name, "hi"))
        err = assert_error(r, 404, param="model")
        assert err["code"] == "model_not_found"
        assert len(err["message"]) < 600  # a huge name is not echoed back whole
        assert "Known models: a, b" in err["message"]
        assert "X-Injected" not in r.headers
    for path in ("/v1/models/..%2fa", "/v1/models/a%2Fb", "/v1/models/%0a", "/v1/models/../a",
                 "/v1/models/" + "x" * 8000):
        r = await http.get(f"{shim.url}{path}")
        assert r.status_code in (404, 400), (path, r.text)
        assert "Traceback" not in r.text
    for name in names:
        r = await http.post(f"{shim.url}/control/switch", json={"model": name})
        if name is long_name:
            assert_error(r, 413)
        else:
            assert_error(r, 404, param="model")
    untouched(shim)


# ------------------------------------------------------------------------------ slow clients


async def test_slow_loris_headers_and_bodies_are_bounded(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a"], top={"header_timeout_secs": 1.5,
                                          "body_timeout_secs": 1.5})
    port = shim.config.port

    async def trickle(head: bytes, drip: bytes) -> tuple[bytes, float]:
        """Send ``head`` then ``drip`` a byte every 0.3 s; the answer and when it came."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        t0 = time.monotonic()
        try:
            writer.write(head)
            await writer.drain()
            got = bytearray()

            async def read() -> None:
                got.extend(await reader.read())

            task = asyncio.ensure_future(read())
            for b in drip:
                if task.done():
                    break
                try:
                    writer.write(bytes([b]))
                    await writer.drain()
                except ConnectionError:
                    break
                await asyncio.sleep(0.3)
            await asyncio.wait_for(task, ANSWER_BOUND_S)
            return bytes(got), time.monotonic() - t0
        finally:
            writer.close()

    # headers trickled: 408 and closed, near header_timeout_secs
    answer, took = await trickle(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
                                 b"X-Slow: " + b"a" * 200)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert took < 1.5 + 3
    # a connection that sends nothing is closed
    answer, took = await trickle(b"", b"")
    assert answer == b"" and took < 1.5 + 3
    # the body trickled: 408 with the JSON error, on /v1 and on /control
    body = json.dumps(chat_body("a", "hi")).encode()
    for path in ("/v1/chat/completions", "/control/switch"):
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        answer, took = await trickle(head, body)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b'"body_timeout"' in answer
        assert took < 1.5 + 3
    # headers too large: 431
    big = (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 10)
           + b"\r\n\r\n")
    answer = await raw_exchange(port, big)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    many = (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 20000 + b"\r\n")
    assert (await raw_exchange(port, many)).startswith(b"HTTP/1.1 431")
    # keep-alive: the next request's headers are bounded too, and a normal client is fine
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    first = await asyncio.wait_for(reader.readuntil(b'"active":null}'), ANSWER_BOUND_S)
    assert first.startswith(b"HTTP/1.1 200")
    writer.write(b"GET /health HTTP/1.1\r\n")
    rest = await asyncio.wait_for(reader.read(), ANSWER_BOUND_S)
    writer.close()
    assert rest.startswith(b"HTTP/1.1 408"), rest
    r = await http.post(f"{shim.url}/v1/chat/completions", json=chat_body("a", "hi"))
    assert r.status_code == 200, r.text


async def test_garbage_on_the_wire(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a"], top={"header_timeout_secs": 2})
    port = shim.config.port
    for data in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # TLS hello
                 b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                 b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                 b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"zz\r\n"):
        answer = await raw_exchange(port, data)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:200]
    untouched(shim)
    assert (await http.get(f"{shim.url}/health")).status_code == 200


# ------------------------------------------------------------------------------ many clients


@pytest.fixture
def tagged_shims(tmp_path: Path) -> Iterator[Any]:
    tag = secrets.token_hex(8)
    with shims_for_test(tmp_path, tag) as launch:
        def start(top: dict[str, Any], **options: Any) -> ShimProc:
            port, engine_port = free_ports(2)
            config = {"host": "127.0.0.1", "port": port, "metrics_port": 0,
                      "log_dir": str(tmp_path / "logs"), **top,
                      "policy": {"min_active_secs": 0},
                      "models": {"a": {
                          "model_path": "llmux-test/a", "port": engine_port,
                          "engine": "builtin", "weights_mb": 4, "startup_timeout_secs": 120,
                          "env": {"LLMUX_TEST_TAG": tag, "LLMUX_BUILTIN_BACKEND": "pure"}}}}
            return launch(config, **options)

        yield start


def open_idle(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(s)
    return socks


def test_thousands_of_idle_connections_do_not_starve_clients(tagged_shims: Any) -> None:
    """2000 idle sockets against a shim whose soft fd limit is 512 (as under systemd's
    default): it lifts its limit, serves normal requests meanwhile, and closes the idle
    ones after header_timeout_secs."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 2000 + 1024:
        pytest.skip(f"the hard fd limit ({hard}) is below the test's sockets")
    reap_s = 20.0
    shim = tagged_shims({"header_timeout_secs": reap_s},
                        wrapper=("prlimit", f"--nofile=512:{hard}"))
    socks = open_idle(shim.port, 2000)
    try:
        t0 = time.monotonic()
        r = shim.complete("a", max_tokens=4)
        assert r.status_code == 200, r.text
        for _ in range(20):
            assert shim.client.get(f"{shim.url}/health", timeout=ANSWER_BOUND_S).status_code \
                == 200
        # served while the idle ones are still open (not after the server reaped them)
        assert time.monotonic() - t0 < reap_s - 5
        # the idle ones are closed by the server (recv sees EOF)
        time.sleep(max(0.0, t0 + reap_s + 2 - time.monotonic()))
        closed = 0
        for s in socks:
            s.settimeout(5)
            try:
                if s.recv(1) == b"":
                    closed += 1
            except (TimeoutError, ConnectionError):
                pass
        assert closed == len(socks)
    finally:
        for s in socks:
            s.close()
    assert shim.proc.poll() is None
    assert "Too many open files" not in shim.log()


def test_max_connections_answers_503(tagged_shims: Any) -> None:
    shim = tagged_shims({"max_connections": 64, "header_timeout_secs": 30})
    socks = open_idle(shim.port, 100)
    try:
        t0 = time.monotonic()
        with httpx.Client(timeout=ANSWER_BOUND_S) as c:
            r = c.post(f"{shim.url}/v1/chat/completions", json=chat_body("a", "hi"))
        assert r.status_code == 503, r.text
        assert time.monotonic() - t0 < ANSWER_BOUND_S
    finally:
        for s in socks:
            s.close()

    def answered() -> dict[str, Any]:
        r = shim.client.get(f"{shim.url}/control/status")
        return r.json() if r.status_code == 200 else {}

    status = wait_until(answered, 30, "/control/status to answer 200", interval=0.2)
    assert status["models"]["a"]["state"] == "stopped"  # the refused one started nothing
    assert shim.complete("a", max_tokens=4).status_code == 200


async def test_a_flood_of_bad_requests_leaves_good_clients_served(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"])
    url = f"{shim.url}/v1/chat/completions"
    r = await http.post(url, json=chat_body("a", "warm up"))
    assert r.status_code == 200
    n_switches = switches(shim)
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as flood:
        bad = [flood.post(url, json=chat_body(f"nope-{i}", "x")) for i in range(300)]
        bad += [flood.post(url, content=b"{" * (i + 1)) for i in range(100)]
        bad += [flood.post(url, json={**chat_body("b", "x"), "max_tokens": "many"})
                for _ in range(100)]
        good = [http.post(url, json=chat_body("a", f"q{i}")) for i in range(10)]
        t0 = time.monotonic()
        answers = await asyncio.gather(*bad, *good)
        took = time.monotonic() - t0
    assert all(400 <= a.status_code < 500 for a in answers[:500])
    assert all(a.status_code == 200 for a in answers[500:])
    assert took < 60
    assert switches(shim) == n_switches  # no request for b got through to a switch
    assert shim.switcher.active == "a"
    assert not shim.supervisor.pids("b")


async def test_openapi_description_is_served(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim: Shim = await shim_factory(["a"])
    r = await http.get(f"{shim.url}/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    # every route the shim has is described, and nothing it lacks; the operator page's
    # routes (/ui, its files and the data it polls) are the page's own, not the API
    served = {(route.path.replace("{model:path}", "{model}"), m)
              for route in shim.app._fallback.routes  # type: ignore[attr-defined]
              if not route.path.startswith("/ui")
              for m in route.methods - {"HEAD"}}
    served |= {("/v1/chat/completions", "POST"), ("/v1/completions", "POST")}
    described = {(p, m.upper()) for p, ops in doc["paths"].items() for m in ops}
    assert served == described


async def test_a_host_strategy_without_a_host_is_a_400(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    """Found by the fuzz: it was a 503 ("retry later") for what no retry can change."""
    shim = await shim_factory(["a"])
    assert (await http.post(f"{shim.url}/control/wake", json={"model": "a"})).status_code == 200
    for strategy in ("offload+checkpoint", {"process": "cuda_suspend"}):
        r = await http.post(f"{shim.url}/control/sleep",
                            json={"model": "a", "strategy": strategy})
        err = assert_error(r, 400, param="strategy")
        assert err["code"] == "host_service_not_configured"
        assert "[checkpoint]" in err["message"]
    assert str(shim.lifecycle.status("a").state) == "running"
    r = await http.post(f"{shim.url}/v1/chat/completions", json=chat_body("a", "hi"))
    assert r.status_code == 200, r.text
