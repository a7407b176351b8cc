#!/usr/bin/env python3
"""Dump and restore throughput of the checkpoint engine, next to the disk's own speed.

Run as root, from the repository root: ``.venv/bin/python -m tests.bench.bench_checkpoint
[--sizes 1,4,8]``.

One run measures, in the state directory's filesystem, the disk's sequential write speed
(large blocks, fsync included) and read speed (page cache dropped first), both buffered and
with O_DIRECT; then for each size, one after the other (the machine has little RAM), the
built-in engine holding that much weights memory resident is dumped and restored through
``CheckpointEngine`` (the library under llmuxd, no D-Bus), and the rate is image bytes per
second of the engine's own call. The dump is also timed up to the images being on disk
(syncfs), since the core returns once CRIU has written into the page cache. CRIU's own
statistics (stats-dump / stats-restore images) say where the time went.

This is a benchmark that prints numbers, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import mmap
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmux.service.core import criuimages
from llmux.service.core.authz import Caller
from llmux.service.core.engine import CheckpointEngine, EngineConfig
from llmux.shim.builtin import testing
from llmux.shim.builtin.testing import EngineProcess
from tests.support import procs as testprocs

MB = 1 << 20
GB = 1 << 30
BLOCK = 64 * MB
TARGET = 0.70
MODEL = "bench-builtin"


# --------------------------------------------------------------------------- page cache


def syncfs(path: Path) -> None:
    """Write back every dirty page of the filesystem holding ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.syncfs(fd) if hasattr(os, "syncfs") else os.sync()
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the disk


@dataclass(frozen=True)
class DiskSpeed:
    nbytes: int
    write_mbps: float
    """Buffered writes then fsync: what CRIU's page dump plus a sync costs at best."""
    read_mbps: float
    """Buffered reads with the page cache dropped first: what a restore reads at best."""
    direct_write_mbps: float
    direct_read_mbps: float
    cache_dropped: bool

    @property
    def best_write(self) -> float:
        return max(self.write_mbps, self.direct_write_mbps)

    @property
    def best_read(self) -> float:
        return max(self.read_mbps, self.direct_read_mbps)


def _pattern() -> mmap.mmap:
    """One page-aligned block of incompressible bytes (O_DIRECT needs the alignment)."""
    buf = mmap.mmap(-1, BLOCK)
    step = 16 * MB
    chunk = os.urandom(step)
    for off in range(0, BLOCK, step):
        buf[off : off + step] = chunk[off // step :] + chunk[: off // step]
    return buf


def measure_disk(directory: Path, nbytes: int) -> DiskSpeed:
    buf = _pattern()
    path = directory / "disk-speed.bin"
    blocks = max(1, nbytes // BLOCK)
    nbytes = blocks * BLOCK
    try:
        dropped = testprocs.drop_caches()
        write_s = _timed_write(path, os.O_CREAT | os.O_TRUNC, buf, blocks)

        testprocs.drop_caches()
        read_s = _timed_read(path, 0)

        testprocs.drop_caches()
        direct_write_s = _timed_write(path, os.O_DIRECT, buf, blocks)

        testprocs.drop_caches()
        direct_read_s = _timed_read(path, os.O_DIRECT)
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        buf.close()
    return DiskSpeed(nbytes, nbytes / MB / write_s, nbytes / MB / read_s,
                     nbytes / MB / direct_write_s, nbytes / MB / direct_read_s, dropped)


def _timed_write(path: Path, flags: int, buf: mmap.mmap, blocks: int) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | flags, 0o600)
    try:
        for _ in range(blocks):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def _timed_read(path: Path, flags: int) -> float:
    into = mmap.mmap(-1, BLOCK)
    view = memoryview(into)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        while os.readv(fd, [view]) > 0:
            pass
    finally:
        os.close(fd)
        view.release()
        into.close()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- the engine


def tree_pids(root: int) -> list[int]:
    """The root and every descendant (from /proc/*/stat), root first."""
    children: dict[int, list[int]] = {}
    for pid, stat in testprocs.proc_stats():
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return out


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids: list[int], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{p}").exists() for p in pids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} did not go away in {timeout:.0f} s")
        time.sleep(0.02)


def http(port: int, path: str, body: dict[str, Any] | None = None, timeout: float = 60) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def completion(port: int, model: str) -> str:
    answer = http(port, "/v1/completions",
                  {"model": model, "prompt": "the old sailor said", "max_tokens": 12})
    return str(answer["choices"][0]["text"])


