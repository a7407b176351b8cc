"""The /v1 pass-through: bad input answered before any engine sees it, streaming chunk by
chunk, other /v1 routes, listing, health, metrics, and releasing engine connections."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from llmux.shim.app import Shim
from tests.support.procs import pid_alive, wait_until_async
from tests.support.proxy_fixtures import ShimFactory, chat_body, kill_pids, sse_events


async def raw_post(shim: Shim, path: str, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """A hand-made request (for what httpx would not send: lying lengths, odd headers)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", shim.config.port)
    writer.write(b"POST " + path.encode() + b" HTTP/1.1\r\nhost: x\r\n" + head + b"\r\n" + body)
    await writer.drain()
    data = await reader.read(65536)
    writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


async def test_bad_input_is_refused_and_others_are_unaffected(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"], top={"max_body_bytes": 4096})
    url = f"{shim.url}/v1/chat/completions"
    bad_cases: list[tuple[str, int, str, httpx.Response]] = []

    async def bad(name: str, status: int, needle: str, **kw: object) -> None:
        r = await http.post(url, **kw)  # type: ignore[arg-type]
        bad_cases.append((name, status, needle, r))

    async def good(i: int) -> list[object]:
        r = await http.post(url, json=chat_body("a", f"good {i}", max_tokens=10, stream=True))
        assert r.status_code == 200, r.text
        return sse_events(r.content)

    # nothing has touched an engine yet: every bad request below must leave it so
    await asyncio.gather(
        bad("malformed", 400, "not valid JSON", content=b'{"model": "a",',
            headers={"content-type": "application/json"}),
        bad("not an object", 400, "JSON object", json=["a"]),
        bad("empty", 400, "empty", content=b"", headers={"content-type": "application/json"}),
        bad("no model", 404, "Known models: a, b", json={"messages": []}),
        bad("unknown model", 404, "`gpt-4` does not exist. Known models: a, b",
            json={"model": "gpt-4"}),
        bad("model not a string", 400, "must be a string", json={"model": 7}),
        bad("too large", 413, "max_body_bytes=4096", json={"model": "a", "x": "y" * 5000}),
        bad("wrong type", 415, "text/plain", content=b'{"model": "a"}',
            headers={"content-type": "text/plain"}),
        bad("form", 415, "application/x-www-form-urlencoded", data={"model": "a"}),
    )
    for name, status, needle, r in bad_cases:
        assert r.status_code == status, (name, r.text)
        err = r.json()["error"]
        assert needle in err["message"], (name, err)
        assert set(err) == {"message", "type", "param", "code"}
    statuses = (await http.get(f"{shim.url}/control/status")).json()["models"]
    assert {m: s["state"] for m, s in statuses.items()} == {"a": "stopped", "b": "stopped"}
    assert shim.metrics.requests.get(("-", 400)) == 4

    # now the same bad input, concurrently with good streaming requests
    goods = [asyncio.create_task(good(i)) for i in range(6)]
    bad_cases.clear()
    await asyncio.gather(*(bad("unknown model", 404, "Known models", json={"model": "zz"})
                           for _ in range(5)),
                         *(bad("malformed", 400, "JSON", content=b"{{",
                               headers={"content-type": "application/json"})
                           for _ in range(5)))
    for events in await asyncio.gather(*goods):
        assert events[-1] == "[DONE]" and len(events) >= 3
    assert all(r.status_code == s for _, s, _, r in bad_cases)


async def test_oversized_body_by_header_and_by_counting(shim_factory: ShimFactory) -> None:
    shim = await shim_factory(["a"], top={"max_body_bytes": 2048})
    # a Content-Length above the limit is refused before the body is read
    status, body = await raw_post(shim, "/v1/completions",
                                  b"content-type: application/json\r\n"
                                  b"content-length: 99999999\r\n")
    assert status == 413 and b"99999999 bytes" in body
    # a chunked body is counted while it is read
    chunk = b"x" * 1000
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4)) + b"0\r\n\r\n"
    status, body = await raw_post(shim, "/v1/completions",
                                  b"content-type: application/json\r\n"
                                  b"transfer-encoding: chunked\r\n", chunked)
    assert status == 413 and b"above max_body_bytes=2048" in body
    status, body = await raw_post(shim, "/v1/completions",
                                  b"content-type: application/json\r\n"
                                  b"content-length: abc\r\n")
    assert status == 400


