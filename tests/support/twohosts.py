"""Two llmux "hosts" on one machine, meeting only through a remote checkpoint store.

Each host: its own private system-style bus, its own llmuxd (own state directory, the
same ``[remote]`` store) and its shims in podman containers that reach that bus only.
Used by tests/e2e/test_remote_two_hosts.py and tests/bench/bench_remote.py.

Each host's shim container has a network namespace of its own (podman's default bridge;
the test reaches it on a port published on the machine's loopback): only llmuxd, on the
machine, talks to the store, and the shim reaches llmuxd over the bus's unix socket and its
engine over the unix socket in the engine's TMPDIR (llmux.shim.netns). The hosts share one
shim config, ports included, as real hosts would: the engine's port is inside the engine's
own network namespace and names its TMPDIR, which a restored tree keeps, and the shim's is
inside its container's; neither needs to be free on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmux.common.contract import BUS_NAME, CHECKPOINT_INTERFACE, checkpoint_path
from tests.support.llmuxd_harness import Llmuxd, running_bus, running_llmuxd
from tests.support.podman_shim import MODEL, ShimFactory, shim_factory


@dataclass
class Host:
    name: str
    daemon: Llmuxd
    shims: ShimFactory

    def location(self, model: str = MODEL) -> str:
        """The checkpoint object's Location property ("" when there is none)."""
        call = self.daemon.busctl("--json=short", "get-property", BUS_NAME,
                                  checkpoint_path(model), CHECKPOINT_INTERFACE, "Location")
        if call.rc != 0:
            return ""
        return str(json.loads(call.stdout)["data"])

    def wait_location(self, want: str, timeout: float = 120, model: str = MODEL) -> None:
        deadline = time.monotonic() + timeout
        while (seen := self.location(model)) != want:
            if time.monotonic() > deadline:
                raise AssertionError(f"host {self.name}: the checkpoint of {model} is "
                                     f"{seen or 'absent'}, not {want}, after {timeout:g} s:\n"
                                     f"{self.daemon.log()[-4000:]}")
            time.sleep(0.2)


def remote_toml(url: str, endpoint_url: str = "", credentials_file: str = "",
                keep_local: bool = True) -> str:
    return (f'[remote]\nurl = "{url}"\nendpoint_url = "{endpoint_url}"\n'
            f'credentials_file = "{credentials_file}"\n'
            f'keep_local = {"true" if keep_local else "false"}\n')


@contextlib.contextmanager
def host(name: str, workdir: Path, rootfs: str, config: str, *,
         port: int | None = None, engine_port: int | None = None, backend: str = "pure",
         weights_mb: int = 16, model: dict[str, Any] | None = None) -> Iterator[Host]:
    """One host: bus, llmuxd with ``config`` (llmuxd.toml), a shim factory on that bus
    (``model``: the model's table instead of the built-in engine's default one)."""
    workdir.mkdir(parents=True, exist_ok=True)
    bus_dir = Path(tempfile.mkdtemp(prefix=f"llmux-remote-bus-{name}-"))
    os.chmod(bus_dir, 0o755)
    try:
        with running_bus(bus_dir) as bus, running_llmuxd(bus, workdir, config) as daemon:
            extra: dict[str, Any] = {"engine_port": engine_port} if engine_port else {}
            if port:
                extra["port"] = port
            if model is not None:
                extra["model"] = model
            with shim_factory(
                rootfs=rootfs, bus_dir=bus_dir,
                bus_address_in=f"unix:path=/run/llmux-bus/{Path(bus.socket_path).name}",
                workdir=workdir / "shared", backend=backend, weights_mb=weights_mb,
                network="bridge", **extra,
            ) as shims:
                yield Host(name, daemon, shims)
    finally:
        for entry in bus_dir.iterdir():
            with contextlib.suppress(OSError):
                entry.unlink()
        with contextlib.suppress(OSError):
            bus_dir.rmdir()
