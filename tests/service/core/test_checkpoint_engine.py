"""The checkpoint engine with real CRIU on real process trees (root, CRIU 4.x)."""

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
from llmux.common.errors import (
    AccessDenied,
    Busy,
    CriuFailed,
    InvalidArgument,
    ManifestMismatch,
    NoSpace,
    NoSuchProcess,
    NotFound,
    PidInUse,
    Unsupported,
)
from llmux.service.core.engine import (
    Caller,
    CheckpointEngine,
    EngineConfig,
    Progress,
)
from llmux.service.core.store import FINAL_KILL, CheckpointStore
from tests.support.criu_testlib import Target, TargetFactory, blocking_criu, criu_after_dump
from tests.support.procs import hold_pid, wait_until_async

pytestmark = pytest.mark.criu

ME = Caller(pid=os.getpid(), uid=0)


async def _open(state_dir: Path, criu: str) -> CheckpointEngine:
    """A CheckpointEngine on state_dir that runs criu, with CUDA off."""
    return await CheckpointEngine.open(
        EngineConfig(state_dir=state_dir, criu_path=criu, cuda_mode="off")
    )


async def _open_after_dump(
    state_dir: Path, tmp_path: Path, criu_path: str, then: str, spawn_target: TargetFactory
) -> tuple[CheckpointEngine, Target, Path]:
    """_open with criu_after_dump's wrapper (it runs ``then`` once CRIU completed the dump),
    a target tree, and the marker file the wrapper creates at that moment."""
    wrapper, marker = criu_after_dump(tmp_path, criu_path, then)
    eng = await _open(state_dir, wrapper)
    return eng, await spawn_target(), marker




def _assert_root_only(path: Path) -> None:
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    for dirpath, dirnames, names in os.walk(path):
        for d in dirnames:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, d)).st_mode) == 0o700, d
        for n in names:
            p = os.path.join(dirpath, n)
            assert stat.S_IMODE(os.lstat(p).st_mode) == 0o600, p
            assert os.lstat(p).st_uid == 0


async def test_checkpoint_then_restore_keeps_pids_and_links(
    engine: CheckpointEngine, spawn_target: TargetFactory, state_dir: Path
) -> None:
    t = await spawn_target()
    assert await t.ping() == ["pong", str(t.pid), str(t.child), "1"]
    seen: list[Progress] = []

    began = time.monotonic()
    m = await engine.checkpoint(ME, "tiny-model", t.pid, progress=seen.append)
    dump_wall = time.monotonic() - began
    assert m.model == "tiny-model"
    assert m.root_pid == t.pid
    assert m.pids == [t.pid, t.child]
    assert set(m.tids) >= {t.pid, t.child}
    assert m.cuda_pids == []
    assert m.criu_version.startswith("4.")
    assert m.kernel_release == os.uname().release
    assert m.images_bytes > 0
    assert seen[-1].status == "done" and seen[-1].fraction == 1.0
    await wait_until_async(lambda: not proctree.taken(t.pids), 30,
                           f"the dumped tree {t.pids} to be gone")

    listed = engine.list_checkpoints()
    assert [x.model for x in listed] == ["tiny-model"]
    assert engine.get_checkpoint("tiny-model").pids == m.pids
    ckpt = state_dir / "tiny-model"
    assert json.loads((ckpt / "manifest.json").read_text())["root_pid"] == t.pid
    _assert_root_only(state_dir)

    began = time.monotonic()
    r = await engine.restore(ME, "tiny-model", progress=seen.append)
    restore_wall = time.monotonic() - began
    assert r.pids == m.pids
    assert t.alive()
    # Same PIDs, the TCP listener answers, and the ZMQ ipc link to the child still counts.
    assert await t.ping() == ["pong", str(t.pid), str(t.child), "2"]
    assert "answered" in (t.workdir / "target.log").read_text().splitlines()[-1]
    assert engine.get_checkpoint("tiny-model")  # keep_images defaults to True
    print(
        f"\n[bench] test target: dump {m.dump_seconds:.3f}s (job {dump_wall:.3f}s, "
        f"{m.images_bytes >> 20} MiB), restore job {restore_wall:.3f}s"
    )

    # And once more: a restored tree can be checkpointed and restored again.
    m2 = await engine.checkpoint(ME, "tiny-model", t.pid)
    assert m2.pids == m.pids
    await engine.restore(ME, "tiny-model", keep_images=False)
    assert await t.ping() == ["pong", str(t.pid), str(t.child), "3"]
    assert engine.list_checkpoints() == []
    assert not (state_dir / "tiny-model").exists()


