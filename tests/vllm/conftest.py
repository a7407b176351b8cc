"""The `vllm` tier: real vLLM (the CPU build) behind the real shim (see tests/support/vllmbed.py).

llmuxd and its private bus are tests/support/llmuxd_harness.py's (the root conftest
registers them), as for the other suites.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import free_port
from tests.support.shimproc import Shim, shims_for_test
from tests.support.vllmbed import REQUEST_TIMEOUT_S, VllmBed


@pytest.fixture
def start_vllm_shim(tmp_path: Path, vllm_bed: VllmBed) -> Iterator[Callable[..., Shim]]:
    """start(models, bus=None, extra=None, names=None) -> a running `llmux serve`."""
    tag = secrets.token_hex(8)
    with shims_for_test(tmp_path, tag) as launch:

        def start(models: dict[str, str], bus: str | None = None,
                  extra: dict[str, dict[str, Any]] | None = None,
                  names: dict[str, str] | None = None) -> Shim:
            """models: {config name: eviction}; names: config name -> test model (alpha, beta)."""
            config: dict[str, Any] = {
                "host": "127.0.0.1",
                "port": free_port(),
                "metrics_port": 0,
                "log_dir": str(tmp_path / "engine-logs"),
                "vllm_command": str(vllm_bed.vllm),
                "policy": {"min_active_secs": 0, "request_timeout_secs": REQUEST_TIMEOUT_S},
                "models": {name: vllm_bed.model((names or {}).get(name, name), free_port(),
                                                eviction, tag, (extra or {}).get(name))
                           for name, eviction in models.items()},
            }
            if bus is not None:
                config["checkpoint"] = {"bus": bus, "keep_images": True, "job_timeout_secs": 600}
            return launch(config, request_timeout_s=REQUEST_TIMEOUT_S)

        yield start
