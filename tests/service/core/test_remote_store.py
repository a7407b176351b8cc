"""Checkpoints through a remote store between two checkpoint engines ("hosts"), each with
its own state directory: real CRIU, a real shared folder (file://) and a real S3 server
(moto in server mode, tests/support/s3server.py) spoken to by boto3.

Host A checkpoints a tree and uploads it; host B, which never saw it, downloads and
restores it: the same PIDs answer. Then the faults: the S3 server killed mid-upload, one
byte changed in the store, the store unreachable at restore, wrong credentials, a missing
bucket, a compatibility field changed. Each is a named error; nothing is lost; no half
checkpoint is visible as complete.

Both hosts are this machine, so host B restores the tree's PIDs after A's tree is gone
(they are free then; a PID taken meanwhile would be PidInUse, which the test would name).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmux.common import proctree
from llmux.common.errors import ManifestMismatch, NotFound, StoreFailed
from llmux.service.core.config import RemoteConfig
from llmux.service.core.engine import Caller, CheckpointEngine, EngineConfig
from llmux.service.core.remote import RECORD
from tests.support.criu_testlib import Target, TargetFactory
from tests.support.procs import wait_until_async
from tests.support.s3server import MotoServer

pytestmark = [pytest.mark.criu, pytest.mark.s3]

ME = Caller(pid=os.getpid(), uid=0)
MODEL = "tiny-remote"
BUCKET = "llmux-checkpoints"


async def open_host(criu_path: str, state: Path, remote: RemoteConfig,
                    tier: Path | None = None) -> CheckpointEngine:
    """A host's llmuxd core on ``state``; with ``tier``, its memory tier there (1 GiB)."""
    tiered: dict[str, Any] = {"memory_tier_dir": tier, "memory_tier_limit_bytes": 1 << 30}
    eng = await CheckpointEngine.open(EngineConfig(
        state_dir=state, criu_path=criu_path, cuda_mode="off", remote=remote,
        **(tiered if tier is not None else {})))
    eng.pid_free_timeout = 5.0
    return eng


def after(answer: list[str]) -> list[str]:
    """The ping answer of a tree restored from a dump taken after ``answer``: the same
    PIDs, its counter carried on (the state came back, not a fresh start)."""
    return [*answer[:3], str(int(answer[3]) + 1)]


def where(engine: CheckpointEngine) -> dict[str, str]:
    return {i.model: i.location for i in engine.checkpoint_infos()}


@pytest.fixture
def moto() -> Iterator[MotoServer]:
    server = MotoServer().start()
    server.bucket(BUCKET)
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def s3_config(moto: MotoServer, tmp_path: Path) -> RemoteConfig:
    creds = moto.credentials_file(tmp_path / "aws-credentials")
    return RemoteConfig(url=f"s3://{BUCKET}/cluster-1", endpoint_url=moto.endpoint,
                        credentials_file=str(creds))


@pytest.fixture
def file_config(tmp_path: Path) -> RemoteConfig:
    shared = tmp_path / "shared-store"
    shared.mkdir()
    return RemoteConfig(url=f"file://{shared}")


async def dumped_on_a(host_a: CheckpointEngine, spawn_target: TargetFactory,
                      ballast_mb: int = 0) -> tuple[Target, list[str]]:
    """A tree checkpointed on host A (gone from it), uploaded; its ping answer."""
    t = await spawn_target(ballast_mb)
    answer = await t.ping()
    await host_a.checkpoint(ME, MODEL, t.pid)
    await wait_until_async(lambda: not proctree.taken(t.pids), 30, "the dumped tree to go")
    return t, answer


async def two_hosts_round_trip(criu_path: str, tmp_path: Path, remote: RemoteConfig,
                               spawn_target: TargetFactory) -> None:
    a = await open_host(criu_path, tmp_path / "host-a", remote)
    t, answer = await dumped_on_a(a, spawn_target)
    assert a.uploads is not None
    await a.uploads.wait()
    assert a.uploads.errors == {}
    assert where(a) == {MODEL: "both"}

    b = await open_host(criu_path, tmp_path / "host-b", remote)
    assert where(b) == {MODEL: "remote"}, "host B does not see the uploaded checkpoint"
    assert not (tmp_path / "host-b" / MODEL).exists()
    r = await b.restore(ME, MODEL)
    assert r.pids == t.pids
    assert await t.ping() == after(answer), "the restored tree answers otherwise"
    assert where(b) == {MODEL: "both"}, "keep_local: host B keeps its downloaded copy"
    # the restored host's copy is whole (the images the record lists, manifest last)
    assert (tmp_path / "host-b" / MODEL / "manifest.json").is_file()


