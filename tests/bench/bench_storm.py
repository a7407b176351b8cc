"""Switch storm benchmark: strict arrival order vs batching with a bound vs a memory budget.

Not a test: it prints numbers. For each scenario a real shim (``llmux serve`` in its own
process) runs three built-in models; CLIENTS concurrent clients each pick a model at
random for every request, for DURATION seconds, with ``min_active_secs = 0``. Requests
are mixed: plain chat completions, streams read to the end, and streams abandoned after
their first chunk (the client closes the connection). Scenarios, side by side:

* ``max_wait_secs = 0``: strict arrival order (what the shim did before batching);
* the default (``max_wait_secs = 30``): batching per model, bounded;
* a ``memory_budget_mb`` that holds all three (they stay resident: no switch after the
  three cold starts).

Printed per scenario: requests served, switches (from /metrics), requests per switch,
p50/p99 latency (request to answer; for an abandoned stream, to its first chunk), the
longest wait (request to the response's first byte) and the mean switch time. Every
answer is checked: its ``model`` field and its text must be the requested model's (the
models answer a prompt differently and deterministically); any request without an
answer, a non-200 status or a wrong answer is counted and printed as lost.

Usage (from the repository root): .venv/bin/python -m tests.bench.bench_storm
[--duration 60] [--clients 50] [--weights-mb 16] [--eviction offload+keep_running]
[--only strict,default,budget]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.procs import free_ports

PY = sys.executable
REPO = Path(__file__).resolve().parents[2]

MODELS = ("alpha", "beta", "gamma")
PROMPTS = [f"storm prompt {i}" for i in range(5)]
MAX_TOKENS = 12


@dataclass
class Result:
    label: str
    served: int = 0
    lost: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)
    switches: int = 0
    switch_secs: float = 0.0
    max_wait_secs: float | None = None


def body(model: str, prompt: str, stream: bool) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}


async def switch_figures(s: aiohttp.ClientSession, url: str) -> tuple[int, float]:
    """(switches, seconds spent switching) from the shim's /metrics."""
    async with s.get(f"{url}/metrics") as r:
        text = await r.text()
    count = sum(float(m) for m in re.findall(
        r'^llmux_switch_duration_seconds_count\{[^}]*\} (\S+)$', text, re.M))
    total = sum(float(m) for m in re.findall(
        r'^llmux_switch_duration_seconds_sum\{[^}]*\} (\S+)$', text, re.M))
    return int(count), total


async def one(s: aiohttp.ClientSession, url: str, model: str, prompt: str, kind: str,
              expected: dict[tuple[str, str], str] | None, res: Result) -> None:
    t0 = time.monotonic()
    stream = kind != "chat"
    try:
        async with s.post(f"{url}/v1/chat/completions", json=body(model, prompt, stream)) as r:
            res.waits.append(time.monotonic() - t0)
            if r.status != 200:
                res.lost.append(f"{model} {kind}: HTTP {r.status} {(await r.text())[:200]}")
                return
            if kind == "chat":
                data = await r.json()
                text = data["choices"][0]["message"]["content"]
                if data.get("model") != model or (
                        expected is not None and text != expected[(model, prompt)]):
                    res.lost.append(f"{model}: wrong answer {data.get('model')} {text!r}")
                    return
            else:
                first = True
                raw = b""
                async for chunk in r.content.iter_any():
                    raw += chunk
                    if first and b"\n\n" in raw:
                        first = False
                        event = json.loads(raw.split(b"\n\n", 1)[0][5:])
                        if event.get("model") != model:
                            res.lost.append(f"{model}: stream from {event.get('model')}")
                            return
                        if kind == "abandon":
                            break  # the client goes away after the first chunk
                if kind == "stream" and not raw.rstrip().endswith(b"data: [DONE]"):
                    res.lost.append(f"{model}: stream cut short")
                    return
    except (TimeoutError, aiohttp.ClientError, ValueError, KeyError) as e:
        res.lost.append(f"{model} {kind}: {type(e).__name__}: {e}")
        return
    res.latencies.append(time.monotonic() - t0)
    res.served += 1
    res.kinds[kind] = res.kinds.get(kind, 0) + 1


async def storm(url: str, args: argparse.Namespace, res: Result,
                expected: dict[tuple[str, str], str]) -> None:
    deadline = time.monotonic() + args.duration
    timeout = aiohttp.ClientTimeout(total=900)

    async def client(i: int) -> None:
        rng = random.Random(i)
        conn = aiohttp.TCPConnector(limit=1, force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=conn) as s:
            while time.monotonic() < deadline:
                x = rng.random()
                kind = "chat" if x < 0.6 else "stream" if x < 0.85 else "abandon"
                await one(s, url, rng.choice(MODELS), rng.choice(PROMPTS), kind, expected, res)

    async with aiohttp.ClientSession() as s:
        before = await switch_figures(s, url)
        await asyncio.gather(*(client(i) for i in range(args.clients)))
        after = await switch_figures(s, url)
    res.switches = after[0] - before[0]
    res.switch_secs = after[1] - before[1]


async def wait_up(url: str, within: float = 120.0) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(f"{url}/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not come up")
            await asyncio.sleep(0.2)


