#!/usr/bin/env python3
"""Dump and restore with and without llmuxd's zero-page pass (drop_zero_pages), side by side.

Run as root, from the repository root: ``.venv/bin/python -m tests.bench.bench_zero_pages
[--data-mb 768] [--zero-mb 512] [--repeat 3]``.

The target holds data pages and pages written with zeros, as a CUDA checkpoint leaves a
vLLM engine core's host memory (on an H100, 1.3 GiB of zeros in a 3.5 GiB image of
Qwen3-0.6B after a level-2 sleep). Each round dumps it through ``CheckpointEngine`` (the
library under llmuxd, memory tier on, as by default) with the pass off and on, alternating,
(each round in the other order) restores each checkpoint once the work behind the dump
(the pass, the copy to disk) is done, and checks every byte after the restore. It prints
the image, the dump (to the job's answer), the work behind it and the restore, medians
beside each round's figures.

This is a benchmark that prints numbers, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmux.service.core.authz import Caller
from llmux.service.core.config import EngineConfig
from llmux.service.core.criu import BUNDLE_PATH
from llmux.service.core.engine import CheckpointEngine

MiB = 1 << 20
TARGET = r"""
import mmap, os, signal, sys, time
work, data_mb, zero_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
MiB, PAGE = 1 << 20, 4096
data = mmap.mmap(-1, data_mb * MiB, flags=mmap.MAP_PRIVATE)
block = bytes(range(256)) * (MiB // 256)
for o in range(0, len(data), MiB):
    data[o:o + MiB] = block
zeros = mmap.mmap(-1, zero_mb * MiB, flags=mmap.MAP_PRIVATE)
for o in range(0, len(zeros), PAGE):
    zeros[o] = 0
def verify(_s, _f):
    ok = zeros[:] == bytes(len(zeros)) and all(
        data[o:o + MiB] == block for o in range(0, len(data), MiB))
    path = os.path.join(work, "verdict")
    with open(path + ".tmp", "w") as f:
        f.write("ok" if ok else "differs")
    os.rename(path + ".tmp", path)
signal.signal(signal.SIGUSR1, verify)
open(os.path.join(work, "ready"), "w").write(str(os.getpid()))
while True:
    time.sleep(0.2)
"""


async def _wait(pred: object, what: str, secs: float = 120) -> None:
    deadline = time.monotonic() + secs
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.02)


async def one_round(criu: str, work: Path, drop: bool, data_mb: int, zero_mb: int
                    ) -> dict[str, float]:
    state = work / f"state-{'drop' if drop else 'keep'}"
    engine = await CheckpointEngine.open(EngineConfig(
        state_dir=state, criu_path=criu, cuda_mode="off", drop_zero_pages=drop,
        memory_tier_dir=Path(tempfile.mkdtemp(prefix="llmux-bench-zp-", dir="/dev/shm"))))
    me = Caller(pid=os.getpid(), uid=0)
    for name in ("ready", "verdict"):
        (work / name).unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", TARGET, str(work), str(data_mb),
                             str(zero_mb)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        await _wait(lambda: (work / "ready").exists(), "the target")
        async def reap() -> None:  # as the shim would: the dump waits for the PIDs
            while proc.poll() is None:
                await asyncio.sleep(0.01)

        reaper = asyncio.create_task(reap())
        t = time.monotonic()
        await engine.checkpoint(me, "zp", proc.pid)
        dump = time.monotonic() - t
        await asyncio.wait_for(reaper, 30)
        await engine.mover.wait()  # the pass (when on) and the copy to disk, behind the dump
        behind = time.monotonic() - t - dump
        m = engine.store.get("zp")
        t = time.monotonic()
        await engine.restore(me, "zp", keep_images=False)
        restore = time.monotonic() - t
        os.kill(proc.pid, signal.SIGUSR1)
        await _wait(lambda: (work / "verdict").exists(), "the verdict")
        verdict = (work / "verdict").read_text()
        if verdict != "ok":
            raise SystemExit(f"the restored memory {verdict} (drop={drop})")
        return {"image": m.images_bytes / MiB, "dropped": m.zero_bytes_dropped / MiB,
                "dump": dump, "behind": behind, "restore": restore}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.sleep(0.2)
        for _ in range(50):
            try:
                if os.waitpid(proc.pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:
                break
            await asyncio.sleep(0.05)


async def main_async(args: argparse.Namespace) -> None:
    rows: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="llmux-bench-zp-", dir="/var/tmp") as tmp:
        for r in range(args.repeat):
            for drop in ((False, True) if r % 2 == 0 else (True, False)):
                work = Path(tmp) / f"r{r}-{drop}"
                work.mkdir()
                rows[drop].append(await one_round(args.criu, work, drop, args.data_mb,
                                                  args.zero_mb))
    print(f"target: {args.data_mb} MiB of data, {args.zero_mb} MiB written with zeros; "
          f"{args.repeat} rounds, off and on, the order alternating; every byte checked after "
          "each restore")
    print(f"{'pass':<5} {'image MiB':>10} {'dropped MiB':>12} {'dump s':>8} {'behind s':>9} "
          f"{'restore s':>10}  (each round)")
    for drop in (False, True):
        got = rows[drop]

        def med(key: str, got: list[dict[str, float]] = got) -> float:
            return statistics.median(g[key] for g in got)

        each = ", ".join(f"{g['restore']:.2f}" for g in got)
        print(f"{'on' if drop else 'off':<5} {med('image'):>10.0f} {med('dropped'):>12.0f} "
              f"{med('dump'):>8.2f} {med('behind'):>9.2f} {med('restore'):>10.2f}  ({each})")
    off, on = rows[False], rows[True]
    ratio = statistics.median(g["restore"] for g in off) / statistics.median(
        g["restore"] for g in on)
    print(f"restore, off / on: {ratio:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-mb", type=int, default=768)
    p.add_argument("--zero-mb", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--criu", default=BUNDLE_PATH, help="the criu binary")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
