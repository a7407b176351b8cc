"""CRIU's network lock: iptables where the host has it, none where it has not."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from llmux.service.core.criu import DumpRequest, dump_argv, network_lock_options


def test_network_lock_skipped_without_iptables_restore(tmp_path: Path) -> None:
    assert network_lock_options(str(tmp_path)) == ["--network-lock", "skip"]


def test_network_lock_left_to_criu_with_iptables_restore(tmp_path: Path) -> None:
    tool = tmp_path / "iptables-restore"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    assert network_lock_options(str(tmp_path)) == []


def test_dump_argv_carries_the_choice(tmp_path: Path) -> None:
    argv = dump_argv("criu", DumpRequest(pid=os.getpid(), images_dir=tmp_path))
    skipped = "--network-lock" in argv
    assert skipped == (network_lock_options() != [])
