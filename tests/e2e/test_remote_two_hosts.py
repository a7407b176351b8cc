"""Two hosts on one machine, meeting only through the remote checkpoint store.

Host A and host B each have their own bus, llmuxd (own state directory) and shim in a
podman container; they share only the store: a moto S3 server on loopback, or a shared
folder (file://). Host A cold-starts the model and checkpoints it (llmuxd uploads it in
the background); host A's shim and llmuxd then stop. Host B, which never saw the model,
finds the checkpoint in the store at start, and the first wake restores it: the same
answer, not a cold start. A checkpoint whose compatibility fields this host does not
satisfy is refused before the download and B cold-starts, with the reason in last_error.

Both hosts are one machine: B restores the tree's PIDs after A's tree is gone, so they
are free; a PID taken meanwhile would be PidInUse, and B would cold-start with that
reason (the test would show it in its failure).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmux.service.core.pidns import inner_pids
from llmux.service.core.remote import RECORD
from tests.support.podman_shim import MODEL, Reaper
from tests.support.s3server import MotoServer
from tests.support.twohosts import host, remote_toml

pytestmark = [pytest.mark.podman, pytest.mark.criu, pytest.mark.dbus, pytest.mark.s3]

BUCKET = "llmux-e2e"


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


def checkpoint_on_a(tmp_path: Path, podman_rootfs: str, config: str,
                    reaper: Reaper) -> tuple[str, list[int], int]:
    """Host A: cold start, sleep (checkpoint), upload; A's shim and llmuxd gone after.
    (the answer, the engine's PIDs inside its namespace, its port)."""
    with host("a", tmp_path / "host-a", podman_rootfs, config) as a:
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
        engine_port = a.shims.engine_port
        shim.stop()
    # the model's weights are on host B as on any host that serves it (its model cache):
    # the restored engine reloads them from there after a discard
    shutil.copytree(tmp_path / "host-a" / "shared" / "hf", tmp_path / "host-b" / "shared" / "hf")
    return first, inner, engine_port


def test_host_b_wakes_the_model_from_the_store(
    tmp_path: Path, podman_rootfs: str, store: tuple[str, str], reaper: Reaper,
) -> None:
    config, _kind = store
    first, inner, engine_port = checkpoint_on_a(tmp_path, podman_rootfs, config, reaper)

    with host("b", tmp_path / "host-b", podman_rootfs, config, engine_port=engine_port) as b:
        assert b.location() == "remote", "host B's llmuxd does not list the stored checkpoint"
        assert not (b.daemon.state_dir / MODEL).exists()
        shim = b.shims.start("b")
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
    request: pytest.FixtureRequest,
) -> None:
    config, kind = store
    first, _pids, engine_port = checkpoint_on_a(tmp_path, podman_rootfs, config, reaper)
    moto = request.getfixturevalue("moto") if kind == "s3" else None
    tamper_record(kind, tmp_path, moto, "kernel_release", "0.0.1-other")

    with host("b", tmp_path / "host-b", podman_rootfs, config, engine_port=engine_port) as b:
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
) -> None:
    creds = moto.credentials_file(tmp_path / "aws-credentials")
    config = remote_toml(f"s3://{BUCKET}/e2e", moto.endpoint, str(creds))
    first, _pids, engine_port = checkpoint_on_a(tmp_path, podman_rootfs, config, reaper)

    with host("b", tmp_path / "host-b", podman_rootfs, config, engine_port=engine_port) as b:
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