async def test_leave_running_then_restore_refused_while_pids_live(
    engine: CheckpointEngine, spawn_target: TargetFactory
) -> None:
    t = await spawn_target()
    m = await engine.checkpoint(ME, "lr", t.pid, leave_running=True)
    assert m.leave_running
    assert t.alive()
    assert (await t.ping())[0] == "pong"
    with pytest.raises(PidInUse) as err:
        await engine.restore(ME, "lr")
    assert str(t.pid) in str(err.value) and "target.py" in str(err.value)
    assert engine.get_checkpoint("lr")  # kept
    assert (await t.ping())[0] == "pong"


async def test_restore_with_pid_taken_names_the_holder_and_keeps_checkpoint(
    engine: CheckpointEngine, spawn_target: TargetFactory
) -> None:
    t = await spawn_target()
    m = await engine.checkpoint(ME, "taken", t.pid)
    # not spawned by `llmux serve`: no PID namespace of its own, so its PIDs must be free
    assert not m.pid_namespace and m.inner_pids == []
    await wait_until_async(lambda: not proctree.taken(t.pids), 30,
                           f"the dumped tree {t.pids} to be gone")
    squatter = hold_pid(t.child)
    if squatter is None:
        pytest.skip("could not place a process on a chosen PID (busy machine)")
    try:
        with pytest.raises(PidInUse) as err:
            await engine.restore(ME, "taken")
        assert f"PID {t.child}" in str(err.value)
        assert "sleep 300" in str(err.value)
        assert engine.get_checkpoint("taken")
    finally:
        squatter.kill()
        squatter.wait()
    await engine.restore(ME, "taken")
    assert (await t.ping())[1:3] == [str(t.pid), str(t.child)]


async def test_cancel_during_dump_leaves_tree_running(
    criu_path: str,
    state_dir: Path,
    tmp_path: Path,
    spawn_target: TargetFactory,
    engine: CheckpointEngine,
) -> None:
    wrapper, marker = blocking_criu(tmp_path, criu_path)
    eng = await _open(state_dir, wrapper)
    t = await spawn_target()
    job = asyncio.create_task(eng.checkpoint(ME, "cancelled", t.pid))
    await wait_until_async(marker.exists, 30, f"criu to reach {marker.name}")
    # CRIU has written the images and holds the tree frozen: the worst moment to die.
    with pytest.raises(Busy):
        await eng.checkpoint(ME, "cancelled", t.pid)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert t.alive()
    assert (await t.ping())[0] == "pong"
    assert eng.list_checkpoints() == []
    assert [p.name for p in state_dir.iterdir() if not p.name.startswith(".restored")] == []
    # The model is free again, and the tree can still be checkpointed.
    m = await engine.checkpoint(ME, "cancelled", t.pid, leave_running=True)
    assert m.pids == t.pids


async def test_failed_dump_leaves_tree_running_with_log_excerpt(
    criu_path: str, state_dir: Path, tmp_path: Path, spawn_target: TargetFactory
) -> None:
    wrapper, _ = blocking_criu(tmp_path, criu_path, fail=True)
    eng = await _open(state_dir, wrapper)
    t = await spawn_target()
    with pytest.raises(CriuFailed) as err:
        await eng.checkpoint(ME, "fails", t.pid)
    assert "criu dump failed" in str(err.value)
    assert "Error" in str(err.value)
    assert t.alive()
    assert (await t.ping())[0] == "pong"
    assert eng.list_checkpoints() == []
    assert not any(p.name.startswith(".tmp-") for p in state_dir.iterdir())


