"""Restore -> first token on the GPU, each figure beside the limit it is held to.

Not a test: a benchmark that prints numbers (run as root on the GPU machine; ``--device
cpu`` runs the CRIU parts anywhere). For each model size it starts the built-in engine
(weights and KV cache in CUDA virtual memory, as vLLM's sleep mode holds them), then runs
the eviction policies of ``llmux validate`` through the daemon's own library
(``CheckpointEngine``: CUDA suspend/resume, CRIU checkpoint/restore with the CUDA state),
and prints per policy: sleep, wake, GB/s, GPU memory before / asleep / woken, same answer
and same weights checksum, and restore -> first token. The limits are measured in the
same run: pinned and pageable host<->GPU copies, the disk's write and read speed with the
page cache dropped (one reader and several), page-cache and tmpfs reads.

Levers, each measured before/after in the same run:
- weights out of the CUDA checkpoint: ``offload+...`` (the engine copies its weights to
  pinned host memory itself, the driver checkpoints what remains) against ``retain+...``;
- a memory tier: images in tmpfs against images on disk with the page cache dropped;
- parallel page-cache warm-up of the images before CRIU restores (``prefetch``).

    python tests/bench/bench_gpu_restore.py --sizes 2048,8192 --out DIR
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import importlib.util
import json
import logging
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script (the GPU machine): the tests' support package
from tests.support import procs  # noqa: E402

GB = 1e9
#: the tier's label when the weights are not read ahead during the restore
NOT_AHEAD = "weights not read ahead"
MIB = 1 << 20


def _load_demo() -> Any:
    """packaging/gpu/h100_demo.py: its process, HTTP and nvidia-smi helpers."""
    spec = importlib.util.spec_from_file_location("h100_demo", REPO / "packaging/gpu/h100_demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["h100_demo"] = module
    spec.loader.exec_module(module)
    return module


demo = _load_demo()
OUT: list[Any] = []


def say(text: str = "") -> None:
    print(text, flush=True)
    for f in OUT:
        f.write(text + "\n")
        f.flush()


KEEP_CACHE: list[bool] = []


def drop_caches() -> bool:
    """Drop the page cache (machine-wide), so reads come from the disk; not with KEEP_CACHE."""
    return False if KEEP_CACHE else procs.drop_caches()


# --------------------------------------------------------------------------- limits
def copy_bandwidth(nbytes: int) -> dict[str, float]:
    """GB/s of host<->GPU copies of ``nbytes``: pinned and pageable, each way."""
    import torch

    result: dict[str, float] = {}
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    for kind in ("pinned", "pageable"):
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=kind == "pinned")
        host.fill_(1)
        for direction in ("h2d", "d2h"):
            best = 0.0
            for _ in range(2 if kind == "pinned" else 1):
                torch.cuda.synchronize()
                t = time.perf_counter()
                if direction == "h2d":
                    device.copy_(host, non_blocking=kind == "pinned")
                else:
                    host.copy_(device, non_blocking=kind == "pinned")
                torch.cuda.synchronize()
                best = max(best, nbytes / (time.perf_counter() - t) / GB)
            result[f"{kind}_{direction}"] = best
        del host
    del device
    torch.cuda.empty_cache()
    return result


def _write_file(path: Path, nbytes: int, block: bytes) -> float:
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left:
            n = min(len(block), left)
            f.write(block[:n])
            left -= n
        os.fsync(f.fileno())
    return time.perf_counter() - t


def _read_file(path: Path, offset: int = 0, length: int | None = None) -> int:
    size = path.stat().st_size if length is None else length
    buf = bytearray(16 * MIB)
    view = memoryview(buf)
    done = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while done < size:
            n = f.readinto(view[: min(len(buf), size - done)])
            if not n:
                break
            done += n
    return done


def _read_fresh(path: Path, huge: bool) -> float:
    """GB/s of one reader filling memory never touched before (as CRIU's restorer fills a
    restored process's mappings: every 4 KiB page faulted in, zeroed, then copied into),
    with ``huge``: the mapping asks for transparent huge pages (2 MiB faults)."""
    size = path.stat().st_size
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge:
        with contextlib.suppress(OSError, AttributeError):
            region.madvise(mmap.MADV_HUGEPAGE)
    view = memoryview(region)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            t = time.perf_counter()
            done = 0
            while done < size:
                n = os.preadv(fd, [view[done:done + 64 * MIB]], done)
                if not n:
                    break
                done += n
            return done / (time.perf_counter() - t) / GB
        finally:
            os.close(fd)
    finally:
        view.release()
        region.close()


def parallel_read(paths: Sequence[Path], threads: int) -> tuple[float, int]:
    """Read ``paths`` with ``threads`` readers, big files split in pieces: (s, bytes)."""
    pieces: list[tuple[Path, int, int]] = []
    for path in paths:
        size = path.stat().st_size
        step = max(256 * MIB, -(-size // threads))
        pieces += [(path, off, min(step, size - off)) for off in range(0, size, step)]
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(lambda p: _read_file(*p), pieces))
    return time.perf_counter() - t, total


def storage_speeds(directory: Path, nbytes: int, label: str) -> dict[str, float]:
    """Write (fsync'd) and read speeds in GB/s: cold (page cache dropped) with 1 and 8
    readers, and warm (from the page cache)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "llmux-speed.bin"
    block = os.urandom(16 * MIB)
    out: dict[str, float] = {}
    try:
        out[f"{label}_write"] = nbytes / _write_file(path, nbytes, block) / GB
        for threads in (1, 8):
            dropped = drop_caches()
            secs, done = parallel_read([path], threads)
            out[f"{label}_read_{'cold' if dropped else 'cached?'}_{threads}t"] = done / secs / GB
        secs, done = parallel_read([path], 1)
        out[f"{label}_read_cached_1t"] = done / secs / GB
        if label == "tmpfs":  # CRIU 4.2.1's restorer: one reader per process, fresh memory
            out["tmpfs_read_fresh_1t"] = _read_fresh(path, huge=False)
            out["tmpfs_read_fresh_thp_1t"] = _read_fresh(path, huge=True)
    finally:
        path.unlink(missing_ok=True)
    return out


# --------------------------------------------------------------------------- engine
@dataclass
class Engine:
    size_mb: int
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    pids: list[int] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def root(self) -> int:
        return self.proc.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def post(self, path: str, body: dict[str, Any] | None = None, timeout: float = 600) -> Any:
        data = json.dumps(body or {}).encode()
        return json.loads(demo.http_get(self.url(path), timeout=timeout, data=data) or b"null")

    def ask(self, max_tokens: int = 16) -> str:
        answer = self.post("/v1/completions", {"model": "bench", "prompt": "The GPU restore",
                                               "max_tokens": max_tokens, "temperature": 0})
        return str(answer["choices"][0]["text"])

    def state(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(demo.http_get(self.url("/engine_state")))
        return body

    def checksum(self) -> int:
        return int(self.post("/collective_rpc", {"method": "weights_checksum"})["results"][0])


def start_engine(size_mb: int, device: str, workdir: Path, extra: Sequence[str] = (),
                 readers: int = 1) -> Engine:
    """The built-in engine; ``readers`` load its weights at once (LLMUX_BUILTIN_LOAD_THREADS)."""
    port = demo.free_port()
    log_path = workdir / f"engine-{size_mb}-{port}.log"
    argv = [sys.executable, "-m", "llmux.shim.launch", "--", sys.executable, "-m",
            "llmux.shim.builtin", "serve", f"bench/model-{size_mb}", "--served-model-name",
            "bench", "--port", str(port), "--device", device, "--weights-mb", str(size_mb),
            "--enable-sleep-mode", *extra]
    env = dict(os.environ)
    env.setdefault("XDG_CACHE_HOME", str(workdir / "cache"))
    env.setdefault("HF_HOME", str(workdir / "hf"))
    env["LLMUX_BUILTIN_LOAD_THREADS"] = str(readers)
    proc = demo._spawn(argv, log_path, env)
    return Engine(size_mb, proc, port, log_path, env=env)


def weight_files(engine: Engine) -> list[Path]:
    """The engine's weights file, found as the shim finds it (llmux.shim.weightfiles)."""
    from llmux.shim.config import EngineKind, ModelConfig
    from llmux.shim.weightfiles import weight_files as found

    config = ModelConfig(name="bench", model_path=f"bench/model-{engine.size_mb}", port=1,
                         engine=EngineKind.BUILTIN, weights_mb=engine.size_mb)
    return found(config, engine.env)


def wait_engine(engine: Engine, timeout: float = 900) -> None:
    demo.wait_http(engine.url("/health"), timeout, engine.proc)
    engine.pids = demo.process_tree(engine.root)


def gpu_mib(engine: Engine, gpu: bool) -> int:
    if gpu:
        time.sleep(0.3)
        return int(demo.nvidia_smi_used_mib(engine.pids) or 0)
    return sum(_rss_kb(p) for p in engine.pids) // 1024


def _rss_kb(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0])
    return 0


def first_token_secs(engine: Engine) -> float:
    t = time.perf_counter()
    engine.ask(max_tokens=1)
    return time.perf_counter() - t


# --------------------------------------------------------------------------- the service
class Service:
    """The daemon's CheckpointEngine on a state folder (disk or tmpfs)."""

    def __init__(self, state_dir: Path, criu: str, gpu: bool, prefetch_threads: int = 0,
                 memory_tier: Path | None = None, drop_zero_pages: bool = True) -> None:
        """``memory_tier``: llmuxd's memory tier (images in that tmpfs folder, a copy written
        to ``state_dir`` in the background), as ``memory_tier_dir`` in llmuxd.toml sets it;
        ``drop_zero_pages`` as in llmuxd.toml (on by default there too)."""
        from llmux.service.core.authz import Caller
        from llmux.service.core.engine import CheckpointEngine, EngineConfig

        self.caller = Caller(pid=os.getpid(), uid=0)
        self.state_dir = state_dir
        self.answered = self.behind = 0.0
        self.memory_tier_zeros = memory_tier is not None and not drop_zero_pages
        self.dumped = 0
        config = EngineConfig(drop_zero_pages=drop_zero_pages, state_dir=state_dir, criu_path=criu,
                              cuda_mode="api" if gpu else "off",
                              prefetch_threads=prefetch_threads, memory_tier_dir=memory_tier,
                              memory_tier_limit_bytes=64 << 30 if memory_tier else 0)
        self.engine: Any = demo.sync(CheckpointEngine.open(config))

    def suspend(self, engine: Engine, model: str = "bench") -> Any:
        return demo.sync(self.engine.suspend(self.caller, model, engine.root))

    def resume(self, engine: Engine, model: str = "bench") -> Any:
        return demo.sync(self.engine.resume(self.caller, model, engine.root))

    def checkpoint(self, engine: Engine, model: str = "bench") -> Any:
        """The dump, then the work llmuxd does behind it (the zero-page pass, the copy of
        a memory-tier checkpoint to disk) in the same event loop, which would otherwise
        cancel it; ``self.answered`` / ``self.behind`` are the two times, ``self.dumped``
        the image's size before the pass."""
        async def dump_then_settle() -> Any:
            t = time.perf_counter()
            dumped = await self.engine.checkpoint(self.caller, model, engine.root)
            self.answered = time.perf_counter() - t
            self.dumped = int(dumped.images_bytes)
            t = time.perf_counter()
            await self.engine.wait_moves()
            self.behind = time.perf_counter() - t
            return self.engine.store.get(model)

        with demo.TreeReaper(engine.pids):
            manifest = demo.sync(dump_then_settle())
        with contextlib.suppress(Exception):
            engine.proc.wait(timeout=10)
        demo.wait_gone(engine.pids, 30)
        return manifest

    def restore(self, engine: Engine, model: str = "bench") -> Any:
        manifest = demo.sync(self.engine.restore(self.caller, model, keep_images=True))
        engine.pids = demo.process_tree(engine.root)
        return manifest

    def images(self, model: str = "bench") -> Path:
        path: Path = self.engine.store.images_dir(model)
        return path

    def images_in(self, model: str = "bench") -> str:
        """Where the images are read from now: "memory" (the tier) or "disk"."""
        images = self.images(model)
        return "memory" if images.is_symlink() or images.resolve() != images else "disk"

    def forget(self, model: str = "bench") -> None:
        with contextlib.suppress(Exception):
            self.engine.delete_checkpoint(self.caller, model)
        shutil.rmtree(self.state_dir / "checkpoints" / model, ignore_errors=True)


# --------------------------------------------------------------------------- cycles
@dataclass
class Row:
    size_mb: int
    policy: str
    sleep_secs: float = 0.0
    wake_secs: float = 0.0
    first_token_secs: float = 0.0
    moved_bytes: int = 0
    image_bytes: int = 0
    mib_before: int = 0
    mib_asleep: int = 0
    mib_woken: int = 0
    same_answer: bool | None = None
    same_weights: bool | None = None
    limit: str = ""
    note: str = ""
    error: str = ""

    @property
    def sleep_gbps(self) -> float:
        return self.moved_bytes / self.sleep_secs / GB if self.sleep_secs else 0.0

    @property
    def wake_gbps(self) -> float:
        return self.moved_bytes / self.wake_secs / GB if self.wake_secs else 0.0


@dataclass
class Context:
    gpu: bool
    engine: Engine
    answer: str
    checksum: int
    disk: Service | None
    memory: Service | None
    limits: dict[str, float]
    rows: list[Row] = field(default_factory=list)
    prefetch_label: str = ""
    disk_prefetch: Service | None = None
    #: the memory tier without the zero-page pass (--compare-zero-pages)
    memory_zeros: Service | None = None
    #: the disk again, the weights not read ahead during the restore (--compare-prefetch)
    disk_no_ahead: Service | None = None
    #: appended to each row's policy: what differs from the default engine
    label: str = ""


def cycle(ctx: Context, policy: str, sleep: Callable[[Row], None],
          wake: Callable[[Row], None], limit: Callable[[Row], str] = lambda _r: "") -> Row:
    engine = ctx.engine
    row = Row(engine.size_mb, policy)
    say(f"\n--- {policy} ({engine.size_mb} MiB of weights) ---")
    try:
        row.mib_before = gpu_mib(engine, ctx.gpu)
        t = time.perf_counter()
        sleep(row)
        row.sleep_secs = time.perf_counter() - t
        row.mib_asleep = gpu_mib(engine, ctx.gpu) if demo.alive(engine.root) else 0
        t = time.perf_counter()
        wake(row)
        row.wake_secs = time.perf_counter() - t
        t = time.perf_counter()
        first = engine.ask(max_tokens=1)
        row.first_token_secs = row.wake_secs + (time.perf_counter() - t)
        del first
        row.mib_woken = gpu_mib(engine, ctx.gpu)
        row.same_answer = engine.ask() == ctx.answer
        row.same_weights = engine.checksum() == ctx.checksum
        row.limit = limit(row)
        timings = engine.state().get("cumem_timings")
        if timings and "offload" in policy:
            say("  cumem: " + ", ".join(f"{k} {v:.3f}" for k, v in timings.items()))
    except Exception as exc:  # the benchmark goes on
        text = str(exc)
        errors = [line for line in text.splitlines() if "Error" in line]
        row.error = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''} " \
                    + " | ".join(errors[-3:])[-600:]
        say(f"  ERROR {row.error}")
    say(f"  sleep {row.sleep_secs:.3f} s, wake {row.wake_secs:.3f} s, wake->first token "
        f"{row.first_token_secs:.3f} s, moved {row.moved_bytes / GB:.2f} GB, "
        f"image {row.image_bytes / GB:.2f} GB, GPU {row.mib_before}/{row.mib_asleep}/"
        f"{row.mib_woken} MiB, answer {row.same_answer}, weights {row.same_weights}"
        + (f"; {row.note}" if row.note else "") + (f"; limit: {row.limit}" if row.limit else ""))
    ctx.rows.append(row)
    return row


def weights_bytes(ctx: Context) -> int:
    return int(ctx.engine.state()["weights_bytes"])


def run_cycles(ctx: Context, policies: set[str]) -> None:
    engine, limits = ctx.engine, ctx.limits
    wbytes = weights_bytes(ctx)
    pinned_h2d = limits.get("pinned_h2d", 0.0)

    def h2d_limit(row: Row) -> str:
        if not pinned_h2d:
            return ""
        ideal = row.moved_bytes / (pinned_h2d * GB)
        return f"pinned H2D of {row.moved_bytes / GB:.2f} GB: {ideal:.3f} s " \
               f"(wake {row.wake_secs / ideal:.2f}x)"

    def sleep_level(level: int) -> Callable[[Row], None]:
        def go(row: Row) -> None:
            engine.post(f"/sleep?level={level}")
            row.moved_bytes = wbytes if level == 1 else 0
        return go

    def wake_up(row: Row) -> None:
        engine.post("/wake_up")

    # First what never offloads: after a level-1 sleep the engine keeps weights-sized pinned
    # buffers (as vLLM's stay in PyTorch's host cache), and every later image would carry
    # them; with one policy per model, as in production, they never meet.
    service = ctx.disk
    if ctx.gpu and service is not None and "retain+cuda_suspend" in policies:
        def suspend(row: Row) -> None:
            service.suspend(engine)
            row.moved_bytes = row.mib_before * MIB

        cycle(ctx, "retain+cuda_suspend", suspend, lambda _r: service.resume(engine),
              lambda r: f"pinned D2H/H2D {limits.get('pinned_d2h', 0):.1f}/"
                        f"{pinned_h2d:.1f} GB/s; target >= 10 GB/s each way")
    tiers = (("disk", ctx.disk), (f"disk, {ctx.prefetch_label}", ctx.disk_prefetch),
             ("memory", ctx.memory), ("memory, zero pages kept", ctx.memory_zeros),
             (f"disk, {NOT_AHEAD}", ctx.disk_no_ahead))
    for weights in ("retain", "discard", "offload"):
        if weights == "offload":
            if "offload+keep_running" in policies:
                cycle(ctx, "offload+keep_running", sleep_level(1), wake_up, h2d_limit)
            if ctx.gpu and service is not None and "offload+cuda_suspend" in policies:
                def offload_suspend(row: Row) -> None:
                    engine.post("/sleep?level=1")
                    service.suspend(engine)
                    row.moved_bytes = wbytes

                def resume_wake(row: Row) -> None:
                    service.resume(engine)
                    engine.post("/wake_up")

                cycle(ctx, "offload+cuda_suspend", offload_suspend, resume_wake, h2d_limit)
        if f"{weights}+checkpoint" not in policies:
            continue
        for tier, tier_service in tiers:
            if tier_service is not None and (weights == "offload" or tier != tiers[1][0]) \
                    and (weights == "discard" or tier not in (tiers[3][0], tiers[4][0])):
                checkpoint_cycle(ctx, tier_service, weights, tier, wbytes)


def checkpoint_cycle(ctx: Context, service: Service, weights: str, tier: str,
                     wbytes: int) -> None:
    engine, limits = ctx.engine, ctx.limits
    level = {"retain": 0, "offload": 1, "discard": 2}[weights]
    stats: dict[str, Any] = {}

    def sleep(row: Row) -> None:
        if level:
            engine.post(f"/sleep?level={level}")
        t = time.perf_counter()
        manifest = service.checkpoint(engine)
        stats["checkpoint"] = time.perf_counter() - t
        row.image_bytes = int(manifest.images_bytes)
        row.moved_bytes = row.image_bytes
        row.note = f"CUDA {manifest.cuda_seconds:.2f} s, dump {manifest.dump_seconds:.2f} s, " \
                   f"answered {service.answered:.2f} s, behind it {service.behind:.2f} s " \
                   f"(zero pages: {service.dumped / GB:.2f} -> {row.image_bytes / GB:.2f} GB)"
        if OUT and level == 2 and tier.startswith("memory"):  # what it holds, for the docs
            kept = "-zeros" if service.memory_tier_zeros else ""
            write_breakdown(service, f"explain-{engine.size_mb}-{weights}{kept}.txt")
        if tier.startswith("disk"):
            stats["dropped"] = drop_caches()

    def wake(row: Row) -> None:
        from llmux.shim.weightfiles import prefetch

        source = service.images_in()
        ahead: concurrent.futures.Future[Any] | None = None
        pool = concurrent.futures.ThreadPoolExecutor(1)
        if level == 2 and NOT_AHEAD not in tier:  # as the shim does for a discard checkpoint
            ahead = pool.submit(prefetch, weight_files(engine))
        t = time.perf_counter()
        service.restore(engine)
        restore_secs = time.perf_counter() - t
        if level:
            engine.post("/wake_up")
        if level == 2:
            t = time.perf_counter()
            engine.post("/collective_rpc", {"method": "reload_weights"})
            row.note += f", reload of the weights {time.perf_counter() - t:.2f} s"
        if ahead is not None:
            done = ahead.result()
            row.note += f", weights read ahead: {done.bytes / GB:.2f} GB asked for in " \
                        f"{done.seconds:.2f} s{' (' + done.skipped + ')' if done.skipped else ''}"
        pool.shutdown()
        row.note += f", restore {restore_secs:.2f} s (images in {source})"
        if tier.startswith("disk"):
            row.note += " (page cache dropped)" if stats.get("dropped") else " (cache NOT dropped)"

    def limit(row: Row) -> str:
        """The time the medium needs for the bytes that must come from it (its best of one
        and eight readers): the images, and for discard the weights file too (from the disk
        with the page cache dropped, else from the page cache)."""
        cold = tier.startswith("disk")
        keys = ("disk_read_cold_1t", "disk_read_cold_8t") if cold else \
            ("tmpfs_read_cold_1t", "tmpfs_read_cold_8t", "tmpfs_read_cached_1t")
        speed = max(limits.get(k, 0.0) for k in keys)
        if not speed:
            return ""
        ideal = row.image_bytes / (speed * GB)
        what = f"{row.image_bytes / GB:.2f} GB of images"
        if level == 2:  # the weights file: from the disk, or from the page cache
            keys = ("disk_read_cold_1t", "disk_read_cold_8t") if cold else \
                ("disk_read_cached_1t",)
            cache = max(limits.get(k, 0.0) for k in keys)
            if cache:
                ideal += wbytes / (cache * GB)
                what += f" + {wbytes / GB:.2f} GB of weights"
        return f"{tier.split(',')[0]} read of {what}: {ideal:.2f} s " \
               f"(restore->first token {row.first_token_secs / ideal:.2f}x)"

    cycle(ctx, f"{weights}+checkpoint [{tier}]{ctx.label}", sleep, wake, limit)
    service.forget()


def write_breakdown(service: Service, name: str, model: str = "bench") -> None:
    """`llmux checkpoints --explain` of the checkpoint just taken, next to the log."""
    from llmux.client.opscli import render_breakdown
    from llmux.service.core.explain import explain

    store = service.engine.store
    try:
        text = render_breakdown(explain(store.get(model), store.images_dir(model),
                                        store.files_dir(model)))
    except Exception as exc:  # the benchmark goes on
        text = f"explain failed: {type(exc).__name__}: {exc}"
    Path(OUT[0].name).with_name(name).write_text(text + "\n")
    say(f"  breakdown written to {name}")


def parallel_resume(args: argparse.Namespace, workdir: Path, service: Service,
                    limits: dict[str, float]) -> list[str]:
    """N engines suspended (CUDA checkpoint), resumed alone then all at once; first with
    everything in the driver's checkpoint (retain+cuda_suspend), then with the weights
    offloaded by each engine first (offload+cuda_suspend: resume, then wake)."""
    lines: list[str] = []
    engines = [start_engine(args.parallel_mb, "cuda", workdir) for _ in range(args.parallel)]
    try:
        for e in engines:
            wait_engine(e)
            e.ask(1)
        names = [f"bench-{i}" for i in range(len(engines))]
        for offload in (False, True):
            def sleep(e: Engine, name: str, offload: bool = offload) -> None:
                if offload:
                    e.post("/sleep?level=1")
                service.suspend(e, name)

            def wake(e: Engine, name: str, offload: bool = offload) -> None:
                service.resume(e, name)
                if offload:
                    e.post("/wake_up")

            alone: list[float] = []
            alone_resume: list[float] = []
            for e, name in zip(engines, names, strict=True):
                sleep(e, name)
                t = time.perf_counter()
                service.resume(e, name)
                alone_resume.append(time.perf_counter() - t)
                if offload:
                    e.post("/wake_up")
                alone.append(time.perf_counter() - t)
            for e, name in zip(engines, names, strict=True):
                sleep(e, name)
            t = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(len(engines)) as pool:
                list(pool.map(wake, engines, names))
            together = time.perf_counter() - t
            # the same again in two steps: every driver resume at once, then every wake
            for e, name in zip(engines, names, strict=True):
                sleep(e, name)
            t = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(len(engines)) as pool:
                list(pool.map(service.resume, engines, names))
            resumes = time.perf_counter() - t
            t = time.perf_counter()
            if offload:
                with concurrent.futures.ThreadPoolExecutor(len(engines)) as pool:
                    list(pool.map(lambda e: e.post("/wake_up"), engines))
            wakes = time.perf_counter() - t
            answers = [e.ask(1) for e in engines]
            policy = "offload+cuda_suspend" if offload else "retain+cuda_suspend"
            lines.append(f"parallel {policy} of {len(engines)} x {args.parallel_mb} MiB "
                         f"engines: alone {', '.join(f'{s:.2f}' for s in alone)} s (sum "
                         f"{sum(alone):.2f}), together {together:.2f} s = "
                         f"{together / max(alone):.2f}x the slowest alone (target <= 1.2x); "
                         f"the driver's resumes alone "
                         f"{', '.join(f'{s:.2f}' for s in alone_resume)} s, together "
                         f"{resumes:.2f} s"
                         + (f", then the wakes together {wakes:.2f} s" if offload else "")
                         + f"; answers after: {len(answers)}")
            say(lines[-1])
    finally:
        for e in engines:
            demo.kill_tree(demo.process_tree(e.root) if demo.alive(e.root) else e.pids)
    return lines


# --------------------------------------------------------------------------- facts
def facts(criu: str) -> dict[str, Any]:
    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                            "kernel": os.uname().release, "cpus": os.cpu_count()}
    out = demo._smi("--query-gpu=name,driver_version,memory.total")
    info["gpu"] = out.strip() if out else "none"
    if criu:
        info["criu"] = demo.criu_version(criu)
        features = {}
        for feature in ("uffd", "uffd-noncoop", "mem_dirty_track", "memfd_hugetlb",
                        "io_uring", "pagemap_scan"):
            done = subprocess.run([criu, "check", "--feature", feature], capture_output=True,
                                  text=True, check=False)
            features[feature] = "yes" if done.returncode == 0 else "no"
        info["criu_features"] = features
    with contextlib.suppress(OSError):
        info["mem_total_gib"] = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    return info


