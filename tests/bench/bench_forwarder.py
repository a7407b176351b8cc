"""The engine socket's forwarder (llmux.shim.netns) against a direct TCP connection.

Not a test: it prints numbers. The shim reaches an engine with a network of its own
through the unix socket its tree's forwarder listens on; this measures what that hop adds,
side by side with a direct TCP connection to the same upstream (bench_proxy's trivial
upstream: answers at once, streams SSE events as fast as it can), in alternating rounds.
Both run here, in this network namespace: the namespace changes nothing on loopback.

Usage: .venv/bin/python -m tests.bench.bench_forwarder [--requests N] [--streams N]
[--chunks N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.bench.bench_proxy import free_port, latency, pct, spawn, stop, stream, wait_up


def run_forwarder(path: str, port: int) -> subprocess.Popen[bytes]:
    code = ("import sys; from llmux.shim import netns; "
            "netns.forward(netns.listen(sys.argv[1]), int(sys.argv[2]))")
    return subprocess.Popen([sys.executable, "-c", code, path, str(port)],
                            stdin=subprocess.DEVNULL, start_new_session=True)


async def measure(args: argparse.Namespace, port: int, sock: str) -> None:
    base = f"http://127.0.0.1:{port}/v1/chat/completions"
    plain = json.dumps({"model": "trivial", "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 2}).encode()
    streaming = json.dumps({"model": "trivial", "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}).encode()
    async with (aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4)) as tcp,
                aiohttp.ClientSession(connector=aiohttp.UnixConnector(sock, limit=4)) as unix):
        d_lat: list[float] = []
        f_lat: list[float] = []
        await latency(tcp, base, plain, 50)
        await latency(unix, base, plain, 50)
        for _ in range(max(1, args.requests // 50)):
            d_lat += await latency(tcp, base, plain, 50)
            f_lat += await latency(unix, base, plain, 50)
        d_st, f_st = [], []
        for _ in range(args.streams):
            d_st.append(await stream(tcp, base, streaming))
            f_st.append(await stream(unix, base, streaming))

    def rate(st: list[tuple[int, float, float, int]]) -> float:
        return sum(x[0] - x[3] for x in st) / sum(x[1] - x[2] for x in st)

    print(f"{len(d_lat)} requests and {len(d_st)} streams a side, {os.cpu_count()} cpu(s)")
    for label, lat, st in (("direct TCP", d_lat, d_st), ("forwarder", f_lat, f_st)):
        print(f"{label:11} p50 {pct(lat, 0.5) * 1e3:.3f} ms  p99 {pct(lat, 0.99) * 1e3:.3f} ms"
              f"  mean {statistics.fmean(lat) * 1e3:.3f} ms  first event p50 "
              f"{pct([x[2] for x in st], 0.5) * 1e3:.3f} ms  {rate(st):,.0f} events/s")
    print(f"forwarder adds p50 {(pct(f_lat, 0.5) - pct(d_lat, 0.5)) * 1e3:.3f} ms; "
          f"stream rate {rate(f_st) / rate(d_st) * 100:.1f}% of direct")


async def main(args: argparse.Namespace) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="llmux-bench-fwd-") as d:
        sock = str(Path(d) / "engine.sock")
        up = spawn("--serve-trivial", str(port), str(args.chunks))
        fwd = run_forwarder(sock, port)
        try:
            await wait_up(f"http://127.0.0.1:{port}/health")
            deadline = time.monotonic() + 30
            while not Path(sock).exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await measure(args, port, sock)
        finally:
            stop(fwd)
            stop(up)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--streams", type=int, default=30)
    ap.add_argument("--chunks", type=int, default=300, help="SSE events per stream")
    asyncio.run(main(ap.parse_args()))