def start_engine(model: str, weights_mb: int, workdir: Path, backend: str) -> EngineProcess:
    """The built-in engine as the shim starts it (stdin /dev/null, own session, log file).

    Its weights file goes under the run's work dir (HF_HOME), so nothing is left behind.
    """
    env = {"LLMUX_BUILTIN_BACKEND": backend, "HF_HOME": str(workdir / "hf"),
           "XDG_CACHE_HOME": str(workdir / "cache")}
    return testing.start_engine(
        f"llmux-bench/w{weights_mb}", weights_mb=weights_mb, extra_env=env,
        extra_args=["--served-model-name", model, "--device", "cpu"],
        log_path=workdir / f"engine-{weights_mb}mb.log", timeout_secs=900)


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphans of the engine (its core, once the API server is killed) become our children.

    The dumped tree's PIDs must be reaped before the core returns (it waits for them, as a
    restore needs them free); left to PID 1 they linger, and on this test bed PID 1 (a
    sandbox agent) reaps orphans only every ~2 s. The shim's container init or systemd
    reap at once, so the benchmark reaps them itself rather than charge that to CRIU.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


class Reaper:
    """A thread that reaps the given PIDs as soon as they are our zombie children."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = set(pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and self.pids:
            for pid in list(self.pids):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:  # not (yet) our child, or already reaped
                    if not Path(f"/proc/{pid}").exists():
                        self.pids.discard(pid)
                    continue
                if done:
                    self.pids.discard(pid)
            self._stop.wait(0.005)

    def __enter__(self) -> Reaper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- CRIU's stats


# images/stats.proto: stats_entry { dump = 1; restore = 2 }
_DUMP_STATS = {1: "freezing_us", 2: "frozen_us", 3: "memdump_us", 4: "memwrite_us",
               5: "pages_scanned", 6: "pages_skipped_parent", 7: "pages_written",
               8: "irmap_resolve_us", 9: "pages_lazy", 10: "page_pipes", 11: "page_pipe_bufs",
               12: "shpages_scanned", 13: "shpages_skipped_parent", 14: "shpages_written"}
_RESTORE_STATS = {1: "pages_compared", 2: "pages_skipped_cow", 3: "forking_us",
                  4: "restore_us", 5: "pages_restored"}


def criu_stats(path: Path) -> dict[str, int]:
    """Decode a stats-dump / stats-restore image (llmuxd's own reader of CRIU's images)."""
    try:
        entry = next(criuimages.entries(path), b"")
    except (OSError, criuimages.ImageError):
        return {}
    out: dict[str, int] = {}
    for number, sub in criuimages.fields(entry):
        names = _DUMP_STATS if number == 1 else _RESTORE_STATS if number == 2 else None
        if names is None or not isinstance(sub, bytes):
            continue
        for n, v in criuimages.fields(sub):
            if n in names and isinstance(v, int):
                out[names[n]] = v
    return out


_STAMP = re.compile(r"^\((\d+\.\d+)\)")


def log_span(log: Path) -> float:
    """Seconds from CRIU's first to its last timestamped log line."""
    first = last = None
    with contextlib.suppress(OSError), log.open(errors="replace") as f:
        for line in f:
            m = _STAMP.match(line)
            if m:
                t = float(m[1])
                first = t if first is None else first
                last = t
    return (last or 0.0) - (first or 0.0)


# --------------------------------------------------------------------------- one size


@dataclass
class SizeResult:
    gb: float
    disk: DiskSpeed
    """The disk, measured with as many bytes right before this size's engine started."""
    rss_mb: float
    image_bytes: int
    dump_secs: float
    dump_durable_s: float
    restore_secs: float
    same_pids: bool
    same_answer: bool
    dump_stats: dict[str, int] = field(default_factory=dict)
    restore_stats: dict[str, int] = field(default_factory=dict)
    dump_log_s: float = 0.0
    restore_log_s: float = 0.0
    criu_dump_s: float = 0.0

    @property
    def dump_mbps(self) -> float:
        return self.image_bytes / MB / self.dump_secs

    @property
    def dump_durable_mbps(self) -> float:
        return self.image_bytes / MB / self.dump_durable_s

    @property
    def restore_mbps(self) -> float:
        return self.image_bytes / MB / self.restore_secs