def print_table(rows: list[Row]) -> None:
    say("\n| size | policy | sleep s | wake s | GB/s sleep/wake | restore->1st token s | "
        "image GB | GPU MiB before/asleep/woken | same answer | same weights | limit |")
    say("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = "yes" if r.same_answer else "NO" if r.same_answer is False else "-"
        weights = "yes" if r.same_weights else "NO" if r.same_weights is False else "-"
        size = f"{r.size_mb // 1024} GiB" if r.size_mb >= 1024 else f"{r.size_mb} MiB"
        say(f"| {size} | {r.policy} | {r.sleep_secs:.2f} | {r.wake_secs:.2f}"
            f" | {r.sleep_gbps:.1f}/{r.wake_gbps:.1f} | {r.first_token_secs:.2f} | "
            f"{r.image_bytes / GB:.2f} | {r.mib_before}/{r.mib_asleep}/{r.mib_woken} | {same} | "
            f"{weights} | {r.limit or r.error or '-'} |")


# --------------------------------------------------------------------------- main
def bench_size(args: argparse.Namespace, size: int, workdir: Path, criu: str,
               limits: dict[str, float], rows: list[Row]) -> None:
    """Every policy with one reader loading the weights (vLLM's default loader); then, with
    ``--load-threads N``, the cold start and discard+checkpoint again with N readers."""
    policies = set(args.policies.split(","))
    checksum = bench_engine(args, size, workdir, criu, limits, rows, policies, 1)
    if args.load_threads > 1 and policies & {"discard+checkpoint"}:
        bench_engine(args, size, workdir, criu, limits, rows, {"discard+checkpoint"},
                     args.load_threads, checksum)


def bench_engine(args: argparse.Namespace, size: int, workdir: Path, criu: str,
                 limits: dict[str, float], rows: list[Row], policies: set[str],
                 readers: int, expected_checksum: int | None = None) -> int:
    """One engine through ``policies``; its weights' checksum at start (which must equal
    ``expected_checksum``: the same file, however many readers loaded it)."""
    gpu = args.device == "cuda"
    label = f" ({readers} readers)" if readers > 1 else ""
    say(f"\n== {size} MiB of weights{label}")
    t = time.perf_counter()
    engine = start_engine(size, args.device, workdir, readers=readers)
    try:
        wait_engine(engine)
        cold = time.perf_counter() - t
        first = first_token_secs(engine)
        state = engine.state()
        say(f"cold start {cold:.2f} s (+ first token {first:.3f} s); pids {engine.pids}; "
            f"worker state: cuda_graphs={state.get('cuda_graphs')}, "
            f"distributed={state.get('distributed')}, cumem mapped "
            f"{state.get('cumem_mapped_bytes', 0) / GB:.2f} GB")
        checksum = engine.checksum()
        same = None if expected_checksum is None else checksum == expected_checksum
        rows.append(Row(size, "cold start" + label, wake_secs=cold,
                        first_token_secs=cold + first, mib_woken=gpu_mib(engine, gpu),
                        same_weights=same, note="process start to /health"))
        ctx = Context(gpu, engine, engine.ask(), checksum, None, None, limits, label=label)
        if criu:
            ctx.disk = Service(Path(args.images_dir) / f"state-{size}", criu, gpu)
            if args.prefetch_threads and not label:
                ctx.prefetch_label = f"{args.prefetch_threads} prefetch readers"
                ctx.disk_prefetch = Service(Path(args.images_dir) / f"state-pf-{size}", criu,
                                            gpu, prefetch_threads=args.prefetch_threads)
            if args.compare_prefetch and not label:
                ctx.disk_no_ahead = ctx.disk
            if args.memory_tier:
                ctx.memory = Service(Path(args.images_dir) / f"state-tier-{size}", criu, gpu,
                                     memory_tier=Path(args.memory_dir) / f"tier-{size}")
                if args.compare_zero_pages and not label:
                    ctx.memory_zeros = Service(
                        Path(args.images_dir) / f"state-tierz-{size}", criu, gpu,
                        memory_tier=Path(args.memory_dir) / f"tierz-{size}",
                        drop_zero_pages=False)
        run_cycles(ctx, policies)
        rows.extend(ctx.rows)
        return checksum
    finally:
        demo.kill_tree(demo.process_tree(engine.root) if demo.alive(engine.root) else engine.pids)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2048,8192", help="MiB of weights, comma-separated")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--policies", default="offload+keep_running,retain+cuda_suspend,"
                        "offload+cuda_suspend,retain+checkpoint,offload+checkpoint,"
                        "discard+checkpoint")
    parser.add_argument("--criu", default="", help="criu program (default: .criu/criu, PATH)")
    parser.add_argument("--images-dir", default="/var/tmp/llmux-bench")
    parser.add_argument("--memory-dir", default="/dev/shm/llmux-bench")
    parser.add_argument("--no-memory-tier", dest="memory_tier", action="store_false")
    parser.add_argument("--limits-gb", type=float, default=4.0,
                        help="GB for the copy and disk measurements")
    parser.add_argument("--parallel", type=int, default=0, help="engines for parallel resume")
    parser.add_argument("--parallel-mb", type=int, default=2048)
    parser.add_argument("--prefetch-threads", type=int, default=0,
                        help="also restore offload+checkpoint from disk with this many "
                             "prefetch readers (the lever, against the default: none)")
    parser.add_argument("--load-threads", type=int, default=8,
                        help="also run discard+checkpoint with this many readers loading the "
                             "weights (the lever, against vLLM's default: one)")
    parser.add_argument("--compare-zero-pages", action="store_true",
                        help="also run discard+checkpoint from the memory tier without the "
                             "zero-page pass (the lever, against llmuxd's default: on)")
    parser.add_argument("--compare-prefetch", action="store_true",
                        help="also run discard+checkpoint from the disk without reading the "
                             "weights ahead during the restore (the lever, against the shim's "
                             "default: read ahead)")
    parser.add_argument("--keep-cache", action="store_true",
                        help="never drop the page cache (on a shared machine)")
    parser.add_argument("--out", default=os.environ.get("OUT", ""))
    args = parser.parse_args(argv)
    if args.keep_cache:
        KEEP_CACHE.append(True)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(demo.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    os.umask(0o077)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        OUT.append(open(Path(args.out) / "bench_gpu_restore.log", "w"))  # noqa: SIM115
        # the daemon's library says where a restore's time went (CRIU, then the CUDA restore)
        handler = logging.FileHandler(Path(args.out) / "llmuxd-library.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("llmux").addHandler(handler)
        logging.getLogger("llmux").setLevel(logging.INFO)
    workdir = Path(tempfile.mkdtemp(prefix="llmux-bench-"))
    demo.make_import_root(workdir)
    criu = demo.find_criu(args.criu)
    info = facts(criu)
    say(f"llmux GPU restore bench: {json.dumps(info)}")
    gpu = args.device == "cuda"
    nbytes = int(args.limits_gb * GB)
    limits: dict[str, float] = {}
    if gpu:
        limits |= copy_bandwidth(nbytes)
    limits |= storage_speeds(Path(args.images_dir), nbytes, "disk")
    if args.memory_tier:
        limits |= storage_speeds(Path(args.memory_dir), nbytes, "tmpfs")
    say("limits (GB/s): " + ", ".join(f"{k} {v:.2f}" for k, v in limits.items()))
    rows: list[Row] = []
    extra: list[str] = []
    try:
        for size in [int(s) for s in args.sizes.split(",") if s]:
            try:
                bench_size(args, size, workdir, criu, limits, rows)
            except Exception as exc:
                say(f"ERROR at {size} MiB: {type(exc).__name__}: {exc}")
        if args.parallel and gpu and criu:
            try:
                extra = parallel_resume(args, workdir, Service(
                    Path(args.images_dir) / "state-parallel", criu, gpu), limits)
            except Exception as exc:
                extra = [f"parallel resume failed: {type(exc).__name__}: {exc}"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        for d in (args.images_dir, args.memory_dir):
            shutil.rmtree(d, ignore_errors=True)
    print_table(rows)
    for line in extra:
        say(line)
    say("limits (GB/s): " + ", ".join(f"{k} {v:.2f}" for k, v in limits.items()))
    if args.out:
        (Path(args.out) / "bench_gpu_restore.json").write_text(json.dumps(
            {"facts": info, "limits": limits, "rows": [asdict(r) for r in rows],
             "extra": extra}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
