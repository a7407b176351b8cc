"""The memory tier: images in tmpfs within a limit, restored from there, moved to disk."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmux.common import proctree
from llmux.common.errors import InvalidArgument
from llmux.service.core import dump, memtier, tiermove
from llmux.service.core.authz import Caller
from llmux.service.core.engine import CheckpointEngine, EngineConfig
from llmux.service.core.manifest import Manifest
from llmux.service.core.store import DISK_COPY, TIER_OWNER, CheckpointStore
from tests.support.criu_testlib import TargetFactory
from tests.support.procs import tmpfs_at, wait_until_async

pytestmark = pytest.mark.criu
ME = Caller(pid=os.getpid(), uid=os.getuid())
MIB = 1 << 20


def _held(tier: Path) -> list[Path]:
    """The checkpoints' folders in a state directory's folder of the tier."""
    return [p for p in tier.iterdir() if p.name != TIER_OWNER]


def _fake_dump(store: CheckpointStore, model: str, expected: int, payload: bytes) -> Path:
    """A staging folder with one image file, committed like a dump."""
    staging = store.begin(model, expected)
    (staging.images / "pages-1.img").write_bytes(payload)
    manifest = Manifest(model=model, owner="root", owner_uid=0, root_pid=1, pids=[1], tids=[1],
                        cuda_pids=[], criu_version="4.2.1", kernel_release=os.uname().release,
                        driver_version="", created=time.time(), images_bytes=len(payload),
                        image_sizes={"pages-1.img": len(payload)})
    return store.commit(staging, manifest)


def test_a_dump_that_fits_stays_in_memory_with_a_copy_on_disk(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "state", tmp_path / "tier", 64 * MIB)
    store.prepare()
    final = _fake_dump(store, "m", MIB, b"x" * MIB)
    assert store.in_memory("m") and not store.on_disk("m")
    tier = store.memory_dir
    assert tier is not None and tier.parent == tmp_path / "tier"
    images = store.images_dir("m")
    assert images.is_symlink() and Path(os.readlink(images)).is_relative_to(tier)
    assert (images / "pages-1.img").read_bytes() == b"x" * MIB
    assert oct(tier.stat().st_mode & 0o777) == "0o700"
    assert store.drop_memory_copy("m") == 0, "dropped a copy that is not on disk"

    copied = store.copy_to_disk("m")
    assert copied is not None and store.finish_disk_copy("m", *copied)
    assert store.in_memory("m") and store.on_disk("m")  # both: memory for restores
    assert (final / DISK_COPY / "pages-1.img").read_bytes() == b"x" * MIB
    assert store.copy_to_disk("m") is None  # nothing more to write

    assert store.drop_memory_copy("m") >= MIB
    assert not store.in_memory("m") and images.is_dir() and not images.is_symlink()
    assert (images / "pages-1.img").read_bytes() == b"x" * MIB
    assert not (final / DISK_COPY).exists() and _held(tier) == []


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
    auto = CheckpointStore(tmp_path / "state3", tmp_path / "tier3", memtier.AUTO)
    auto.prepare()
    _fake_dump(auto, "m", MIB, b"a")  # the default: on, within half the memory available
    assert auto.in_memory("m")


def _empty(folder: Path) -> None:
    """What a reboot does to the tmpfs."""
    shutil.rmtree(folder)


def test_delete_replace_and_a_lost_tier(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "state", tmp_path / "tier", 64 * MIB)
    store.prepare()
    tier = store.memory_dir
    assert tier is not None
    _fake_dump(store, "a", MIB, b"1")
    first = Path(os.readlink(store.images_dir("a"))).parent
    _fake_dump(store, "a", MIB, b"2")  # the replaced checkpoint's tier folder goes too
    assert not first.exists() and len(_held(tier)) == 1
    copied = store.copy_to_disk("a")
    assert copied is not None and store.finish_disk_copy("a", *copied)
    store.delete("a")  # both copies
    assert _held(tier) == [] and not store.path("a").exists()

    _fake_dump(store, "b", MIB, b"3")  # in memory only
    _fake_dump(store, "c", MIB, b"4")  # in memory and on disk
    copied = store.copy_to_disk("c")
    assert copied is not None and store.finish_disk_copy("c", *copied)
    _fake_dump(store, "d", MIB, b"5")  # its copy to disk cut short by a kill
    partial = store.path("d") / ".tmp-images-dead"
    partial.mkdir()
    (partial / "pages-1.img").write_bytes(b"")
    other = CheckpointStore(tmp_path / "state-other", tmp_path / "tier", 64 * MIB)
    other.prepare()  # another llmuxd's tier folder beside it is not swept
    _fake_dump(other, "z", MIB, b"z")

    again = CheckpointStore(tmp_path / "state", tmp_path / "tier", 64 * MIB)
    cleaned = again.prepare()  # a restart: everything found again, the half copy removed
    assert again.in_memory("b") and not again.on_disk("b")
    assert again.in_memory("c") and again.on_disk("c")
    assert again.in_memory("d") and not again.on_disk("d") and not partial.exists()
    assert any("incomplete copy to disk" in c for c in cleaned)
    assert [m for m, _ in again.memory_copies()] == ["b", "c", "d"]
    assert other.in_memory("z")
    assert other.memory_dir is not None and other.memory_dir.is_dir()
    shutil.rmtree(tmp_path / "state-other")  # its llmuxd's state directory is gone
    CheckpointStore(tmp_path / "state", tmp_path / "tier", 64 * MIB).prepare()
    assert not other.memory_dir.exists(), "the tier of a state directory gone was kept"

    (Path(os.readlink(again.images_dir("c"))) / "pages-1.img").write_bytes(b"")
    (Path(os.readlink(again.images_dir("b"))) / "pages-1.img").write_bytes(b"")
    restarted = CheckpointStore(tmp_path / "state", tmp_path / "tier", 64 * MIB)
    cleaned = restarted.prepare()  # a damaged memory copy: the disk copy takes over
    assert not restarted.in_memory("c") and restarted.on_disk("c")
    assert (restarted.images_dir("c") / "pages-1.img").read_bytes() == b"4"
    assert restarted.in_memory("b"), "a damaged copy, the only one, is kept for a restore " \
        "to refuse by name"

    _empty(tier)  # a reboot
    (tmp_path / "tier").mkdir(exist_ok=True)
    rebooted = CheckpointStore(tmp_path / "state", tmp_path / "tier", 64 * MIB)
    cleaned = rebooted.prepare()
    assert not rebooted.has("b") and not rebooted.has("d")  # never reached the disk
    assert any("images in memory lost" in c for c in cleaned)
    assert rebooted.has("c") and not rebooted.in_memory("c")
    assert (rebooted.images_dir("c") / "pages-1.img").read_bytes() == b"4"


def _restored_from(caplog: pytest.LogCaptureFixture, model: str) -> str:
    """Where llmuxd's log says the last restore of ``model`` read its images."""
    said = [r.getMessage() for r in caplog.records
            if r.getMessage().startswith(f"restoring {model} from ")]
    assert said, f"no restore of {model} logged"
    return said[-1].removeprefix(f"restoring {model} from ")