async def test_two_hosts_through_a_shared_folder(
    criu_path: str, tmp_path: Path, file_config: RemoteConfig, spawn_target: TargetFactory,
) -> None:
    await two_hosts_round_trip(criu_path, tmp_path, file_config, spawn_target)
    store = Path(file_config.url.removeprefix("file://"))
    # root-only objects, no temporary names left, the record beside one generation
    top = sorted(p.name for p in (store / MODEL).iterdir())
    assert len(top) == 2 and RECORD in top, f"not one record beside one generation: {top}"
    assert not [p for p in store.rglob(".part-*")]
    assert all(p.stat().st_mode & 0o077 == 0 for p in store.rglob("*") if p.is_file())


async def test_two_hosts_through_s3(
    criu_path: str, tmp_path: Path, s3_config: RemoteConfig, spawn_target: TargetFactory,
) -> None:
    await two_hosts_round_trip(criu_path, tmp_path, s3_config, spawn_target)


async def test_keep_local_false_drops_the_downloaded_copy(
    criu_path: str, tmp_path: Path, file_config: RemoteConfig, spawn_target: TargetFactory,
) -> None:
    a = await open_host(criu_path, tmp_path / "host-a", file_config)
    t, answer = await dumped_on_a(a, spawn_target)
    assert a.uploads is not None
    await a.uploads.wait()
    cfg = RemoteConfig(url=file_config.url, keep_local=False)
    b = await open_host(criu_path, tmp_path / "host-b", cfg)
    await b.restore(ME, MODEL)
    assert await t.ping() == after(answer)
    assert where(b) == {MODEL: "remote"}


async def test_a_newer_dump_supersedes_the_upload(
    criu_path: str, tmp_path: Path, file_config: RemoteConfig, spawn_target: TargetFactory,
) -> None:
    a = await open_host(criu_path, tmp_path / "host-a", file_config)
    t = await spawn_target(64)
    await a.checkpoint(ME, MODEL, t.pid, leave_running=True)
    second = await a.checkpoint(ME, MODEL, t.pid, leave_running=True)
    assert a.uploads is not None
    await a.uploads.wait()
    assert a.remote is not None
    record = a.remote.record(MODEL)
    assert record.manifest.created == second.created, "the older dump's upload won"
    store = Path(file_config.url.removeprefix("file://"))
    generations = {p.name for p in (store / MODEL).iterdir() if p.is_dir()}
    assert generations == {record.generation}, f"stale generations left: {generations}"


async def test_a_checkpoint_in_the_memory_tier_is_uploaded_after_its_copy_to_disk(
    criu_path: str, tmp_path: Path, file_config: RemoteConfig, spawn_target: TargetFactory,
) -> None:
    a = await open_host(criu_path, tmp_path / "host-a", file_config, tier=tmp_path / "tier")
    t, answer = await dumped_on_a(a, spawn_target)
    assert a.uploads is not None
    await a.uploads.wait()
    assert a.uploads.errors == {}
    assert a.store.on_disk(MODEL), "uploaded before the images' copy to disk"
    assert a.store.in_memory(MODEL), "the memory copy stays for the restores"
    b = await open_host(criu_path, tmp_path / "host-b", file_config)
    await b.restore(ME, MODEL)
    assert await t.ping() == after(answer)


async def test_a_memory_copy_dropped_under_its_upload_is_uploaded_from_disk(
    criu_path: str, tmp_path: Path, file_config: RemoteConfig, spawn_target: TargetFactory,
) -> None:
    a = await open_host(criu_path, tmp_path / "host-a", file_config, tier=tmp_path / "tier")
    assert a.remote is not None and a.uploads is not None
    backend = a.remote.backend
    put_file = backend.put_file
    dropped: list[int] = []

    def put_then_drop(key: str, path: Path, cancelled: Any) -> None:
        put_file(key, path, cancelled)
        if not dropped:  # the tier gives its memory back after the first file is up
            dropped.append(a.store.drop_memory_copy(MODEL))

    backend.put_file = put_then_drop  # type: ignore[method-assign]
    t, answer = await dumped_on_a(a, spawn_target)
    await a.uploads.wait()
    assert dropped and dropped[0] > 0, "the memory copy was not dropped under the upload"
    assert not a.store.in_memory(MODEL) and a.store.on_disk(MODEL)
    assert a.uploads.errors == {}, a.uploads.errors
    (info,) = a.checkpoint_infos()
    assert (info.location, info.storage, info.problem) == ("both", "disk", "")
    b = await open_host(criu_path, tmp_path / "host-b", file_config)
    await b.restore(ME, MODEL)  # every file arrived, each sha256 checked
    assert await t.ping() == after(answer)


