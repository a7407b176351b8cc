"""Two hosts on one machine, meeting only through the remote checkpoint store.

Host A and host B each have their own bus, llmuxd (own state directory) and shim in a
podman container with a network namespace of its own (podman's bridge; the test reaches
each shim on a port published on the machine's loopback); they share only the store: a moto
S3 server on the machine's loopback, which only llmuxd talks to, or a shared folder
(file://). Host A cold-starts the model and checkpoints it (llmuxd uploads it in
the background); host A's shim and llmuxd then stop. Host B, which never saw the model,
finds the checkpoint in the store at start, and the first wake restores it: the same
answer, not a cold start. A checkpoint whose compatibility fields this host does not
satisfy is refused before the download and B cold-starts, with the reason in last_error.

What differs from two real hosts is only the machine they share: the hosts use one shim
config, ports included, as real hosts would, and the test holds both of those ports on the
machine's loopback throughout: the shim's port is inside each container's network
namespace (A's and B's at once), the engine's inside the engine's own (llmux.shim.netns),
so host B needs neither port free on the machine, as it needed host A's engine port when
the containers shared the machine's network. The engine's port still names its TMPDIR,
which a restored tree keeps, so a host restores it only with the same model config.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmux.service.core.pidns import inner_pids
from llmux.service.core.remote import RECORD
from tests.support.podman_shim import MODEL, Reaper, ShimContainer
from tests.support.s3server import MotoServer
from tests.support.twohosts import Host, host, remote_toml

pytestmark = [pytest.mark.podman, pytest.mark.criu, pytest.mark.dbus, pytest.mark.s3]

BUCKET = "llmux-e2e"


@pytest.fixture
def ports() -> Iterator[tuple[int, int]]:
    """(the shim's port, the engine's) of both hosts' config: held by listeners on the
    machine's loopback for the whole test, so a shim or engine that needed them there
    would fail."""
    held = []
    try:
        for _ in range(2):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen()
            held.append(s)
        yield held[0].getsockname()[1], held[1].getsockname()[1]
    finally:
        for s in held:
            s.close()


def own_networks(*shims: ShimContainer) -> list[str]:
    """The shims' network namespaces: each its own, none the machine's."""
    found = [shim.net_ns for shim in shims]
    mine = os.readlink("/proc/self/ns/net")
    assert len(set(found)) == len(found) and mine not in found, (found, mine)
    return found


@pytest.fixture
def moto() -> Iterator[MotoServer]:
    server = MotoServer().start()
    server.bucket(BUCKET)
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(params=["s3", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(llmuxd.toml's [remote] table, kind): the moto server or a shared folder."""
    if request.param == "file":
        shared = tmp_path / "shared-store"
        shared.mkdir()
        yield remote_toml(f"file://{shared}"), "file"
        return
    moto: MotoServer = request.getfixturevalue("moto")
    creds = moto.credentials_file(tmp_path / "aws-credentials")
    yield remote_toml(f"s3://{BUCKET}/e2e", moto.endpoint, str(creds)), "s3"


def tamper_record(kind: str, tmp_path: Path, moto: MotoServer | None, field: str,
                  value: str) -> None:
    """Change one compatibility field of the store's record of MODEL."""
    if kind == "file":
        path = tmp_path / "shared-store" / MODEL / RECORD
        data = json.loads(path.read_text())
        data["manifest"]["compat"][field] = value
        path.write_text(json.dumps(data))
        return
    assert moto is not None
    s3 = moto.client()
    key = f"e2e/{MODEL}/{RECORD}"
    data = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data["manifest"]["compat"][field] = value
    s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(data).encode())


def checkpoint_on_a(tmp_path: Path, podman_rootfs: str, config: str, reaper: Reaper,
                    ports: tuple[int, int]) -> tuple[str, list[int]]:
    """Host A: cold start, sleep (checkpoint), upload; A's shim and llmuxd gone after.
    (the answer, the engine's PIDs inside its namespace)."""
    with host("a", tmp_path / "host-a", podman_rootfs, config, port=ports[0],
              engine_port=ports[1]) as a:
        first, inner, shim = checkpoint(a, reaper)
        shim.stop()
    copy_model_cache(tmp_path)
    return first, inner


def checkpoint(a: Host, reaper: Reaper) -> tuple[str, list[int], ShimContainer]:
    """On host A: cold start, sleep (checkpoint), upload. (the answer, the engine's PIDs
    inside its namespace, A's shim, still running)."""
    shim = a.shims.start("a")
    first = shim.answer()
    status = shim.model_status()
    assert status["last_wake"] == "cold", status
    pids = list(status["pids"])
    reaper.watch(pids)
    inner = inner_pids(pids)  # the PIDs inside the engine's namespace: a restore keeps them
    body = shim.control("sleep")
    assert body["state"] == "checkpointed", f"{body}\n{shim.logs()}"
    a.wait_location("both")  # uploaded: in the store and on A
    return first, inner, shim