async def _gone(pids: list[int]) -> None:
    await wait_until_async(lambda: not proctree.taken(pids), 30,
                           f"the dumped tree {pids} to be gone")


async def test_restores_read_the_memory_copy_while_the_disk_copy_is_written(
    criu_path: str, tmp_path: Path, spawn_target: TargetFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="llmux")
    config = EngineConfig(state_dir=tmp_path / "state", criu_path=criu_path, cuda_mode="off",
                          memory_tier_dir=tmp_path / "tier")  # the default ceiling (AUTO)
    engine = await CheckpointEngine.open(config)
    t = await spawn_target()
    before = await t.ping()
    await engine.checkpoint(ME, "tiered", t.pid)
    await _gone(t.pids)
    engine._no_restores.clear()  # a restore of another model: the copy to disk waits
    try:
        await asyncio.sleep(1.0)
        assert engine.store.in_memory("tiered") and not engine.store.on_disk("tiered")
    finally:
        engine._no_restores.set()
    await engine.wait_moves()
    assert engine.store.in_memory("tiered") and engine.store.on_disk("tiered")
    await engine.restore(ME, "tiered")
    assert _restored_from(caplog, "tiered") == "the memory tier"
    after = await t.ping()  # the same processes, their state (a ping counter) kept
    assert after[:3] == before[:3] and int(after[3]) == int(before[3]) + 1

    # a restart finds both copies again; the memory copy still serves the restore
    await engine.checkpoint(ME, "tiered", t.pid)
    await _gone(t.pids)
    await engine.wait_moves()
    engine = await CheckpointEngine.open(config)
    assert engine.store.in_memory("tiered") and engine.store.on_disk("tiered")
    await engine.restore(ME, "tiered")
    assert _restored_from(caplog, "tiered") == "the memory tier"
    assert int((await t.ping())[3]) == int(before[3]) + 2

    # the memory copy dropped: the disk copy, complete, serves the restore
    await engine.checkpoint(ME, "tiered", t.pid)
    await _gone(t.pids)
    await engine.wait_moves()
    assert engine.store.drop_memory_copy("tiered") > 0
    await engine.restore(ME, "tiered", keep_images=False)
    assert _restored_from(caplog, "tiered") == "disk"
    assert int((await t.ping())[3]) == int(before[3]) + 3
    assert not engine.store.has("tiered") and not engine.store.path("tiered").exists()
    assert engine.store.memory_dir is not None
    assert _held(engine.store.memory_dir) == []

    # keep_images=false frees both copies
    await engine.checkpoint(ME, "tiered", t.pid)
    await _gone(t.pids)
    await engine.wait_moves()
    await engine.restore(ME, "tiered", keep_images=False)
    assert _restored_from(caplog, "tiered") == "the memory tier"
    assert not engine.store.path("tiered").exists()
    assert _held(engine.store.memory_dir) == []
    with pytest.raises(InvalidArgument, match="memory_tier_dir"):
        await CheckpointEngine.open(EngineConfig(
            state_dir=tmp_path / "s2", criu_path=criu_path, cuda_mode="off",
            memory_tier_dir=None, memory_tier_limit_bytes=1 << 30))


