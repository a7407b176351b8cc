"""The remote store's record and the compatibility fields, read without CRIU: a record
that names a file outside the checkpoint is refused, and each field is compared by its
own rule."""

from __future__ import annotations

import json

import pytest

from llmux.common.errors import ManifestMismatch
from llmux.service.core import compat
from llmux.service.core.manifest import Manifest
from llmux.service.core.remote import RemoteFile, RemoteRecord

MANIFEST = Manifest(model="m", owner="root", owner_uid=0, root_pid=10, pids=[10],
                    cuda_pids=[], criu_version="4.2", kernel_release="6.1",
                    driver_version="", created=1.0)


def record_text(generation: str = "20261207T080000-abcd", rel: str = "images/pages-1.img",
                ) -> str:
    return RemoteRecord(MANIFEST, generation, {rel: RemoteFile(3, "00")}).to_json()


def test_a_record_round_trips() -> None:
    back = RemoteRecord.from_json(record_text(), "m/manifest.json")
    assert back.manifest == MANIFEST and back.files == {"images/pages-1.img": RemoteFile(3, "00")}


@pytest.mark.parametrize("rel", ["../../etc/passwd", "/etc/passwd", "images/../../x",
                                 "other/file"])
def test_a_record_naming_a_file_outside_the_checkpoint_is_refused(rel: str) -> None:
    with pytest.raises(ManifestMismatch, match="outside the checkpoint"):
        RemoteRecord.from_json(record_text(rel=rel), "m/manifest.json")


@pytest.mark.parametrize("generation", ["../x", "a/b", "", "." * 3])
def test_a_record_with_an_odd_generation_is_refused(generation: str) -> None:
    with pytest.raises(ManifestMismatch, match="invalid generation"):
        RemoteRecord.from_json(record_text(generation=generation), "m/manifest.json")


def test_a_torn_record_is_refused() -> None:
    text = record_text()
    with pytest.raises(ManifestMismatch, match="malformed"):
        RemoteRecord.from_json(text[: len(text) // 2], "m/manifest.json")
    data = json.loads(text)
    del data["files"]
    with pytest.raises(ManifestMismatch, match="malformed"):
        RemoteRecord.from_json(json.dumps(data), "m/manifest.json")


HERE = {"kernel_release": "6.1", "cpu_features": "avx avx2 sse", "criu_version": "4.2.1",
        "gpu_model": "", "driver_version": "", "image": "sha256:aa"}


def test_compat_rules() -> None:
    compat.check("m", dict(HERE), HERE, cuda=False)
    # fewer CPU features in the checkpoint, another CRIU minor: fine
    compat.check("m", {**HERE, "cpu_features": "avx sse", "criu_version": "4.1"}, HERE,
                 cuda=False)
    # GPU fields matter only for CUDA state
    compat.check("m", {**HERE, "gpu_model": "NVIDIA H100"}, HERE, cuda=False)
    with pytest.raises(ManifestMismatch, match=r"gpu_model is 'NVIDIA H100' in the "
                                               r"checkpoint, '' on this host"):
        compat.check("m", {**HERE, "gpu_model": "NVIDIA H100"}, HERE, cuda=True)
    with pytest.raises(ManifestMismatch, match=r"cpu_features: .*avx512f.*which this CPU lacks"):
        compat.check("m", {**HERE, "cpu_features": "avx avx512f"}, HERE, cuda=False)
    with pytest.raises(ManifestMismatch, match=r"criu_version is .3\.17."):
        compat.check("m", {**HERE, "criu_version": "3.17"}, HERE, cuda=False)
    # a checkpoint of an older version records nothing: nothing compared
    compat.check("m", {}, HERE, cuda=True)


def test_this_hosts_facts_are_recorded() -> None:
    facts = compat.host_facts("4.2.1", {"kind": "host"})
    assert set(facts) == set(compat.FIELDS)
    assert facts["cpu_features"], "/proc/cpuinfo has flags on this machine"
    assert facts["image"] == compat.image_digest({"kind": "host"}) != compat.image_digest(
        {"kind": "overlay"})