async def test_an_upload_stops_at_once_when_llmuxd_stops(
    criu_path: str, tmp_path: Path, moto: MotoServer, s3_config: RemoteConfig,
    spawn_target: TargetFactory,
) -> None:
    a = await open_host(criu_path, tmp_path / "host-a", s3_config)
    t = await spawn_target(300)
    await a.checkpoint(ME, MODEL, t.pid)
    s3 = moto.client()
    await wait_until_async(lambda: bool(s3.list_objects_v2(Bucket=BUCKET).get("KeyCount")),
                           30, "the upload to begin")
    assert a.uploads is not None and a.uploads.busy(MODEL), "the upload ended too soon"
    began = time.monotonic()
    a.uploads.cancel_all()  # what HostServer.stop does on SIGTERM
    await a.uploads.wait()
    assert time.monotonic() - began < 5, "the upload went on after llmuxd's stop"
    assert a.remote is not None
    with pytest.raises(NotFound):
        a.remote.record(MODEL)  # nothing half-uploaded visible
    assert where(a) == {MODEL: "local"}


# ------------------------------------------------------------------------------- faults


async def test_s3_server_killed_mid_upload_keeps_the_local_copy(
    criu_path: str, tmp_path: Path, moto: MotoServer, s3_config: RemoteConfig,
    spawn_target: TargetFactory,
) -> None:
    a = await open_host(criu_path, tmp_path / "host-a", s3_config)
    t = await spawn_target(200)
    answer = await t.ping()
    await a.checkpoint(ME, MODEL, t.pid)
    s3 = moto.client()

    def some_uploaded() -> bool:
        return bool(s3.list_objects_v2(Bucket=BUCKET).get("KeyCount"))

    await wait_until_async(some_uploaded, 30, "the upload to begin")
    assert a.uploads is not None and a.uploads.busy(MODEL), "the upload ended too soon"
    moto.kill()
    await a.uploads.wait()
    assert "unreachable" in a.uploads.errors[MODEL], a.uploads.errors
    assert where(a) == {MODEL: "local"}
    # the store back (empty, as moto forgets): nothing half-uploaded is visible
    again = MotoServer(port=moto.port).start()
    try:
        again.bucket(BUCKET)
        b = await open_host(criu_path, tmp_path / "host-b", s3_config)
        assert where(b) == {}
        with pytest.raises(NotFound):
            await b.restore(ME, MODEL)
    finally:
        again.kill()
    # nothing lost: host A restores its own copy
    await wait_until_async(lambda: not proctree.taken(t.pids), 30, "the dumped tree to go")
    await a.restore(ME, MODEL)
    assert await t.ping() == after(answer)


