"""Zero pages taken out of CRIU's images after a dump (zeropages.py), with real CRIU.

The target is a parent and a forked child whose memory is known: private anonymous pages
written with zeros (dropped), data and a mix (the data kept), a private file mapping whose
pages were overwritten with zeros (kept: a missing page there would be the file's), shared
anonymous memory, and a block both inherit from the parent, whose halves each of them then
zeroed: a page the child's image no longer lists must come back zero in the child, not as
the parent's copy. After the restore each process checks every byte and writes its verdict.

The pass runs behind the dump: the checkpoint's job answers first, the pass gives way to
restores and puts its images in place only while no job holds the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from llmux.service.core import criuimages, tiermove, zeropages
from llmux.service.core.claims import Claims
from llmux.service.core.engine import Caller, CheckpointEngine
from llmux.service.core.store import image_sizes
from tests.service.core.conftest import OpenEngine
from tests.support.criu_testlib import reaping
from tests.support.procs import wait_until_async

pytestmark = pytest.mark.criu

ME = Caller(pid=os.getpid(), uid=0)
MiB = 1 << 20

TARGET = r"""
import mmap, os, signal, sys, time
work = sys.argv[1]
MiB, PAGE = 1 << 20, 4096
zeros = mmap.mmap(-1, 16 * MiB, flags=mmap.MAP_PRIVATE)
for o in range(0, len(zeros), PAGE):
    zeros[o] = 0                                  # present, all zeros
