"""CRIU's network lock: the fastest method this host's CRIU can use at a dump (CRIU
unlocks a restore by the dump's method, recorded in its images)."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from llmux.common.errors import Unsupported
from llmux.service.core.criu import (
    CriuTool,
    DumpRequest,
    RestoreRequest,
    dump_argv,
    iptables_restore_found,
    restore_argv,
    usable_network_locks,
)


def _tool(directory: Path, name: str, code: int) -> Path:
    """An executable that reports CRIU 4.2.1 and answers `check` with exit ``code``."""
    path = directory / name
    path.write_text(f"#!/bin/sh\n[ \"$1\" = check ] && exit {code}\necho 'Version: 4.2.1'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_iptables_restore_looked_up_on_the_path_given(tmp_path: Path) -> None:
    assert not iptables_restore_found(str(tmp_path))
    _tool(tmp_path, "iptables-restore", 0)
    assert iptables_restore_found(str(tmp_path))


def test_usable_locks_fastest_first(tmp_path: Path) -> None:
    """nftables only where `criu check --feature network_lock_nftables` passes."""
    yes, no = _tool(tmp_path, "criu-nft", 0), _tool(tmp_path, "criu-old", 1)
    bare = tmp_path / "bare"
    bare.mkdir()
    assert asyncio.run(usable_network_locks(str(yes), str(bare))) == ("nftables", "skip")
    assert asyncio.run(usable_network_locks(str(no), str(bare))) == ("skip",)
    _tool(tmp_path, "iptables-restore", 0)
    assert asyncio.run(usable_network_locks(str(yes), str(tmp_path))) == (
        "nftables", "iptables", "skip")


def test_a_named_lock_this_host_lacks_is_refused_by_key(tmp_path: Path) -> None:
    criu = _tool(tmp_path, "criu", 1)  # the nftables check fails
    refused = (r"network_lock = 'nftables' cannot be used on this host: "
               r".* can use (iptables, )?skip \(")
    with pytest.raises(Unsupported, match=refused):
        asyncio.run(CriuTool.locate(str(criu), "nftables"))
    tool = asyncio.run(CriuTool.locate(str(criu), "skip"))
    assert tool.network_lock == "skip"


def test_the_dump_names_the_method_and_the_restore_leaves_it_to_criu(tmp_path: Path) -> None:
    """CRIU ignores --network-lock at a restore (with a warning): the images say."""
    dump = dump_argv("criu", DumpRequest(pid=os.getpid(), images_dir=tmp_path), "nftables")
    restore = restore_argv("criu", RestoreRequest(images_dir=tmp_path, pidfile=tmp_path / "p"))
    assert dump[dump.index("--network-lock") + 1] == "nftables"
    assert "--network-lock" not in restore