async def test_one_byte_changed_in_the_store_is_refused(
    criu_path: str, tmp_path: Path, moto: MotoServer, s3_config: RemoteConfig,
    spawn_target: TargetFactory,
) -> None:
    a = await open_host(criu_path, tmp_path / "host-a", s3_config)
    t, answer = await dumped_on_a(a, spawn_target)
    assert a.uploads is not None
    await a.uploads.wait()
    s3 = moto.client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    page = max((k for k in keys if "/images/pages-" in k),
               key=lambda k: s3.head_object(Bucket=BUCKET, Key=k)["ContentLength"])
    body = bytearray(s3.get_object(Bucket=BUCKET, Key=page)["Body"].read())
    body[len(body) // 2] ^= 0x01
    s3.put_object(Bucket=BUCKET, Key=page, Body=bytes(body))

    b = await open_host(criu_path, tmp_path / "host-b", s3_config)
    with pytest.raises(ManifestMismatch) as err:
        await b.restore(ME, MODEL)
    rel = page.split("/", 3)[3]
    assert "damaged" in str(err.value) and rel in str(err.value) and "sha256" in str(err.value)
    # nothing committed on B, no staging left; the store's record is still there
    assert where(b) == {MODEL: "remote"}
    assert [p.name for p in (tmp_path / "host-b").iterdir()
            if not p.name.startswith(".restored")] == []
    # nothing lost: A's copy restores
    await a.restore(ME, MODEL)
    assert await t.ping() == after(answer)


async def test_store_unreachable_at_restore(
    criu_path: str, tmp_path: Path, moto: MotoServer, s3_config: RemoteConfig,
    spawn_target: TargetFactory,
) -> None:
    a = await open_host(criu_path, tmp_path / "host-a", s3_config)
    await dumped_on_a(a, spawn_target)
    assert a.uploads is not None
    await a.uploads.wait()
    b = await open_host(criu_path, tmp_path / "host-b", s3_config)
    assert where(b) == {MODEL: "remote"}
    moto.kill()
    with pytest.raises(StoreFailed) as err:
        await b.restore(ME, MODEL)
    assert "unreachable" in str(err.value) and moto.endpoint in str(err.value)
    assert where(a) == {MODEL: "both"}  # A's copy untouched


async def test_store_unreachable_file_url(
    criu_path: str, tmp_path: Path, spawn_target: TargetFactory,
) -> None:
    gone = tmp_path / "not-mounted"
    cfg = RemoteConfig(url=f"file://{gone}")
    a = await open_host(criu_path, tmp_path / "host-a", cfg)
    t, answer = await dumped_on_a(a, spawn_target)
    assert a.uploads is not None
    await a.uploads.wait()
    assert "not a directory" in a.uploads.errors[MODEL]
    assert where(a) == {MODEL: "local"}
    await a.restore(ME, MODEL)
    assert await t.ping() == after(answer)


async def test_wrong_credentials(
    criu_path: str, tmp_path: Path, spawn_target: TargetFactory,
) -> None:
    server = MotoServer(auth=True).start()
    try:
        server.bucket(BUCKET)
        wrong = server.credentials_file(tmp_path / "wrong", key_id="AKIAWRONGWRONGWRONG1",
                                        secret="not-the-secret")
        cfg = RemoteConfig(url=f"s3://{BUCKET}", endpoint_url=server.endpoint,
                           credentials_file=str(wrong))
        a = await open_host(criu_path, tmp_path / "host-a", cfg)
        t, answer = await dumped_on_a(a, spawn_target)
        assert a.uploads is not None
        await a.uploads.wait()
        assert "refused the credentials" in a.uploads.errors[MODEL], a.uploads.errors
        assert where(a) == {MODEL: "local"}
        assert not server.client().list_objects_v2(Bucket=BUCKET).get("KeyCount")
        b = await open_host(criu_path, tmp_path / "host-b", cfg)
        with pytest.raises(StoreFailed) as err:
            await b.restore(ME, MODEL)
        assert "refused the credentials" in str(err.value)
        await a.restore(ME, MODEL)
        assert await t.ping() == after(answer)
    finally:
        server.kill()


async def test_missing_bucket(
    criu_path: str, tmp_path: Path, moto: MotoServer, spawn_target: TargetFactory,
) -> None:
    creds = moto.credentials_file(tmp_path / "aws-credentials")
    cfg = RemoteConfig(url="s3://no-such-bucket/x", endpoint_url=moto.endpoint,
                       credentials_file=str(creds))
    a = await open_host(criu_path, tmp_path / "host-a", cfg)
    t, answer = await dumped_on_a(a, spawn_target)
    assert a.uploads is not None
    await a.uploads.wait()
    assert "bucket 'no-such-bucket' does not exist" in a.uploads.errors[MODEL]
    b = await open_host(criu_path, tmp_path / "host-b", cfg)
    with pytest.raises(StoreFailed) as err:
        await b.restore(ME, MODEL)
    assert "does not exist" in str(err.value)
    await a.restore(ME, MODEL)
    assert await t.ping() == after(answer)


@pytest.mark.parametrize("field,value,shown", [
    ("cpu_features", "+llmux_imaginary_flag", "llmux_imaginary_flag"),
    ("kernel_release", "0.0.1-other", "'0.0.1-other'"),
    ("image", "sha256:0000", "'sha256:0000'"),
])
async def test_a_compatibility_field_changed_is_refused_before_the_download(
    criu_path: str, tmp_path: Path, file_config: RemoteConfig, spawn_target: TargetFactory,
    field: str, value: str, shown: str,
) -> None:
    a = await open_host(criu_path, tmp_path / "host-a", file_config)
    await dumped_on_a(a, spawn_target)
    assert a.uploads is not None
    await a.uploads.wait()
    store = Path(file_config.url.removeprefix("file://"))
    record_path = store / MODEL / RECORD
    data = json.loads(record_path.read_text())
    compat = data["manifest"]["compat"]
    assert set(compat) >= {"kernel_release", "cpu_features", "criu_version", "gpu_model",
                           "driver_version", "image"}
    here = compat[field]
    if value.startswith("+"):
        compat[field] = f"{here} {value[1:]}"
    else:
        compat[field] = value
    record_path.write_text(json.dumps(data))
    # the download would fail if it began: the images are gone from the store
    for img in store.glob(f"{MODEL}/*/images/pages-*.img"):
        img.unlink()

    b = await open_host(criu_path, tmp_path / "host-b", file_config)
    with pytest.raises(ManifestMismatch) as err:
        await b.restore(ME, MODEL)
    message = str(err.value)
    assert field in message and shown in message, message
    if not value.startswith("+"):
        assert repr(here)[:40] in message, f"this host's value is not named: {message}"
    assert not any((tmp_path / "host-b").glob(".tmp-*")), "a download began"
    with pytest.raises(ManifestMismatch):  # CheckRestore answers the same, as data
        await b.check_restore(ME, MODEL)


@pytest.fixture(autouse=True)
def _no_aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hosts read credentials from their files only, not from the tester's env."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)