def copy_model_cache(tmp_path: Path) -> None:
    """The model's weights are on host B as on any host that serves it (its model cache):
    the restored engine reloads them from there after a discard."""
    shutil.copytree(tmp_path / "host-a" / "shared" / "hf", tmp_path / "host-b" / "shared" / "hf")


def test_host_b_wakes_the_model_from_the_store(
    tmp_path: Path, podman_rootfs: str, store: tuple[str, str], reaper: Reaper,
    ports: tuple[int, int],
) -> None:
    """Host A stays up, its shim idle, while host B wakes the model: both shims on the same
    ports at once, each in its own network namespace."""
    config, _kind = store
    port, engine_port = ports
    with host("a", tmp_path / "host-a", podman_rootfs, config, port=port,
              engine_port=engine_port) as a:
        first, inner, shim_a = checkpoint(a, reaper)
        copy_model_cache(tmp_path)
        with host("b", tmp_path / "host-b", podman_rootfs, config, port=port,
                  engine_port=engine_port) as b:
            wake_on_b(b, first, inner, reaper, shim_a)
        shim_a.stop()


def wake_on_b(b: Host, first: str, inner: list[int], reaper: Reaper,
              shim_a: ShimContainer) -> None:
    """Host B, while host A is up: the stored checkpoint restored, the same answer."""
    assert b.location() == "remote", "host B's llmuxd does not list the stored checkpoint"
    assert not (b.daemon.state_dir / MODEL).exists()
    shim = b.shims.start("b")
    own_networks(shim_a, shim)
    assert shim_a.status()["models"][MODEL]["state"] == "checkpointed"
    assert shim.model_status()["state"] == "checkpointed", shim.model_status()
    body = shim.control("wake")
    assert body["state"] == "running", body
    status = shim.model_status()
    assert status["last_wake"] == "restore", f"{status}\n{shim.logs()}\n" \
                                             f"{b.daemon.log()[-4000:]}"
    pids = list(status["pids"])
    reaper.watch(pids)
    assert sorted(inner_pids(pids)) == sorted(inner), (pids, inner_pids(pids), inner)
    assert shim.answer() == first
    assert b.location() == "both", "keep_local: B keeps the downloaded copy"
    assert "downloaded checkpoint" in b.daemon.log()
    shim.stop()


def test_an_incompatible_checkpoint_is_a_cold_start_with_the_reason(
    tmp_path: Path, podman_rootfs: str, store: tuple[str, str], reaper: Reaper,
    request: pytest.FixtureRequest, ports: tuple[int, int],
) -> None:
    config, kind = store
    first, _pids = checkpoint_on_a(tmp_path, podman_rootfs, config, reaper, ports)
    moto = request.getfixturevalue("moto") if kind == "s3" else None
    tamper_record(kind, tmp_path, moto, "kernel_release", "0.0.1-other")

    with host("b", tmp_path / "host-b", podman_rootfs, config, port=ports[0],
              engine_port=ports[1]) as b:
        shim = b.shims.start("b")
        assert shim.model_status()["state"] == "checkpointed"
        assert shim.answer() == first  # the first request: restore refused, cold start
        status = shim.model_status()
        assert status["state"] == "running" and status["last_wake"] == "cold", status
        reaper.watch(list(status["pids"]))
        error = status["last_error"] or ""
        assert "org.llmux.Error.ManifestMismatch" in error, status
        assert "kernel_release" in error and "0.0.1-other" in error, error
        assert not (b.daemon.state_dir / MODEL).exists(), "B downloaded a refused checkpoint"
        assert b.location() == "remote", "the stored checkpoint is kept"
        shim.stop()


def test_the_store_unreachable_at_the_wake_is_a_cold_start_with_the_reason(
    tmp_path: Path, podman_rootfs: str, moto: MotoServer, reaper: Reaper,
    ports: tuple[int, int],
) -> None:
    creds = moto.credentials_file(tmp_path / "aws-credentials")
    config = remote_toml(f"s3://{BUCKET}/e2e", moto.endpoint, str(creds))
    first, _pids = checkpoint_on_a(tmp_path, podman_rootfs, config, reaper, ports)

    with host("b", tmp_path / "host-b", podman_rootfs, config, port=ports[0],
              engine_port=ports[1]) as b:
        shim = b.shims.start("b")
        assert shim.model_status()["state"] == "checkpointed"
        moto.kill()  # the store goes away between the listing and the wake
        assert shim.answer() == first
        status = shim.model_status()
        assert status["state"] == "running" and status["last_wake"] == "cold", status
        reaper.watch(list(status["pids"]))
        error = status["last_error"] or ""
        assert "org.llmux.Error.StoreFailed" in error and "unreachable" in error, status
        assert moto.endpoint in error, error
        assert not (b.daemon.state_dir / MODEL).exists()
        shim.stop()
