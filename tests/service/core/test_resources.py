"""What llmuxd reads about a tree from /proc before it lets CRIU near it."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from llmux.common import resources


def test_link_remaps_are_told_apart_by_inode_and_age(tmp_path: Path) -> None:
    """A link to a deleted file this process holds is its own; another job's is not; a
    young or used link-remap is never stale."""
    held, link, other = tmp_path / "held", tmp_path / "link_remap.1", tmp_path / "link_remap.2"
    held.write_bytes(b"x")
    other.write_bytes(b"y")
    fd = os.open(held, os.O_RDONLY)
    try:
        os.link(held, link)  # what CRIU's --link-remap makes during a dump
        held.unlink()
        ids = resources.deleted_file_ids([os.getpid()])
        assert resources.owned_by([link, other], ids) == [link]
        assert resources.stale([link, other], 600) == []
        assert resources.stale([link], 0) == [], "in use by this process"
    finally:
        os.close(fd)
    assert resources.stale([link, other], 0) == [link, other]


def test_port_holders_name_the_listener_and_skip_free_ports() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        holders = resources.port_holders([port])
        assert list(holders) == [port] and f"PID {os.getpid()}" in holders[port]
        assert port in resources.listening_ports([os.getpid()])
    assert resources.port_holders([port]) == {}


def test_shm_paths_keep_only_segments() -> None:
    paths = ["/dev/shm/psm_1", "/dev/shm/link_remap.3", "/dev/shm/sub/x", "/tmp/a"]
    assert resources.shm_paths(paths) == ["/dev/shm/psm_1"]