async def test_streaming_is_passed_through_as_it_comes(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a"])
    # long enough that the engine is still generating when a loaded client reads its first
    # event (300 tokens were all sent before that once, under the full suite's load)
    body = {"model": "a", "prompt": "stream", "max_tokens": 1500, "stream": True}
    pieces = 0
    async with http.stream("POST", f"{shim.url}/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b""
        async for chunk in r.aiter_raw():
            pieces += 1
            raw += chunk
            if pieces == 1:
                # the first event is here while the engine is still generating
                assert shim.switcher.in_flight("a") == 1
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and len(events) > 100
    assert pieces > 1  # not buffered into one body


async def test_other_v1_routes_are_forwarded_by_model(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a"])
    # a /v1 route the engine does not have: the engine's own 404 comes back (it was asked)
    r = await http.post(f"{shim.url}/v1/embeddings", json={"model": "a", "input": "x"})
    assert r.status_code in (200, 404, 400, 501)
    assert shim.lifecycle.status("a").state == "running"
    # a GET on an unknown path is a JSON 404 from the shim
    r = await http.get(f"{shim.url}/v1/nothing")
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]


async def test_models_health_and_metrics(shim_factory: ShimFactory,
                                         http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"])
    r = await http.get(f"{shim.url}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = (await http.get(f"{shim.url}/v1/models")).json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["state"]) for m in models["data"]] == [
        ("a", "model", "stopped"), ("b", "model", "stopped")]
    assert (await http.post(f"{shim.url}/v1/chat/completions",
                            json=chat_body("a", "m"))).status_code == 200
    assert (await http.post(f"{shim.url}/v1/chat/completions",
                            json=chat_body("b", "m"))).status_code == 200
    assert (await http.post(f"{shim.url}/v1/chat/completions",
                            json=chat_body("zz", "m"))).status_code == 404
    one = (await http.get(f"{shim.url}/v1/models/b")).json()
    assert one["id"] == "b" and one["state"] == "running"
    assert (await http.get(f"{shim.url}/v1/models/zz")).status_code == 404
    text = (await http.get(f"{shim.url}/metrics")).text
    for needle in ('llmux_requests_total{model="a",status="200"} 1.0',
                   'llmux_requests_total{model="-",status="404"} 1.0',
                   'llmux_requests_in_flight{model="a"} 0.0',
                   "llmux_queue_depth 0.0",
                   'llmux_model_active{model="b"} 1.0',
                   'llmux_switch_duration_seconds_count{model="b",outcome="ok"} 1.0',
                   'llmux_sleep_duration_seconds_count{model="a",'
                   'strategy="offload+keep_running"} 1.0',
                   'llmux_wake_duration_seconds_count{model="a",strategy="cold"} 1.0',
                   "# TYPE llmux_engine_restarts_total counter"):
        assert needle in text, needle


async def test_separate_metrics_port(shim_factory: ShimFactory,
                                     http: httpx.AsyncClient) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shim = await shim_factory(["a"], top={"metrics_port": port})
    r = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert r.status_code == 200 and "llmux_queue_depth" in r.text
    assert (await http.get(f"http://127.0.0.1:{port}/v1/models")).status_code == 404
    assert shim.config.metrics_port == port


def established_to(port: int) -> int:
    """ESTABLISHED TCP connections whose remote end is 127.0.0.1:port (from /proc)."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state = fields[2], fields[3]
        if state == "01" and int(remote.split(":")[1], 16) == port:
            n += 1
    return n


async def test_release_closes_every_engine_connection(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a"])
    port = shim.config.models["a"].port
    await shim.switcher.wake("a")
    # one pool per engine: the proxy's, the health checks' and the probe's connections
    await asyncio.gather(*(http.post(f"{shim.url}/v1/chat/completions",
                                     json=chat_body("a", f"p{i}")) for i in range(4)))
    assert shim.engines.open_connections("a") >= 1
    assert established_to(port) >= 1
    await shim.engines.release("a")
    assert shim.engines.open_connections("a") == 0
    await wait_until_async(lambda: established_to(port) == 0, 1,
                           "the engine connection to close", interval=0.01)
    assert established_to(port) == 0
    # and the next request simply reconnects
    r = await http.post(f"{shim.url}/v1/chat/completions", json=chat_body("a", "again"))
    assert r.status_code == 200


async def test_upstream_error_bodies_pass_through(shim_factory: ShimFactory,
                                                  http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a"])
    r = await http.post(f"{shim.url}/v1/chat/completions",
                        json={"model": "a", "messages": "not a list"})
    assert 400 <= r.status_code < 500
    assert "error" in r.json()
    assert json.loads(r.content)["error"]["message"]


async def test_serve_shuts_down_gracefully_on_sigterm(
        builtin_config_dict: Callable[..., dict[str, Any]],
        write_config: Callable[[dict[str, Any], str], Path]) -> None:
    """`llmux serve`: SIGTERM lets the running stream finish, then stops every engine."""
    raw = builtin_config_dict(["a"])
    path = write_config(raw, ".json")
    llmux = Path(sys.executable).parent / "llmux"
    proc = await asyncio.create_subprocess_exec(
        str(llmux), "serve", "--config", str(path), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "LLMUX_BUILTIN_BACKEND": "pure"}, start_new_session=True)
    base = f"http://127.0.0.1:{raw['port']}"
    pids: list[int] = []
    try:
        async with httpx.AsyncClient(timeout=60) as c:
            for _ in range(600):
                try:
                    if (await c.get(f"{base}/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            body = {"model": "a", "prompt": "bye", "max_tokens": 400, "stream": True}
            async with c.stream("POST", f"{base}/v1/completions", json=body) as r:
                raw_bytes = b""
                async for chunk in r.aiter_bytes():
                    if not raw_bytes:
                        st = (await httpx.AsyncClient().get(f"{base}/control/status")).json()
                        pids = st["models"]["a"]["pids"]
                        proc.send_signal(signal.SIGTERM)
                    raw_bytes += chunk
            events = sse_events(raw_bytes)
            assert events[-1] == "[DONE]" and len(events) > 300  # finished despite SIGTERM
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        out = (await proc.stdout.read()).decode() if proc.stdout else ""
        assert "action=shutdown signal=SIGTERM" in out and "action=stopped" in out
        assert pids and not any(pid_alive(p) for p in pids)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        kill_pids(pids)