async def test_manifest_mismatch_is_precise(
    engine: CheckpointEngine, spawn_target: TargetFactory, criu_path: str, state_dir: Path
) -> None:
    t = await spawn_target()
    await engine.checkpoint(ME, "mm", t.pid)
    path = state_dir / "mm" / "manifest.json"
    original = path.read_text()

    async def reopen_and_restore(**changes: object) -> str:
        data = json.loads(original)
        data.update(changes)
        path.write_text(json.dumps(data))
        eng = await _open(state_dir, criu_path)
        with pytest.raises(ManifestMismatch) as err:
            await eng.restore(ME, "mm")
        return str(err.value)

    assert "kernel 5.10.0-old" in await reopen_and_restore(kernel_release="5.10.0-old")
    assert "CRIU 3.17.1" in await reopen_and_restore(criu_version="3.17.1")
    msg = await reopen_and_restore(cuda_pids=[t.child], driver_version="999.1")
    assert "driver 999.1" in msg
    msg = await reopen_and_restore(rootfs={"kind": "overlay", "lowerdirs": ["/x"]})
    assert "another image" in msg
    # Untouched, it restores.
    path.write_text(original)
    eng = await _open(state_dir, criu_path)
    await eng.restore(ME, "mm")
    assert (await t.ping())[0] == "pong"


async def test_no_space_refused_and_tree_untouched(
    criu_path: str, tiny_tmpfs: Path, spawn_target: TargetFactory
) -> None:
    eng = await _open(tiny_tmpfs / "state", criu_path)
    t = await spawn_target()
    with pytest.raises(NoSpace) as err:
        await eng.checkpoint(ME, "big", t.pid)
    assert "MiB" in str(err.value) and str(tiny_tmpfs) in str(err.value)
    assert t.alive()
    assert list((tiny_tmpfs / "state").iterdir()) == []


def test_no_space_names_the_gpu_memory_a_cuda_checkpoint_brings(tiny_tmpfs: Path) -> None:
    """The refusal names both figures and the GPU part (weights and KV cache): the part an
    operator bounds with vLLM's --kv-cache-memory-bytes or --gpu-memory-utilization."""
    store = CheckpointStore(tiny_tmpfs)
    with pytest.raises(NoSpace) as err:
        store.check_space("big", 6 << 30, gpu_bytes=5 << 30)
    msg = str(err.value)
    assert "needs about 6144 MiB, 5120 MiB of it GPU memory (weights and KV cache)" in msg
    assert "has only 1 MiB free" in msg or "has only 0 MiB free" in msg, msg
    with pytest.raises(NoSpace) as err:
        store.check_space("big", 6 << 30)
    assert "GPU memory" not in str(err.value)


async def test_open_cleans_leftovers_and_skips_incomplete(criu_path: str, state_dir: Path) -> None:
    state_dir.mkdir(mode=0o755)
    (state_dir / ".tmp-m-1234" / "images").mkdir(parents=True)
    (state_dir / ".old-m-5678").mkdir()
    (state_dir / "incomplete" / "images").mkdir(parents=True)
    eng = await _open(state_dir, criu_path)
    names = sorted(p.name for p in state_dir.iterdir())
    assert names == ["incomplete"]
    assert eng.list_checkpoints() == []
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    with pytest.raises(NotFound):
        eng.get_checkpoint("incomplete")


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".hidden", "x" * 200, "a..b", "a b"])
async def test_bad_model_names(engine: CheckpointEngine, name: str) -> None:
    with pytest.raises(InvalidArgument):
        await engine.checkpoint(ME, name, os.getpid())
    with pytest.raises(InvalidArgument):
        await engine.restore(ME, name)
    with pytest.raises(InvalidArgument):
        engine.get_checkpoint(name)
    with pytest.raises(InvalidArgument):
        engine.delete_checkpoint(ME, name)
    with pytest.raises(InvalidArgument):
        await engine.suspend(ME, name, os.getpid())


async def test_bad_pids_and_missing_checkpoint(engine: CheckpointEngine) -> None:
    with pytest.raises(InvalidArgument):
        await engine.checkpoint(ME, "m", 0)
    with pytest.raises(InvalidArgument):
        await engine.checkpoint(ME, "m", 1, weights_bytes=-1)
    with pytest.raises(NoSuchProcess):
        await engine.checkpoint(ME, "m", 4_000_000)
    with pytest.raises(NotFound):
        await engine.restore(ME, "absent")
    with pytest.raises(NotFound):
        engine.delete_checkpoint(ME, "absent")


