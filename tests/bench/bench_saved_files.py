#!/usr/bin/env python3
"""What a restore spends on the files saved beside the images: a vLLM-sized /dev/shm segment.

Run as root, from the repository root: ``.venv/bin/python -m tests.bench.bench_saved_files
[--mb 400] [--repeat 5]``.

Real vLLM (CPU) leaves two /dev/shm segments of 400 MiB in all, 100% zero pages
(``llmux checkpoints --explain``). The dump saves them sparse; before CRIU runs, the
restore verifies each copy's checksum (upperfiles.verify) and writes it back
(upperfiles.put_back). This prints, side by side in one run, the verify of a plain
SHA-256 of the whole file (what earlier checkpoints record) and of zerodigest's checksum
that skips the zeros (what a dump records now), and the put-back reading every byte (as
before) and only the data extents (now), each from a dropped page cache, the median of
``--repeat`` runs. A benchmark that prints numbers: nothing asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from llmux.service.core import upperfiles
from tests.support import procs as testprocs

MB = 1 << 20


def read_all_copy(src: Path, dst: Path) -> None:
    """The put-back before it skipped holes: every byte read, zero chunks left as holes."""
    with src.open("rb") as fin, dst.open("wb") as fout:
        upperfiles._sparse_copy(fin, fout)


def timed(what: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        testprocs.drop_caches()
        t = time.perf_counter()
        what()
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--mb", type=int, default=400, help="segment size (MiB)")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="llmux-bench-saved-", dir="/var/tmp") as tmp, \
            tempfile.TemporaryDirectory(prefix="llmux-bench-saved-", dir="/dev/shm") as shm:
        segment = Path(shm) / "psm_bench"
        with open(segment, "wb") as f:  # as vLLM's: a few written pages, the rest zeros
            f.truncate(args.mb * MB)
            f.write(b"\x01" * 4096)
        files = Path(tmp) / "files"
        files.mkdir()
        [saved] = upperfiles.save([str(segment)], Path("/"), files, reason="dev-shm")
        plain = replace(saved, sha256=hashlib.sha256(segment.read_bytes()).hexdigest())
        target = Path(tmp) / "target"
        target.mkdir()
        rows = [
            ("verify, SHA-256 of the whole file", timed(
                lambda: upperfiles.verify([plain], files), args.repeat)),
            ("verify, zero-skipping checksum", timed(
                lambda: upperfiles.verify([saved], files), args.repeat)),
            ("put back, reading every byte", timed(
                lambda: read_all_copy(files / saved.stored, target / "all"), args.repeat)),
            ("put back, data extents only", timed(
                lambda: upperfiles.put_back([replace(saved, path="/seg")], files, target),
                args.repeat)),
        ]
    print(f"\n/dev/shm segment of {args.mb} MiB (4 KiB written), page cache dropped before "
          f"each, {args.repeat} runs")
    for name, times in rows:
        print(f"  {name:<36} median {statistics.median(times):.3f} s  "
              f"(min {min(times):.3f}, max {max(times):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
