"""The whole system on one machine: a private bus, llmuxd on it, a real shim in front of it.

The private system-style dbus-daemon (with the project's policy) and the llmuxd fixture
are the ones tests/service/dbus uses (tests/support/llmuxd_harness.py, registered by the
root conftest), so both suites exercise the same set-up.
The shim runs as `llmux serve --config FILE`, a separate process: llmuxd resolves it
from the bus as the caller, and its engines are its own descendants, as in a container.

Every engine gets a random LLMUX_TEST_TAG in its environment; a restored engine is not
the shim's child (CRIU restores it under llmuxd), so teardown finds anything left by
that tag in /proc/*/environ and kills it.
"""

from __future__ import annotations

import secrets
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import free_port
from tests.support.shimproc import REQUEST_TIMEOUT_S, Shim, shims_for_test


def builtin_model(port: int, tag: str, workdir: Path, eviction: str,
                  weights_mb: int = 8) -> dict[str, Any]:
    """A built-in engine model; its weights and JIT log live under the test's tmp dir."""
    weights, process = eviction.split("+")
    return {
        "model_path": f"llmux-it/{port}",
        "port": port,
        "engine": "builtin",
        "weights_mb": weights_mb,
        "eviction": {"weights": weights, "process": process},
        "startup_timeout_secs": 120,
        "env": {"LLMUX_TEST_TAG": tag, "HF_HOME": str(workdir / "hf"),
                "XDG_CACHE_HOME": str(workdir / "cache"), "LLMUX_BUILTIN_BACKEND": "pure"},
    }


@pytest.fixture
def start_shim(tmp_path: Path) -> Iterator[Callable[..., Shim]]:
    """start_shim(bus_address, {name: eviction}) -> a running shim; all of it ends after.
    start_shim(same_as=SHIM): a new shim on the config of an earlier one (its restart)."""
    tag = secrets.token_hex(8)
    with shims_for_test(tmp_path, tag) as launch:

        def start(bus_address: str = "", models: dict[str, str] | None = None, *,
                  same_as: Shim | None = None,
                  edit: Callable[[dict[str, Any]], None] | None = None, **top: Any) -> Shim:
            if same_as is not None:
                config = tomllib.loads(same_as.config_path.read_text())
                if edit is not None:
                    edit(config)
                return launch(config)
            assert models is not None, "start_shim needs the models, or same_as"
            port = free_port()
            config: dict[str, Any] = {
                "host": "127.0.0.1",
                "port": port,
                "metrics_port": 0,
                "log_dir": str(tmp_path / "engine-logs"),
                **top,
                "policy": {"min_active_secs": 0, "request_timeout_secs": REQUEST_TIMEOUT_S},
                "checkpoint": {"bus": bus_address, "keep_images": True, "job_timeout_secs": 300},
                "models": {name: builtin_model(free_port(), tag, tmp_path, eviction)
                           for name, eviction in models.items()},
            }
            return launch(config)

        yield start
