"""The ``llmux`` command, run as a real process: exit codes and output."""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.procs import wait_until

SEED = {"models": {"qwen3-0.6b": {
    "model_path": "Qwen/Qwen3-0.6B", "port": 8001,
    "eviction": {"weights": "discard", "process": "checkpoint"},
    "checkpoint_path": "/tmp/llmux-checkpoints/qwen3-0.6b/images"}},
    "checkpoint": {"criu_path": "/usr/local/bin/criu", "cuda_plugin_dir": "/usr/lib/criu/",
                   "images_dir": "/tmp/llmux-checkpoints",
                   "cuda_checkpoint_path": "/usr/local/bin/cuda-checkpoint",
                   "keep_images": True},
    "port": 3000}

BAD = {"models": {"a": {"port": 70000, "eviction": {"weights": "evaporate"}},
                  "b": {"model_path": "x", "port": 3000}},
       "colour": "red"}


def llmux_argv() -> list[str]:
    script = Path(sys.executable).parent / "llmux"
    return [str(script)] if script.exists() else [sys.executable, "-m", "llmux.shim.cli"]


def llmux(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*llmux_argv(), *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


WriteConfig = Callable[..., Path]


def test_validate_config_ok(write_config: WriteConfig) -> None:
    path = write_config(SEED)
    r = llmux("validate-config", "--config", str(path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"OK: {path}: 1 model(s): qwen3-0.6b"


def test_validate_config_toml(write_config: WriteConfig,
                              builtin_config_dict: Callable[..., dict[str, Any]]) -> None:
    path = write_config(builtin_config_dict(["a", "b"], eviction="offload+keep_running"),
                        ".toml")
    r = llmux("validate-config", "--config", str(path))
    assert r.returncode == 0, r.stderr
    assert "2 model(s): a, b" in r.stdout


@pytest.mark.parametrize("form", [["validate-config", "--config"], ["serve", "--config"],
                                  ["--config"]])
def test_invalid_config_lists_every_problem(write_config: WriteConfig, form: list[str]) -> None:
    path = write_config(BAD)
    r = llmux(*form, str(path))
    assert r.returncode == 2
    for line in ("models.a.model_path: missing", "models.a.port: 70000 is not a port",
                 "models.a.eviction.weights: unknown weights strategy 'evaporate'",
                 "models.b.port: port 3000 is already used by port", "colour: unknown key"):
        assert line in r.stderr, r.stderr
    assert str(path) in r.stderr
    assert r.stdout == ""


def test_missing_config_file(tmp_path: Path) -> None:
    r = llmux("validate-config", "--config", str(tmp_path / "nope.toml"))
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_usage_errors() -> None:
    r = llmux()
    assert r.returncode == 2 and "give a command" in r.stderr
    r = llmux("serve")
    assert r.returncode == 2 and "--config" in r.stderr
    r = llmux("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = llmux("--help")
    assert r.returncode == 0
    assert "serve" in r.stdout and "validate-config" in r.stdout and "--validate" in r.stdout


def test_validate_unknown_model_and_bad_policies(write_config: WriteConfig) -> None:
    path = write_config(SEED)
    r = llmux("--config", str(path), "--validate", "nope")
    assert r.returncode == 2 and "'nope' is not in" in r.stderr and "qwen3-0.6b" in r.stderr
    r = llmux("--config", str(path), "--validate", "qwen3-0.6b", "--policies",
              "offload+keep_running,offload+hibernate")
    assert r.returncode == 2 and "'offload+hibernate'" in r.stderr
    r = llmux("--config", str(path), "--policies", "offload+keep_running")
    assert r.returncode == 2 and "--policies needs --validate" in r.stderr


def test_validate_model_runs_every_cycle(
        write_config: WriteConfig, builtin_config_dict: Callable[..., dict[str, Any]],
        procs: Any) -> None:
    # a marker of this test's own: other test sessions on the machine run "llmux-test/m1"
    marker = f"llmux-test/m1-{secrets.token_hex(4)}"
    path = write_config(builtin_config_dict(["m1"], m1={"model_path": marker}))
    r = llmux("--config", str(path), "--validate", "m1", "--policies",
              "offload+keep_running,discard+keep_running,retain+stop")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "Eviction" in out and "Sleep (s)" in out and "Wake (s)" in out and "Pass" in out
    assert "GB/s sleep/wake" in out
    [limits] = {line for line in out.splitlines() if line.startswith("Limits measured")}
    assert "disk (" in limits and "write" in limits and "read" in limits, limits
    rows = [line for line in out.splitlines() if line.startswith(("offload+", "discard+",
                                                                  "retain+"))]
    # the policies that offload the weights run last (the pinned buffers they leave behind
    # would weigh on the others), the rest in the order given
    assert [row.split()[0] for row in rows] == ["discard+keep_running", "retain+stop",
                                                "offload+keep_running"]
    assert "Order: discard+keep_running, retain+stop, offload+keep_running" in out
    assert all(row.split()[-2:] == ["match", "PASS"] for row in rows), out
    assert "Result: ALL PASSED" in out
    assert procs.pids_with_marker(marker) == [], "the engine is stopped at the end"


def test_validate_model_reports_a_failed_policy(
        write_config: WriteConfig, builtin_config_dict: Callable[..., dict[str, Any]],
        tmp_path: Path, procs: Any) -> None:
    marker = f"llmux-test/m1-{secrets.token_hex(4)}"
    raw = builtin_config_dict(["m1"], m1={"model_path": marker})
    # a private bus address where nothing listens: the host service is unreachable
    raw["checkpoint"] = {"bus": f"unix:path={tmp_path}/no-bus"}
    path = write_config(raw)
    r = llmux("--config", str(path), "--validate", "m1", "--policies",
              "offload+keep_running,retain+checkpoint")
    assert r.returncode == 1, r.stdout + r.stderr
    rows = {words[0]: words for words in map(str.split, r.stdout.splitlines())
            if words and words[0] in ("offload+keep_running", "retain+checkpoint")}
    assert rows["offload+keep_running"][-1] == "PASS"
    assert rows["retain+checkpoint"][-1] == "FAIL"
    assert "llmuxd" in r.stdout
    assert "Result: SOME FAILED" in r.stdout
    assert procs.pids_with_marker(marker) == []


def test_host_strategy_without_host_service_fails_clearly(
        write_config: WriteConfig, builtin_config_dict: Callable[..., dict[str, Any]],
        tmp_path: Path) -> None:
    raw = builtin_config_dict(["m1"], eviction="offload+cuda_suspend")
    raw["checkpoint"] = {"bus": f"unix:path={tmp_path}/no-bus"}
    r = llmux("serve", "--config", str(write_config(raw)), timeout=60)
    assert r.returncode == 1, r.stderr
    assert "llmuxd" in r.stderr and "no-bus" in r.stderr


@pytest.mark.parametrize("form", [["serve", "--config"], ["--config"]])
def test_serve_runs_until_sigterm(
        form: list[str], write_config: WriteConfig,
        builtin_config_dict: Callable[..., dict[str, Any]], procs: Any) -> None:
    raw = builtin_config_dict(["m1"])
    path = write_config(raw)
    proc = subprocess.Popen([*llmux_argv(), *form, str(path), "--log-level", "warning"]
                            if form[0] == "serve" else
                            [*llmux_argv(), "--log-level", "warning", *form, str(path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    procs.track(proc.pid)
    base = f"http://127.0.0.1:{raw['port']}"
    try:
        with httpx.Client(trust_env=False, timeout=120) as c:

            def listening() -> bool:
                try:
                    if c.get(f"{base}/health").status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                return False

            wait_until(listening, 60, "the shim to listen", interval=0.1)
            body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4, "temperature": 0}
            r = c.post(f"{base}/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            status = c.get(f"{base}/control/status").json()
            assert status["models"]["m1"]["state"] == "running"
            assert status["models"]["m1"]["last_wake"] == "cold"
            engine_pids = status["models"]["m1"]["pids"]
            procs.track(*engine_pids)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
        assert not procs.any_running(engine_pids), "serve stops its engines on SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_main_in_process(write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
                             ) -> None:
    """main() returns the exit code instead of exiting (usable from other tools)."""
    from llmux.shim.cli import main

    assert main(["validate-config", "--config", str(write_config(SEED))]) == 0
    assert "OK:" in capsys.readouterr().out
    assert main(["validate-config", "--config", str(write_config(BAD))]) == 2
    assert "models.a.model_path" in capsys.readouterr().err
