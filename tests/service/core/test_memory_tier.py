"""The memory tier: images in tmpfs within a limit, restored from there, moved to disk."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from llmux.common import proctree
from llmux.common.errors import InvalidArgument
from llmux.service.core.authz import Caller
from llmux.service.core.engine import CheckpointEngine, EngineConfig
from llmux.service.core.manifest import Manifest
from llmux.service.core.store import CheckpointStore
from tests.support.criu_testlib import TargetFactory
from tests.support.procs import wait_until_async

pytestmark = pytest.mark.criu
ME = Caller(pid=os.getpid(), uid=os.getuid())
MIB = 1 << 20


def _fake_dump(store: CheckpointStore, model: str, expected: int, payload: bytes) -> Path:
    """A staging folder with one image file, committed like a dump."""
    staging = store.begin(model, expected)
    (staging.images / "pages-1.img").write_bytes(payload)
    manifest = Manifest(model=model, owner="root", owner_uid=0, root_pid=1, pids=[1], tids=[1],
                        cuda_pids=[], criu_version="4.2.1", kernel_release=os.uname().release,
                        driver_version="", created=time.time(), images_bytes=len(payload))
    return store.commit(staging, manifest)


def test_a_dump_that_fits_goes_to_memory_then_to_disk(tmp_path: Path) -> None:
    tier = tmp_path / "tier"
    store = CheckpointStore(tmp_path / "state", tier, 64 * MIB)
    store.prepare()
    final = _fake_dump(store, "m", MIB, b"x" * MIB)
    assert store.in_memory("m")
    images = store.images_dir("m")
    assert images.is_symlink() and Path(os.readlink(images)).is_relative_to(tier)
    assert (images / "pages-1.img").read_bytes() == b"x" * MIB
    assert oct(tier.stat().st_mode & 0o777) == "0o700"

    moved = store.copy_to_disk("m")
    assert moved is not None
    assert store.finish_move("m", *moved)
    store.drop_memory_copy(moved[0])
    assert not store.in_memory("m") and images.is_dir() and not images.is_symlink()
    assert (final / "images" / "pages-1.img").read_bytes() == b"x" * MIB
    assert list(tier.iterdir()) == []


def test_the_move_gives_way_before_every_chunk(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy to disk calls pause() before each chunk (where a move waits while a restore
    runs), and the copy is byte for byte, the chunks' seams included."""
    from llmux.service.core import store as store_module

    monkeypatch.setattr(store_module, "_COPY_CHUNK", 256 * 1024)
    store = CheckpointStore(tmp_path / "state", tmp_path / "tier", 64 * MIB)
    store.prepare()
    payload = os.urandom(MIB + 12345)
    _fake_dump(store, "m", len(payload), payload)
    calls: list[float] = []
    moved = store.copy_to_disk("m", lambda: calls.append(time.monotonic()))
    assert moved is not None
    assert len(calls) == 5  # ceil((1 MiB + 12345) / 256 KiB)
    assert (moved[1] / "pages-1.img").read_bytes() == payload


def test_over_the_limit_or_off_the_images_stay_on_disk(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "state", tmp_path / "tier", 2 * MIB)
    store.prepare()
    _fake_dump(store, "small", MIB, b"s" * MIB)
    _fake_dump(store, "big", 2 * MIB, b"b" * 2 * MIB)  # 1 MiB used + 2 MiB > 2 MiB
    assert store.in_memory("small") and not store.in_memory("big")
    off = CheckpointStore(tmp_path / "state2", tmp_path / "tier2", 0)
    off.prepare()
    _fake_dump(off, "m", MIB, b"o")
    assert not off.in_memory("m") and not (tmp_path / "tier2").exists()


def test_delete_replace_and_a_lost_tier(tmp_path: Path) -> None:
    tier = tmp_path / "tier"
    store = CheckpointStore(tmp_path / "state", tier, 64 * MIB)
    store.prepare()
    _fake_dump(store, "a", MIB, b"1")
    first = Path(os.readlink(store.images_dir("a"))).parent
    _fake_dump(store, "a", MIB, b"2")  # the replaced checkpoint's tier folder goes too
    assert not first.exists() and len(list(tier.iterdir())) == 1
    store.delete("a")
    assert list(tier.iterdir()) == []

    _fake_dump(store, "b", MIB, b"3")
    for folder in tier.iterdir():  # as a reboot would leave it
        for f in folder.rglob("*"):
            if f.is_file():
                f.unlink()
        for d in sorted(folder.rglob("*"), reverse=True):
            d.rmdir()
        folder.rmdir()
    (tier / "stray").mkdir()
    again = CheckpointStore(tmp_path / "state", tier, 64 * MIB)
    cleaned = again.prepare()
    assert not again.has("b") and any("images in memory lost" in c for c in cleaned)
    assert not (tier / "stray").exists()


async def test_checkpoint_restores_from_memory_and_moves_to_disk(
    criu_path: str, tmp_path: Path, spawn_target: TargetFactory
) -> None:
    tier = tmp_path / "tier"
    engine = await CheckpointEngine.open(EngineConfig(
        state_dir=tmp_path / "state", criu_path=criu_path, cuda_mode="off",
        memory_tier_dir=tier, memory_tier_limit_bytes=1 << 30))
    t = await spawn_target()
    before = await t.ping()
    m = await engine.checkpoint(ME, "tiered", t.pid)
    assert m.images_bytes > 0
    # restore while the images may still be in memory: the same process comes back
    await wait_until_async(lambda: not proctree.taken(t.pids), 30,
                           f"the dumped tree {t.pids} to be gone")
    await engine.restore(ME, "tiered")
    after = await t.ping()  # the same processes, their state (a ping counter) kept
    assert after[:3] == before[:3] and int(after[3]) == int(before[3]) + 1
    await engine.wait_moves()
    assert not engine.store.in_memory("tiered")
    # a move waits while a restore runs: restores are latency, moves background work
    await engine.checkpoint(ME, "tiered", t.pid)
    await wait_until_async(lambda: not proctree.taken(t.pids), 30,
                           f"the dumped tree {t.pids} to be gone")
    engine._no_restores.clear()  # as a restore of another model does
    try:
        await asyncio.sleep(1.0)
        assert engine.store.in_memory("tiered"), "the move ran during a restore"
    finally:
        engine._no_restores.set()
    await engine.wait_moves()
    assert not engine.store.in_memory("tiered")
    await engine.restore(ME, "tiered")
    assert int((await t.ping())[3]) == int(before[3]) + 2
    assert list(tier.iterdir()) == []
    assert (engine.store.images_dir("tiered") / "inventory.img").is_file()
    with pytest.raises(InvalidArgument, match="memory_tier_dir"):
        await CheckpointEngine.open(EngineConfig(
            state_dir=tmp_path / "s2", criu_path=criu_path, cuda_mode="off",
            memory_tier_dir=None, memory_tier_limit_bytes=1 << 30))