async def test_authorization_rules(engine: CheckpointEngine, spawn_target: TargetFactory) -> None:
    t = await spawn_target()
    user = Caller(pid=os.getpid(), uid=1000)  # not the host administrator
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        outsider = Caller(pid=stranger.pid, uid=1000)
        with pytest.raises(AccessDenied, match="outside the caller's container"):
            await engine.checkpoint(outsider, "a", t.pid)
        with pytest.raises(AccessDenied, match="ancestor"):
            await engine.checkpoint(Caller(t.child, 1000), "a", t.pid)
        with pytest.raises(AccessDenied, match="caller itself"):
            await engine.checkpoint(user, "a", os.getpid())
        with pytest.raises(AccessDenied):
            await engine.checkpoint(user, "a", 1)
        with pytest.raises(AccessDenied):
            await engine.suspend(outsider, "a", t.pid)
        assert t.alive()

        # Its own descendant: allowed; then ownership guards restore and delete.
        m = await engine.checkpoint(user, "a", t.pid)
        assert m.owner_uid == 1000
        with pytest.raises(AccessDenied, match="belongs to uid 1000"):
            await engine.restore(Caller(os.getpid(), 1001), "a")
        with pytest.raises(AccessDenied):
            engine.delete_checkpoint(Caller(os.getpid(), 1001), "a")
        await engine.restore(user, "a")
        # A tree restored for a container may be targeted by others in that container
        # (same cgroups), though it is not their descendant.
        assert not proctree.is_descendant(t.pid, stranger.pid)
        with pytest.raises(Unsupported):  # authorized; refused only for lack of CUDA state
            await engine.suspend(outsider, "a", t.pid)
        await engine.resume(outsider, "a", t.pid)
        engine.delete_checkpoint(user, "a")
        assert engine.list_checkpoints() == []
    finally:
        stranger.kill()
        stranger.wait()


async def test_old_criu_refused(tmp_path: Path, state_dir: Path) -> None:
    fake = tmp_path / "criu-old"
    fake.write_text("#!/bin/sh\necho 'Version: 3.17.1'\n")
    fake.chmod(0o755)
    with pytest.raises(Unsupported, match=r"CRIU 3\.17\.1 .* too old.*4\.0"):
        await CheckpointEngine.open(EngineConfig(state_dir=state_dir, criu_path=str(fake)))
    with pytest.raises(Unsupported, match="not found"):
        await CheckpointEngine.open(
            EngineConfig(state_dir=state_dir, criu_path=str(tmp_path / "nope"))
        )


async def test_info(engine: CheckpointEngine, state_dir: Path) -> None:
    info = engine.info()
    assert info.criu_version.startswith("4.")
    assert info.kernel_release == os.uname().release
    assert info.state_dir == str(state_dir)
    assert info.free_bytes > 0


async def test_suspend_without_cuda_is_refused_and_leaves_the_tree_running(
    engine: CheckpointEngine, spawn_target: TargetFactory
) -> None:
    t = await spawn_target()
    with pytest.raises(Unsupported, match="holds CUDA state"):
        await engine.suspend(ME, "s", t.pid)
    res = await engine.resume(ME, "s", t.pid)
    assert res.cuda_pids == []
    assert (await t.ping())[0] == "pong"


async def test_dump_completed_then_criu_fails_keeps_the_checkpoint(
    criu_path: str, state_dir: Path, tmp_path: Path, spawn_target: TargetFactory
) -> None:
    eng, t, _ = await _open_after_dump(state_dir, tmp_path, criu_path, "exit 1", spawn_target)
    m = await eng.checkpoint(ME, "late", t.pid)
    assert any("completed the dump" in w for w in m.warnings)
    await eng.restore(ME, "late")
    assert (await t.ping())[0] == "pong"


