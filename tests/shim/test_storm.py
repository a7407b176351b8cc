"""A switch storm: three models, 50 clients, streaming and not, a tenth of the streams
abandoned mid-way, bursts during switches and two /control/switch at once, for a bounded
time (LLMUX_STORM_SECS, default 15; long runs: LLMUX_LONG=1 gives 60).

What must hold for every request: the right model's answer, or a clear error (JSON body with
a message; 503/504 with Retry-After) within request_timeout_secs; none hangs. What must hold
at every moment: one transition at a time, never two engines for one model, and in the end
nothing in flight nor queued.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from llmux.shim.app import Shim
from tests.support.proxy_fixtures import (
    ShimFactory,
    chat_body,
    direct_chat,
    engine_roots,
    sse_events,
)

MODELS = ["a", "b", "c"]
PROMPTS = [f"storm prompt {i}" for i in range(5)]
TIMEOUT_SECS = 20.0
#: a request may take its timeout, plus the switch it was admitted before, plus slack
BOUND_SECS = TIMEOUT_SECS + 15.0
T = TypeVar("T")


def storm_secs() -> float:
    if "LLMUX_STORM_SECS" in os.environ:
        return float(os.environ["LLMUX_STORM_SECS"])
    return 60.0 if os.environ.get("LLMUX_LONG") == "1" else 15.0


@dataclass
class Outcome:
    model: str
    prompt: str
    kind: str  # "plain", "stream", "abandoned", "switch"
    status: int
    text: str | None
    seconds: float
    error: str | None = None
    retry_after: str | None = None


class Watch:
    """Counts transitions running at once (the lifecycle's activate/evict, wrapped)."""

    def __init__(self, shim: Shim) -> None:
        self.now = 0
        self.most = 0
        lc = shim.lifecycle
        for name in ("activate", "evict"):
            setattr(lc, name, self._counted(getattr(lc, name)))

    def _counted(self, fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        async def run(*args: Any, **kwargs: Any) -> T:
            self.now += 1
            self.most = max(self.most, self.now)
            try:
                return await fn(*args, **kwargs)
            finally:
                self.now -= 1
        return run


async def one_request(c: httpx.AsyncClient, shim: Shim, model: str, prompt: str, kind: str
                      ) -> Outcome:
    t0 = time.monotonic()
    stream = kind != "plain"
    async with c.stream("POST", f"{shim.url}/v1/chat/completions",
                        json=chat_body(model, prompt, stream=stream)) as r:
        if r.status_code != 200:
            raw = await r.aread()
            try:
                err = str(httpx.Response(200, content=raw).json()["error"]["message"])
            except Exception:
                err = None
            return Outcome(model, prompt, kind, r.status_code, None, time.monotonic() - t0,
                           err or f"(no message) {raw[:200]!r}", r.headers.get("retry-after"))
        if kind == "abandoned":
            async for _ in r.aiter_raw():
                break  # the client goes away after the first chunk
            return Outcome(model, prompt, kind, 200, None, time.monotonic() - t0)
        raw = await r.aread()
    if stream:
        events = [e for e in sse_events(raw) if e != "[DONE]"]
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    else:
        text = str(httpx.Response(200, content=raw).json()["choices"][0]["message"]["content"])
    return Outcome(model, prompt, kind, 200, text, time.monotonic() - t0)


async def test_switch_storm_loses_nothing(shim_factory: ShimFactory,
                                          http: httpx.AsyncClient) -> None:
    shim = await shim_factory(MODELS, eviction=None, policy={
        "request_timeout_secs": TIMEOUT_SECS},
        a={"eviction": "offload+keep_running"}, b={"eviction": "retain+stop"},
        c={"eviction": "discard+keep_running"})
    expected: dict[tuple[str, str], str] = {}
    for m in MODELS:
        await shim.switcher.wake(m)
        for p in PROMPTS:
            expected[(m, p)] = await direct_chat(http, shim, m, p)
    watch = Watch(shim)
    rng = random.Random(12)
    deadline = time.monotonic() + storm_secs()
    outcomes: list[Outcome] = []
    most_roots: dict[str, int] = dict.fromkeys(MODELS, 0)
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=100)

    async def client(seed: int) -> None:
        r = random.Random(seed)
        async with httpx.AsyncClient(timeout=BOUND_SECS + 30, limits=limits) as c:
            while time.monotonic() < deadline:
                model, prompt = r.choice(MODELS), r.choice(PROMPTS)
                roll = r.random()
                kind = "plain" if roll < 0.6 else "abandoned" if roll < 0.64 else "stream"
                outcomes.append(await one_request(c, shim, model, prompt, kind))

    async def bursts_and_races() -> None:
        async with httpx.AsyncClient(timeout=BOUND_SECS + 30, limits=limits) as c:
            while time.monotonic() < deadline:
                await asyncio.sleep(rng.uniform(0.5, 1.5))
                while not shim.switcher.switching and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                model = rng.choice(MODELS)  # a burst during a switch
                burst = [one_request(c, shim, model, rng.choice(PROMPTS), "plain")
                         for _ in range(10)]
                a, b = rng.sample(MODELS, 2)  # and two switches at once
                t0 = time.monotonic()
                got = await asyncio.gather(
                    *burst, c.post(f"{shim.url}/control/switch", json={"model": a}),
                    c.post(f"{shim.url}/control/switch", json={"model": b}))
                for target, res in zip((a, b), got[-2:], strict=True):
                    assert isinstance(res, httpx.Response)
                    outcomes.append(Outcome(target, "", "switch", res.status_code, None,
                                            time.monotonic() - t0,
                                            None if res.status_code == 200 else res.text,
                                            res.headers.get("retry-after")))
                outcomes.extend(o for o in got[:-2] if isinstance(o, Outcome))

    async def sample() -> None:
        while time.monotonic() < deadline + 1:
            for m in MODELS:
                roots = await asyncio.to_thread(engine_roots, shim, m)
                most_roots[m] = max(most_roots[m], len(roots))
            await asyncio.sleep(0.2)

    await asyncio.gather(*(client(i) for i in range(50)), bursts_and_races(), sample())

    served = [o for o in outcomes if o.status == 200 and o.kind in ("plain", "stream")]
    wrong = [o for o in served if o.text != expected[(o.model, o.prompt)]]
    failed = [o for o in outcomes if o.status != 200]
    unclear = [o for o in failed if o.status not in (503, 504) or not o.error
               or o.retry_after is None]
    slow = [o for o in outcomes if o.seconds > BOUND_SECS]
    print(f"storm: {len(outcomes)} requests, {len(served)} answered, {len(failed)} errors "
          f"({sorted({o.status for o in failed})}), {shim.switcher.switches} switches, "
          f"longest {max(o.seconds for o in outcomes):.1f} s")
    assert len(served) > 50, "the storm served almost nothing"
    assert not wrong, f"answered by the wrong model: {wrong[:3]}"
    assert not unclear, f"errors without a clear message or Retry-After: {unclear[:3]}"
    assert not slow, f"requests over {BOUND_SECS} s: {slow[:3]}"
    assert watch.most == 1, f"{watch.most} transitions ran at once"
    assert max(most_roots.values()) == 1, f"a model ran two engines: {most_roots}"
    assert shim.switcher.in_flight_all() == dict.fromkeys(MODELS, 0)
    assert shim.switcher.queue_depth == 0
    # and the shim still serves every model afterwards
    for m in MODELS:
        r = await http.post(f"{shim.url}/v1/chat/completions", json=chat_body(m, PROMPTS[0]))
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == (
            expected[(m, PROMPTS[0])]), r.text
