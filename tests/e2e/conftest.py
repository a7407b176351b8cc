"""End to end in real containers: llmuxd on the host, the shim in podman containers.

The private system-style dbus-daemon (with the project's policy) and the llmuxd fixture are
tests/support/llmuxd_harness.py's (registered by the root conftest). The bus socket's
directory is bind-mounted into every container.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.podman_shim import Reaper, ShimFactory, prepare_rootfs


@pytest.fixture(scope="session")
def podman_rootfs() -> str:
    """The shim containers' --rootfs, checked once per session by packaging's script."""
    if os.geteuid() != 0:
        pytest.skip("rootful podman is needed (run as root)")
    if shutil.which("podman") is None or shutil.which("runc") is None:
        pytest.skip("podman and runc are needed (bash packaging/setup-dev.sh)")
    try:
        return prepare_rootfs()
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    """Reaps the engine PIDs a test registers if they end as zombies of pytest."""
    with Reaper() as r:
        yield r


@pytest.fixture
def shims(podman_rootfs: str, llmuxd: Any, tmp_path: Path) -> Iterator[ShimFactory]:
    """Start shim containers; every container and engine process is gone afterwards."""
    bus_dir = Path(llmuxd.bus.socket_path).parent
    factory = ShimFactory(
        rootfs=podman_rootfs,
        bus_dir=bus_dir,
        bus_address_in=f"unix:path=/run/llmux-bus/{Path(llmuxd.bus.socket_path).name}",
        workdir=tmp_path / "shared",
        backend=os.environ.get("LLMUX_E2E_BACKEND", "pure"),
    )
    try:
        yield factory
    finally:
        leftovers = factory.cleanup()
        assert not leftovers, f"processes left running after the containers were removed: " \
                              f"{leftovers}"
