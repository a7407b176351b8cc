"""Faults during a dump or a restore of the built-in engine, with real CRIU (the zdtm way).

Each fault is injected into one job; then the same check, ``nothing_lost``: the model runs
(whole, not stopped, not traced, the same answer) or it is wholly gone and its checkpoint
is complete and restores; no half checkpoint, no link_remap file, nothing new in /dev/shm;
and the next dump and restore work. The faults: CRIU SIGKILLed at points spread over a dump
and a restore, each fatal CRIU_FAULT code (1-6, criu/include/fault-injection.h) on dump and
on restore, the engine's core killed mid-dump and mid-restore, a stuck CRIU (Timeout), a
state directory that fills up during the dump.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from llmux.common import proctree, resources
from llmux.common.errors import (
    CriuFailed,
    HostError,
    ManifestMismatch,
    NoSpace,
    NotFound,
    Timeout,
)
from llmux.service.core.engine import Caller, CheckpointEngine, EngineConfig
from llmux.shim.builtin.testing import EngineProcess, start_engine_async
from tests.support.criu_testlib import blocking_criu, reap, reaping
from tests.support.procs import tmpfs_at, wait_until_async

pytestmark = pytest.mark.criu

ME = Caller(pid=os.getpid(), uid=0)
PROMPT = {"prompt": "the old tower", "max_tokens": 6}


@dataclass
class Model:
    """A built-in engine (API server + core) that the test stands parent for."""

    process: EngineProcess
    pids: list[int]

    @property
    def root(self) -> int:
        return self.pids[0]

    def shm_segments(self) -> list[str]:
        paths = set()
        for pid in self.pids:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                if " /dev/shm/" in line:
                    paths.add(line[line.index("/dev/shm/"):].removesuffix(" (deleted)"))
        return sorted(paths)

    async def answer(self) -> str:
        async with httpx.AsyncClient(base_url=self.process.base_url, timeout=60) as c:
            r = await c.post("/v1/completions", json=PROMPT)
            assert r.status_code == 200, r.text
            text: str = r.json()["choices"][0]["text"]
            return text


@pytest.fixture
async def model(tmp_path: Path) -> AsyncIterator[Model]:
    env = {"HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "xdg"),
           "LLMUX_BUILTIN_BACKEND": "pure"}
    e = await start_engine_async("test-org/faults", weights_mb=96, extra_env=env)
    pids = e.tree_pids()
    segments = [Path(p) for p in Model(e, pids).shm_segments()]
    try:
        async with reaping(lambda: pids[1:], e.process.poll):
            yield Model(e, pids)
    finally:
        await e.stop_async(5)  # a clean stop removes the engine's /dev/shm segment
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            reap(pids)
            if not proctree.taken(pids):
                break
            await asyncio.sleep(0.05)
        resources.remove_unused(segments)  # left by a tree killed or dumped for good


async def _open(state_dir: Path, criu: str, **config: float) -> CheckpointEngine:
    eng = await CheckpointEngine.open(
        EngineConfig(state_dir=state_dir, criu_path=criu, cuda_mode="off", **config)  # type: ignore[arg-type]
    )
    eng.pid_free_timeout = 5.0
    return eng


def _criu_children() -> list[int]:
    """CRIU processes the engine (in this process) started: its direct children, fast."""
    out = []
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            for pid in Path(f"/proc/self/task/{task}/children").read_text().split():
                with contextlib.suppress(OSError):
                    # the bundle runs CRIU through its own loader: look at the arguments
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if any(a.endswith(b"/criu") for a in argv) and (
                            b"dump" in argv or b"restore" in argv):
                        out.append(int(pid))
    return out


async def _gone(pids: list[int], within: float = 30.0) -> None:
    await wait_until_async(lambda: (reap(pids), not proctree.taken(pids))[1], within,
                           f"PIDs {pids} to be free (reaped)")
    assert not proctree.taken(pids), f"PIDs {proctree.taken(pids)} still taken"


def _link_remaps(*roots: Path, held_by: list[int] | None = None,
                 before: set[str] | None = None) -> list[str]:
    """link_remap files under roots. /dev/shm is the host's, and another suite's CRIU on
    this machine makes link-remaps there too (the built-in engine's get the same names): so
    only those of this model count, those linking to a file its processes hold (held_by)
    or, its processes gone, those made since ``before`` that no process holds."""
    found = []
    for root in roots:
        for dirpath, _dirs, names in os.walk(root):
            found += [os.path.join(dirpath, n) for n in names if n.startswith("link_remap.")]
    if held_by is not None:
        ids = _held_ids(held_by)
        found = [f for f in found if _id(f) in ids]
    if before is not None:
        new = [Path(f) for f in found if f not in before]
        held = resources.in_use(new)
        found = [str(f) for f in new if f not in held]
    return found


def _id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _held_ids(pids: list[int]) -> set[tuple[int, int] | None]:
    ids: set[tuple[int, int] | None] = set()
    for pid in pids:
        for sub in ("fd", "map_files"):
            with contextlib.suppress(OSError):
                ids |= {_id(e.path) for e in os.scandir(f"/proc/{pid}/{sub}")}
    ids.discard(None)
    return ids


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


async def nothing_lost(eng: CheckpointEngine, m: Model, name: str, answer: str,
                       shm_before: set[str], tmp_path: Path, why: object = None) -> str:
    """The checks after every fault; returns "running" or "restored" (what was found)."""
    state = eng.store.root
    remaps_before = {f"/dev/shm/{n}" for n in shm_before}
    assert not [p.name for p in state.iterdir() if p.name.startswith((".tmp-", ".old-"))], \
        "a half checkpoint was left"
    live = [p for p in m.pids if proctree.exists(p)]
    for pid in live:
        st = proctree.read_stat(pid)
        assert st is not None and st.state not in ("T", "t"), f"PID {pid} left stopped"
        assert proctree.tracer_of(pid) == 0, f"PID {pid} left traced"
    if live == m.pids:
        found = "running"
    elif not live and not eng.store.has(name) and "died during the failed dump" in str(why):
        # CRIU's known limit: killed while it had a task infected, that task dies on CRIU's
        # injected code. Named, and no half engine left: the shim starts the model afresh.
        assert isinstance(why, CriuFailed), why
        assert not _link_remaps(Path("/dev/shm"), tmp_path, before=remaps_before), \
            "link_remap files left"
        return "damaged, ended and named"
    else:
        assert not live, f"half a tree is left: {live} of {m.pids} ({why})"
        assert eng.store.has(name), "the tree is gone and there is no checkpoint: lost"
        await _gone(m.pids)
        await eng.restore(ME, name)
        found = "restored"
    assert await m.answer() == answer
    assert not _link_remaps(Path("/dev/shm"), tmp_path, held_by=m.pids), "link_remap files left"
    # /dev/shm is the host's (other tests run beside): the model's segments are in use
    ours = [Path(n) for n in m.shm_segments()]
    assert ours and set(ours) == resources.in_use(ours), f"/dev/shm segments: {ours}"
    # the next attempt works: a full round trip
    await eng.checkpoint(ME, name, m.root)
    await _gone(m.pids)
    await eng.restore(ME, name)
    assert await m.answer() == answer
    return found


def _log_has(path: Callable[[], Path | None], marker: str) -> bool:
    found = path()
    try:
        return found is not None and marker in found.read_text(errors="replace")
    except FileNotFoundError:
        return False


async def _kill_at(marker: str, log: Callable[[], Path | None],
                   what: Callable[[], list[int]]) -> list[int]:
    """As soon as CRIU's log shows ``marker`` (a stage of its work; "" for at once), SIGKILL
    what() names (CRIU, or the engine's core)."""
    deadline = time.monotonic() + 60
    while not (what() and (not marker or _log_has(log, marker))):
        if time.monotonic() > deadline:
            raise AssertionError(f"CRIU never logged {marker!r}")
        await asyncio.sleep(0)
    hit = what()
    for pid in hit:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return hit


async def _job_with(job: Awaitable[object], fault: Awaitable[object]) -> BaseException | None:
    """Run the job and the fault together; return the job's error (None on success)."""
    task = asyncio.ensure_future(job)
    hit = asyncio.ensure_future(fault)
    try:
        result = await task
        fired = hit.result() if hit.done() and not hit.cancelled() else None
        print(f"\n[fault] killed: {fired}; warnings: {getattr(result, 'warnings', None)}")
        return None
    except HostError as exc:
        return exc
    finally:
        hit.cancel()
        await asyncio.gather(hit, return_exceptions=True)


async def _inject(job: Awaitable[object], fault: str, arg: str | int,
                  monkeypatch: pytest.MonkeyPatch, log: Callable[[], Path | None],
                  core: Callable[[], list[int]]) -> BaseException | None:
    """Run the job with the fault: CRIU_FAULT=arg in CRIU's environment, or CRIU (or the
    engine's core) SIGKILLed once CRIU's log shows the stage ``arg``. Returns the job's
    error (None on success)."""
    if fault == "criu-fault":
        monkeypatch.setenv("CRIU_FAULT", str(arg))
        try:
            return await _job_with(job, asyncio.sleep(0))
        finally:
            monkeypatch.delenv("CRIU_FAULT")
    victim = _criu_children if fault == "criu-kill" else core
    return await _job_with(job, _kill_at(str(arg), log, victim))


# ------------------------------------------------------------------------------- dump faults

DUMP_STAGES = [
    ("freezing", "Seized task"),
    ("infecting", "Wait for parasite being daemonized"),
    ("dumping-pages", "page-xfer: Transferring pages"),
    ("second-task", "Dumping task cwd"),
    ("images-written", "Writing image inventory"),
    ("killing-the-tree", "Unfreezing tasks into 2"),
]
"""Where CRIU is killed in a dump: the first log line of each stage (CRIU 4.2)."""
RESTORE_STAGES = [
    ("forking", "Forking task with"),
    ("opening-files", "Opening fdinfo-s"),
    ("mapping-memory", "Restore via sigreturn"),
    ("in-the-restorer", "Switched to the restorer"),
    ("tasks-restored", ": Restored"),
]

DUMP_FAULTS = (
    [pytest.param("criu-kill", stage, id=f"criu-killed-{name}") for name, stage in DUMP_STAGES]
    + [pytest.param("criu-fault", code, id=f"CRIU_FAULT={code}") for code in range(1, 7)]
    + [pytest.param("core-kill", stage, id=f"core-killed-{name}")
       for name, stage in DUMP_STAGES[:3]]
)


@pytest.mark.parametrize(("fault", "arg"), DUMP_FAULTS)
async def test_a_fault_during_a_dump_loses_nothing(
    fault: str, arg: str | int, model: Model, criu_path: str, state_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    eng = await _open(state_dir, criu_path)
    answer = await model.answer()
    shm_before = _shm()
    core = model.pids[1:]
    error = await _inject(eng.checkpoint(ME, "f", model.root), fault, arg, monkeypatch,
                          lambda: next(state_dir.glob(".tmp-f-*/images/dump.log"), None),
                          lambda: core if _criu_children() else [])
    if error is not None:
        assert isinstance(error, CriuFailed), error
        assert "criu dump failed" in str(error)
    if fault == "core-kill":
        # the engine died under the dump: what is left must not be frozen, nothing half kept
        for pid in model.pids:
            if proctree.exists(pid):
                assert proctree.read_stat(pid).state not in ("T", "t")  # type: ignore[union-attr]
                assert proctree.tracer_of(pid) == 0
        assert not [p for p in state_dir.iterdir() if p.name.startswith(".tmp-")]
        return
    found = await nothing_lost(eng, model, "f", answer, shm_before, tmp_path, error)
    print(f"\n[fault] dump {fault} {arg}: {type(error).__name__ if error else 'ok'}, {found}")


# ---------------------------------------------------------------------------- restore faults

RESTORE_FAULTS = (
    [pytest.param("criu-kill", stage, id=f"criu-killed-{name}")
     for name, stage in RESTORE_STAGES]
    + [pytest.param("criu-fault", code, id=f"CRIU_FAULT={code}") for code in range(1, 7)]
    + [pytest.param("core-kill", "", id="restored-core-killed")]
)


@pytest.mark.parametrize(("fault", "arg"), RESTORE_FAULTS)
async def test_a_fault_during_a_restore_keeps_the_checkpoint(
    fault: str, arg: str | int, model: Model, criu_path: str, state_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    eng = await _open(state_dir, criu_path)
    answer = await model.answer()
    shm_before = _shm()
    await eng.checkpoint(ME, "r", model.root)
    await _gone(model.pids)
    core = model.pids[1:]
    error = await _inject(eng.restore(ME, "r"), fault, arg, monkeypatch,
                          lambda: state_dir / "r" / "images" / "restore.log",
                          lambda: proctree.taken(core))
    if error is not None:
        assert isinstance(error, CriuFailed), error
        assert "criu restore failed" in str(error)
        assert eng.store.has("r"), "a failed restore lost the checkpoint"
        # CRIU takes back what it restored: no part of the tree may be left
        await _gone(model.pids)
    elif fault == "core-kill":
        # restored, then the core died: the checkpoint (kept by default) brings it back
        for pid in model.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await _gone(model.pids)
    else:
        await _gone([], 0)
    if not proctree.taken(model.pids):
        await eng.restore(ME, "r")  # a retry succeeds
    found = await nothing_lost(eng, model, "r", answer, shm_before, tmp_path)
    print(f"\n[fault] restore {fault} {arg}: {type(error).__name__ if error else 'ok'}, {found}")


# ------------------------------------------------------------------------ stuck CRIU, full disk


async def test_a_stuck_criu_is_killed_and_the_tree_runs_on(
    model: Model, criu_path: str, state_dir: Path, tmp_path: Path
) -> None:
    """CRIU hung before it kills the tree (frozen, all images written): killed after the
    bound, the tree thawed, a named Timeout; the next dump with a sane bound works."""
    wrapper, marker = blocking_criu(tmp_path, criu_path, stage="post-dump")
    eng = await _open(state_dir, wrapper, criu_timeout_secs=3.0, criu_timeout_secs_per_gib=0.0)
    answer = await model.answer()
    began = time.monotonic()
    with pytest.raises(Timeout) as err:
        await eng.checkpoint(ME, "stuck", model.root)
    assert time.monotonic() - began < 30
    assert marker.exists()
    assert "did not finish within 3s" in str(err.value)
    assert "criu_timeout_secs" in str(err.value)
    sane = await _open(state_dir, criu_path)
    assert await nothing_lost(sane, model, "stuck", answer, _shm(), tmp_path) == "running"


@pytest.fixture
def small_state(tmp_path: Path) -> Iterator[Path]:
    with tmpfs_at(tmp_path / "small", 400) as mnt:
        yield mnt


async def test_the_disk_filling_during_a_dump_is_no_space_and_loses_nothing(
    model: Model, criu_path: str, small_state: Path, tmp_path: Path
) -> None:
    """Another writer takes the space the estimate counted on once CRIU has begun (its
    pre-dump action script fills the state directory's file system)."""
    filler = small_state / "filler"
    act = tmp_path / "fill.sh"
    act.write_text("#!/bin/sh\n"
                   'if [ "$CRTOOLS_SCRIPT_ACTION" = pre-dump ]; then '
                   f'dd if=/dev/zero of="{filler}" bs=1M status=none; fi\n'
                   "exit 0\n")
    act.chmod(0o755)
    wrapper = tmp_path / "criu-fill"
    wrapper.write_text("#!/bin/sh\n"
                       f'if [ "$1" = dump ]; then exec "{criu_path}" "$@" '
                       f'--action-script "{act}"; fi\n'
                       f'exec "{criu_path}" "$@"\n')
    wrapper.chmod(0o755)
    # the images on disk (no memory tier): the disk that fills is the one CRIU writes to
    eng = await _open(small_state / "state", str(wrapper), memory_tier_limit_bytes=0)
    answer = await model.answer()
    with pytest.raises(NoSpace) as err:
        await eng.checkpoint(ME, "full", model.root)
    assert filler.exists()
    assert f"the state directory {small_state / 'state'} filled up" in str(err.value)
    assert "the tree runs on and nothing was kept" in str(err.value)
    filler.unlink()
    eng = await _open(small_state / "state", criu_path)
    assert await nothing_lost(eng, model, "full", answer, _shm(), tmp_path) == "running"


# ---------------------------------------------------------------------- a damaged checkpoint


def _damage(state_dir: Path, name: str, how: str) -> None:
    top = state_dir / name
    images = top / "images"
    if how == "truncated-image":
        biggest = max(images.glob("pages-*.img"), key=lambda p: p.stat().st_size)
        os.truncate(biggest, biggest.stat().st_size // 2)
    elif how == "image-symlink":
        biggest = max(images.glob("pages-*.img"), key=lambda p: p.stat().st_size)
        copy = top / "elsewhere.img"
        os.rename(biggest, copy)
        os.symlink(copy, biggest)
    elif how == "saved-file-symlink":
        (stored,) = [p for p in (top / "files").rglob("*") if p.is_file()]
        copy = top / "elsewhere"
        os.rename(stored, copy)
        os.symlink(copy, stored)
    elif how == "tampered-manifest":
        mpath = top / "manifest.json"
        data = json.loads(mpath.read_text())
        first = sorted(data["image_sizes"])[0]
        data["image_sizes"][first] += 1
        mpath.write_text(json.dumps(data))
    elif how == "garbage-manifest":
        (top / "manifest.json").write_text('{"model": "x", "pids": [')


@pytest.mark.parametrize("how", ["truncated-image", "image-symlink", "saved-file-symlink",
                                 "tampered-manifest", "garbage-manifest"])
async def test_a_damaged_checkpoint_is_refused_before_criu_by_name(
    how: str, model: Model, criu_path: str, state_dir: Path, tmp_path: Path
) -> None:
    """A checkpoint changed after its commit (truncated, a link planted, its manifest
    edited or broken) is refused with a named error before CRIU or any file is put back;
    the running model is untouched; a new checkpoint replaces the damaged one."""
    eng = await _open(state_dir, criu_path, memory_tier_limit_bytes=0)
    answer = await model.answer()
    m = await eng.checkpoint(ME, "d", model.root, leave_running=True)
    assert any(f.reason == "dev-shm" for f in m.files)
    _damage(state_dir, "d", how)
    # as after a restart of the service; the images on disk (no memory tier): the damage
    # is done to the disk's copy
    eng = await _open(state_dir, criu_path, memory_tier_limit_bytes=0)
    if how == "garbage-manifest":
        assert eng.list_checkpoints() == []
        with pytest.raises(NotFound):
            await eng.restore(ME, "d")
    else:
        with pytest.raises(ManifestMismatch) as err:
            await eng.restore(ME, "d")
        expected = {"truncated-image": "checkpoint 'd' is damaged",
                    "image-symlink": "not a regular file (a symbolic link planted?)",
                    "saved-file-symlink": "is a symbolic link in the checkpoint",
                    "tampered-manifest": "checkpoint 'd' is damaged"}
        assert expected[how] in str(err.value), str(err.value)
        assert not _criu_children()
    assert await nothing_lost(eng, model, "d", answer, _shm(), tmp_path) == "running"


def _stopped_clone(action: str, images_dir: Path) -> subprocess.Popen[bytes]:
    """A stand-in for a helper task a dying CRIU left: CRIU's argv, stopped."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", action,
                             "--images-dir", str(images_dir)])
    os.kill(proc.pid, signal.SIGSTOP)
    return proc


async def test_start_up_ends_the_stopped_helpers_of_a_dump_cut_short(
    criu_path: str, state_dir: Path, tmp_path: Path
) -> None:
    """The same for a dump: its staging folder names the images, and what CRIU left with
    that (unique) folder in its argv is killed at start-up; another dump's is not."""
    staging = state_dir / ".tmp-m-0badc0de" / "images"
    staging.mkdir(parents=True)
    other = tmp_path / "other" / "images"

    helper, unrelated = _stopped_clone("dump", staging), _stopped_clone("dump", other)
    try:
        await _open(state_dir, criu_path)
        assert helper.wait(10) == -signal.SIGKILL
        assert unrelated.poll() is None
        assert not staging.parent.exists(), "the staging folder is cleaned"
    finally:
        for p in (helper, unrelated):
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()


async def test_start_up_ends_the_stopped_helpers_of_a_restore_cut_short(
    criu_path: str, state_dir: Path, tmp_path: Path
) -> None:
    """A CRIU killed mid-restore (with the service) can leave its helper tasks stopped:
    clones of CRIU, its argv, outside the tree's PIDs. The journal the next start-up reads
    names the images and when the restore began: what CRIU of those images left since then
    is killed; a process from before, or of other images, is not."""
    images = state_dir / "m" / "images"

    older = _stopped_clone("restore", images)  # born before the restore began: not its work
    await asyncio.sleep(0.05)
    floor = proctree.now_ticks()
    await asyncio.sleep(0.05)
    helper = _stopped_clone("restore", images)
    other = _stopped_clone("restore", tmp_path / "other" / "images")
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / ".restoring-m.json").write_text(json.dumps(
            {"view": None, "paths": [], "pids": [], "criu_start": None, "floor": floor,
             "log": str(images / "restore.log")}))
        eng = await _open(state_dir, criu_path)
        assert helper.wait(10) == -signal.SIGKILL
        assert older.poll() is None and other.poll() is None
        assert not list(state_dir.glob(".restoring-*")), "the journal is done with"
        del eng
    finally:
        for p in (older, helper, other):
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()


async def test_start_up_reads_a_journal_whose_last_write_was_cut_short(
    criu_path: str, state_dir: Path
) -> None:
    """The service killed while writing a restore journal leaves ``….json.new``: a complete
    first version is taken as the journal (and done with), a torn one is removed; none is
    left for ever."""
    state_dir.mkdir(parents=True)
    images = state_dir / "a" / "images"
    complete = {"view": None, "paths": [], "pids": [], "criu_start": None,
                "floor": proctree.now_ticks(), "log": str(images / "restore.log")}
    (state_dir / ".restoring-a.json.new").write_text(json.dumps(complete))
    (state_dir / ".restoring-b.json.new").write_text('{"view": nu')
    (state_dir / ".restoring-c.json").write_text(json.dumps(complete))
    (state_dir / ".restoring-c.json.new").write_text(json.dumps(complete))
    await _open(state_dir, criu_path)
    assert not list(state_dir.glob(".restoring-*"))
