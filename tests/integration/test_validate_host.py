"""`llmux --validate` through llmuxd, with an engine that answers otherwise on a prefix-cache
hit (vLLM's trait, seen at 8B on an H100; the built-in engine copies it where asked): a
policy that keeps the KV cache is held to the answer asked again, the others to the first."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import builtin_model
from tests.support.llmuxd_harness import Llmuxd
from tests.support.procs import free_port
from tests.support.shimproc import LLMUX, to_toml

pytestmark = [pytest.mark.criu, pytest.mark.dbus]


def test_a_kept_kv_cache_is_held_to_the_answer_from_the_cache(
        llmuxd: Llmuxd, tmp_path: Path) -> None:
    tag = secrets.token_hex(8)
    model = builtin_model(free_port(), tag, tmp_path, "retain+checkpoint")
    model["env"]["LLMUX_BUILTIN_PREFIX_DRIFT"] = "1"
    config = {"host": "127.0.0.1", "port": free_port(), "metrics_port": 0,
              "log_dir": str(tmp_path / "engine-logs"),
              "checkpoint": {"bus": llmuxd.bus.address, "job_timeout_secs": 300},
              "models": {"m": model}}
    path = tmp_path / "llmux.toml"
    path.write_text(to_toml(config))
    r = subprocess.run([str(LLMUX), "--config", str(path), "--validate", "m", "--policies",
                        "offload+keep_running,retain+checkpoint,retain+stop"],
                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr[-3000:]
    [cold] = [line.split(": ", 1)[1] for line in out.splitlines()
              if line.startswith("Baseline response: ")]
    [again] = [line for line in out.splitlines() if line.startswith("Asked again")]
    assert cold not in again  # the stand-in answered otherwise from its cache
    responses = [line for line in out.splitlines() if line.strip().startswith("Response:")]
    # retain+checkpoint keeps the cache (the process whole); the sleep and the cold start
    # reset it
    assert len(responses) == 3, out
    kept = [line for line in responses if "matches the baseline asked again" in line]
    assert len(kept) == 1 and cold not in kept[0], out
    assert sum(f"{cold} (matches baseline)" in line for line in responses) == 2, out
    assert "Result: ALL PASSED" in out
