"""Proxy overhead benchmark: latency added and streaming chunk rate, proxy vs direct.

Not a test: it prints numbers. Two upstreams, each measured directly and
through the shim (raw /v1 path, switcher, metrics: the whole hot path):

* a trivial upstream (a raw ASGI app under uvicorn in its own process) that
  answers at once and streams CHUNKS SSE events as fast as it can, so that
  what is measured is the proxy's own cost;
* the built-in engine, spawned by the shim's real lifecycle (``serve()``).

"chunks/s (whole)" counts SSE events over the whole stream, request to last
byte, so it includes the added first-chunk latency; "(steady)" counts the
events after the first read over the time after it: the pass-through rate.

"page" measures the same proxy path of the built-in engine's shim without and with the
operator's page open (an SSE client following /ui's engine-log stream, polling
/ui/api/state once a second and the checkpoints every 10 s, while the engine log grows
by LOG_LINES_PER_S lines), in alternating rounds of one run: the page must cost the
proxy less than 5%.

Usage: .venv/bin/python -m tests.bench.bench_proxy [--requests N] [--streams N]
[--chunks N] [--only trivial|builtin|page] [--page-rounds N] [--api-key KEY]. Loopback only,
bounded request counts. With --api-key the trivial shim has `[auth] api_keys = [KEY]` and
every request sends it: the cost of the key check on the hot path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

PY = sys.executable
HERE = Path(__file__).resolve()
SSE_EVENT = (b'data: {"id":"cmpl-bench","object":"chat.completion.chunk","created":0,'
             b'"model":"trivial","choices":[{"index":0,"delta":{"content":"tok "},'
             b'"finish_reason":null}]}\n\n')
ANSWER = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "trivial",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()


#: the key of --api-key, for the shim's process and the client's requests
API_KEY_ENV = "LLMUX_BENCH_API_KEY"


def request_headers() -> dict[str, str]:
    key = os.environ.get(API_KEY_ENV)
    auth = {"authorization": f"Bearer {key}"} if key else {}
    return {"content-type": "application/json", **auth}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- the trivial upstream


def trivial_app(chunks: int) -> Any:
    json_headers = [(b"content-type", b"application/json"),
                    (b"content-length", str(len(ANSWER)).encode())]
    sse_headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        if scope["method"] == "GET":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"status":"ok"}'})
            return
        if b'"stream": true' in body or b'"stream":true' in body:
            await send({"type": "http.response.start", "status": 200, "headers": sse_headers})
            for _ in range(chunks):
                await send({"type": "http.response.body", "body": SSE_EVENT, "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                        "more_body": False})
            return
        await send({"type": "http.response.start", "status": 200, "headers": json_headers})
        await send({"type": "http.response.body", "body": ANSWER})

    return app


def run_trivial(port: int, chunks: int) -> None:
    import uvicorn

    uvicorn.run(trivial_app(chunks), host="127.0.0.1", port=port, loop="uvloop",
                http="httptools", lifespan="off", access_log=False, log_level="warning")


# ---------------------------------------------------------------- the shim under test


class _InstantLifecycle:
    """Stands in for the Lifecycle in front of the trivial upstream: always running."""

    def __init__(self, port: int) -> None:
        from llmux.shim.lifecycle import ModelState

        self._port = port
        self._state = ModelState.RUNNING

    async def activate(self, model: str) -> str:
        return "cold"

    async def evict(self, model: str, policy: Any = None) -> str:
        return "sleeping"

    def base_url(self, model: str) -> str:
        return f"http://127.0.0.1:{self._port}"

    def status(self, model: str) -> Any:
        state = self._state

        class _S:
            def to_json(self) -> dict[str, Any]:
                return {"state": str(state), "pids": [], "last_wake": "cold"}

        s = _S()
        s.state = state  # type: ignore[attr-defined]
        return s

    def statuses(self) -> dict[str, Any]:
        return {"trivial": self.status("trivial")}


def run_shim_trivial(port: int, upstream_port: int) -> None:
    """The shim's real app (proxy, switcher, metrics) in front of the trivial upstream."""
    import uvicorn
    import uvloop

    from llmux.shim.app import build_app, uvicorn_config
    from llmux.shim.config import config_from_dict
    from llmux.shim.engineclient import EngineClient
    from llmux.shim.metrics import ShimMetrics
    from llmux.shim.switcher import Switcher

    key = os.environ.get(API_KEY_ENV)
    config = config_from_dict({
        "port": port, "metrics_port": 0,
        **({"auth": {"api_keys": [key]}} if key else {}),
        "models": {"trivial": {"model_path": "trivial", "port": upstream_port,
                               "engine": "builtin"}}})

    async def main() -> None:
        lifecycle = _InstantLifecycle(upstream_port)
        switcher = Switcher(config, lifecycle)
        metrics = ShimMetrics(in_flight=switcher.in_flight_all,
                              queue_depth=lambda: switcher.queue_depth,
                              active_models=lambda: switcher.active_models)
        engines = EngineClient(config.models)
        app = build_app(config, lifecycle, switcher, engines, metrics)
        await uvicorn.Server(uvicorn_config(app, "127.0.0.1", port)).serve()

    uvloop.run(main())


