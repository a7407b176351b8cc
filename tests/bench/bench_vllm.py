#!/usr/bin/env python3
"""Cold start vs restore through llmux for real vLLM (CPU), same and new container.

Run as root, from the repository root: ``.venv/bin/python -m tests.bench.bench_vllm
[--sizes tiny,1gb]``.

The set-up of tests/e2e/test_vllm_podman.py: a private dbus-daemon with the project's
policy, llmuxd on the host (CRIU 4.2, --cuda-mode off), the shim in podman containers
(runc, host PID/network/IPC namespaces, no --privileged) serving real vLLM (the CPU build
in .cache/vllm-venv, tests/support/vllmbed.py's engine flags) as qwen3-0.6b with eviction
retain+checkpoint. The models are tests/support/vllmbed.py's: Llama-architecture, random weights,
"tiny" (hidden 128, 2 layers, ~2 MB) and "1gb" (hidden 1024, 16 layers, fp32, ~1 GB).
For each size, one after the other:

1. warm-up container (unless --no-warm-up): one cold start, so that the timed one does not
   pay for first-use costs; the container is then removed (its engine with it).
2. container A: cold start, timed from POST /control/wake to the first token of a chat
   completion (max_tokens=1, temperature 0); POST /control/sleep: llmuxd dumps the tree
   (the checkpoint's size and CRIU's dump time come from its manifest); POST /control/wake
   again in A, timed the same way: the restore in the same container. Sleep again.
3. A is removed; container B: POST /control/wake timed to the first token: the restore
   into a new container. The greedy answers of the cold start and of both restores to the
   same prompt must be identical (reported, not asserted).

The CRIU restore time alone is llmuxd's ("restored MODEL (PIDs [...]) in 0.34s ...").
With --drop-caches (the default) the page cache is emptied before each timed phase, so
that the cold start reads the weights and the restores read the images from the disk.
llmuxd runs CRIU from $LLMUX_CRIU (default /opt/llmux/criu/criu, packaging/criu).
This is a benchmark that prints numbers, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tests.support import llmuxd_harness as harness
from tests.support import podman_shim, vllmbed
from tests.support import procs as testprocs

MB = 1 << 20
#: --perf DIR: perf record -a -g of each restore's wake call, one file each
PERF_DIR: Path | None = None
#: restore should be at least this much faster than a cold start
TARGET_SPEEDUP = 10.0




@dataclass
class Timed:
    """One timed wake: POST /control/wake to the first token."""

    total_s: float
    wake_call_s: float
    token: str
    answer: str
    criu_restore_s: float
    cache_dropped: bool


@dataclass
class Row:
    size: str
    model_mb: float
    cold: Timed
    same: Timed
    new: Timed
    images_bytes: int
    files_bytes: int
    dump_secs: float
    sleep_s: float
    dump2_s: float
    checkpoint2_bytes: int

    @property
    def identical(self) -> bool:
        return (self.cold.token == self.same.token == self.new.token
                and self.cold.answer == self.same.answer == self.new.answer)

    @property
    def cache_dropped(self) -> bool:
        return self.cold.cache_dropped and self.same.cache_dropped and self.new.cache_dropped


def engine_args(model_dir: Path) -> list[str]:
    """tests/support/vllmbed.py's flags, with a KV cache big enough for one max-length request.

    vLLM reads "64M" as 64 * 10**6 bytes; the 1gb model's KV cache for 512 tokens (16
    layers, 16 KV heads of 64, fp32) is 64 MiB, so its engine would refuse to start.
    """
    args = list(vllmbed.ENGINE_ARGS)
    config = json.loads((model_dir / "config.json").read_text())
    layers = int(config["num_hidden_layers"])
    heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    max_len = int(args[args.index("--max-model-len") + 1])
    needed = 2 * layers * max_len * heads * head_dim * 4  # K and V, fp32
    i = args.index("--kv-cache-memory-bytes") + 1
    if needed * 1.25 > 64 * 10**6:
        args[i] = f"{-(-needed * 5 // 4 // 10**6)}M"
    return args


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / MB


def criu_restores(daemon: Any) -> list[float]:
    # llmuxd's own log line: "restored MODEL (PIDs [...]) in 0.34s (0.35s total)"
    return [float(s) for s in
            re.findall(r"restored \S+ \(PIDs [^)]*\) in ([0-9.]+)s", daemon.log())]


def criu_errors(daemon: Any) -> str:
    """The lines before CRIU's first error in the last restore's log (it goes with the run)."""
    log = daemon.state_dir / podman_shim.MODEL / "images" / "restore.log"
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    first = next((i for i, line in enumerate(lines) if "Error (" in line), len(lines))
    return f"\n{log} around its first error:\n" + "\n".join(lines[max(0, first - 30):first + 5])


def reported_kib() -> int:
    """KiB of free memory the guest has reported to its hypervisor (virtio-balloon free
    page reporting; the host drops those pages and faults them in again on next use)."""
    try:
        return int(Path("/sys/module/page_reporting/parameters/reported_kib").read_text())
    except (OSError, ValueError):
        return 0


def cpu_ticks() -> dict[tuple[int, str], int]:
    """(PID, name) -> user + system clock ticks of every process now."""
    out = {}
    for pid, text in testprocs.proc_stats():
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:]
        fields = rest.split()
        out[(pid, name)] = int(fields[11]) + int(fields[12])
    return out


def busiest(before: dict[tuple[int, str], int], after: dict[tuple[int, str], int],
            n: int = 6) -> str:
    """The processes that used the most CPU between two cpu_ticks() (seconds each)."""
    hz = os.sysconf("SC_CLK_TCK")
    used = sorted(((after[k] - before.get(k, 0), k) for k in after), reverse=True)[:n]
    return ", ".join(f"{name}[{pid}] {ticks / hz:.2f}s" for ticks, (pid, name) in used if ticks)


def evict_state_dir(state_dir: Path) -> bool:
    """Written back, then out of the page cache: the files of llmuxd's state directory only
    (the checkpoints' images on disk), the rest of the cache (libraries, the model) kept."""
    os.sync()
    for dirpath, _dirs, names in os.walk(state_dir):
        for name in names:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
    return True


EVICT_ONLY_IMAGES = False
"""--evict-images: a restore's phase evicts the state directory's files, not every cache."""


def timed_wake(shim: Any, expect: str, drop: bool, daemon: Any) -> Timed:
    """Drop the caches, POST /control/wake, one token; then the full answer (untimed)."""
    restores_before = len(criu_restores(daemon))
    reported0 = reported_kib()
    if drop and EVICT_ONLY_IMAGES and expect == "restore":
        dropped = evict_state_dir(daemon.state_dir)
    else:
        dropped = testprocs.drop_caches() if drop else False
    reported1 = reported_kib()
    ticks = cpu_ticks()
    perf = None
    if PERF_DIR is not None and expect == "restore":  # the whole machine, with call graphs
        PERF_DIR.mkdir(parents=True, exist_ok=True)
        out = PERF_DIR / f"wake-{len(list(PERF_DIR.glob('wake-*.data')))}.data"
        perf = subprocess.Popen(["perf", "record", "-a", "-g", "-q", "-o", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # perf is recording
    t0 = time.perf_counter()
    body = shim.control("wake")
    t_wake = time.perf_counter() - t0
    if perf is not None:
        perf.send_signal(signal.SIGINT)
        perf.wait(60)
    print(f"[{expect} wake] CPU used during it: {busiest(ticks, cpu_ticks())}; free memory "
          f"reported to the hypervisor: {(reported1 - reported0) >> 10} MiB while the cache "
          f"was dropped, {(reported_kib() - reported1) >> 10} MiB during the wake",
          file=sys.stderr)
    token = shim.first_token()
    total = time.perf_counter() - t0
    if body.get("wake") != expect:
        raise RuntimeError(f"expected a {expect} wake, got {body}\n{shim.model_status()}\n"
                           f"{shim.logs()}{criu_errors(daemon)}")
    criu_s = float("nan")
    if expect == "restore":
        found = criu_restores(daemon)
        if len(found) > restores_before:
            criu_s = found[-1]
    return Timed(total, t_wake, token, shim.answer(), criu_s, dropped)


def sleep(shim: Any, daemon: Any) -> tuple[float, dict[str, Any]]:
    """POST /control/sleep (llmuxd dumps the tree): (sleep call s, llmuxd's manifest)."""
    t0 = time.perf_counter()
    slept = shim.control("sleep")
    sleep_s = time.perf_counter() - t0
    if slept.get("state") != "checkpointed":
        raise RuntimeError(f"sleep did not checkpoint: {slept}\n{shim.logs()}")
    return sleep_s, read_manifest(daemon)


def read_manifest(daemon: Any) -> dict[str, Any]:
    """llmuxd's manifest of the checkpoint as it is now (the zero-page pass behind a dump
    rewrites it)."""
    manifest: dict[str, Any] = json.loads(
        (daemon.state_dir / podman_shim.MODEL / "manifest.json").read_text())
    return manifest


def keep(args: argparse.Namespace, daemon: Any, size: str, what: str) -> None:
    """With --keep DIR: CRIU's -v4 logs of the checkpoint as they are now (restore.log of
    the last restore, dump.log of the last dump) and, after a dump, ExplainCheckpoint's
    breakdown, for the stage times and the bytes of each phase."""
    if args.keep is None:
        return
    args.keep.mkdir(parents=True, exist_ok=True)
    images = daemon.state_dir / podman_shim.MODEL / "images"
    for log in ("restore.log", "dump.log"):
        with contextlib.suppress(OSError):
            shutil.copyfile(images / log, args.keep / f"{size}-{what}-{log}")
    if what.startswith("dump"):
        [text] = daemon.ok("ExplainCheckpoint", "s", podman_shim.MODEL)
        (args.keep / f"{size}-{what}-explain.json").write_text(text)


def say(size: str, what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] [{size}] {what}", file=sys.stderr, flush=True)


def measure(size: str, model_dir: Path, bed: Any, args: argparse.Namespace, rootfs: str,
            daemon: Any, workdir: Path) -> Row:
    model = bed.model(size, 0, "retain+checkpoint", "")
    model.pop("port")  # the factory's engine port
    model["env"] = {"HF_HUB_OFFLINE": "1"}  # the factory adds its LLMUX_TEST_TAG
    model["extra_args"] = engine_args(model_dir)
    say(size, f"vLLM flags: {' '.join(model['extra_args'])}")
    with podman_shim.shim_factory(
        rootfs=rootfs, bus_dir=Path(daemon.bus.socket_path).parent,
        bus_address_in=f"unix:path={podman_shim.BUS_DIR_IN}/"
                       f"{Path(daemon.bus.socket_path).name}",
        workdir=workdir / f"w-{size}", model=model, top={"vllm_command": str(bed.vllm)},
    ) as shims:
        if args.warm_up:
            say(size, "warm-up container: one cold start")
            warm = shims.start("warm")
            warm.control("wake")
            warm.first_token()
            warm.remove()
            testprocs.wait_until(lambda: not testprocs.processes_tagged(shims.tag), 120,
                                 "the warm-up engine to end with its container")

        say(size, "container A: cold start")
        a = shims.start("a")
        cold = timed_wake(a, "cold", args.drop_caches, daemon)
        say(size, f"cold start {cold.total_s:.2f} s; sleep (dump)")
        sleep_s, manifest = sleep(a, daemon)
        keep(args, daemon, size, "dump1")
        say(size, f"dumped in {manifest['dump_seconds']} s "
                  f"({(manifest['images_bytes'] + manifest['files_bytes']) / MB:.0f} MB); "
                  "container A: restore")
        if args.new_first:
            # the other order: the first restore after the cold start goes into B, then
            # B's tree is dumped and restored in B (the same container, second)
            a.stop()
            a.remove()
            say(size, "container B: restore into a new container (first)")
            b = shims.start("b")
            new = timed_wake(b, "restore", args.drop_caches, daemon)
            keep(args, daemon, size, "new")
            _, manifest2 = sleep(b, daemon)
            keep(args, daemon, size, "dump2")
            time.sleep(args.settle)
            same = timed_wake(b, "restore", args.drop_caches, daemon)
            keep(args, daemon, size, "same")
            say(size, f"restores: new container {new.total_s:.2f} s, then the same "
                      f"container {same.total_s:.2f} s")
            b.remove()
            testprocs.wait_until(lambda: not testprocs.processes_tagged(shims.tag), 120,
                                 "the restored engine to end with container B")
        else:
            time.sleep(args.settle)
            if args.settle:
                manifest = read_manifest(daemon)
                say(size, f"after {args.settle:.0f} s: {manifest['images_bytes'] / MB:.0f} MB "
                          f"of images, {manifest.get('zero_bytes_dropped', 0) / MB:.0f} MB "
                          "of zero pages dropped")
            same = timed_wake(a, "restore", args.drop_caches, daemon)
            keep(args, daemon, size, "same")
            say(size, f"restore in the same container {same.total_s:.2f} s; sleep (dump) again")
            if args.same_images:
                # B restores the very images A did: the restored tree ends with A, undumped
                manifest2 = manifest
                a.stop()
                a.remove()
                testprocs.wait_until(lambda: not testprocs.processes_tagged(shims.tag), 120,
                                     "the restored engine to end with container A")
            else:
                _, manifest2 = sleep(a, daemon)
                keep(args, daemon, size, "dump2")
                a.stop()
                a.remove()

            say(size, "container B: restore into a new container")
            b = shims.start("b")
            new = timed_wake(b, "restore", args.drop_caches, daemon)
            keep(args, daemon, size, "new")
            say(size, f"restore into a new container {new.total_s:.2f} s")
            b.remove()
            testprocs.wait_until(lambda: not testprocs.processes_tagged(shims.tag), 120,
                                 "the restored engine to end with container B")
        # the next size starts from an empty state directory
        daemon.ok("DeleteCheckpoint", "s", podman_shim.MODEL)
        return Row(
            size=size, model_mb=dir_mb(model_dir), cold=cold, same=same, new=new,
            images_bytes=int(manifest["images_bytes"]),
            files_bytes=int(manifest["files_bytes"]),
            dump_secs=float(manifest["dump_seconds"]), sleep_s=sleep_s,
            dump2_s=float(manifest2["dump_seconds"]),
            checkpoint2_bytes=int(manifest2["images_bytes"]) + int(manifest2["files_bytes"]))


def print_table(rows: list[Row]) -> None:
    print("\nreal vLLM (CPU), eviction retain+checkpoint; times from POST /control/wake to the "
          "first token (max_tokens=1)")
    head = (f"{'size':>4} | {'model':>8} | {'cold start':>10} | "
            f"{'restore same container':>22} | {'restore new container':>21} | "
            f"{'CRIU restore same/new':>21} | {'checkpoint':>10} | {'dump':>7} | "
            f"{'sleep call':>10} | {'same answer':>11} | {'cache dropped':>13}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ckpt = (r.images_bytes + r.files_bytes) / MB
        same = f"{r.same.total_s:.2f} s ({r.cold.total_s / r.same.total_s:.1f}x)"
        new = f"{r.new.total_s:.2f} s ({r.cold.total_s / r.new.total_s:.1f}x)"
        criu = f"{r.same.criu_restore_s:.2f} / {r.new.criu_restore_s:.2f} s"
        print(f"{r.size:>4} | {r.model_mb:>5.0f} MB | {r.cold.total_s:>8.2f} s | "
              f"{same:>22} | {new:>21} | {criu:>21} | {ckpt:>7.0f} MB | "
              f"{r.dump_secs:>5.2f} s | {r.sleep_s:>8.2f} s | "
              f"{'yes' if r.identical else 'MISMATCH':>11} | "
              f"{'yes' if r.cache_dropped else 'no':>13}")
    print(f"\ntarget: restore >= {TARGET_SPEEDUP:g}x faster than the cold start")
    for r in rows:
        for where, t in (("same container", r.same), ("new container", r.new)):
            ratio = r.cold.total_s / t.total_s
            print(f"  {r.size:>4} {where:<15} {ratio:6.1f}x  "
                  f"{'met' if ratio >= TARGET_SPEEDUP else 'NOT met'}  "
                  f"(wake call {t.wake_call_s:.2f} s of {t.total_s:.2f} s)")
        if not r.identical:
            print(f"  {r.size:>4} answers differ: cold {r.cold.answer!r}, same container "
                  f"{r.same.answer!r}, new container {r.new.answer!r}")
        print(f"  {r.size:>4} second dump (after the restore in A): {r.dump2_s:.2f} s, "
              f"{r.checkpoint2_bytes / MB:.0f} MB")


def tier_config(args: argparse.Namespace) -> str:
    """llmuxd.toml with the memory tier that --memory-tier-mb asks for (else empty)."""
    if args.memory_tier_mb <= 0:
        return ""
    return (f'memory_tier_dir = "/dev/shm/llmux-bench-tier-{os.getpid()}"\n'
            f"memory_tier_limit_bytes = {args.memory_tier_mb * MB}\n")


def print_medians(rows: list[Row]) -> None:
    """Per configuration (size/label), the median of each time over the repeats."""
    labels = sorted({r.size for r in rows})
    if len(rows) == len(labels):
        return
    print("\nmedians over the repeats (s): cold start, restore same / new container, "
          "CRIU restore same / new")
    for label in labels:
        mine = [r for r in rows if r.size == label]

        def med(values: list[float]) -> str:
            return f"{statistics.median(values):.2f}"

        print(f"  {label:<10} n={len(mine)}  cold {med([r.cold.total_s for r in mine])}  "
              f"restore {med([r.same.total_s for r in mine])} / "
              f"{med([r.new.total_s for r in mine])}  CRIU "
              f"{med([r.same.criu_restore_s for r in mine])} / "
              f"{med([r.new.criu_restore_s for r in mine])}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sizes", default="tiny,1gb",
                   help="model sizes (tests/support/vllmbed.py's: tiny, 1gb), comma-separated")
    p.add_argument("--drop-caches", dest="drop_caches", action="store_true", default=True,
                   help="empty the page cache before each timed phase (the default)")
    p.add_argument("--no-drop-caches", dest="drop_caches", action="store_false",
                   help="keep the page cache between the phases")
    p.add_argument("--llmuxd-log", type=Path, default=None,
                   help="keep a copy of llmuxd's log there")
    p.add_argument("--keep", type=Path, default=None, metavar="DIR",
                   help="keep CRIU's logs of each phase and the checkpoints' breakdowns there")
    p.add_argument("--same-images", action="store_true",
                   help="no second dump: B restores the images A restored (A's restored "
                        "tree ends with A), so that both restores read the same checkpoint")
    p.add_argument("--settle", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long between the dump and the restore in the same container")
    p.add_argument("--perf", type=Path, default=None, metavar="DIR",
                   help="record each restore's wake call with perf record -a -g there")
    p.add_argument("--new-first", action="store_true",
                   help="restore into the new container first, then dump and restore there "
                        "again (the same container second)")
    p.add_argument("--memory-tier-mb", type=int, default=0, metavar="MB",
                   help="llmuxd's memory tier (a /dev/shm folder) up to this size; 0: none")
    p.add_argument("--compare-tier", action="store_true",
                   help="with --memory-tier-mb: each repeat runs without the tier, then with it")
    p.add_argument("--compare-zero-pages", action="store_true",
                   help="each repeat runs llmuxd with drop_zero_pages off, then on (with "
                        "--settle long enough for the pass before the restore)")
    p.add_argument("--compare-network-lock", action="store_true",
                   help="each repeat runs llmuxd with CRIU's network lock by iptables, then "
                        "by nftables")
    p.add_argument("--evict-images", action="store_true",
                   help="before a restore, evict only the state directory's files from the "
                        "page cache (the images on disk cold; libraries and the memory tier "
                        "as they are), not every cache")
    p.add_argument("--repeat", type=int, default=1, help="run everything this many times")
    p.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                   help="no untimed cold start before the timed one")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    global PERF_DIR, EVICT_ONLY_IMAGES
    PERF_DIR = args.perf
    EVICT_ONLY_IMAGES = args.evict_images
    if os.geteuid() != 0:
        print("run as root (rootful podman, CRIU)", file=sys.stderr)
        return 2
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    exe = vllmbed.VLLM_VENV / "bin" / "vllm"
    python = vllmbed.VLLM_VENV / "bin" / "python"
    if not exe.exists():
        print(f"real vLLM is not installed at {vllmbed.VLLM_VENV}: run "
              "packaging/vllm/install-vllm.sh", file=sys.stderr)
        return 2
    models = {size: vllmbed.make_model(python, "alpha", size) for size in sizes}
    bed = vllmbed.VllmBed(exe, python, models)
    rootfs = podman_shim.prepare_rootfs()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="llmux-bench-vllm-") as tmp:
        workdir = Path(tmp)
        free_gb = shutil.disk_usage(workdir).free / (1 << 30)
        print(f"state directory under {workdir}: {free_gb:.0f} GB free", file=sys.stderr)
        (workdir / "bus").mkdir(mode=0o755)
        configs = [("disk", "memory_tier_limit_bytes = 0\n")]  # the tier is on by default
        if args.memory_tier_mb > 0:
            tier = [("tier", tier_config(args))]
            configs = [*configs, *tier] if args.compare_tier else tier
        if args.compare_zero_pages:
            configs = [(f"{label}-zp-{on}", f"{config}drop_zero_pages = {on}\n")
                       for label, config in configs for on in ("false", "true")]
        if args.compare_network_lock:
            configs = [(f"{label}-{lock}", f'{config}network_lock = "{lock}"\n')
                       for label, config in configs for lock in ("iptables", "nftables")]
        logs: list[str] = []
        with harness.running_bus(workdir / "bus") as bus:
            try:
                for rep in range(args.repeat):  # the configurations interleaved, each run
                    for label, config in configs:
                        here = workdir / f"{label}-{rep}"
                        here.mkdir()
                        with harness.running_llmuxd(bus, here, config) as daemon:
                            try:
                                for size in sizes:
                                    row = measure(size, models[size], bed, args, rootfs,
                                                  daemon, here)
                                    tag = f"{size}/{label}" if len(configs) > 1 else size
                                    rows.append(replace(row, size=tag))
                            finally:
                                logs.append(daemon.log())
            finally:
                if args.llmuxd_log is not None:
                    args.llmuxd_log.write_text("\n".join(logs))
                shutil.rmtree(f"/dev/shm/llmux-bench-tier-{os.getpid()}", ignore_errors=True)
    print_table(rows)
    print_medians(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
