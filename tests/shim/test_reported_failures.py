"""Failures users of model-swapping proxies report, each as a test against real engines:
a model loaded twice, two switches at once, a flood while a model sleeps, a model stuck in
"starting", and "timed out waiting to stop" followed by 500s."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import httpx
import openai
import pytest

from llmux.shim.app import Shim
from tests.support.proxy_fixtures import ShimFactory, chat_body, engine_roots, starts_logged


async def ask(client: httpx.AsyncClient, shim: Shim, model: str, prompt: str = "hello"
              ) -> httpx.Response:
    return await client.post(f"{shim.url}/v1/chat/completions", json=chat_body(model, prompt))


async def test_a_crowd_for_a_stopped_model_starts_one_engine(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"])
    answers = await asyncio.gather(*(ask(http, shim, "a", f"p{i % 3}") for i in range(30)))
    assert [r.status_code for r in answers] == [200] * 30, [r.text for r in answers][:3]
    assert starts_logged(shim, "a") == 1
    assert len(engine_roots(shim, "a")) == 1 and engine_roots(shim, "b") == []


async def test_two_switches_at_once_end_with_one_model_and_one_engine_each(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"], eviction="retain+stop")
    for _ in range(3):
        results = await asyncio.gather(
            http.post(f"{shim.url}/control/switch", json={"model": "a"}),
            http.post(f"{shim.url}/control/switch", json={"model": "b"}),
            ask(http, shim, "a"), ask(http, shim, "b"))
        assert [r.status_code for r in results] == [200] * 4, [r.text for r in results]
        active = shim.switcher.active_models
        assert len(active) == 1, active
        assert len(engine_roots(shim, active[0])) == 1
        other = "b" if active[0] == "a" else "a"
        assert engine_roots(shim, other) == [], "the evicted model's engine is still running"
    assert shim.switcher.in_flight_all() == {"a": 0, "b": 0}
    assert shim.switcher.queue_depth == 0


async def test_a_flood_while_asleep_wakes_the_model_once(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"])  # offload+keep_running: the engine sleeps
    first = await ask(http, shim, "a", "flood")
    assert first.status_code == 200
    slept = await http.post(f"{shim.url}/control/sleep", json={"model": "a"})
    assert slept.status_code == 200 and slept.json()["changed"], slept.text
    switches = shim.switcher.switches
    answers = await asyncio.gather(*(ask(http, shim, "a", "flood") for _ in range(50)))
    assert {r.status_code for r in answers} == {200}
    assert {r.json()["choices"][0]["message"]["content"] for r in answers} == {
        first.json()["choices"][0]["message"]["content"]}
    assert shim.switcher.switches == switches + 1, "one wake for the whole flood"
    assert starts_logged(shim, "a") == 1, "woken, not started again"
    assert shim.lifecycle.status("a").state.value == "running"


async def test_a_model_that_never_gets_ready_is_not_stuck_starting(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    never = [sys.executable, "-c", "import time; time.sleep(600)"]
    shim = await shim_factory(["a", "hung"], hung={"command": never, "startup_timeout_secs": 2})
    for attempt in (1, 2):
        r = await ask(http, shim, "hung")
        assert r.status_code == 503, r.text
        assert "did not answer /health within 2 s" in r.json()["error"]["message"]
        assert r.headers["retry-after"].isdigit()
        status = (await http.get(f"{shim.url}/control/status")).json()["models"]["hung"]
        assert status["state"] == "stopped" and status["pids"] == [], status
        assert starts_logged(shim, "hung") == attempt, "each request tries again"
        assert engine_roots(shim, "hung") == []
    assert (await ask(http, shim, "a")).status_code == 200


# An engine that outlives SIGTERM: the wrapper ignores it, runs the real engine as its child
# (which stops on SIGTERM as engines do) and lingers after it.
_STUBBORN = ("import signal, subprocess, sys, time\n"
             "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
             "child = subprocess.Popen([sys.executable, '-m', 'llmux.shim.builtin', "
             "*sys.argv[1:]], preexec_fn=lambda: signal.signal(signal.SIGTERM, "
             "signal.SIG_DFL))\n"
             "child.wait()\n"
             "time.sleep(600)\n")


async def test_an_engine_that_will_not_stop_is_killed_and_nothing_answers_500(
        shim_factory: ShimFactory, http: httpx.AsyncClient,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="llmux.shim.supervisor")
    shim = await shim_factory(["a", "b"], eviction="retain+stop",
                              a={"command": [sys.executable, "-c", _STUBBORN]})
    shim.supervisor.grace_secs = 1.0
    for model in ("a", "b", "a", "b"):
        r = await ask(http, shim, model)
        assert r.status_code == 200, r.text
        assert len(engine_roots(shim, model)) == 1
    assert engine_roots(shim, "a") == [], "SIGKILL after the grace period ends the wrapper"
    assert "model a: " in caplog.text and "sending SIGKILL" in caplog.text


async def test_engine_killed_mid_stream_ends_it_with_an_error_the_client_raises(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a"], a={"weights_mb": 32})  # slower tokens: a longer stream
    first = await ask(http, shim, "a", "before")
    client = openai.AsyncOpenAI(base_url=f"{shim.url}/v1", api_key="unused", max_retries=0)
    raised: openai.APIError | None = None
    for _attempt in range(5):  # the kill must land before the engine sent its last token
        got = 0
        try:
            stream = await client.completions.create(model="a", prompt="long",
                                                     max_tokens=1500, stream=True)
            async for _ in stream:
                got += 1
                if got == 1:
                    os.kill(shim.supervisor.pids("a")[0], signal.SIGKILL)
        except openai.APIError as e:
            raised = e
            break
        assert (await ask(http, shim, "a", "before")).status_code == 200  # and again
    await client.close()
    assert raised is not None, "the engine finished each stream before it was killed"
    assert "stopped in the middle of this answer" in str(raised)
    assert shim.switcher.in_flight("a") == 0
    again = await ask(http, shim, "a", "before")  # restarted: a new engine, the same answer
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]


async def test_an_engine_killed_while_asleep_comes_back_cold(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"])  # offload+keep_running: the engine sleeps
    first = await ask(http, shim, "a", "asleep")
    slept = await http.post(f"{shim.url}/control/sleep", json={"model": "a"})
    assert slept.status_code == 200 and slept.json()["state"] == "sleeping", slept.text
    pids = shim.supervisor.pids("a")
    os.kill(pids[0], signal.SIGKILL)
    again = await ask(http, shim, "a", "asleep")  # not a wake of a dead engine: a new one
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
    status = (await http.get(f"{shim.url}/control/status")).json()["models"]["a"]
    assert status["state"] == "running" and status["last_wake"] == "cold", status
    assert set(status["pids"]).isdisjoint(pids)
    assert len(engine_roots(shim, "a")) == 1