@pytest.mark.parametrize("when", ["after-criu-finished", "while-criu-killed-the-tree"])
async def test_service_death_after_dump_is_salvaged_at_start(
    criu_path: str, state_dir: Path, tmp_path: Path, spawn_target: TargetFactory, when: str
) -> None:
    """while-criu-killed-the-tree: CRIU was killed (with the service: PDEATHSIG, or the
    unit's cgroup) after it logged the start of the tree's kill and before its last line;
    part of the tree may still live. That dump is complete: start-up kills the rest of the
    tree (PID and start time from the job's journal; a reused PID is spared) and keeps it.
    Before the fix, the staging directory was removed with the tree already dead: lost."""
    eng, t, marker = await _open_after_dump(state_dir, tmp_path, criu_path, "exec sleep 120",
                                            spawn_target)
    job = asyncio.create_task(eng.checkpoint(ME, "crash", t.pid))
    await wait_until_async(marker.exists, 30, f"criu to reach {marker.name}")
    await wait_until_async(lambda: not proctree.taken(t.pids), 30,
                           f"the dumped tree {t.pids} to be gone")
    # What a service killed right now would leave behind: copy it into another state dir.
    other = tmp_path / "other-state"
    other.mkdir(mode=0o700)
    (tmp,) = [p for p in state_dir.iterdir() if p.name.startswith(".tmp-")]
    subprocess.run(["cp", "-a", str(tmp), str(other / tmp.name)], check=True)
    spared = None
    if when == "while-criu-killed-the-tree":
        log = other / tmp.name / "images" / "dump.log"
        text = log.read_text()
        log.write_text(text[: text.index("\n", text.index(FINAL_KILL)) + 1])
        journal = json.loads((other / tmp.name / "journal.json").read_text())
        left = subprocess.Popen(["sleep", "300"])  # a member CRIU had not killed yet
        spared = subprocess.Popen(["sleep", "300"])  # a PID reused since the journal
        start = proctree.start_times([left.pid, spared.pid])
        journal["tree"].update({str(left.pid): start[left.pid],
                                str(spared.pid): start[spared.pid] + 1})
        (other / tmp.name / "journal.json").write_text(json.dumps(journal))
    # Cancelled this late, the job keeps the checkpoint and says so.
    job.cancel()
    m = await job
    assert any("cancelled" in w for w in m.warnings)

    fresh = await _open(other, criu_path)
    fresh.pid_free_timeout = 1.0
    if spared is not None:
        assert left.wait(10) == -9
        assert spared.poll() is None
        spared.kill()
        spared.wait()
    (salvaged,) = fresh.list_checkpoints()
    assert salvaged.model == "crash" and salvaged.pids == t.pids
    assert any("salvaged" in w for w in salvaged.warnings)
    assert not any(p.name.startswith(".tmp-") for p in other.iterdir())
    await fresh.restore(ME, "crash")
    assert (await t.ping())[0] == "pong"


async def test_prepare_checks_and_claims_then_run_is_the_job(
    engine: CheckpointEngine, spawn_target: TargetFactory
) -> None:
    """prepare_* refuses before anything is touched and claims the model (and PID) until
    run() ends or release() lets go; a Prepared runs once."""
    t = await spawn_target()
    with pytest.raises(NotFound):
        await engine.prepare_restore(ME, "prepared")
    with pytest.raises(AccessDenied):
        await engine.prepare_checkpoint(ME, "prepared", 1)
    with pytest.raises(Unsupported):  # cuda_mode off: nothing to suspend
        await engine.prepare_suspend(ME, "prepared", t.pid)
    prepared = await engine.prepare_checkpoint(ME, "prepared", t.pid, leave_running=True)
    assert prepared.model == "prepared"
    assert engine.list_checkpoints() == [], "prepare dumps nothing"
    with pytest.raises(Busy):
        await engine.prepare_checkpoint(ME, "prepared", t.pid)
    with pytest.raises(Busy):
        await engine.prepare_resume(ME, "other", t.pid)  # the same root PID
    with pytest.raises(Busy):
        engine.delete_checkpoint(ME, "prepared")
    prepared.release()
    prepared.release()  # idempotent
    with pytest.raises(RuntimeError):
        await prepared.run()
    again = await engine.prepare_checkpoint(ME, "prepared", t.pid, leave_running=True)
    seen: list[Progress] = []
    m = await again.run(seen.append)
    assert m.pids == t.pids and seen[-1].status == "done"
    assert t.alive()
    resume = await engine.prepare_resume(ME, "prepared", t.pid)  # free again after run()
    assert (await resume.run()).cuda_pids == []
    restore = await engine.prepare_restore(ME, "prepared")  # PIDs still taken: the run says
    with pytest.raises(PidInUse):
        engine.pid_free_timeout = 0.2
        await restore.run()
    assert engine.get_checkpoint("prepared")