def run_shim_builtin(config_path: str) -> None:
    from llmux.shim.app import run
    from llmux.shim.config import load_config

    run(load_config(config_path))


# ---------------------------------------------------------------- the client


async def wait_up(url: str, within: float = 120.0) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} did not come up within {within:.0f} s")
            await asyncio.sleep(0.1)


async def latency(session: aiohttp.ClientSession, url: str, body: bytes, n: int) -> list[float]:
    out: list[float] = []
    headers = request_headers()
    for _ in range(n):
        t0 = time.perf_counter()
        async with session.post(url, data=body, headers=headers) as r:
            await r.read()
            assert r.status == 200, r.status
        out.append(time.perf_counter() - t0)
    return out


async def stream(session: aiohttp.ClientSession, url: str, body: bytes
                 ) -> tuple[int, float, float, int]:
    """(events, seconds from the request to the last byte, seconds to the first event,
    events in the first read)."""
    events = 0
    first = 0.0
    first_events = 0
    t0 = time.perf_counter()
    async with session.post(url, data=body, headers=request_headers()) as r:
        assert r.status == 200, r.status
        async for chunk in r.content.iter_any():
            n = chunk.count(b"data: ")
            if not first and n:
                first = time.perf_counter() - t0
                first_events = n
            events += n
    return events, time.perf_counter() - t0, first, first_events


