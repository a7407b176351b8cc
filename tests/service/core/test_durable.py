"""The one durable write (temp, fsync, rename, fsync the folder) and the one wait until
processes are gone: what every crash-relevant file and every kill-and-wait goes through."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from llmux.common import proctree
from llmux.service.core import authz, durable
from llmux.service.core.authz import RestoredRegistry
from llmux.service.core.durable import temp_path, write_durably, write_json_durably
from llmux.service.core.gone import wait_gone, wait_gone_async


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What os.fsync was called on, by path: files and folders."""
    calls: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(durable.os, "fsync", fsync)
    return calls


def test_a_durable_write_syncs_the_file_then_its_folder(tmp_path: Path,
                                                         synced: list[str]) -> None:
    path = tmp_path / "journal.json"
    write_json_durably(path, {"tree": {"1": 2}})
    assert json.loads(path.read_text()) == {"tree": {"1": 2}}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert synced == [str(temp_path(path)), str(tmp_path)], "the data, then the rename"
    assert not temp_path(path).exists()


def test_a_failed_write_leaves_the_old_version_and_no_temp_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "manifest.json"
    write_durably(path, "old")

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write_durably(path, "new")
    assert path.read_text() == "old"
    assert not temp_path(path).exists()


def test_the_registry_of_restored_trees_is_written_durably_and_survives(
        tmp_path: Path, synced: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """It grants a container rights on a tree after a restart: synced, folder included."""
    path = tmp_path / ".restored.json"
    through_helper: list[Path] = []
    monkeypatch.setattr(authz, "write_json_durably",
                        lambda p, v: (through_helper.append(p), write_json_durably(p, v)))
    registry = RestoredRegistry(path)
    registry.add(os.getpid(), "0::/llmux.slice/a", "m")
    assert through_helper == [path]
    assert synced == [str(temp_path(path)), str(tmp_path)]
    temp_path(path).write_text('[{"root_pid": ')  # a later write cut short by a crash
    again = RestoredRegistry(path)  # as llmuxd starting again reads it
    tree = again.get(os.getpid())
    assert tree is not None and (tree.cgroups, tree.model) == ("0::/llmux.slice/a", "m")


def test_a_restored_tree_that_ended_unreaped_is_not_counted_live(tmp_path: Path) -> None:
    """LiveTrees: a root killed with its container may stay a zombie until its parent
    reaps it; it serves nothing, and a restore of its checkpoint is no replica."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        registry = RestoredRegistry(tmp_path / ".restored.json")
        registry.add(proc.pid, "0::/llmux.slice/a", "m")
        assert registry.live("m") == 1 and registry.live("other") == 0
        proc.kill()
        for _ in range(500):  # until it is a zombie (not reaped: no wait yet)
            st = proctree.read_stat(proc.pid)
            if st is not None and st.state == "Z":
                break
            time.sleep(0.01)
        assert registry.live("m") == 0
    finally:
        proc.kill()
        proc.wait()


def test_wait_gone_returns_what_is_left_at_the_deadline() -> None:
    left = [7, 8]
    t = time.monotonic()
    assert wait_gone(lambda: left, 0.2) == [7, 8]
    assert 0.2 <= time.monotonic() - t < 2
    polls = iter([[7, 8], [8], []])
    assert wait_gone(lambda: next(polls), 5, interval=0.01) == []
    assert wait_gone(lambda: [], 0) == [], "nothing to wait for: no wait"


def test_wait_gone_sees_a_real_process_reaped() -> None:
    child = subprocess.Popen(["sleep", "30"])
    assert wait_gone(lambda: proctree.taken([child.pid]), 0.1) == [child.pid]
    child.kill()
    child.wait()
    assert wait_gone(lambda: proctree.taken([child.pid]), 5) == []


def test_the_awaitable_wait_gone_is_the_same_loop_and_can_be_cancelled() -> None:
    async def main() -> None:
        polls = iter([[5], [5], []])
        assert await wait_gone_async(lambda: next(polls), 5, interval=0.01) == []
        assert await wait_gone_async(lambda: [5], 0.1) == [5]
        waiting = asyncio.create_task(wait_gone_async(lambda: [5], 60))
        await asyncio.sleep(0.1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(main())
