"""When the launcher gives an engine a PID namespace of its own (llmux.shim.pidns), read from
real mountinfo texts: a podman container's (masked /proc, with and without the read-only
bind of the host's /proc) and a host's."""

from __future__ import annotations

from llmux.shim import pidns

PODMAN = """\
76 60 0:41 / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
80 76 0:44 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
81 76 0:45 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
52 80 0:44 /bus /proc/bus ro,nosuid,nodev,noexec,relatime - proc proc rw
55 80 0:44 /sys /proc/sys ro,nosuid,nodev,noexec,relatime - proc proc rw
57 80 0:45 /null /proc/keys rw,nosuid,noexec - tmpfs tmpfs rw,size=65536k,mode=755
"""
HOST_PROC_BIND = "90 76 0:22 / /run/llmux/proc ro,nosuid,nodev,noexec,relatime - proc proc rw\n"
BINFMT = ("91 90 0:50 / /run/llmux/proc/sys/fs/binfmt_misc rw,relatime - binfmt_misc "
          "binfmt_misc rw\n")
HOST = """\
23 1 253:1 / / rw,relatime - ext4 /dev/vda rw
24 23 0:22 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
25 24 0:50 / /proc/sys/fs/binfmt_misc rw,relatime - binfmt_misc binfmt_misc rw
26 23 0:5 / /dev rw,nosuid - devtmpfs devtmpfs rw
"""


def test_a_masked_proc_is_not_visible_and_a_read_only_bind_of_the_hosts_is() -> None:
    assert not pidns.visible_procfs(PODMAN)
    assert pidns.visible_procfs(PODMAN + HOST_PROC_BIND)
    # the kernel counts nothing mounted on binfmt_misc (a directory it keeps empty)
    assert pidns.visible_procfs(PODMAN + HOST_PROC_BIND + BINFMT)
    assert pidns.visible_procfs(HOST)


def test_only_a_container_runtimes_layout_gets_a_namespace() -> None:
    assert pidns.runtime_layout(PODMAN)
    assert not pidns.runtime_layout(HOST), "the host's root cannot be bound into a user ns"
    devtmpfs = PODMAN.replace("/dev rw,nosuid - tmpfs tmpfs", "/dev rw,nosuid - devtmpfs devtmpfs")
    assert not pidns.runtime_layout(devtmpfs)