async def interleaved(fn: Callable[[str], Awaitable[Any]], direct: str, proxy: str,
                      rounds: int) -> tuple[list[Any], list[Any]]:
    """Alternate direct and proxied runs so that drift hits both alike."""
    d: list[Any] = []
    p: list[Any] = []
    for _ in range(rounds):
        d.append(await fn(direct))
        p.append(await fn(proxy))
    return d, p


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def measure(label: str, direct: str, proxy: str, model: str, *, requests: int,
                  streams: int, stream_extra: dict[str, Any]) -> dict[str, float]:
    plain = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 2}).encode()
    streaming = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                            "stream": True, **stream_extra}).encode()
    conn = aiohttp.TCPConnector(limit=4)
    async with aiohttp.ClientSession(connector=conn) as s:
        batch = 50
        rounds = max(1, requests // batch)

        async def lat(base: str) -> list[float]:
            return await latency(s, base + "/v1/chat/completions", plain, batch)

        await interleaved(lat, direct, proxy, 2)  # warm-up
        d_lat, p_lat = interleaved_flat(await interleaved(lat, direct, proxy, rounds))

        async def st(base: str) -> tuple[int, float, float, int]:
            return await stream(s, base + "/v1/chat/completions", streaming)

        await interleaved(st, direct, proxy, 1)
        d_st, p_st = await interleaved(st, direct, proxy, streams)
    d_ev, d_t = sum(x[0] for x in d_st), sum(x[1] for x in d_st)
    p_ev, p_t = sum(x[0] for x in p_st), sum(x[1] for x in p_st)
    # steady state: the events after the first read, over the time after it
    d_ss = sum(x[0] - x[3] for x in d_st) / sum(x[1] - x[2] for x in d_st)
    p_ss = sum(x[0] - x[3] for x in p_st) / sum(x[1] - x[2] for x in p_st)
    r = {
        "direct_p50_ms": pct(d_lat, 0.5) * 1e3, "proxy_p50_ms": pct(p_lat, 0.5) * 1e3,
        "direct_p99_ms": pct(d_lat, 0.99) * 1e3, "proxy_p99_ms": pct(p_lat, 0.99) * 1e3,
        "direct_mean_ms": statistics.fmean(d_lat) * 1e3,
        "proxy_mean_ms": statistics.fmean(p_lat) * 1e3,
        "direct_cps": d_ev / d_t, "proxy_cps": p_ev / p_t,
        "direct_ss_cps": d_ss, "proxy_ss_cps": p_ss,
        "direct_ttfc_ms": pct([x[2] for x in d_st], 0.5) * 1e3,
        "proxy_ttfc_ms": pct([x[2] for x in p_st], 0.5) * 1e3,
        "events_per_stream": d_ev / len(d_st), "proxy_events_per_stream": p_ev / len(p_st),
    }
    print_result(label, r, len(d_lat), len(d_st))
    return r


def interleaved_flat(pair: tuple[list[list[float]], list[list[float]]]
                     ) -> tuple[list[float], list[float]]:
    return [x for b in pair[0] for x in b], [x for b in pair[1] for x in b]


def print_result(label: str, r: dict[str, float], n_lat: int, n_streams: int) -> None:
    added50 = r["proxy_p50_ms"] - r["direct_p50_ms"]
    added99 = r["proxy_p99_ms"] - r["direct_p99_ms"]
    ratio = r["proxy_cps"] / r["direct_cps"] * 100
    print(f"\n== {label}: {n_lat} non-streaming requests and {n_streams} streams "
          f"(~{r['events_per_stream']:.0f} events each) per side")
    print(f"{'':26}{'direct':>12}{'proxy':>12}{'added':>12}")
    print(f"{'latency p50 (ms)':26}{r['direct_p50_ms']:12.3f}{r['proxy_p50_ms']:12.3f}"
          f"{added50:12.3f}")
    print(f"{'latency p99 (ms)':26}{r['direct_p99_ms']:12.3f}{r['proxy_p99_ms']:12.3f}"
          f"{added99:12.3f}")
    print(f"{'latency mean (ms)':26}{r['direct_mean_ms']:12.3f}{r['proxy_mean_ms']:12.3f}"
          f"{r['proxy_mean_ms'] - r['direct_mean_ms']:12.3f}")
    print(f"{'stream first chunk p50 ms':26}{r['direct_ttfc_ms']:12.3f}"
          f"{r['proxy_ttfc_ms']:12.3f}{r['proxy_ttfc_ms'] - r['direct_ttfc_ms']:12.3f}")
    print(f"{'stream chunks/s (whole)':26}{r['direct_cps']:12.0f}{r['proxy_cps']:12.0f}"
          f"{ratio:11.1f}%")
    ss = r["proxy_ss_cps"] / r["direct_ss_cps"] * 100
    print(f"{'stream chunks/s (steady)':26}{r['direct_ss_cps']:12.0f}{r['proxy_ss_cps']:12.0f}"
          f"{ss:11.1f}%")


# ---------------------------------------------------------------- orchestration


def spawn(*args: str, env: dict[str, str] | None = None, log: Path | None = None
          ) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen([PY, str(HERE), *args], stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            start_new_session=True)


def stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


async def bench_trivial(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    up, px = free_port(), free_port()
    procs = [spawn("--serve-trivial", str(up), str(args.chunks), log=tmp / "trivial.log")]
    try:
        await wait_up(f"http://127.0.0.1:{up}/health")
        procs.append(spawn("--serve-shim-trivial", str(px), str(up), log=tmp / "shim1.log"))
        await wait_up(f"http://127.0.0.1:{px}/health")
        return await measure("trivial upstream", f"http://127.0.0.1:{up}",
                             f"http://127.0.0.1:{px}", "trivial", requests=args.requests,
                             streams=args.streams, stream_extra={})
    finally:
        for p in reversed(procs):
            stop(p)


def engine_command() -> dict[str, Any]:
    """LLMUX_BENCH_ENGINE_CMD='["python", "x.py"]' replaces the engine's argv prefix."""
    raw = os.environ.get("LLMUX_BENCH_ENGINE_CMD")
    return {"command": json.loads(raw)} if raw else {}


async def bench_builtin(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    eng, px = free_port(), free_port()
    cfg = tmp / "shim.json"
    cfg.write_text(json.dumps({
        "port": px, "host": "127.0.0.1", "metrics_port": 0, "log_dir": str(tmp / "logs"),
        "models": {"tiny": {"model_path": "llmux/bench-tiny", "port": eng, "engine": "builtin",
                            "weights_mb": args.weights_mb, **engine_command()}}}))
    shim = spawn("--serve-shim", str(cfg), log=tmp / "shim2.log")
    try:
        await wait_up(f"http://127.0.0.1:{px}/health")
        # the first request starts the engine (cold start through the lifecycle)
        async with aiohttp.ClientSession() as s:
            body = {"model": "tiny", "prompt": "warm", "max_tokens": 1}
            async with s.post(f"http://127.0.0.1:{px}/v1/completions", json=body,
                              timeout=aiohttp.ClientTimeout(total=600)) as r:
                await r.read()
                assert r.status == 200, (r.status, await r.text())
        return await measure("built-in engine", f"http://127.0.0.1:{eng}",
                             f"http://127.0.0.1:{px}", "tiny",
                             requests=max(100, args.requests // 5),
                             streams=max(5, args.streams // 2),
                             stream_extra={"max_tokens": args.builtin_tokens})
    finally:
        stop(shim)


#: engine chatter while the page benchmark runs (vLLM logs a few lines a second when busy)
LOG_LINES_PER_S = 20


def run_page_client(base: str, model: str) -> None:
    """The page as a process: prints what it did ("page:" JSON) when SIGTERM ends it."""
    import uvloop

    stats = {"polls": 0, "log_events": 0}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(page_client(base, model, stats))
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        print("page:" + json.dumps(stats), flush=True)

    uvloop.run(main())


def cpu_secs(pid: int) -> float:
    """A process's own user + system CPU seconds (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def page_client(base: str, model: str, stats: dict[str, int]) -> None:
    """What an open /ui page does to the shim: follow a log, poll the state and checkpoints."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as s:

        async def follow() -> None:
            async with s.get(f"{base}/ui/api/logs/{model}") as r:
                assert r.status == 200, r.status
                async for chunk in r.content.iter_any():
                    stats["log_events"] += chunk.count(b"event: lines")

        async def poll() -> None:
            seq = 0
            while True:
                async with s.get(f"{base}/ui/api/state", params={"since": str(seq)}) as r:
                    body = await r.json()
                    seq = body["seq"]
                stats["polls"] += 1
                await asyncio.sleep(1.0)

        async def checkpoints() -> None:
            while True:
                async with s.get(f"{base}/ui/api/checkpoints") as r:
                    await r.read()
                await asyncio.sleep(10.0)

        await asyncio.gather(follow(), poll(), checkpoints())


async def log_writer(path: Path) -> None:
    """Appends engine-like lines to the model's log (the page follows them)."""
    n = 0
    while True:
        with open(path, "a") as f:  # a tiny append, on the client's side
            f.write(f"(APIServer pid=1) INFO bench line {n}: Avg prompt throughput: 0.0 "
                    "tokens/s, Avg generation throughput: 123.4 tokens/s, Running: 1 reqs\n")
        n += 1
        await asyncio.sleep(1.0 / LOG_LINES_PER_S)


async def bench_page(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """The proxy without and with an open operator page, in alternating rounds."""
    eng, px = free_port(), free_port()
    cfg = tmp / "shim-page.json"
    cfg.write_text(json.dumps({
        "port": px, "host": "127.0.0.1", "metrics_port": 0, "log_dir": str(tmp / "logs"),
        "models": {"tiny": {"model_path": "llmux/bench-tiny", "port": eng, "engine": "builtin",
                            "weights_mb": args.weights_mb, **engine_command()}}}))
    shim = spawn("--serve-shim", str(cfg), log=tmp / "shim3.log")
    base = f"http://127.0.0.1:{px}"
    loop = asyncio.get_running_loop()
    writer = None
    try:
        await wait_up(f"{base}/health")
        async with aiohttp.ClientSession() as s:
            body = {"model": "tiny", "prompt": "warm", "max_tokens": 1}
            async with s.post(f"{base}/v1/completions", json=body,
                              timeout=aiohttp.ClientTimeout(total=600)) as r:
                await r.read()
                assert r.status == 200, (r.status, await r.text())
        writer = loop.create_task(log_writer(tmp / "logs" / "tiny.log"))
        plain = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 2}).encode()
        streaming = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                "stream": True, "max_tokens": args.page_tokens}).encode()
        lat: dict[bool, list[float]] = {False: [], True: []}
        st: dict[bool, list[tuple[int, float, float, int]]] = {False: [], True: []}
        stats = {"polls": 0, "log_events": 0}
        cpu = {False: 0.0, True: 0.0}  # the shim's CPU seconds (its own process)
        wall = {False: 0.0, True: 0.0}
        conn = aiohttp.TCPConnector(limit=4)
        #: the page runs in a process of its own: its work must not slow this client
        page: subprocess.Popen[bytes] | None = None
        # the page's own cost: the shim's CPU while idle, without and with the page open
        idle: dict[bool, float] = {}
        for on in (False, True):
            if on:
                page = spawn("--page-client", base, "tiny", log=tmp / "page.log")
                await asyncio.sleep(1.5)
            c0, t0 = cpu_secs(shim.pid), time.perf_counter()
            await asyncio.sleep(args.page_idle_secs)
            idle[on] = (cpu_secs(shim.pid) - c0) / (time.perf_counter() - t0)
            if page is not None:
                stop(page)
                page = None
        async with aiohttp.ClientSession(connector=conn) as s:
            url = base + "/v1/chat/completions"
            await latency(s, url, plain, 50)  # warm-up
            await stream(s, url, streaming)
            # off, on, on, off, off, on, ...: drift hits both alike; the page stays open
            # over two "on" phases in a row, as a page open on an operator's desk does
            for i in range(args.page_rounds * 2):
                with_page = i % 4 in (1, 2)
                if with_page and page is None:
                    page = spawn("--page-client", base, "tiny", log=tmp / "page.log")
                    await asyncio.sleep(1.5)  # started, connected, its backlog read
                elif not with_page and page is not None:
                    stop(page)
                    page = None
                    await asyncio.sleep(0.2)
                cpu0, t0 = cpu_secs(shim.pid), time.perf_counter()
                t_end = t0 + args.page_round_secs
                while time.perf_counter() < t_end:
                    lat[with_page] += await latency(s, url, plain, 10)
                for _ in range(args.page_streams):
                    st[with_page].append(await stream(s, url, streaming))
                cpu[with_page] += cpu_secs(shim.pid) - cpu0
                wall[with_page] += time.perf_counter() - t0
            if page is not None:
                stop(page)
                page = None
    finally:
        if writer is not None:
            writer.cancel()
        if page is not None:
            stop(page)
        stop(shim)
    for line in (tmp / "page.log").read_text().splitlines():
        if line.startswith("page:"):
            for key, value in json.loads(line[5:]).items():
                stats[key] += value
    r: dict[str, float] = {}
    for key, on in (("off", False), ("on", True)):
        xs = st[on]
        r[f"{key}_p50_ms"] = pct(lat[on], 0.5) * 1e3
        r[f"{key}_p99_ms"] = pct(lat[on], 0.99) * 1e3
        r[f"{key}_mean_ms"] = statistics.fmean(lat[on]) * 1e3
        r[f"{key}_cps"] = sum(x[0] for x in xs) / sum(x[1] for x in xs)
        r[f"{key}_ss_cps"] = (sum(x[0] - x[3] for x in xs) / sum(x[1] - x[2] for x in xs))
        # the shim's own CPU per request (streams counted as requests too)
        r[f"{key}_cpu_us"] = cpu[on] / (len(lat[on]) + len(xs)) * 1e6
        r[f"{key}_cpu_pct"] = cpu[on] / wall[on] * 100
    print(f"\n== built-in engine through the shim, without and with the /ui page open: "
          f"{len(lat[False])} / {len(lat[True])} requests and {len(st[False])} streams per "
          f"side, {args.page_rounds} rounds of {args.page_round_secs:g} s each; the page "
          f"polled {stats['polls']} times and got {stats['log_events']} log events")
    print(f"shim CPU while idle: {idle[False] * 100:.2f}% of one core without the page, "
          f"{idle[True] * 100:.2f}% with it open: the page costs the shim "
          f"{(idle[True] - idle[False]) * 1e3:.1f} ms of CPU a second")
    r["idle_page_ms_per_s"] = (idle[True] - idle[False]) * 1e3
    print(f"{'':26}{'no page':>12}{'page open':>12}{'change':>12}")
    for label, key, lower_better in (("latency p50 (ms)", "p50_ms", True),
                                     ("latency p99 (ms)", "p99_ms", True),
                                     ("latency mean (ms)", "mean_ms", True),
                                     ("stream chunks/s (whole)", "cps", False),
                                     ("stream chunks/s (steady)", "ss_cps", False),
                                     ("shim CPU us per request", "cpu_us", True),
                                     ("shim CPU % of one core", "cpu_pct", True)):
        off, on = r[f"off_{key}"], r[f"on_{key}"]
        change = (on / off - 1) * 100
        print(f"{label:26}{off:12.3f}{on:12.3f}{change:+11.1f}%"
              f"{'  (worse)' if (change > 0) == lower_better and abs(change) > 0.05 else ''}")
    return r


async def main(args: argparse.Namespace) -> None:
    print(f"bench_proxy: python {sys.version.split()[0]}, {os.cpu_count()} cpu(s), "
          f"builtin backend {os.environ.get('LLMUX_BUILTIN_BACKEND', 'default')}")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="llmux-bench-") as d:
        tmp = Path(d)
        try:
            if args.only in (None, "builtin"):
                results["built-in engine"] = await bench_builtin(args, tmp)
            if args.only in (None, "trivial"):
                results["trivial upstream"] = await bench_trivial(args, tmp)
            if args.only in (None, "page"):
                page = await bench_page(args, tmp)
        except BaseException:
            for f in sorted(tmp.glob("*.log")) + sorted(tmp.glob("logs/*")):
                print(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}")
            raise
    print("\n== summary (targets: added p50 < 0.5 ms; chunk rate >= 80% trivial, "
          ">= 97% built-in)")
    if args.only in (None, "page"):
        def change(key: str) -> str:
            return f"{(page[f'on_{key}'] / page[f'off_{key}'] - 1) * 100:+.1f}%"

        print(f"{'/ui page open':18} latency p50 {change('p50_ms')}, mean {change('mean_ms')}, "
              f"chunk rate {change('cps')} (target: within 5%); the page's own cost "
              f"{page['idle_page_ms_per_s']:.1f} ms of shim CPU a second")
    for label, r in results.items():
        print(f"{label:18} added p50 {r['proxy_p50_ms'] - r['direct_p50_ms']:.3f} ms, "
              f"p99 {r['proxy_p99_ms'] - r['direct_p99_ms']:.3f} ms, chunk rate "
              f"{r['proxy_cps'] / r['direct_cps'] * 100:.1f}% of direct over whole streams, "
              f"{r['proxy_ss_cps'] / r['direct_ss_cps'] * 100:.1f}% after the first chunk")


def cli() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-trivial":
        run_trivial(int(sys.argv[2]), int(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-shim-trivial":
        run_shim_trivial(int(sys.argv[2]), int(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--page-client":
        run_page_client(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-shim":
        run_shim_builtin(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000,
                    help="non-streaming requests per side (trivial upstream)")
    ap.add_argument("--streams", type=int, default=40, help="streams per side")
    ap.add_argument("--chunks", type=int, default=300, help="SSE events per trivial stream")
    ap.add_argument("--builtin-tokens", type=int, default=200,
                    help="max_tokens of a built-in engine stream")
    ap.add_argument("--weights-mb", type=int, default=8)
    ap.add_argument("--only", choices=["trivial", "builtin", "page"])
    ap.add_argument("--api-key", help="an [auth] api key for the trivial shim, sent by every "
                                      "request")
    ap.add_argument("--page-rounds", type=int, default=10,
                    help="rounds without and with the /ui page open (alternating)")
    ap.add_argument("--page-round-secs", type=float, default=3.0,
                    help="seconds of back-to-back requests per round")
    ap.add_argument("--page-streams", type=int, default=10, help="streams per round")
    ap.add_argument("--page-tokens", type=int, default=1000,
                    help="max_tokens of a stream in the page benchmark")
    ap.add_argument("--page-idle-secs", type=float, default=10.0,
                    help="seconds of the idle shim's CPU measured without and with the page")
    args = ap.parse_args()
    if args.api_key:
        os.environ[API_KEY_ENV] = args.api_key
    import uvloop

    uvloop.run(main(args))


if __name__ == "__main__":
    cli()
