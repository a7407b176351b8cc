"""Dump/restore cycles of one built-in engine through llmuxd, compared the way CRIU's zdtm
compares a restored task with the original: its open files, its memory maps (path and
size) and its mountinfo match cycle 1, the same prompt gives the same completion, and
llmuxd's RSS and fd count stay flat over the run.

10 cycles by default; LLMUX_LONG=1 runs 100 (LLMUX_CYCLES=N sets any number). And llmuxd
killed in the middle of a restore of that engine.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llmux.common import proctree, resources
from llmux.shim.builtin.testing import EngineProcess, start_engine
from tests.support.llmuxd_harness import OBJECT_PATH, Llmuxd, children_of
from tests.support.procs import wait_until
from tests.support.zdtmcompare import assert_same, settled
from tests.support.zdtmcompare import usage as process_usage

pytestmark = pytest.mark.criu

CYCLES = int(os.environ.get("LLMUX_CYCLES", "100" if os.environ.get("LLMUX_LONG") else "10"))
PROMPT = {"prompt": "the old tower", "max_tokens": 8}
RSS_GROWTH_LIMIT = 16 << 20
"""llmuxd's RSS may grow this much from cycle 2 to the last (allocator noise), no more."""
@contextlib.contextmanager
def _subreaper() -> Iterator[None]:
    """A restored tree is reparented to the nearest subreaper: this test, standing in for
    the shim, reaps it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(36, 0, 0, 0, 0)


def _reap(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def _segments(pids: list[int]) -> list[Path]:
    """The /dev/shm files the engine maps."""
    found = set()
    for pid in pids:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            if " /dev/shm/" in line:
                found.add(Path(line[line.index("/dev/shm/"):].removesuffix(" (deleted)")))
    return sorted(found)


def _stop(e: EngineProcess, pids: list[int], segments: list[Path]) -> None:
    """A clean stop (the engine removes its segments), then whatever is left is killed and
    reaped, and segments nobody uses are removed."""
    e.stop(5)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    wait_until(lambda: (_reap(pids), not proctree.taken(pids))[1], 30, "the engine")
    resources.remove_unused(segments)


def _answer(e: EngineProcess) -> str:
    r = httpx.post(f"{e.base_url}/v1/completions", json=PROMPT, timeout=60)
    assert r.status_code == 200, r.text
    text: str = r.json()["choices"][0]["text"]
    return text


def _done(llmuxd: Llmuxd, method: str, signature: str, *args: object) -> None:
    job_id, _ = llmuxd.ok(method, signature, *args)
    outcome = llmuxd.ok("WaitJob", "ud", job_id, 300)
    assert outcome == ["done", "", ""], outcome


def _settled_usage(daemon: int, fewest_fds: int) -> tuple[int, int]:
    """llmuxd's (RSS, fds) once its work behind the dump is over: the zero-page pass holds a
    pages image open while it reads. Taken when the fds are back to the fewest seen, or
    after 10 s (a leak never comes back)."""
    deadline = time.monotonic() + 10
    while True:
        usage = process_usage(daemon)
        if not fewest_fds or usage[1] <= fewest_fds or time.monotonic() > deadline:
            return usage
        time.sleep(0.1)


def test_dump_restore_cycles_keep_the_tree_as_it_was(llmuxd: Llmuxd, tmp_path: Path) -> None:
    env = {"HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "xdg"),
           "LLMUX_BUILTIN_BACKEND": "pure"}
    assert llmuxd.proc is not None
    daemon = llmuxd.proc.pid
    with _subreaper():
        e = start_engine("test-org/cycles", weights_mb=16, extra_env=env)
        pids = e.tree_pids()
        mapped = _segments(pids)
        try:
            answer = _answer(e)
            first = settled(pids)
            usage = []
            began = time.monotonic()
            for cycle in range(1, CYCLES + 1):
                _done(llmuxd, "Checkpoint", "sua{sv}", "cycles", e.pid, 0)
                e.process.poll()

                def gone() -> bool:
                    _reap(pids)
                    return not proctree.taken(pids)

                wait_until(gone, 30, f"cycle {cycle}: the dumped PIDs to be free")
                _done(llmuxd, "Restore", "sa{sv}", "cycles", 0)
                assert_same(first, pids, f"cycle {cycle}")
                assert _answer(e) == answer, f"cycle {cycle}: another completion"
                usage.append(_settled_usage(daemon, min((u[1] for u in usage), default=0)))
        finally:
            _stop(e, pids, mapped)
    secs = time.monotonic() - began
    rss = [u[0] for u in usage]
    fds = [u[1] for u in usage]
    print(f"\n[cycles] {CYCLES} dump/restore cycles in {secs:.1f}s; llmuxd RSS "
          f"{rss[0] >> 20} -> {rss[-1] >> 20} MiB (max {max(rss) >> 20}), fds {fds[0]} -> "
          f"{fds[-1]} (max {max(fds)})")
    base = 1 if len(usage) > 1 else 0
    assert rss[-1] - rss[base] < RSS_GROWTH_LIMIT, f"llmuxd RSS grew: {rss}"
    assert max(fds[base:]) <= fds[base], f"llmuxd fds grew: {fds}"


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.1])
def test_llmuxd_killed_mid_restore_loses_nothing(
    llmuxd: Llmuxd, tmp_path: Path, delay: float
) -> None:
    """llmuxd (and CRIU with it) SIGKILLed ``delay`` s into a restore of the built-in engine,
    then started again: the checkpoint is kept; the tree is wholly back or wholly gone (and
    then restores); the /dev/shm segment the restore had put back is in use or removed; no
    journal is left."""
    env = {"HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "xdg"),
           "LLMUX_BUILTIN_BACKEND": "pure"}
    assert llmuxd.proc is not None
    with _subreaper():
        e = start_engine("test-org/killed", weights_mb=64, extra_env=env)
        pids = e.tree_pids()
        mapped = _segments(pids)
        try:
            answer = _answer(e)
            _done(llmuxd, "Checkpoint", "sua{sv}", "k", e.pid, 0)
            e.process.poll()
            wait_until(lambda: (_reap(pids), not proctree.taken(pids))[1], 30, "the dump")
            manifest = (llmuxd.state_dir / "k" / "manifest.json").read_text()
            segments = [f["path"] for f in json.loads(manifest)["files"]
                        if f["reason"] == "dev-shm"]
            assert segments and not any(Path(p).exists() for p in segments)
            proc = llmuxd.proc
            llmuxd.ok("Restore", "sa{sv}", "k", 0)
            wait_until(lambda: bool(children_of(proc.pid)) or proctree.exists(pids[0]), 60,
                       "CRIU to start")
            time.sleep(delay)
            proc.kill()
            proc.wait(30)
            llmuxd.start()
            assert llmuxd.ok("ListCheckpoints") == [[["k", f"{OBJECT_PATH}/checkpoint/k"]]]
            assert not list(llmuxd.state_dir.glob(".restoring-*"))
            live = [p for p in pids if proctree.exists(p)]
            if live != pids:
                assert not live, f"half a tree: {live} of {pids}"
                assert not any(Path(p).exists() for p in segments), "segment left unused"
                wait_until(lambda: (_reap(pids), not proctree.taken(pids))[1], 30, "zombies")
                _done(llmuxd, "Restore", "sa{sv}", "k", 0)
            for pid in pids:
                assert proctree.tracer_of(pid) == 0
                st = proctree.read_stat(pid)
                assert st is not None and st.state not in ("T", "t")
            try:
                assert _answer(e) == answer
            except Exception:
                for pid in pids:
                    print(pid, Path(f"/proc/{pid}/wchan").read_text(),
                          Path(f"/proc/{pid}/stat").read_text()[:80],
                          [ln for ln in Path(f"/proc/{pid}/maps").read_text().splitlines()
                           if "rwxp" in ln or "criu" in ln.lower()][:5])
                print(llmuxd.log()[-3000:])
                raise
        finally:
            _stop(e, pids, mapped)