async def warm(url: str, res: Result) -> dict[tuple[str, str], str]:
    """Every model's answer to every prompt, asked calmly (one request at a time)."""
    out: dict[tuple[str, str], str] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        for m in MODELS:
            for p in PROMPTS:
                async with s.post(f"{url}/v1/chat/completions", json=body(m, p, False)) as r:
                    assert r.status == 200, await r.text()
                    out[(m, p)] = (await r.json())["choices"][0]["message"]["content"]
    assert len({out[(m, PROMPTS[0])] for m in MODELS}) == len(MODELS), "models must differ"
    return out


def scenario_config(name: str, args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any],
                                                                          float | None]:
    ports = free_ports(len(MODELS) + 1)
    policy: dict[str, Any] = {"min_active_secs": 0, "request_timeout_secs": 900,
                              "eviction": args.eviction}
    max_wait: float | None = 30.0
    if name == "strict":
        policy["max_wait_secs"] = 0
        max_wait = 0.0
    elif name == "budget":
        # all three fit: weights plus the interpreters (about 50 MiB), with room to spare
        policy["memory_budget_mb"] = len(MODELS) * (args.weights_mb + 200)
    cfg = {"host": "127.0.0.1", "port": ports[0], "metrics_port": 0,
           "log_dir": str(tmp / f"logs-{name}"), "policy": policy,
           "models": {m: {"model_path": f"llmux-bench/{m}", "port": p, "engine": "builtin",
                          "weights_mb": args.weights_mb}
                      for m, p in zip(MODELS, ports[1:], strict=True)}}
    return cfg, max_wait


async def run_scenario(name: str, label: str, args: argparse.Namespace,
                       tmp: Path) -> Result:
    cfg, max_wait = scenario_config(name, args, tmp)
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    url = f"http://127.0.0.1:{cfg['port']}"
    log = open(tmp / f"{name}.log", "ab")  # noqa: SIM115
    shim = subprocess.Popen([PY, "-m", "tests.bench.bench_storm", "--serve-shim", str(path)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=REPO)
    res = Result(label, max_wait_secs=max_wait)
    try:
        await wait_up(url)
        expected = await warm(url, res)
        await storm(url, args, res, expected)
    except BaseException:
        log.flush()
        print((tmp / f"{name}.log").read_text(errors="replace")[-4000:])
        raise
    finally:
        if shim.poll() is None:
            shim.send_signal(signal.SIGTERM)
            try:
                shim.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(shim.pid, signal.SIGKILL)
                shim.wait()
        log.close()
    return res


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def print_table(results: list[Result]) -> None:
    head = (f"{'scenario':26}{'served':>8}{'switches':>10}{'req/switch':>12}{'p50 s':>9}"
            f"{'p99 s':>9}{'longest wait s':>16}{'switch s':>10}{'lost':>6}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        per = f"{r.served / r.switches:.1f}" if r.switches else "-"
        mean_switch = r.switch_secs / r.switches if r.switches else 0.0
        print(f"{r.label:26}{r.served:8d}{r.switches:10d}{per:>12}"
              f"{pct(r.latencies, 50):9.2f}{pct(r.latencies, 99):9.2f}"
              f"{max(r.waits, default=0):16.2f}{mean_switch:10.3f}{len(r.lost):6d}")
    for r in results:
        for line in r.lost[:5]:
            print(f"  lost in {r.label}: {line}")
        print(f"  {r.label}: {r.kinds}")
    strict = next((r for r in results if r.max_wait_secs == 0), None)
    default = next((r for r in results if r.label.startswith("default")), None)
    if strict is not None and default is not None and strict.switches and default.switches:
        gain = (default.served / default.switches) / (strict.served / strict.switches)
        mean_switch = default.switch_secs / default.switches
        bound = 30.0 + mean_switch
        p99 = pct(default.latencies, 99)
        print(f"\nrequests per switch: {gain:.1f}x strict order (target >= 5x); default p99 "
              f"{p99:.2f} s vs max_wait_secs + one switch = {bound:.2f} s "
              f"({'within' if p99 <= bound else 'ABOVE'})")
    total_lost = sum(len(r.lost) for r in results)
    print(f"requests lost or answered by the wrong model: {total_lost}")


async def main(args: argparse.Namespace) -> None:
    print(f"bench_storm: python {sys.version.split()[0]}, {os.cpu_count()} cpu(s), "
          f"{args.clients} clients, {args.duration:g} s per scenario, {len(MODELS)} built-in "
          f"models of {args.weights_mb} MiB, eviction {args.eviction}, min_active_secs 0, "
          f"backend {os.environ.get('LLMUX_BUILTIN_BACKEND', 'default')}")
    scenarios = [("strict", "max_wait_secs=0 (strict)"), ("default", "default (max_wait 30)"),
                 ("budget", "budget holds all three")]
    wanted = set(args.only.split(",")) if args.only else {s for s, _ in scenarios}
    results = []
    with tempfile.TemporaryDirectory(prefix="llmux-storm-") as d:
        for name, label in scenarios:
            if name in wanted:
                r = await run_scenario(name, label, args, Path(d))
                print(f"{label}: served {r.served}, switches {r.switches}, lost {len(r.lost)}",
                      flush=True)
                results.append(r)
    print_table(results)


def cli() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-shim":
        from llmux.shim.app import run
        from llmux.shim.config import load_config

        run(load_config(sys.argv[2]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--weights-mb", type=int, default=16)
    p.add_argument("--eviction", default="offload+keep_running")
    p.add_argument("--only", default=None, help="comma-separated: strict,default,budget")
    os.environ.setdefault("LLMUX_BUILTIN_BACKEND", "pure")
    asyncio.run(main(p.parse_args()))


if __name__ == "__main__":
    cli()