async def test_over_the_ceiling_the_oldest_memory_copy_goes_first(
    criu_path: str, tmp_path: Path, spawn_target: TargetFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="llmux")
    engine = await CheckpointEngine.open(EngineConfig(
        state_dir=tmp_path / "state", criu_path=criu_path, cuda_mode="off",
        memory_tier_dir=tmp_path / "tier", memory_tier_limit_bytes=1 << 30))
    targets = [await spawn_target() for _ in range(3)]
    for name, t in zip("ab", targets, strict=False):
        await engine.checkpoint(ME, name, t.pid)
        await _gone(t.pids)
        await engine.wait_moves()
    assert [m for m, _ in engine.store.memory_copies()] == ["a", "b"]
    used = engine.store.memory_used_bytes()
    # room for one and the third dump (as the dump reckons it): it needs a's memory
    expected = int(proctree.rss_bytes(targets[2].pids) * 1.05) + dump._SIZE_SLACK
    engine.store.memory_limit_bytes = used + expected - used // 4
    await engine.checkpoint(ME, "c", targets[2].pid)
    await _gone(targets[2].pids)
    await engine.wait_moves()
    assert [m for m, _ in engine.store.memory_copies()] == ["b", "c"]
    assert not engine.store.in_memory("a") and engine.store.on_disk("a")
    assert any(r.getMessage().startswith("dropped the memory copy of a ")
               for r in caplog.records)
    for name, t in zip("abc", targets, strict=True):
        await engine.restore(ME, name)
        assert _restored_from(caplog, name) == ("disk" if name == "a" else "the memory tier")
        await t.ping()
    # lowered below what it holds: the watch gives the memory back, oldest first
    engine.store.memory_limit_bytes = engine.store.memory_used_bytes() - 1
    await wait_until_async(lambda: engine.store.memory_copies() == [("c", True)], 10,
                           "the watch to drop b's memory copy")


@pytest.fixture
def small_state(tmp_path: Path) -> Iterator[Path]:
    with tmpfs_at(tmp_path / "small", 300) as mnt:
        yield mnt


async def test_a_failed_copy_to_disk_keeps_the_memory_copy_and_says_so(
    criu_path: str, tmp_path: Path, small_state: Path, spawn_target: TargetFactory,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="llmux")
    monkeypatch.setattr(tiermove, "RETRY_SECS", 0.5)
    monkeypatch.setattr(tiermove, "WATCH_SECS", 0.2)
    engine = await CheckpointEngine.open(EngineConfig(
        state_dir=small_state / "state", criu_path=criu_path, cuda_mode="off",
        memory_tier_dir=tmp_path / "tier", memory_tier_limit_bytes=1 << 30))
    t = await spawn_target()
    before = await t.ping()
    engine._no_restores.clear()  # hold the copy to disk back until the disk is full
    try:
        await engine.checkpoint(ME, "m", t.pid)
        await _gone(t.pids)
        filler = small_state / "filler"
        free = shutil.disk_usage(small_state).free
        subprocess.run(["fallocate", "-l", str(free - 64 * 1024), str(filler)], check=True)
    finally:
        engine._no_restores.set()
    await engine.wait_moves()
    assert engine.store.in_memory("m") and not engine.store.on_disk("m")
    assert "No space left on device" in engine.mover.write_errors["m"]
    (info,) = engine.checkpoint_infos()  # what `llmux checkpoints` shows the operator
    assert (info.storage, info.location) == ("memory", "local")
    assert "writing its images to disk failed" in info.problem and "No space" in info.problem
    assert any("is in the memory tier only" in r.getMessage() for r in caplog.records)
    assert list((small_state / "state" / "m").glob(".tmp-images-*")) == []
    await engine.restore(ME, "m")  # nothing lost: it is restored from memory
    assert _restored_from(caplog, "m") == "the memory tier"
    assert int((await t.ping())[3]) == int(before[3]) + 1
    filler.unlink()  # room again: the copy is tried again and completes
    await wait_until_async(lambda: engine.store.on_disk("m"), 20,
                           "the copy to disk to be tried again")
    (info,) = engine.checkpoint_infos()  # on disk: nothing at risk, whatever was logged
    assert (info.storage, info.problem) == ("memory+disk", "")
    await wait_until_async(lambda: "m" not in engine.mover.write_errors, 5,
                           "the failure to be forgotten once the copy is written")
    assert engine.store.in_memory("m")


