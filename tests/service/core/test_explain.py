"""ExplainCheckpoint's core: a real CRIU checkpoint of a process whose memory is known, read
back page by page (explain.py over criuimages.py).

The target lays out what a model engine has, each of a size that stands out: a large
anonymous block written with zeros, one with data, a private file mapping whose pages
are written back unchanged (equal to the file) but one, a thread with a stack, shared
anonymous memory and a /dev/shm segment. Every stored page must land under its kind,
and every byte of the pages images under some kind.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmux.common.contract import CheckpointBreakdown, MemoryPart
from llmux.common.errors import AccessDenied, InvalidArgument, ManifestMismatch, NotFound
from llmux.service.core import explain
from llmux.service.core.engine import Caller, CheckpointEngine
from tests.service.core.conftest import OpenEngine
from tests.support.procs import wait_until

pytestmark = pytest.mark.criu

ME = Caller(pid=os.getpid(), uid=0)
MiB = 1 << 20

TARGET = r"""
import mmap, os, sys, threading, time
work, shm = sys.argv[1], sys.argv[2]
zeros = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE)
for o in range(0, len(zeros), 4096):
    zeros[o] = 0                      # present, all zeros
data = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE)
data.write(b"\xab" * len(data))
with open(os.path.join(work, "weights.bin"), "rb") as f:
    private = mmap.mmap(f.fileno(), 1 << 20, flags=mmap.MAP_PRIVATE,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE)
for o in range(0, len(private), 4096):
    private[o] = private[o]           # copied on write, equal to the file
private[4096 * 3] = (private[4096 * 3] + 1) % 256   # this one differs
shared = mmap.mmap(-1, 4 << 20)       # MAP_SHARED anonymous: CRIU stores it once
shared.write(os.urandom(4 << 20))
fd = os.open(shm, os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, 4 << 20)
segment = mmap.mmap(fd, 4 << 20)      # like vLLM's rings: mostly never written
segment[(1 << 20) + 5:(1 << 20) + 105] = b"r" * 100
def spin():
    buf = bytearray(64 << 10)         # on the heap; the thread's stack is touched
    while True:
        time.sleep(1)
threading.Thread(target=spin, daemon=True).start()
open(os.path.join(work, "ready"), "w").write(str(os.getpid()))
while True:
    time.sleep(1)
"""


@pytest.fixture
async def engine(open_engine: OpenEngine) -> CheckpointEngine:
    """The zero pages kept in the images (drop_zero_pages off): what explain counts."""
    return await open_engine(drop_zero_pages=False)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    (tmp_path / "weights.bin").write_bytes(bytes(range(256)) * (4 * 1024))
    shm = Path(f"/dev/shm/llmux-explain-{os.getpid()}")
    proc = subprocess.Popen([sys.executable, "-c", TARGET, str(tmp_path), str(shm)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: (tmp_path / "ready").exists() or proc.poll() is not None, 30,
                   "the target to be ready")
        assert proc.poll() is None, "the target died"
        yield proc.pid, shm
    finally:
        proc.kill()
        proc.wait(10)
        shm.unlink(missing_ok=True)


def _part(parts: list[MemoryPart], kind: str) -> MemoryPart:
    found = [p for p in parts if p.kind == kind]
    assert found, f"no {kind!r} in {[p.kind for p in parts]}"
    return found[0]


async def test_every_stored_byte_is_sorted_by_kind(
    engine: CheckpointEngine, target: tuple[int, Path], tmp_path: Path
) -> None:
    pid, _shm = target
    m = await engine.checkpoint(ME, "explained", pid, leave_running=True)
    b = await engine.explain_checkpoint(ME, "explained")

    assert b.model == "explained" and [p.pid for p in b.processes] == [pid]
    assert b.processes[0].comm.startswith("python")
    images = engine.store.images_dir("explained")
    pages = sum(p.stat().st_size for p in images.glob("pages-*.img"))
    assert sum(p.stored_bytes for p in b.totals()) == pages, "a stored byte unaccounted"
    assert b.images_bytes == m.images_bytes
    assert b.other_images_bytes == m.images_bytes - pages
    parts = b.processes[0].parts

    large = _part(parts, explain.LARGE)
    assert large.stored_bytes >= 24 * MiB
    assert 16 * MiB <= large.zero_bytes < 17 * MiB, "the zeros, not the 0xab block"
    assert large.file_equal_bytes == 0
    # every page of the 0xab block is the same page: all but its first are duplicates
    assert 8 * MiB - 4096 <= large.duplicate_bytes < 9 * MiB

    files = _part(parts, explain.OTHER_FILES)
    assert files.stored_bytes >= MiB
    assert files.file_equal_bytes == MiB - 4096, "every written page but the changed one"

    assert _part(parts, explain.THREAD_STACKS).stored_bytes > 0
    assert _part(parts, explain.HEAP).stored_bytes > 0
    assert _part(parts, explain.LIBRARIES).mappings > 0
    assert _part(parts, explain.SHARED_FILES).stored_bytes == 0  # /dev/shm is saved aside

    [shared] = b.shared  # CRIU 4.2 dumps it as a memfd named /dev/zero
    assert shared.kind == explain.SHARED_ANON and shared.mappings == 1
    assert shared.stored_bytes == 4 * MiB and shared.duplicate_bytes == 0
    assert not [p for p in parts if p.kind in (explain.SHARED_ANON, explain.MEMFD)
                and p.stored_bytes], "stored once, not per process"

    [segment] = b.files
    assert segment.kind == "/dev/shm segments"
    assert segment.mapped_bytes == 4 * MiB
    # the copy holds the one MiB with data; the rest are holes, neither stored nor zeros
    assert MiB <= segment.stored_bytes < MiB + 64 * 1024
    assert segment.zero_bytes == MiB - 4096
    assert m.files_bytes == segment.stored_bytes
    assert m.size_bytes == m.images_bytes + m.files_bytes

    # the mapped file replaced by a FIFO: not compared, and the read does not hang
    weights = tmp_path / "weights.bin"
    weights.unlink()
    os.mkfifo(weights)
    fifo = await asyncio.wait_for(engine.explain_checkpoint(ME, "explained"), 60)
    assert _part(fifo.processes[0].parts, explain.OTHER_FILES).file_equal_bytes == 0
    assert fifo.totals()[0].stored_bytes == b.totals()[0].stored_bytes

    # the answer is what the bus carries, and back
    again = CheckpointBreakdown.from_json(b.to_json())
    assert again == b
    assert json.loads(b.to_json())["processes"][0]["pid"] == pid


async def test_explain_refuses_with_named_errors(
    engine: CheckpointEngine, target: tuple[int, Path]
) -> None:
    pid, _shm = target
    with pytest.raises(InvalidArgument):
        await engine.explain_checkpoint(ME, "../etc")
    with pytest.raises(NotFound):
        await engine.explain_checkpoint(ME, "nothing")
    await engine.checkpoint(ME, "mine", pid, leave_running=True)
    with pytest.raises(AccessDenied):
        await engine.explain_checkpoint(Caller(pid=os.getpid(), uid=4242), "mine")
    images = engine.store.images_dir("mine")
    [pagemap] = images.glob(f"pagemap-{pid}.img")
    pagemap.write_bytes(pagemap.read_bytes()[:-3])  # truncated: refused, not misread
    with pytest.raises(ManifestMismatch, match="pagemap"):
        await engine.explain_checkpoint(ME, "mine")
