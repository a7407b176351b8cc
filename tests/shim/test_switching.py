"""Switching between models through the proxy: correctness under load, FIFO, min_active,
drain, request timeout, failed switches, client disconnects, a killed engine."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

import httpx
import pytest

from llmux.shim.app import Shim
from tests.support.procs import wait_until_async
from tests.support.proxy_fixtures import ShimFactory, chat_body, direct_chat, proxy_chat, sse_events

PROMPTS = [f"prompt number {i}" for i in range(6)]


async def _queued(http: httpx.AsyncClient, shim: Shim, model: str, prompt: str,
                  done: list[str], depth: int) -> asyncio.Task[None]:
    """A chat request to model, in a task that appends model to done once answered;
    returns when the switcher's queue is depth requests long."""

    async def req() -> None:
        await proxy_chat(http, shim, model, prompt)
        done.append(model)

    task = asyncio.create_task(req())
    await wait_until_async(lambda: shim.switcher.queue_depth >= depth, 30,
                           f"{depth} request(s) to queue", interval=0.005)
    return task


async def expected_answers(http: httpx.AsyncClient, shim: Shim,
                           models: list[str]) -> dict[tuple[str, str], str]:
    """Each model's own answer to each prompt, asked of the engine directly."""
    out: dict[tuple[str, str], str] = {}
    for m in models:
        await shim.switcher.wake(m)
        for p in PROMPTS:
            out[(m, p)] = await direct_chat(http, shim, m, p)
    assert out[("a", PROMPTS[0])] != out[("b", PROMPTS[0])], "models must answer differently"
    return out


