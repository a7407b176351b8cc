"""The switch storm, smaller, with the host strategies: two models evicted by CRIU checkpoint
through llmuxd, 12 clients for LLMUX_STORM_SECS (default 20; 60 with LLMUX_LONG=1), streams
mixed in. Every request gets its model's answer or a clear error with Retry-After; a model
never runs two engines (a restore beside a live tree); at the end both models are restorable
and in-flight is back to 0."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import tomllib
from typing import Any

import httpx
import pytest

from llmux.shim.supervisor import ENGINE_MARK
from tests.support.procs import marked_roots
from tests.support.shimproc import REQUEST_TIMEOUT_S

pytestmark = [pytest.mark.criu, pytest.mark.dbus]

Llmuxd = Any
A, B = "alpha", "beta"
TIMEOUT_SECS = REQUEST_TIMEOUT_S


def storm_secs() -> float:
    if "LLMUX_STORM_SECS" in os.environ:
        return float(os.environ["LLMUX_STORM_SECS"])
    return 60.0 if os.environ.get("LLMUX_LONG") == "1" else 20.0


def _answer(raw: bytes, stream: bool) -> str:
    if not stream:
        return str(json.loads(raw)["choices"][0]["message"]["content"])
    text = ""
    for block in raw.decode().split("\n\n"):
        block = block.strip()
        if block.startswith("data:") and block[5:].strip() != "[DONE]":
            text += json.loads(block[5:])["choices"][0]["delta"].get("content") or ""
    return text


def test_checkpoint_storm_through_llmuxd(llmuxd: Llmuxd, start_shim: Any) -> None:
    # min_active_secs = 0, request_timeout_secs = TIMEOUT_SECS (the fixture's policy)
    shim = start_shim(llmuxd.bus.address, {A: "retain+checkpoint", B: "discard+checkpoint"})
    config = tomllib.loads(shim.config_path.read_text())
    marks = {m: f"{ENGINE_MARK}={m}:{config['models'][m]['port']}" for m in (A, B)}
    prompts = ["one", "two", "three"]
    expected: dict[tuple[str, str], str] = {}
    for m, p in [(m, p) for m in (A, B) for p in prompts]:
        r = shim.client.post(f"{shim.url}/v1/chat/completions", json={
            "model": m, "messages": [{"role": "user", "content": p}], "max_tokens": 6,
            "temperature": 0})
        assert r.status_code == 200, r.text
        expected[(m, p)] = _answer(r.content, False)
    most_roots = {A: 0, B: 0}
    outcomes: list[tuple[str, str, int, str, str | None, float]] = []
    deadline = time.monotonic() + storm_secs()

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(timeout=TIMEOUT_SECS + 60) as c:
            while time.monotonic() < deadline:
                m, p, stream = rng.choice((A, B)), rng.choice(prompts), rng.random() < 0.3
                t0 = time.monotonic()
                r = await c.post(f"{shim.url}/v1/chat/completions", json={
                    "model": m, "messages": [{"role": "user", "content": p}],
                    "max_tokens": 6, "temperature": 0, "stream": stream})
                got = _answer(r.content, stream) if r.status_code == 200 else r.text
                outcomes.append((m, p, r.status_code, got, r.headers.get("retry-after"),
                                 time.monotonic() - t0))

    async def sample() -> None:
        while time.monotonic() < deadline + 1:
            for m in (A, B):
                most_roots[m] = max(most_roots[m],
                                    len(await asyncio.to_thread(marked_roots, marks[m])))
            await asyncio.sleep(0.2)

    async def storm() -> None:
        await asyncio.gather(*(client(i) for i in range(12)), sample())

    asyncio.run(storm())
    served = [o for o in outcomes if o[2] == 200]
    wrong = [o for o in served if o[3] != expected[(o[0], o[1])]]
    unclear = [o for o in outcomes if o[2] != 200 and (o[2] not in (503, 504) or o[4] is None
                                                         or "message" not in o[3])]
    status = shim.status()
    print(f"checkpoint storm: {len(outcomes)} requests, {len(served)} answered, "
          f"{len(outcomes) - len(served)} errors, longest {max(o[5] for o in outcomes):.1f} s, "
          f"states {[status['models'][m]['state'] for m in (A, B)]}")
    assert len(served) >= 12, f"served almost nothing: {outcomes[:5]}\n{shim.log()[-3000:]}"
    assert not wrong, f"answered by the wrong model: {wrong[:3]}"
    assert not unclear, f"errors without a clear message or Retry-After: {unclear[:3]}"
    assert max(most_roots.values()) == 1, f"a model ran two engines: {most_roots}"
    assert all(o[5] < TIMEOUT_SECS + 60 for o in outcomes)
    # both come back with their own answer: restored (or running), never lost
    for m in (A, B):
        r = shim.client.post(f"{shim.url}/v1/chat/completions", json={
            "model": m, "messages": [{"role": "user", "content": "one"}], "max_tokens": 6,
            "temperature": 0})
        assert r.status_code == 200 and _answer(r.content, False) == expected[(m, "one")]
    wakes = {shim.model_status(m)["last_wake"] for m in (A, B)}
    assert "restore" in wakes, f"no restore happened: {wakes}\n{shim.log()[-3000:]}"
