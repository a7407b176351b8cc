#!/usr/bin/env python3
"""Checkpoints through the remote store: upload and download rates beside the local
disk's, and the wake of a model on another host from the store beside a local restore.

Run as root, from the repository root: ``.venv/bin/python -m tests.bench.bench_remote
[--stores s3,file] [--weights-mb 256]``.

The set-up of tests/e2e/test_remote_two_hosts.py (tests/support/twohosts.py): two hosts on
one machine, each with its own bus, llmuxd and shim container (on a network of its own),
sharing only the store (a moto S3 server on loopback, or a folder). The built-in engine
serves qwen3-0.6b with ``weights_mb`` of weights kept through the checkpoint (eviction
retain + checkpoint), so that the checkpoint carries them.

1. the local disk: a file of the checkpoint's size written (fsync) and read back (its
   pages dropped first) in the state directory's filesystem;
2. host A: cold start; sleep (dump; llmuxd uploads in the background: its log gives the
   upload's size and time); wake from the local copy, timed from the request to the first
   token (max_tokens=1), CRIU's restore from llmuxd's log; sleep again, uploaded; A stops;
3. host B (never saw the model): the first request wakes it from the store, timed the same
   way; llmuxd's log gives the download's and the restore's times.

The target: B's wake at most 1.2x (download + A's local wake). Moto keeps objects in
memory and runs on the same 2 cores: its rates are this machine's, not a real store's.
A benchmark that prints numbers, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.podman_shim import MODEL, Reaper, prepare_rootfs
from tests.support.s3server import MotoServer
from tests.support.twohosts import host, remote_toml

MB = 1 << 20
BUCKET = "llmux-bench"

_UPLOADED = re.compile(r"uploaded checkpoint \S+ to \S+: (\d+) MiB in ([\d.]+)s")
_DOWNLOADED = re.compile(r"downloaded checkpoint \S+ from \S+: (\d+) MiB in ([\d.]+)s")
_RESTORED = re.compile(r"restored \S+ \(PIDs [^)]*\) in ([\d.]+)s")


@dataclass
class Row:
    store: str
    size_mib: int
    disk_write_mibs: float
    disk_read_mibs: float
    upload_mibs: float
    download_mibs: float
    download_s: float
    local_wake_s: float
    local_criu_s: float
    remote_wake_s: float
    remote_criu_s: float

    @property
    def ratio(self) -> float:
        return self.remote_wake_s / max(self.download_s + self.local_wake_s, 1e-6)


def disk_rates(directory: Path, size: int) -> tuple[float, float]:
    """MiB/s written (fsync included) and read back (its pages dropped first)."""
    path = directory / "bench-disk.tmp"
    block = os.urandom(8 * MB)
    t = time.monotonic()
    with open(path, "wb") as f:
        for _ in range(max(1, size // len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        written = f.tell()
    write = written / MB / (time.monotonic() - t)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t = time.monotonic()
        while os.read(fd, 8 * MB):
            pass
        read = written / MB / (time.monotonic() - t)
    finally:
        os.close(fd)
        path.unlink()
    return write, read


def last(pattern: re.Pattern[str], log: str) -> tuple[str, ...]:
    found = pattern.findall(log)
    if not found:
        raise RuntimeError(f"no {pattern.pattern!r} in llmuxd's log:\n{log[-3000:]}")
    return tuple(found[-1]) if isinstance(found[-1], tuple) else (found[-1],)


def timed_first_token(shim: object) -> float:
    t = time.monotonic()
    shim.first_token()  # type: ignore[attr-defined]
    return time.monotonic() - t


def run_one(kind: str, weights_mb: int, rootfs: str, workdir: Path) -> Row:
    moto = None
    if kind == "s3":
        moto = MotoServer().start()
        moto.bucket(BUCKET)
        creds = moto.credentials_file(workdir / "aws-credentials")
        config = remote_toml(f"s3://{BUCKET}/bench", moto.endpoint, str(creds))
    else:
        (workdir / "store").mkdir()
        config = remote_toml(f"file://{workdir / 'store'}")
    model = {"model_path": "Qwen/Qwen3-0.6B", "engine": "builtin", "weights_mb": weights_mb,
             "eviction": {"weights": "retain", "process": "checkpoint"},
             "startup_timeout_secs": 300}
    try:
        with Reaper() as reaper:
            with host("a", workdir / "host-a", rootfs, config, model=model) as a:
                shim = a.shims.start("a")
                shim.first_token()
                reaper.watch(list(shim.model_status()["pids"]))
                shim.control("sleep")
                a.wait_location("both", timeout=600)
                size_mib, up_s = (float(x) for x in last(_UPLOADED, a.daemon.log()))
                disk_w, disk_r = disk_rates(a.daemon.state_dir, int(size_mib) * MB)
                local_wake = timed_first_token(shim)
                local_criu = float(last(_RESTORED, a.daemon.log())[0])
                shim.control("sleep")
                a.wait_location("both", timeout=600)
                time.sleep(0.5)
                engine_port = a.shims.engine_port
                shim.stop()
            shutil.copytree(workdir / "host-a" / "shared" / "hf",
                            workdir / "host-b" / "shared" / "hf")
            with host("b", workdir / "host-b", rootfs, config, engine_port=engine_port,
                      model=model) as b:
                shim = b.shims.start("b")
                remote_wake = timed_first_token(shim)
                status = shim.model_status()
                reaper.watch(list(status["pids"]))
                if status["last_wake"] != "restore":
                    raise RuntimeError(f"host B did not restore: {status}")
                down_mib, down_s = (float(x) for x in last(_DOWNLOADED, b.daemon.log()))
                remote_criu = float(last(_RESTORED, b.daemon.log())[0])
                shim.stop()
    finally:
        if moto is not None:
            moto.kill()
    return Row(kind, int(size_mib), disk_w, disk_r, size_mib / max(up_s, 1e-6),
               down_mib / max(down_s, 1e-6), down_s, local_wake, local_criu, remote_wake,
               remote_criu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", default="s3,file")
    parser.add_argument("--weights-mb", type=int, default=256)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("run as root (llmuxd, CRIU, podman)", file=sys.stderr)
        return 2
    rootfs = prepare_rootfs()
    rows = []
    for kind in args.stores.split(","):
        with tempfile.TemporaryDirectory(prefix=f"llmux-bench-remote-{kind}-") as tmp:
            rows.append(run_one(kind, args.weights_mb, rootfs, Path(tmp)))
    print(f"\nremote store, built-in engine {MODEL}, weights {args.weights_mb} MiB kept "
          "through the checkpoint\n")
    header = ("store", "ckpt MiB", "disk w MiB/s", "disk r MiB/s", "upload MiB/s",
              "download MiB/s", "download s", "local wake s (criu)",
              "B wake from store s (criu)", "B / (download + local)")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows:
        print(" | ".join([
            r.store, str(r.size_mib), f"{r.disk_write_mibs:.0f}", f"{r.disk_read_mibs:.0f}",
            f"{r.upload_mibs:.0f}", f"{r.download_mibs:.0f}", f"{r.download_s:.2f}",
            f"{r.local_wake_s:.2f} ({r.local_criu_s:.2f})",
            f"{r.remote_wake_s:.2f} ({r.remote_criu_s:.2f})", f"{r.ratio:.2f}x"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
