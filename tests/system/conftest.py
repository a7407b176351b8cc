"""Fixtures for the system tests: the project's .deb, a Debian 12 tree, systemd booted in podman.

The tree comes from packaging/rootfs/build-rootfs.sh (cached under /var/cache/llmux/rootfs,
keyed by its inputs), the package from packaging/deb/build.sh. The package is installed into
a throw-away overlay over the cached tree with ``chroot dpkg -i`` (systemd not running, as in
an image build), and that overlay is booted with systemd as PID 1 in its own PID namespace:
``podman --runtime runc run --privileged --systemd=always --network=host --rootfs DIR``.
Every container is removed and every mount undone, whatever the outcome.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.systemtest import REPO, Booted, Overlay, boot, remove_container, run


def _missing_tools() -> list[str]:
    tools = ("podman", "runc", "debootstrap", "dpkg-deb", "chroot", "mount")
    return [t for t in tools if shutil.which(t) is None]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = ""
    if os.geteuid() != 0:
        reason = "system tests need root (debootstrap, chroot, podman --privileged)"
    elif missing := _missing_tools():
        reason = f"system tests need {', '.join(missing)} (bash packaging/setup-dev.sh)"
    if reason:
        here = Path(__file__).parent
        for item in items:
            if Path(str(item.fspath)).is_relative_to(here):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def deb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The llmux-host .deb: LLMUX_TEST_DEB if set, else built now by packaging/deb/build.sh."""
    given = os.environ.get("LLMUX_TEST_DEB")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("deb")
    started = time.monotonic()
    proc = run(["bash", str(REPO / "packaging/deb/build.sh"), "--out", str(out)])
    path = Path(proc.stdout.strip().splitlines()[-1])
    print(f"\n[system] built {path.name} in {time.monotonic() - started:.1f} s")
    return path


@pytest.fixture(scope="session")
def debian_rootfs(deb_path: Path) -> Path:
    """The cached Debian 12 tree with the .deb's dependencies (built on first use)."""
    started = time.monotonic()
    proc = run(["bash", str(REPO / "packaging/rootfs/build-rootfs.sh"), "--deb", str(deb_path)],
               timeout=900)
    print(f"\n[system] rootfs ready in {time.monotonic() - started:.1f} s")
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def overlay(debian_rootfs: Path, tmp_path: Path) -> Iterator[Overlay]:
    ov = Overlay(debian_rootfs, tmp_path / "overlay")
    ov.mount()
    try:
        yield ov
    finally:
        ov.unmount()


@pytest.fixture(scope="module")
def installed(debian_rootfs: Path, deb_path: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    """The tree with the .deb installed by ``chroot dpkg -i``, booted with systemd."""
    ov = Overlay(debian_rootfs, tmp_path_factory.mktemp("installed"))
    ov.mount()
    name = f"llmux-systest-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copy(deb_path, ov.merged / "tmp" / deb_path.name)
        ov.chroot("dpkg", "-i", f"/tmp/{deb_path.name}")
        started = time.monotonic()
        machine = boot(name, ov.merged, overlay=False)
        print(f"\n[system] booted {name} in {time.monotonic() - started:.1f} s")
        yield machine
    finally:
        remove_container(name)
        ov.unmount()