async def test_twenty_clients_switch_back_and_forth(shim_factory: ShimFactory,
                                                    http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"])
    expected = await expected_answers(http, shim, ["a", "b"])
    switches_before = shim.switcher.switches

    async def client(i: int) -> list[tuple[str, str, str]]:
        got = []
        async with httpx.AsyncClient(timeout=120) as c:
            for j in range(4):
                model = "ab"[(i + j) % 2]
                prompt = PROMPTS[(i * 3 + j) % len(PROMPTS)]
                got.append((model, prompt, await proxy_chat(c, shim, model, prompt)))
        return got

    results = await asyncio.gather(*(client(i) for i in range(20)))
    answers = [r for rs in results for r in rs]
    assert len(answers) == 80  # none lost
    wrong = [(m, p, a) for m, p, a in answers if a != expected[(m, p)]]
    assert not wrong, f"answers from the wrong model: {wrong[:3]}"
    assert shim.switcher.switches > switches_before  # it did switch under load
    assert shim.switcher.queue_depth == 0
    assert shim.switcher.in_flight_all() == {"a": 0, "b": 0}


async def test_streams_switch_back_and_forth(shim_factory: ShimFactory) -> None:
    shim = await shim_factory(["a", "b"])

    async def one(model: str) -> list[Any]:
        async with httpx.AsyncClient(timeout=120) as c:
            r = await c.post(f"{shim.url}/v1/chat/completions",
                             json=chat_body(model, "stream me", max_tokens=12, stream=True))
            assert r.status_code == 200
            return sse_events(r.content)

    results = await asyncio.gather(*(one("ab"[i % 2]) for i in range(10)))
    for events in results:
        assert events[-1] == "[DONE]"
        assert len(events) >= 3
    a_text = ["".join(e["choices"][0]["delta"].get("content") or "" for e in ev[:-1]
                      if e.get("choices")) for ev in results[0::2]]
    assert len(set(a_text)) == 1  # deterministic and from the same model every time


async def test_fifo_order_between_models(shim_factory: ShimFactory,
                                         http: httpx.AsyncClient) -> None:
    """Strict order (max_wait_secs = 0), `a` active and past min_active: b then a queued;
    b is served first."""
    shim = await shim_factory(["a", "b"], policy={"min_active_secs": 0, "max_wait_secs": 0})
    await shim.switcher.wake("a")
    done: list[str] = []
    # hold `a` busy with a stream so that the next requests queue up behind the drain
    hold = asyncio.create_task(http.post(f"{shim.url}/v1/completions", json={
        "model": "a", "prompt": "long", "max_tokens": 400, "stream": True}))
    await wait_until_async(lambda: shim.switcher.in_flight("a"), 30,
                           "a's stream to be in flight", interval=0.01)

    tb = await _queued(http, shim, "b", "order", done, depth=1)
    ta = await _queued(http, shim, "a", "order", done, depth=2)
    await asyncio.gather(tb, ta, hold)
    assert done == ["b", "a"]  # arrival order across models, no overtaking
    assert (await hold).status_code == 200


async def test_min_active_keeps_admitting_the_active_model(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"], policy={"min_active_secs": 3})
    await shim.switcher.wake("a")  # a just became active: protected for 3 s
    order: list[str] = []
    tb = await _queued(http, shim, "b", "x", order, depth=1)
    # a keeps being served while b waits for a's minimum active time to pass
    for _ in range(3):
        await proxy_chat(http, shim, "a", "x")
        order.append("a")
    assert shim.switcher.active == "a" and shim.switcher.queue_depth == 1
    await tb
    assert order == ["a", "a", "a", "b"]
    assert shim.switcher.active == "b"


async def test_drain_before_switch_lets_streams_finish(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"], policy={"drain_before_switch": True})
    await shim.switcher.wake("a")
    events: list[str] = []
    first_chunk = asyncio.Event()

    async def long_stream() -> list[Any]:
        async with http.stream("POST", f"{shim.url}/v1/completions", json={
                "model": "a", "prompt": "drain", "max_tokens": 200, "stream": True}) as r:
            raw = b""
            async for chunk in r.aiter_bytes():
                raw += chunk
                first_chunk.set()
            events.append("a-stream-done")
            return sse_events(raw)

    ts = asyncio.create_task(long_stream())
    await first_chunk.wait()
    await proxy_chat(http, shim, "b", "after the drain")
    events.append("b-answered")
    sse = await ts
    assert sse[-1] == "[DONE]" and len(sse) > 100  # the stream was not cut by the switch
    assert events == ["a-stream-done", "b-answered"]


async def test_request_timeout_answers_504(shim_factory: ShimFactory,
                                           http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"], policy={"min_active_secs": 60,
                                                  "request_timeout_secs": 0.5})
    await shim.switcher.wake("a")
    r = await http.post(f"{shim.url}/v1/chat/completions", json=chat_body("b", "late"))
    assert r.status_code == 504
    assert r.headers["retry-after"] == "5"  # the client may try again: it is not refused
    err = r.json()["error"]
    assert "request_timeout_secs=0.5" in err["message"] and "`b`" in err["message"]
    assert shim.switcher.queue_depth == 0
    # the active model is untouched
    assert (await http.post(f"{shim.url}/v1/chat/completions",
                            json=chat_body("a", "still here"))).status_code == 200


async def test_failed_switch_answers_503_and_leaves_others(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "bad"], bad={"command": ["/bin/false"],
                                                 "startup_timeout_secs": 5})

    async def ask(model: str) -> httpx.Response:
        return await http.post(f"{shim.url}/v1/chat/completions", json=chat_body(model, "x"))

    results = await asyncio.gather(ask("a"), ask("bad"), ask("bad"), ask("a"))
    codes = [r.status_code for r in results]
    assert codes == [200, 503, 503, 200], [r.text for r in results]
    msg = results[1].json()["error"]["message"]
    assert "switching to model `bad` failed" in msg
    assert results[1].headers["retry-after"] == "5"
    assert "retry-after" not in results[0].headers
    assert (await ask("a")).status_code == 200


async def test_client_disconnect_mid_stream_releases_the_slot(
        shim_factory: ShimFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    shim = await shim_factory(["a", "b"], a={"weights_mb": 32})  # slower tokens
    await shim.switcher.wake("a")
    for _attempt in range(5):  # the client must leave while the proxy is still relaying
        mid_stream = False
        async with httpx.AsyncClient(timeout=60) as c:  # noqa: SIM117
            async with c.stream("POST", f"{shim.url}/v1/completions", json={
                    "model": "a", "prompt": "endless", "max_tokens": 1500,
                    "stream": True}) as r:
                assert r.status_code == 200
                async for _ in r.aiter_bytes():
                    mid_stream = shim.switcher.in_flight("a") == 1
                    break
        # the client is gone (connection closed): the slot is released before the stream's end
        await wait_until_async(
            lambda mid_stream=mid_stream: shim.switcher.in_flight("a") == 0 and (
                not mid_stream or "action=client_disconnect" in caplog.text),
            5, "a's slot to be released (and the disconnect logged)", interval=0.01)
        assert shim.switcher.in_flight("a") == 0
        if mid_stream:
            break
    assert mid_stream, "each stream was relayed whole before the client left"
    assert shim.metrics.requests.get(("a", 200)) == _attempt + 1
    assert "action=client_disconnect" in caplog.text
    assert "Exception in ASGI application" not in caplog.text
    # the engine connection was dropped (the engine aborts), and the next stream is whole
    async with httpx.AsyncClient(timeout=60) as c:
        r = await c.post(f"{shim.url}/v1/completions", json={
            "model": "a", "prompt": "next", "max_tokens": 20, "stream": True})
        assert sse_events(r.content)[-1] == "[DONE]"


async def test_client_gone_while_queued_leaves_the_queue(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"], policy={"min_active_secs": 60})
    await shim.switcher.wake("a")
    with_timeout = httpx.AsyncClient(timeout=httpx.Timeout(120, read=0.5))
    try:
        r = await with_timeout.post(f"{shim.url}/v1/chat/completions", json=chat_body("b", "x"))
        raise AssertionError(f"expected a client-side timeout, got {r.status_code}")
    except httpx.ReadTimeout:
        pass
    finally:
        await with_timeout.aclose()
    await wait_until_async(lambda: shim.switcher.queue_depth == 0, 5,
                           "the queue to be empty", interval=0.01)
    assert shim.switcher.queue_depth == 0
    assert shim.switcher.active == "a"


async def test_killed_engine_is_restarted_on_next_request(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a"])
    first = await proxy_chat(http, shim, "a", "before")
    pid = shim.supervisor.pids("a")[0]
    os.kill(pid, signal.SIGKILL)
    await wait_until_async(lambda: not shim.supervisor.is_alive("a"), 5,
                           "the killed engine to be seen dead", interval=0.01)
    assert await proxy_chat(http, shim, "a", "before") == first
    status = (await http.get(f"{shim.url}/control/status")).json()["models"]["a"]
    assert status["state"] == "running" and status["restarts"] >= 1 and pid not in status["pids"]
    metrics = (await http.get(f"{shim.url}/metrics")).text
    assert 'llmux_engine_restarts_total{model="a"} 1.0' in metrics


async def test_max_active_two_keeps_both_models(shim_factory: ShimFactory,
                                                http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b", "c"], top={"max_active": 2})
    for model in ("a", "b", "a", "b"):
        await proxy_chat(http, shim, model, "both")
    assert sorted(shim.switcher.active_models) == ["a", "b"]
    assert shim.lifecycle.status("a").state == "running"
    assert shim.lifecycle.status("b").state == "running"
    assert shim.switcher.switches == 2  # two cold starts, no eviction
    await proxy_chat(http, shim, "c", "third")  # evicts the longest-active one
    assert sorted(shim.switcher.active_models) == ["b", "c"]
    assert shim.lifecycle.status("a").state == "sleeping"


async def test_shutdown_answers_queued_requests_with_503(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"], policy={"min_active_secs": 60})
    await shim.switcher.wake("a")
    queued = asyncio.create_task(http.post(f"{shim.url}/v1/chat/completions",
                                           json=chat_body("b", "never")))
    await wait_until_async(lambda: shim.switcher.queue_depth, 30, "b's request to queue",
                           interval=0.01)
    await shim.switcher.aclose()
    r = await queued
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]


async def test_drain_is_cancelled_when_nobody_waits_any_more(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    """b gives up (timeout) while a drains for it: a serves new requests again."""
    shim = await shim_factory(["a", "b"], policy={"request_timeout_secs": 0.3})
    await shim.switcher.wake("a")
    first = asyncio.Event()

    async def long_stream() -> bytes:
        raw = b""
        async with http.stream("POST", f"{shim.url}/v1/completions", json={
                "model": "a", "prompt": "hold", "max_tokens": 1500, "stream": True}) as r:
            async for chunk in r.aiter_bytes():
                raw += chunk
                first.set()
                await asyncio.sleep(0.002)  # a slow reader keeps a's slot busy
        return raw

    ts = asyncio.create_task(long_stream())
    await first.wait()
    r = await http.post(f"{shim.url}/v1/chat/completions", json=chat_body("b", "x"))
    if shim.switcher.in_flight("a"):  # the stream outlived b's patience (the usual case)
        assert r.status_code == 504
        ra = await http.post(f"{shim.url}/v1/chat/completions", json=chat_body("a", "y"))
        assert ra.status_code == 200
        assert shim.switcher.active == "a"
    assert sse_events(await ts)[-1] == "[DONE]"