async def bench_size(core: CheckpointEngine, gb: float, workdir: Path, backend: str,
                     state_dir: Path, keep: bool) -> SizeResult:
    weights_mb = int(gb * 1024)
    model = f"{MODEL}-{weights_mb}mb"
    print(f"\n== {gb:g} GB: the disk with {gb:g} GB ...", flush=True)
    disk = measure_disk(state_dir, weights_mb * MB)
    print(f"   write {disk.write_mbps:.0f} MB/s (O_DIRECT {disk.direct_write_mbps:.0f}), "
          f"read {disk.read_mbps:.0f} MB/s (O_DIRECT {disk.direct_read_mbps:.0f})", flush=True)
    print(f"   starting the built-in engine ({backend} backend, --weights-mb {weights_mb})",
          flush=True)
    engine = await asyncio.to_thread(start_engine, model, weights_mb, workdir, backend)
    caller = Caller(pid=os.getpid(), uid=0)
    try:
        before = await asyncio.to_thread(completion, engine.port, model)
        pids = tree_pids(engine.pid)
        rss = sum(rss_bytes(p) for p in pids)
        print(f"   engine up: pids {pids}, RSS of the tree {rss / MB:.0f} MiB", flush=True)
        if rss < weights_mb * MB * 0.9:
            raise RuntimeError(f"the {backend} backend holds only {rss / MB:.0f} MiB resident "
                               f"for {weights_mb} MiB of weights: not a fair benchmark")
        testprocs.drop_caches()  # the weights file's cached pages would compete with the dump

        # We are the root's parent, as the shim is in real use: reap the tree the moment
        # CRIU kills it (the core waits for the dumped PIDs to be gone before it returns).
        with Reaper(pids):
            t0 = time.perf_counter()
            manifest = await core.checkpoint(caller, model, engine.pid)
            dump_secs = time.perf_counter() - t0
            syncfs(state_dir)
            dump_durable_s = time.perf_counter() - t0
            wait_gone(pids)
        images = state_dir / model / "images"
        image_bytes = sum(p.stat().st_size for p in images.rglob("*") if p.is_file())
        print(f"   dumped {image_bytes / MB:.0f} MiB in {dump_secs:.2f} s "
              f"({dump_durable_s:.2f} s until on disk)", flush=True)

        testprocs.drop_caches()  # the restore must read the images from the disk
        t0 = time.perf_counter()
        await core.restore(caller, model, keep_images=True)
        restore_secs = time.perf_counter() - t0
        restored_pids = tree_pids(pids[0]) if alive(pids[0]) else []
        after = await asyncio.to_thread(completion, engine.port, model)
        print(f"   restored {image_bytes / MB:.0f} MiB in {restore_secs:.2f} s; "
              f"pids {restored_pids}", flush=True)
        return SizeResult(
            gb=gb, disk=disk, rss_mb=rss / MB, image_bytes=image_bytes, dump_secs=dump_secs,
            dump_durable_s=dump_durable_s, restore_secs=restore_secs,
            same_pids=sorted(restored_pids) == sorted(pids), same_answer=after == before,
            dump_stats=criu_stats(images / "stats-dump"),
            restore_stats=criu_stats(images / "stats-restore"),
            dump_log_s=log_span(images / "dump.log"),
            restore_log_s=log_span(images / "restore.log"),
            criu_dump_s=float(manifest.dump_seconds))
    finally:
        # The restored tree keeps its session and process group: stop() ends it too.
        await engine.stop_async()
        shutil.rmtree(workdir / "hf", ignore_errors=True)
        if not keep:
            with contextlib.suppress(Exception):
                core.delete_checkpoint(caller, model)
            shutil.rmtree(state_dir / model, ignore_errors=True)
        testprocs.drop_caches()


# --------------------------------------------------------------------------- report


def _pct(part: float, whole: float) -> str:
    return f"{part / whole:.0%}" if whole > 0 else "-"


