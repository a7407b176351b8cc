#!/usr/bin/env python3
"""Cold start vs restore into a new container, for the built-in engine, side by side.

Run as root, from the repository root: ``.venv/bin/python -m tests.bench.bench_cross_container
[--sizes 256,2048]``.

The same set-up as tests/e2e: a private dbus-daemon with the project's policy, llmuxd on the
host (CRIU 4.2, --cuda-mode off), the shim in podman containers (runc, host PID/network/IPC
namespaces, no --privileged) serving the built-in engine (torch backend by default) as
qwen3-0.6b with eviction discard + checkpoint. For each weight size, one after the other:

1. warm-up container: the first start writes the model's weights file into the HF cache;
   the container is then removed (its engine with it).
2. container A: cold start, timed from POST /control/wake to the first token of a chat
   completion (max_tokens=1); then POST /control/sleep: llmuxd dumps the tree (the
   checkpoint's size and CRIU's dump time come from its manifest). A is removed.
3. container B: restore, timed the same way: POST /control/wake (llmuxd restores the
   tree into B, the shim reloads the weights through the engine's ZMQ channel) to the
   first token. The answers of A and B to the same prompt must be identical.

With --drop-caches (the default) the page cache is emptied before each timed phase, so
that the cold start reads the weights and the restore reads the images from the disk.
llmuxd runs CRIU from $LLMUX_CRIU (default /opt/llmux/criu/criu, packaging/criu).
With --pid-namespace both (the default) every size is measured twice, one after the other in
the same run: the engine in a PID namespace of its own (what `llmux serve` does in a
container: restored into fresh PIDs) and in the container's (LLMUX_PID_NAMESPACE=0: the
checkpoint's PIDs taken back); with --pid-namespace net, with a network namespace of its
own and without one (LLMUX_NET_NAMESPACE=0).
This is a benchmark that prints numbers, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import llmuxd_harness as harness
from tests.support import podman_shim
from tests.support import procs as testprocs

MB = 1 << 20




@dataclass
class Row:
    mode: str
    weights_mb: int
    cold_s: float
    restore_secs: float
    restore_wake_s: float
    criu_restore_s: float
    images_bytes: int
    files_bytes: int
    dump_secs: float
    sleep_s: float
    identical: bool
    cache_dropped: bool


def timed_wake(shim: Any, expect: str, drop: bool) -> tuple[float, float, str, bool]:
    """(wake call -> first token s, wake call s, first token, caches dropped)."""
    dropped = testprocs.drop_caches() if drop else False
    t0 = time.perf_counter()
    body = shim.control("wake")
    t_wake = time.perf_counter() - t0
    token = shim.first_token()
    total = time.perf_counter() - t0
    if body.get("wake") != expect:
        raise RuntimeError(f"expected a {expect} wake, got {body}\n{shim.model_status()}\n"
                           f"{shim.logs()}")
    return total, t_wake, token, dropped


MODES = {"ns": {}, "ns-nonet": {"LLMUX_NET_NAMESPACE": "0"}, "host": {"LLMUX_PID_NAMESPACE": "0"}}
"""The engine's namespaces: PID and network of its own (what `llmux serve` does), a PID
namespace of its own on the container's network, or the container's (the host's) PIDs."""
COMPARED = {"both": ["ns", "host"], "net": ["ns", "ns-nonet"]}


def measure(size: int, args: argparse.Namespace, rootfs: str, daemon: Any,
            workdir: Path, mode: str) -> Row:
    with podman_shim.shim_factory(
        rootfs=rootfs, bus_dir=Path(daemon.bus.socket_path).parent,
        bus_address_in="unix:path=/run/llmux-bus/system_bus_socket",
        workdir=workdir / f"w{size}-{mode}", weights_mb=size, backend=args.backend,
        engine_env=MODES[mode],
    ) as shims:
        print(f"[{size} MB] warm-up: writing the weights file", file=sys.stderr)
        warm = shims.start("warm")
        warm.control("wake")
        warm.remove()
        testprocs.wait_until(lambda: not testprocs.processes_tagged(shims.tag), 60,
                               "the warm-up engine to end with its container")

        print(f"[{size} MB] container A: cold start", file=sys.stderr)
        a = shims.start("a")
        cold_s, _, cold_token, dropped_a = timed_wake(a, "cold", args.drop_caches)
        cold_answer = a.answer()
        t0 = time.perf_counter()
        slept = a.control("sleep")
        sleep_s = time.perf_counter() - t0
        if slept.get("state") != "checkpointed":
            raise RuntimeError(f"sleep did not checkpoint: {slept}\n{a.logs()}")
        manifest = json.loads(
            (daemon.state_dir / podman_shim.MODEL / "manifest.json").read_text())
        a.stop()
        a.remove()

        print(f"[{size} MB] container B: restore", file=sys.stderr)
        b = shims.start("b")
        restore_secs, wake_s, restore_token, dropped_b = timed_wake(b, "restore",
                                                                 args.drop_caches)
        restore_answer = b.answer()
        b.remove()
        # llmuxd's own log line: "restored MODEL (PIDs [...]) in 0.34s (0.35s total)"
        found = re.findall(r"restored \S+ \(PIDs [^)]*\) in ([0-9.]+)s", daemon.log())
        criu_restore_s = float(found[-1]) if found else float("nan")
        # the next size starts from an empty state directory
        daemon.ok("DeleteCheckpoint", "s", podman_shim.MODEL)
        if (manifest.get("pid_namespace", False) != (mode != "host")
                or manifest.get("net_namespace", False) != (mode == "ns")):
            raise RuntimeError(f"mode {mode}: the manifest says pid_namespace="
                               f"{manifest.get('pid_namespace')}, net_namespace="
                               f"{manifest.get('net_namespace')}")
        return Row(
            mode=mode, weights_mb=size, cold_s=cold_s, restore_secs=restore_secs,
            restore_wake_s=wake_s,
            criu_restore_s=criu_restore_s,
            images_bytes=int(manifest["images_bytes"]), files_bytes=int(manifest["files_bytes"]),
            dump_secs=float(manifest["dump_seconds"]), sleep_s=sleep_s,
            identical=(cold_token == restore_token and cold_answer == restore_answer),
            cache_dropped=dropped_a and dropped_b)


def print_table(rows: list[Row], backend: str) -> None:
    print(f"\nbuilt-in engine ({backend} backend), eviction discard+checkpoint, restore into a "
          "new container; times from POST /control/wake to the first token")
    head = (f"{'ns':>8} | {'weights':>8} | {'cold start':>10} | {'restore':>8} | "
            f"{'speed-up':>8} | "
            f"{'(restore call)':>14} | {'(CRIU)':>6} | {'checkpoint':>10} | {'dump':>6} | "
            f"{'sleep call':>10} | "
            f"{'same answer':>11} | {'cache dropped':>13}")
    print(head)
    print("-" * len(head))
    for r in rows:
        size = (r.images_bytes + r.files_bytes) / MB
        print(f"{r.mode:>8} | {r.weights_mb:>5} MB | {r.cold_s:>8.2f} s | "
              f"{r.restore_secs:>6.2f} s | "
              f"{r.cold_s / r.restore_secs:>7.1f}x | {r.restore_wake_s:>12.2f} s | "
              f"{r.criu_restore_s:>4.2f} s | "
              f"{size:>7.0f} MB | {r.dump_secs:>4.2f} s | {r.sleep_s:>8.2f} s | "
              f"{'yes' if r.identical else 'NO':>11} | {'yes' if r.cache_dropped else 'no':>13}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sizes", default="256,2048", help="weights in MB, comma-separated")
    p.add_argument("--backend", choices=["torch", "pure"], default="torch")
    p.add_argument("--pid-namespace", choices=["both", "net", *MODES], default="both",
                   help="the engine's namespaces: its own PID and network (ns), its own PID "
                   "namespace on the container's network (ns-nonet), the container's PIDs "
                   "(host); both: ns and host; net: ns and ns-nonet")
    p.add_argument("--no-drop-caches", dest="drop_caches", action="store_false",
                   help="keep the page cache between the phases")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("run as root (rootful podman, CRIU)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    rootfs = podman_shim.prepare_rootfs()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="llmux-bench-xc-") as tmp:
        workdir = Path(tmp)
        (workdir / "bus").mkdir(mode=0o755)
        with harness.running_bus(workdir / "bus") as bus, \
                harness.running_llmuxd(bus, workdir) as daemon:
            modes = COMPARED.get(args.pid_namespace, [args.pid_namespace])
            for size in sizes:
                for mode in modes:
                    rows.append(measure(size, args, rootfs, daemon, workdir, mode))
    print_table(rows, args.backend)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
