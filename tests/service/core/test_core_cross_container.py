"""Cross-container restore with minimal real containers (no container runtime needed).

Each "container" is what podman --rootfs /:O --pid=host --network=host makes: an overlay of
the host root with its own writable layer, mounted on the host, and a private mount
namespace that pivots into it, with /dev bound from the host and its own /proc. The test
tree runs in container A; the checkpoint is restored for a caller in container B: B's rootfs
(--root), B's bind mounts (external keys), the files of A's writable layer put back into B.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llmux.common import proctree
from llmux.service.core.container import ContainerContext
from llmux.service.core.engine import Caller, CheckpointEngine
from tests.support.criu_testlib import TARGET, reap, reaping
from tests.support.procs import mount_overlay, wait_until_async

pytestmark = pytest.mark.criu

ENTER = """#!/bin/sh
# enter MERGED CMD...: run CMD in a new mount namespace whose root is MERGED
M=$1; shift
exec unshare --mount --propagation private sh -c '
M=$1; shift
mount --rbind /dev "$M/dev" && mount -t proc proc "$M/proc" || exit 1
cd "$M" && mkdir -p .oldroot && pivot_root . .oldroot && umount -l /.oldroot || exit 1
cd / && exec "$@"' sh "$M" "$@"
"""


@dataclass
class Containers:
    base: Path
    enter: Path
    mounted: list[Path] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def rootfs(self, name: str) -> Path:
        d = self.base / name
        mount_overlay(d)
        self.mounted.append(d / "merged")
        return d

    def run(self, rootfs: Path, *argv: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [str(self.enter), str(rootfs / "merged"), *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc


@pytest.fixture
def containers(tmp_path: Path) -> Iterator[Containers]:
    if os.geteuid() != 0 or not Path("/usr/bin/unshare").exists():
        pytest.skip("needs root and unshare")
    enter = tmp_path / "enter"
    enter.write_text(ENTER)
    enter.chmod(0o755)
    c = Containers(tmp_path / "ctr", enter)
    try:
        yield c
    finally:
        for p in c.procs:
            p.kill()
            p.wait()
        for m in reversed(c.mounted):
            subprocess.run(["umount", "-l", str(m)], check=False)


async def _ping(port: int) -> list[str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"ping\n")
    line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    return line.decode().split()


@pytest.fixture
async def reaped_pids() -> AsyncIterator[list[int]]:
    """Reaps the given PIDs while the test runs (restored trees are the test's children)."""
    pids: list[int] = []

    async with reaping(lambda: pids):
        yield pids


async def test_restore_into_another_container(
    engine: CheckpointEngine, containers: Containers, tmp_path: Path, reaped_pids: list[int]
) -> None:
    workdir = tmp_path / "wd"  # exists in the lower layer (the host root) before mounting
    workdir.mkdir()
    a = containers.rootfs("a")
    b = containers.rootfs("b")
    target = containers.run(
        a, "sh", "-c", f"exec {sys.executable} {TARGET} {workdir} </dev/null >/dev/null 2>&1"
    )
    ready_in_a = a / "merged" / str(workdir).lstrip("/") / "ready"

    def ready() -> bool:
        assert target.poll() is None, "target died in container A"
        return ready_in_a.exists()

    await wait_until_async(ready, 60, "the target to be ready in container A")
    info = json.loads(ready_in_a.read_text())
    pids = [info["pid"], info["child"]]
    reaped_pids.extend(pids)
    try:
        assert info["pid"] == target.pid
        assert (await _ping(info["port"]))[3] == "1"
        ctx = ContainerContext.from_pid(target.pid)
        assert ctx.foreign and ctx.rootfs_host_path == str(a / "merged")
        assert "/dev" in [e.mount_point for e in ctx.externals]

        admin = Caller(pid=os.getpid(), uid=0)
        m = await engine.checkpoint(admin, "xc", target.pid)
        saved = {f.path for f in m.files}
        assert f"{workdir}/target.log" in saved  # only in A's writable layer
        assert m.foreign_mntns and m.rootfs == {"kind": "overlay", "lowerdirs": ["/"]}
        target.wait()
        await wait_until_async(lambda: not proctree.taken(pids), 30,
                               f"the dumped tree {pids} to be gone")

        # Container A goes away (its writable layer with it); B asks for the model back.
        subprocess.run(["umount", "-l", str(a / "merged")], check=True)
        caller_b = containers.run(b, "sleep", "600")
        host_ns = os.readlink("/proc/self/ns/mnt")

        def entered() -> bool:  # B's sleep runs in its own namespace (pivoted)
            with contextlib.suppress(OSError):
                return os.readlink(f"/proc/{caller_b.pid}/ns/mnt") != host_ns and os.readlink(
                    f"/proc/{caller_b.pid}/exe"
                ).endswith("sleep")
            return False

        def started() -> bool:
            assert caller_b.poll() is None, "container B failed to start"
            return entered()

        await wait_until_async(started, 20, "container B's caller to run in its namespace")
        r = await engine.restore(Caller(pid=caller_b.pid, uid=0), "xc")
        assert r.pids == pids
        # Same PIDs, TCP listener and ZMQ ipc link alive, in B's filesystem.
        assert await _ping(info["port"]) == ["pong", str(pids[0]), str(pids[1]), "2"]
        restored = ContainerContext.from_pid(pids[0])
        assert restored.overlay is not None
        assert restored.overlay.upperdir == str(b / "upper")
        log_in_b = b / "upper" / str(workdir).lstrip("/") / "target.log"
        assert "answered" in log_in_b.read_text()
    finally:
        for pid in pids:
            if str(workdir) in proctree.cmdline(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
        deadline = time.monotonic() + 10
        while proctree.taken(pids) and time.monotonic() < deadline:
            reap(pids)
            await asyncio.sleep(0.05)
        with contextlib.suppress(OSError):
            os.unlink(info["ipc"].removeprefix("ipc://"))