def print_report(results: list[SizeResult]) -> None:
    print("\nDump and restore through CheckpointEngine vs. the disk (MB = MiB; disk = the")
    print("better of buffered+fsync and O_DIRECT, measured with the same bytes just before;")
    print("restore reads with the page cache dropped):\n")
    head = (f"{'weights':>7} {'image':>6} | {'disk wr':>7} | {'dump s':>6} {'MB/s':>5} "
            f"{'%disk':>5} | {'+sync s':>7} {'MB/s':>5} {'%disk':>5} | {'disk rd':>7} | "
            f"{'restore s':>9} {'MB/s':>5} {'%disk':>5} | {'PIDs':>4} {'answer':>6}")
    print(head)
    print("-" * len(head))
    for r in results:
        w, rd = r.disk.best_write, r.disk.best_read
        print(f"{r.gb:>5g}GB {r.image_bytes / MB:>6.0f} | {w:>7.0f} | "
              f"{r.dump_secs:>6.2f} {r.dump_mbps:>5.0f} {_pct(r.dump_mbps, w):>5} | "
              f"{r.dump_durable_s:>7.2f} {r.dump_durable_mbps:>5.0f} "
              f"{_pct(r.dump_durable_mbps, w):>5} | {rd:>7.0f} | "
              f"{r.restore_secs:>9.2f} {r.restore_mbps:>5.0f} {_pct(r.restore_mbps, rd):>5} | "
              f"{'same' if r.same_pids else 'DIFF':>4} {'same' if r.same_answer else 'DIFF':>6}")
    print("\nThe disk, per size (MB/s): buffered+fsync write / O_DIRECT write, "
          "buffered read / O_DIRECT read")
    for r in results:
        d = r.disk
        print(f"  {r.gb:g} GB: write {d.write_mbps:.0f} / {d.direct_write_mbps:.0f}, "
              f"read {d.read_mbps:.0f} / {d.direct_read_mbps:.0f}"
              f"{'' if d.cache_dropped else ' (page cache NOT dropped: no permission)'}")
    print("\nWhere the time goes (seconds; CRIU's own stats-dump / stats-restore):")
    for r in results:
        ds, rs = r.dump_stats, r.restore_stats
        pages_s = ds.get("memdump_us", 0) / 1e6
        write_s = ds.get("memwrite_us", 0) / 1e6
        print(f"  {r.gb:g} GB dump {r.dump_secs:.2f}: CRIU {r.criu_dump_s:.2f} (frozen "
              f"{ds.get('frozen_us', 0) / 1e6:.2f}, of which pages {pages_s:.2f} = collect "
              f"{pages_s - write_s:.2f} + write {write_s:.2f}; "
              f"{ds.get('pages_written', 0) * 4096 / MB:.0f} MiB), core "
              f"{r.dump_secs - r.criu_dump_s:.2f}; then sync {r.dump_durable_s - r.dump_secs:.2f}")
        print(f"  {r.gb:g} GB restore {r.restore_secs:.2f}: CRIU log {r.restore_log_s:.2f} "
              f"(forking "
              f"{rs.get('forking_us', 0) / 1e6:.2f}, restore {rs.get('restore_us', 0) / 1e6:.2f}; "
              f"{rs.get('pages_restored', 0) * 4096 / MB:.0f} MiB), core "
              f"{r.restore_secs - r.restore_log_s:.2f}")
    print(f"\nTarget: dump and restore at >= {TARGET:.0%} of the disk's speed.")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sizes", default="1,4,8", help="weights memory in GB, comma-separated")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="checkpoint state directory (default: a new temp dir under /var/tmp)")
    p.add_argument("--keep", action="store_true",
                   help="keep the state directory, the images and the engines' work dir")
    p.add_argument("--backend", choices=["pure", "torch"], default="pure",
                   help="the built-in engine's model backend (both hold weights resident)")
    p.add_argument("--criu", default="/opt/llmux/criu/criu", help="the criu binary")
    args = p.parse_args(argv)
    try:
        args.sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes: expected numbers of GB like 1,4,8, got {args.sizes!r}")
    if not args.sizes or any(s <= 0 for s in args.sizes):
        p.error("--sizes: every size must be > 0")
    return args


def check_resources(directory: Path, sizes: list[float], keep: bool) -> None:
    """Refuse a run that would fill the disk or the memory, before starting anything."""
    free = shutil.disk_usage(directory).free
    # per size: the weights file (HF cache), the images, the disk test file; kept images add up
    need = int((3 * max(sizes) + 1) * GB) + (int(sum(sizes) * GB) if keep else 0)
    if free < need:
        raise SystemExit(f"not enough free disk in {directory}: {free / GB:.1f} GB free, "
                         f"{need / GB:.1f} GB needed for sizes {sizes}")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if max(sizes) * GB * 1.5 > mem:
        raise SystemExit(f"{max(sizes):g} GB of weights do not fit in {mem / GB:.0f} GB of RAM")


async def amain(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("bench_checkpoint.py needs root (CRIU, drop_caches)", file=sys.stderr)
        return 2
    made = args.state_dir is None
    state_dir: Path = args.state_dir or Path(
        tempfile.mkdtemp(prefix="llmux-bench-", dir="/var/tmp"))
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    workdir = Path(tempfile.mkdtemp(prefix="llmux-bench-work-", dir="/var/tmp"))
    try:
        check_resources(state_dir, args.sizes, args.keep)
        print(f"state dir {state_dir} ({shutil.disk_usage(state_dir).free / GB:.0f} GB free), "
              f"CRIU {args.criu}, {os.cpu_count()} CPUs", flush=True)
        become_subreaper()
        core = await CheckpointEngine.open(EngineConfig(state_dir=state_dir, criu_path=args.criu,
                                                        cuda_mode="off"))
        results = []
        for gb in args.sizes:
            results.append(await bench_size(core, gb, workdir, args.backend, state_dir, args.keep))
        print_report(results)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
            if made:
                shutil.rmtree(state_dir, ignore_errors=True)
        else:  # the engines' log files are part of what a restore needs back
            print(f"kept {state_dir} and {workdir}")
    return 0


def main() -> int:
    return asyncio.run(amain(parse_args()))


if __name__ == "__main__":
    sys.exit(main())