data = mmap.mmap(-1, 8 * MiB, flags=mmap.MAP_PRIVATE)
data.write(b"\xab" * len(data))
mixed = mmap.mmap(-1, 4 * MiB, flags=mmap.MAP_PRIVATE)
for o in range(0, len(mixed), PAGE):
    mixed[o:o + PAGE] = (b"\x5a" if (o // PAGE) % 2 else b"\0") * PAGE
with open(os.path.join(work, "file.bin"), "rb") as f:
    fmap = mmap.mmap(f.fileno(), 4 * MiB, flags=mmap.MAP_PRIVATE,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
fmap[:] = bytes(4 * MiB)                          # zeros over the file's 0x77
shared = mmap.mmap(-1, 4 * MiB)
shared[:] = bytes(4 * MiB)
inherited = mmap.mmap(-1, 8 * MiB, flags=mmap.MAP_PRIVATE)
inherited.write(b"\xcd" * len(inherited))
half = 4 * MiB
child = os.fork()
role = "child" if child == 0 else "parent"
if child == 0:
    inherited[:half] = bytes(half)                # the child zeroes the first half
else:
    inherited[half:] = bytes(half)                # the parent the second

def check():
    want = {
        "zeros": (zeros, bytes(16 * MiB)),
        "data": (data, b"\xab" * (8 * MiB)),
        "mixed": (mixed, b"".join((b"\x5a" if i % 2 else b"\0") * PAGE
                                  for i in range(4 * MiB // PAGE))),
        "file mapping": (fmap, bytes(4 * MiB)),
        "shared": (shared, bytes(4 * MiB)),
        "inherited": (inherited, (bytes(half) + b"\xcd" * half) if role == "child"
                      else (b"\xcd" * half + bytes(half))),
    }
    bad = [name for name, (m, expect) in want.items() if m[:] != expect]
    return "ok" if not bad else "differs: " + ", ".join(bad)

def verify(_sig, _frame):
    path = os.path.join(work, "verdict-" + role)
    with open(path + ".tmp", "w") as f:
        f.write(check())
    os.rename(path + ".tmp", path)

signal.signal(signal.SIGUSR1, verify)
open(os.path.join(work, "ready-" + role), "w").write(str(os.getpid()))
while True:
    time.sleep(0.2)
"""


async def _start(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    (work / "file.bin").write_bytes(b"\x77" * (4 * MiB))
    proc = subprocess.Popen([sys.executable, "-c", TARGET, str(work)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    await wait_until_async(lambda: all((work / f"ready-{r}").exists()
                                       for r in ("parent", "child")) or proc.poll() is not None,
                           30, "the target to be ready")
    assert proc.poll() is None, "the target died"
    return proc, int((work / "ready-child").read_text())


async def _verdicts(work: Path, pids: list[int]) -> dict[str, str]:
    for role in ("parent", "child"):
        (work / f"verdict-{role}").unlink(missing_ok=True)
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)
    await wait_until_async(lambda: all((work / f"verdict-{r}").exists()
                                       for r in ("parent", "child")), 30, "the verdicts")
    return {r: (work / f"verdict-{r}").read_text() for r in ("parent", "child")}


@pytest.fixture
async def target(tmp_path: Path) -> AsyncIterator[tuple[Path, subprocess.Popen[bytes], int]]:
    work = tmp_path / "work"
    work.mkdir()
    proc, child = await _start(work)
    async with reaping(lambda: [proc.pid, child]):
        yield work, proc, child
        for pid in (proc.pid, child):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.2)


@pytest.fixture
async def engine(open_engine: OpenEngine) -> CheckpointEngine:
    return await open_engine(drop_zero_pages=True)


async def test_zero_pages_leave_the_images_and_come_back_as_zeros(
        engine: CheckpointEngine,
        target: tuple[Path, subprocess.Popen[bytes], int]) -> None:
    work, proc, child = target
    assert await _verdicts(work, [proc.pid, child]) == {"parent": "ok", "child": "ok"}

    await engine.checkpoint(ME, "zeros", proc.pid)
    await engine.mover.wait()
    m = engine.store.get("zeros")
    # each process: 16 MiB + 2 MiB of mix + its zeroed half, and the inherited zeros the
    # child shares with the parent; never the file mapping's or the shared memory's pages
    assert m.zero_bytes_dropped >= 2 * (16 + 2 + 4) * MiB, m.zero_bytes_dropped
    assert m.zero_bytes_dropped < 2 * (16 + 2 + 4 + 4) * MiB, m.zero_bytes_dropped
    images = engine.store.images_dir("zeros")
    assert not list(images.glob(f"*{zeropages.SUFFIX}"))
    assert not (images / zeropages.MARKER).exists()
    for pid in (proc.pid, child):
        plain_zeros, other_zeros = _stored_zero_pages(images, pid)
        assert plain_zeros == 0, f"PID {pid}: zero pages of anonymous memory still stored"
        assert other_zeros >= 4 * MiB, "the file mapping's zeros must stay"

    await wait_until_async(lambda: proc.poll() is not None, 30, "the dumped tree to end")
    restored = await engine.restore(ME, "zeros")
    assert restored.root_pid == proc.pid
    assert await _verdicts(work, [proc.pid, child]) == {"parent": "ok", "child": "ok"}


async def test_without_it_every_page_stays(
        open_engine: OpenEngine, tmp_path: Path,
        target: tuple[Path, subprocess.Popen[bytes], int]) -> None:
    _work, proc, child = target
    engine = await open_engine(state_dir=tmp_path / "state-kept", memory_tier_limit_bytes=0,
                               drop_zero_pages=False)
    await engine.checkpoint(ME, "kept", proc.pid, leave_running=True)
    await engine.mover.wait()
    assert engine.store.get("kept").zero_bytes_dropped == 0
    plain_zeros, _ = _stored_zero_pages(engine.store.images_dir("kept"), child)
    assert plain_zeros >= (16 + 2 + 4) * MiB


def _stored_zero_pages(images: Path, pid: int) -> tuple[int, int]:
    """Bytes of all-zero pages the process's images store: in plain private anonymous
    memory, and elsewhere."""
    plain = zeropages._Plain(criuimages.read_vmas(images, pid))
    pagemap = criuimages.read_pagemap(images / f"pagemap-{pid}.img")
    found = [0, 0]
    with open(images / f"pages-{pagemap.pages_id}.img", "rb") as pages:
        for e in pagemap.entries:
            for i in range(e.nr_pages):
                if pages.read(criuimages.PAGE) == bytes(criuimages.PAGE):
                    found[0 if e.vaddr + i * criuimages.PAGE in plain else 1] += 1
    return found[0] * criuimages.PAGE, found[1] * criuimages.PAGE


async def test_the_pass_waits_for_restores_and_for_a_job_holding_the_model(
        engine: CheckpointEngine,
        target: tuple[Path, subprocess.Popen[bytes], int]) -> None:
    work, proc, child = target
    with engine.claims.restoring():  # a restore of another model runs: the pass gives way
        await engine.checkpoint(ME, "zeros", proc.pid)
        before = dict(engine.store.get("zeros").image_sizes)
        await asyncio.sleep(1.0)
        images = engine.store.images_dir("zeros")
        assert not list(images.glob(f"*{zeropages.SUFFIX}")), "the pass did not give way"
        assert engine.store.get("zeros").image_sizes == before == image_sizes(images)
    release = engine.claims.claim("zeros")  # a job holds the model: the pass may not swap
    try:
        await wait_until_async(
            lambda: len(list(images.glob(f"pagemap-*.img{zeropages.SUFFIX}"))) == 2,
            30 + 2 * tiermove.AFTER_RESTORE_SECS, "the pass to write its new images")
        await asyncio.sleep(0.5)
        assert engine.store.get("zeros").image_sizes == before
        assert image_sizes(images) == before
        assert not (images / zeropages.MARKER).exists()
    finally:
        release()
    await engine.mover.wait()
    m = engine.store.get("zeros")
    assert m.zero_bytes_dropped >= 2 * (16 + 2 + 4) * MiB
    assert m.image_sizes != before and sum(m.image_sizes.values()) < sum(before.values())
    assert not list(images.glob(f"*{zeropages.SUFFIX}*"))

    await wait_until_async(lambda: proc.poll() is not None, 30, "the dumped tree to end")
    await engine.restore(ME, "zeros")
    assert await _verdicts(work, [proc.pid, child]) == {"parent": "ok", "child": "ok"}


async def test_a_job_asked_for_during_the_pass_s_renames_waits_for_them() -> None:
    """Background work never refuses the operator's: a restore asked for while a pass
    holds the model for its renames runs after them, not Busy."""
    claims = Claims()
    release = claims.claim("m")  # a job holds the model: the moment waits for it
    entered, leave = asyncio.Event(), asyncio.Event()

    async def renames() -> None:
        async with claims.moment("m"):
            entered.set()
            await leave.wait()

    moment = asyncio.create_task(renames())
    await asyncio.sleep(0.05)
    assert not entered.is_set(), "the moment began while a job held the model"
    release()
    await asyncio.wait_for(entered.wait(), 5)

    async def checks() -> Callable[[object], Awaitable[str]]:
        async def body(_progress: object) -> str:
            return "ran"
        return body

    job = asyncio.create_task(claims.prepare("m", None, checks))
    await asyncio.sleep(0.05)
    assert not job.done(), "the job did not wait for the moment"
    leave.set()
    prepared = await asyncio.wait_for(job, 5)
    assert await prepared.run() == "ran"
    await moment
    assert "m" not in claims.models


async def test_no_pass_without_room_for_its_new_images_beside_the_old(
        engine: CheckpointEngine, target: tuple[Path, subprocess.Popen[bytes], int],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _work, proc, _child = target
    caplog.set_level(logging.INFO, logger="llmux")
    monkeypatch.setattr(zeropages, "room_needed", lambda images: 1 << 60)
    await engine.checkpoint(ME, "zeros", proc.pid, leave_running=True)
    await engine.mover.wait()
    assert engine.store.get("zeros").zero_bytes_dropped == 0
    assert any("keeps its zero pages: the pass needs up to" in r.getMessage()
               for r in caplog.records)


async def test_a_pass_cut_short_by_a_crash_is_finished_at_start_up(
        open_engine: OpenEngine,
        target: tuple[Path, subprocess.Popen[bytes], int]) -> None:
    work, proc, child = target
    engine = await open_engine(memory_tier_limit_bytes=0, drop_zero_pages=False)
    await engine.checkpoint(ME, "zeros", proc.pid)
    images = engine.store.images_dir("zeros")
    before = dict(engine.store.get("zeros").image_sizes)
    # what a service that died in the middle of the renames leaves
    assert zeropages.prepare(images).bytes >= 2 * (16 + 2 + 4) * MiB
    (images / zeropages.MARKER).touch()
    first = sorted(images.glob(f"*{zeropages.SUFFIX}"))[0]
    first.replace(first.with_name(first.name.removesuffix(zeropages.SUFFIX)))

    again = await open_engine(memory_tier_limit_bytes=0, drop_zero_pages=False)
    m = again.store.get("zeros")
    assert not (images / zeropages.MARKER).exists()
    assert not list(images.glob(f"*{zeropages.SUFFIX}*"))
    assert m.image_sizes != before
    assert image_sizes(images) == m.image_sizes
    assert m.zero_bytes_dropped >= 2 * (16 + 2 + 4) * MiB

    await wait_until_async(lambda: proc.poll() is not None, 30, "the dumped tree to end")
    await again.restore(ME, "zeros")
    assert await _verdicts(work, [proc.pid, child]) == {"parent": "ok", "child": "ok"}


def test_an_interrupted_pass_is_finished_or_undone(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "pages-1.img").write_bytes(b"old pages")
    (images / "pagemap-7.img").write_bytes(b"old map")
    (images / "pages-1.img.zp").write_bytes(b"new pages")
    (images / "pagemap-7.img.zp").write_bytes(b"new map")
    assert not zeropages.recover(images)  # no marker: the new files were not all written
    assert sorted(p.name for p in images.iterdir()) == ["pagemap-7.img", "pages-1.img"]
    assert (images / "pages-1.img").read_bytes() == b"old pages"

    (images / "pages-1.img.zp").write_bytes(b"new pages")
    (images / "pagemap-7.img.zp").write_bytes(b"new map")
    (images / zeropages.MARKER).touch()
    os.replace(images / "pages-1.img.zp", images / "pages-1.img")  # died after one rename
    assert zeropages.recover(images)  # the marker stays until the manifest is written
    zeropages.settle(images)
    assert sorted(p.name for p in images.iterdir()) == ["pagemap-7.img", "pages-1.img"]
    assert (images / "pages-1.img").read_bytes() == b"new pages"
    assert (images / "pagemap-7.img").read_bytes() == b"new map"
