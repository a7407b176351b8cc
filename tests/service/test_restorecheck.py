"""The restore's checks as llmuxd runs them for Restore and CheckRestore (restorecheck.py):
the rules of the manifest against this host and the caller's container, as pure functions.
No root, no CRIU: a manifest and a container context made up here.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

import pytest

from llmux.common.errors import ManifestMismatch
from llmux.service.core import restorecheck
from llmux.service.core.container import ContainerContext
from llmux.service.core.criu import CriuTool, CriuVersion
from llmux.service.core.manifest import Manifest
from llmux.service.core.store import IMAGES, CheckpointStore

HOST = ContainerContext(pid=1, mnt_ns="mnt:[1]", foreign=False, root=None, overlay=None)
CRIU = CriuTool("criu", CriuVersion(4, 2, 1), ("nftables", "iptables", "skip"))


def _manifest(**kw: Any) -> Manifest:
    values: dict[str, Any] = {
        "model": "a", "owner": "root", "owner_uid": 0, "root_pid": 100, "pids": [100],
        "cuda_pids": [], "criu_version": "4.1", "kernel_release": os.uname().release,
        "driver_version": "", "created": 0.0, **kw}
    return Manifest(**values)


def test_manifest_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rules the operator page used to copy: now only llmuxd's."""
    monkeypatch.setattr(restorecheck, "driver_version", lambda: "580.1")

    def why(tool: CriuTool = CRIU, **kw: Any) -> str | None:
        try:
            restorecheck.check_manifest(_manifest(**kw), HOST, tool)
        except ManifestMismatch as e:
            return e.message
        return None

    assert why() is None  # another minor CRIU version restores
    assert "CRIU 3.19" in (why(criu_version="3.19") or "")
    other_kernel = "6.2.0" if os.uname().release != "6.2.0" else "6.3.0"
    assert f"kernel {other_kernel}" in (why(kernel_release=other_kernel) or "")
    assert why(driver_version="570.0") is None  # no CUDA state: the driver does not matter
    assert "driver 570.0" in (why(driver_version="570.0", cuda_pids=[7]) or "")
    assert why(driver_version="580.1", cuda_pids=[7]) is None
    assert "another image" in (why(rootfs={"kind": "overlay", "lowerdirs": ["/x"]}) or "")
    # the restore must undo the dump's network lock
    nft_only = CriuTool("criu", CriuVersion(4, 2, 1), ("nftables", "skip"))
    assert why(nft_only, network_lock="nftables") is None
    assert why(nft_only, network_lock="skip") is None
    assert ("dumped under CRIU's iptables network lock, which its restore must undo; this "
            "host can use nftables, skip") in (why(nft_only, network_lock="iptables") or "")
    assert why(nft_only, network_lock="") is None  # an older version's: CRIU's to say


def test_an_unknown_network_lock_is_a_malformed_manifest() -> None:
    """It becomes an argument of CRIU's: only the names CRIU knows pass."""
    with pytest.raises(ManifestMismatch, match="unknown network_lock"):
        Manifest.from_dict({**_manifest().to_dict(), "network_lock": "--action-script=/x"})


def test_intact_and_files_present_only_look(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "state")
    store.prepare()
    images = store.images_dir("a")
    images.mkdir(parents=True)
    (images / "pages-1.img").write_bytes(b"x" * 10)
    there = tmp_path / "weights.bin"
    there.write_bytes(b"w")
    m = _manifest(image_sizes={"pages-1.img": 10}, external_files=[str(there)])
    before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    restorecheck.check_intact(store, m)
    asyncio.run(restorecheck.check_files_present(m, None))
    assert sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before
    with pytest.raises(ManifestMismatch, match="has 10 bytes, the dump wrote 11"):
        restorecheck.check_intact(store, _manifest(image_sizes={"pages-1.img": 11}))
    with pytest.raises(ManifestMismatch, match=re.escape(f"{IMAGES}/pages-2.img is missing")):
        restorecheck.check_intact(store, _manifest(image_sizes={"pages-2.img": 1}))
    with pytest.raises(ManifestMismatch, match=re.escape("lacks: /nowhere/lib.so")):
        asyncio.run(restorecheck.check_files_present(
            _manifest(external_files=["/nowhere/lib.so"]), None))
