"""What llmuxd reads from a container runtime's mount layout, on real runtimes' mountinfo.

The mountinfo lines are podman's (runc, --rootfs /:O, --pid=host) as seen on the test
machine, and docker overlay2's rootfs, whose per-container init layer must not count as
part of the image: two containers of one image must have one identity.
"""

from __future__ import annotations

from pathlib import Path

from llmux.service.core.container import (
    ContainerContext,
    Overlay,
    _is_external,
    parse_mountinfo,
)

CID = "5c2ccd60e3799c9719e46dff1d0d51535aa67455d7131f4775b0d1780bf41c4c"
STORAGE = f"/run/containers/storage/overlay-containers/{CID}"

PODMAN = f"""\
1006 895 0:166 / / rw,relatime - overlay overlay rw,lowerdir=/,upperdir={STORAGE}/rootfs/upper,\
workdir={STORAGE}/rootfs/work
1007 1006 0:170 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
1008 1006 0:171 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
1012 1006 0:24 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs ro
1013 1006 254:0 /tmp/xc/bus /run/llmux-bus rw,relatime - ext4 /dev/vda rw
1014 1006 254:0 {STORAGE}/userdata/hosts /etc/hosts rw,relatime - ext4 /dev/vda rw
1015 1008 0:22 / /dev/shm rw,nosuid,nodev - tmpfs tmpfs rw
1016 1006 254:0 /tmp/xc/hf /root/.cache/huggingface rw,relatime - ext4 /dev/vda rw
1020 1012 0:30 /libpod_parent/libpod-{CID} /sys/fs/cgroup/pids ro - cgroup cgroup rw,pids
1030 1007 0:170 /bus /proc/bus ro,nosuid,nodev,noexec,relatime - proc proc rw
1031 1007 0:170 /sys /proc/sys ro,nosuid,nodev,noexec,relatime - proc proc rw
1032 1007 0:171 /null /proc/keys rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
1033 1007 0:171 /null /proc/timer_list rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
"""

HOST = """\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
24 22 0:5 / /dev rw,nosuid - devtmpfs udev rw
25 24 0:22 / /dev/shm rw,nosuid,nodev - tmpfs tmpfs rw
26 22 0:24 / /sys rw,nosuid,nodev,noexec,relatime - sysfs sysfs rw
27 26 0:30 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
"""


def externals(container: str, host: str) -> list[str]:
    mounts = parse_mountinfo(container)
    host_mounts = parse_mountinfo(host)
    return [m.mount_point for m in mounts
            if m.mount_point != "/" and _is_external(m, mounts, host_mounts)]


def test_podman_binds_are_external_and_its_proc_masks_are_not() -> None:
    found = externals(PODMAN, HOST)
    # bind mounts of host paths, the host's /dev/shm (--ipc=host), the cgroup views
    assert found == ["/run/llmux-bus", "/etc/hosts", "/dev/shm", "/root/.cache/huggingface",
                     "/sys/fs/cgroup/pids"]
    # the runtime's read-only /proc binds and /dev/null masks are binds inside the
    # container's own /proc and /dev: CRIU rebuilds them; no other container provides them
    for masked in ("/proc/bus", "/proc/sys", "/proc/keys", "/proc/timer_list"):
        assert masked not in found


def overlay_context(lowerdirs: tuple[str, ...]) -> ContainerContext:
    return ContainerContext(pid=1, mnt_ns="mnt:[1]", foreign=True, root=None,
                            overlay=Overlay(lowerdirs, "/u", "/w", "/m"))


def test_docker_init_layer_is_not_part_of_the_image(tmp_path: Path) -> None:
    overlay2 = tmp_path / "overlay2"
    (overlay2 / "l").mkdir(parents=True)
    layers = {"IMG1": "img1", "IMG2": "img2", "INITA": "ctra-init", "INITB": "ctrb-init"}
    for link, layer in layers.items():
        (overlay2 / layer / "diff").mkdir(parents=True)
        (overlay2 / "l" / link).symlink_to(f"../{layer}/diff")
    img = (str(overlay2 / "l" / "IMG1"), str(overlay2 / "l" / "IMG2"))
    a = overlay_context((str(overlay2 / "l" / "INITA"), *img))
    b = overlay_context((str(overlay2 / "l" / "INITB"), *img))
    assert a.rootfs_identity() == b.rootfs_identity() == {"kind": "overlay",
                                                           "lowerdirs": list(img)}
    # spelled without the short links, too
    c = overlay_context((str(overlay2 / "ctrc-init" / "diff"), *img))
    assert c.rootfs_identity() == a.rootfs_identity()
    # another image is another identity
    other = overlay_context((str(overlay2 / "l" / "INITA"), img[0]))
    assert other.rootfs_identity() != a.rootfs_identity()
