"""Container detection with a real overlay: a process chrooted into an overlay of the host root
in its own mount namespace (what podman --rootfs /:O makes), holding a file and a cwd that
exist only in the writable layer."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmux.service.core import upperfiles, zerodigest
from llmux.service.core.container import (
    ContainerContext,
    external_mount_key,
    host_path_of,
    mount_of,
    parse_mountinfo,
)
from llmux.service.core.upperfiles import ViewRoot
from tests.support.procs import mount_overlay, wait_until

pytestmark = pytest.mark.criu  # needs root: mount, unshare, chroot


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


@dataclass
class Contained:
    pid: int
    upper: Path
    merged: Path
    workdir: str
    """The in-container directory holding the upper-only files."""


@pytest.fixture
def contained(tmp_path: Path) -> Iterator[Contained]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    merged = mount_overlay(tmp_path / "ov")
    upper = tmp_path / "ov" / "upper"
    inside = f"/tmp/llmux-upper-{os.getpid()}-{time.monotonic_ns()}"
    script = (
        f"mkdir -p {inside}/sub && echo only-in-upper > {inside}/sub/held.txt && "
        f"cd {inside}/sub && exec 3<held.txt && exec sleep 300"
    )
    proc = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "chroot",
            str(merged),
            "sh",
            "-c",
            script,
        ],
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _exe(proc.pid).endswith("sleep"), 20,
                   f"the contained process {proc.pid} to exec sleep")
        yield Contained(proc.pid, upper, merged, inside)
    finally:
        proc.kill()
        proc.wait()
        subprocess.run(["umount", "-l", str(merged)], check=False)


def test_overlay_container_is_detected(contained: Contained) -> None:
    ctx = ContainerContext.from_pid(contained.pid)
    assert ctx.foreign
    assert ctx.overlay is not None
    assert ctx.overlay.upperdir == str(contained.upper)
    assert ctx.overlay.lowerdirs == ("/",)
    assert ctx.overlay.merged == str(contained.merged)
    assert ctx.rootfs_host_path == str(contained.merged)
    assert ctx.rootfs_identity() == {"kind": "overlay", "lowerdirs": ["/"]}
    assert ctx.cgroup_identity
    # A host process is the degenerate case.
    host = ContainerContext.from_pid(os.getpid())
    assert not host.foreign and host.rootfs_host_path == "/"
    assert host.rootfs_identity() == {"kind": "host"}
    assert host.externals == ()


def test_upper_only_files_are_found_saved_and_put_back(
    contained: Contained, tmp_path: Path
) -> None:
    ctx = ContainerContext.from_pid(contained.pid)
    held = f"{contained.workdir}/sub/held.txt"
    found = upperfiles.find_upper_files([contained.pid], ctx)
    assert held in found
    assert f"{contained.workdir}/sub" in found and contained.workdir in found
    assert found.index(contained.workdir) < found.index(held)  # parents first
    assert not any(p.startswith(("/usr", "/bin", "/lib")) for p in found)  # lower layer only

    files = tmp_path / "files"
    files.mkdir()
    with ViewRoot(contained.pid) as view:
        saved = upperfiles.save(found, view.path, files)
    by_path = {s.path: s for s in saved}
    assert by_path[held].kind == "file"
    digest = zerodigest.NonzeroDigest()
    digest.update(b"only-in-upper\n")
    assert by_path[held].sha256 == digest.hexdigest()
    assert by_path[contained.workdir].kind == "dir"
    upperfiles.verify(saved, files)

    target = tmp_path / "target-root"
    target.mkdir()
    upperfiles.put_back(saved, files, target)
    assert (target / held.lstrip("/")).read_text() == "only-in-upper\n"


def test_mountinfo_parsing_and_host_mapping() -> None:
    text = (
        "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw\n"
        "37 35 0:40 / / rw - overlay overlay rw,lowerdir=/a:/b,upperdir=/u,workdir=/w\n"
        "38 37 98:0 /data/cache /root/.cache rw - ext3 /dev/root rw\n"
    )
    entries = parse_mountinfo(text)
    assert entries[0].mount_point == "/mnt/with space"
    assert entries[1].super_option("lowerdir") == "/a:/b"
    assert mount_of(entries, "/root/.cache/x").mount_id == 38  # type: ignore[union-attr]
    assert mount_of(entries, "/etc/hosts").mount_id == 37  # type: ignore[union-attr]
    host = parse_mountinfo(
        "1 0 98:0 / / rw - ext3 /dev/root rw\n2 1 98:0 /data /srv rw - ext3 /dev/root rw\n"
    )
    assert host_path_of(entries[2], host) == "/srv/cache"
    key = external_mount_key("/root/.cache/huggingface")
    assert ":" not in key and "]" not in key