async def test_a_copy_to_disk_cut_short_is_found_incomplete_and_written_again(
    criu_path: str, tmp_path: Path, spawn_target: TargetFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """llmuxd gone mid-copy (here: its copy held after the first files, and a second
    llmuxd opening the same state directory, as a restart does)."""
    caplog.set_level(logging.INFO, logger="llmux")
    config = EngineConfig(state_dir=tmp_path / "state", criu_path=criu_path, cuda_mode="off",
                          memory_tier_dir=tmp_path / "tier", memory_tier_limit_bytes=1 << 30,
                          drop_zero_pages=False)  # the pauses below are the copy's alone
    first = await CheckpointEngine.open(config)
    t = await spawn_target()
    before = await t.ping()
    copied: list[int] = []
    released = threading.Event()

    def hold_after_two_files() -> None:  # the copy's pause before each chunk
        copied.append(1)
        if len(copied) > 2:
            released.wait(30)

    monkey = pytest.MonkeyPatch()
    monkey.setattr(first.mover, "_give_way", hold_after_two_files)
    try:
        await first.checkpoint(ME, "m", t.pid)
        await _gone(t.pids)
        partial = tmp_path / "state" / "m"
        await wait_until_async(lambda: bool(list(partial.glob(".tmp-images-*")))
                               and len(copied) > 2, 10, "the copy to disk to be held")
        assert not first.store.on_disk("m")
        second = await CheckpointEngine.open(config)  # the restart
        assert any("an incomplete copy to disk" in r.getMessage() for r in caplog.records)
        await second.wait_moves()
        assert second.store.in_memory("m") and second.store.on_disk("m")
        assert len(list(partial.glob(".tmp-images-*"))) == 0
        await second.restore(ME, "m")
        assert _restored_from(caplog, "m") == "the memory tier"
        assert int((await t.ping())[3]) == int(before[3]) + 1
    finally:
        released.set()
        monkey.undo()
        await first.wait_moves()
    # the first llmuxd's copy, let go after the restart, harmed nothing
    assert second.store.on_disk("m") and (partial / "images.disk" / "inventory.img").is_file()


async def test_a_new_dump_during_the_copy_of_the_old_one_is_copied_too(
    criu_path: str, tmp_path: Path, spawn_target: TargetFactory,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="llmux")
    engine = await CheckpointEngine.open(EngineConfig(
        state_dir=tmp_path / "state", criu_path=criu_path, cuda_mode="off",
        memory_tier_dir=tmp_path / "tier", memory_tier_limit_bytes=1 << 30,
        drop_zero_pages=False))  # the pauses below are the copy's alone
    held = threading.Event()
    monkeypatch.setattr(engine.mover, "_give_way", lambda: held.wait(30))
    t = await spawn_target()
    try:
        await engine.checkpoint(ME, "m", t.pid)
        await _gone(t.pids)
        await engine.restore(ME, "m")
        await engine.checkpoint(ME, "m", t.pid)  # replaces the one whose copy waits
        await _gone(t.pids)
    finally:
        held.set()
    await engine.wait_moves()
    assert engine.store.in_memory("m") and engine.store.on_disk("m")
    assert engine.mover.write_errors == {}
    assert not any("memory tier only" in r.getMessage() for r in caplog.records)
    assert engine.store.drop_memory_copy("m") > 0  # the disk copy is the new dump's
    await engine.restore(ME, "m")
    assert _restored_from(caplog, "m") == "disk"
    await t.ping()


def test_a_dump_larger_than_the_tmpfs_has_room_for_goes_to_disk(tmp_path: Path,
                                                                 tiny_tmpfs: Path) -> None:
    store = CheckpointStore(tmp_path / "state", tiny_tmpfs / "tier", memtier.AUTO)
    store.prepare()
    _fake_dump(store, "big", 2 * MIB, b"b" * 2 * MIB)  # the tmpfs holds 1 MiB
    assert not store.in_memory("big")
    assert (store.images_dir("big") / "pages-1.img").stat().st_size == 2 * MIB
    _fake_dump(store, "small", 64 * 1024, b"s" * 1024)
    assert store.in_memory("small")
