"""The client library (client/hostclient.py) against a real llmuxd on the private
system-style bus (tests.support.llmuxd_harness), with CRIU: jobs, progress, signals, and
named failures."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from llmux.client.errors import ConnectionFailed
from llmux.client.hostclient import HostClient, JobProgress
from llmux.common import errors
from tests.support.dbus_jobs import SignalRecorder, counts_on, no_half_checkpoints
from tests.support.llmuxd_harness import OBJECT_PATH, Llmuxd
from tests.support.procs import pid_alive, wait_until_async

pytestmark = [pytest.mark.dbus, pytest.mark.criu]


async def test_hostclient_checkpoint_then_restore(llmuxd: Llmuxd, spawn_counter) -> None:
    target = spawn_counter(megabytes=64)
    progress: list[JobProgress] = []
    async with (
        SignalRecorder(llmuxd.bus.address) as recorder,
        HostClient(llmuxd.bus.address) as client,
    ):
        props = await client.checkpoint(
            "tiny-0.1b", target.pid, gpus=[1, 0], progress=progress.append, timeout=120
        )
        assert props.model == "tiny-0.1b"
        assert props.gpus == [1, 0]  # kept as said, for a caller started afresh
        assert props.root_pid == target.pid and props.pids[0] == target.pid
        assert props.size_bytes > 64 << 20
        assert json.loads(props.manifest)["root_pid"] == target.pid
        assert progress and progress[-1].fraction == 1.0
        assert all(0.0 <= p.fraction <= 1.0 for p in progress)

        job_id, job_path = recorder.members("JobNew")[0]
        removed = await recorder.wait_for("JobRemoved")
        assert removed == [job_id, job_path, "done"]
        completed = [b for n, path, b in recorder.signals if n == "Completed" and path == job_path]
        assert completed == [[True, "", ""]]
        added = [b[0] for b in recorder.members("InterfacesAdded")]
        checkpoint = f"{OBJECT_PATH}/checkpoint/tiny_2d0_2e1b"
        assert checkpoint in added
        # the work behind the dump is announced as it lands, not at the next job: the
        # images' durable copy (Storage), and the disk's free bytes it took (FreeBytes)
        await wait_until_async(
            lambda: "memory+disk" in recorder.announced(checkpoint, "Storage"), 60,
            "Storage memory+disk announced")
        await wait_until_async(lambda: recorder.announced(OBJECT_PATH, "FreeBytes"), 30,
                               "FreeBytes announced")
        assert [c.model for c in await client.list_checkpoints()] == ["tiny-0.1b"]
        assert llmuxd.ok("ListCheckpoints") == [
            [["tiny-0.1b", f"{OBJECT_PATH}/checkpoint/tiny_2d0_2e1b"]]
        ]

        # our unreaped zombie holds the PID: the restore waits, the client gives up and cancels
        with pytest.raises(errors.Timeout) as late:
            await client.restore("tiny-0.1b", timeout=0.5)
        assert late.value.dbus_name == "org.llmux.Error.Timeout"
        assert recorder.members("JobRemoved")[-1][2] == "cancelled"
        assert recorder.members("Completed")[-1][:2] == [False, "org.llmux.Error.Cancelled"]
        assert await client.get_checkpoint("tiny-0.1b") is not None

        target.reap()  # CRIU killed it after the dump
        reached = target.last()
        restored = await client.restore("tiny-0.1b", keep_images=False, timeout=120)
        assert restored.root_pid == target.pid
        assert pid_alive(target.pid)
        counts_on(target, reached)
        assert await client.list_checkpoints() == []
        assert await client.get_checkpoint("tiny-0.1b") is None
        removed_paths = [b[0] for b in recorder.members("InterfacesRemoved")]
        assert f"{OBJECT_PATH}/checkpoint/tiny_2d0_2e1b" in removed_paths

        with pytest.raises(errors.NotFound) as refused:  # the service's own class
            await client.restore("tiny-0.1b")
        assert refused.value.dbus_name == "org.llmux.Error.NotFound"
        with pytest.raises(errors.AccessDenied) as denied:
            await client.checkpoint("other", 1)
        assert denied.value.dbus_name == "org.llmux.Error.AccessDenied"
    no_half_checkpoints(llmuxd.state_dir)


def test_hostclient_reports_named_failures(llmuxd: Llmuxd) -> None:
    async def run() -> None:
        async with HostClient(llmuxd.bus.address) as client:
            info = await client.info()
            assert info.state_dir == str(llmuxd.state_dir)
            with pytest.raises(errors.InvalidArgument) as bad:
                await client.checkpoint("../x", os.getpid())
            assert bad.value.dbus_name == "org.llmux.Error.InvalidArgument"
            with pytest.raises(errors.NotFound) as missing:
                await client.delete_checkpoint("nothing")
            assert missing.value.dbus_name == "org.llmux.Error.NotFound"
            assert await client.get_checkpoint("nothing") is None

    asyncio.run(run())
    with pytest.raises(ConnectionFailed) as unreachable:
        asyncio.run(HostClient("unix:path=/nonexistent/socket").connect())
    assert unreachable.value.dbus_name == "org.llmux.Error.Client.ConnectionFailed"
