"""The whole system on one machine: a private bus, llmuxd on it, a real shim in front of it.

The private system-style dbus-daemon (with the project's policy) and the llmuxd fixture
are the ones tests/service/dbus uses (its llmuxd_harness.py, loaded by path under the
same module name: tests/ is not a package), so both suites exercise the same set-up.
The shim runs as `llmux serve --config FILE`, a separate process: llmuxd resolves it
from the bus as the caller, and its engines are its own descendants, as in a container.

Every engine gets a random LLMUX_TEST_TAG in its environment; a restored engine is not
the shim's child (CRIU restores it under llmuxd), so teardown finds anything left by
that tag in /proc/*/environ and kills it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from testprocs import free_port, kill_tagged

_HARNESS = Path(__file__).resolve().parents[1] / "service" / "dbus" / "llmuxd_harness.py"


def _load_dbus_fixtures() -> Any:
    if "llmuxd_harness" in sys.modules:  # already imported by tests/service/dbus
        return sys.modules["llmuxd_harness"]
    spec = importlib.util.spec_from_file_location("llmuxd_harness", _HARNESS)
    assert spec is not None and spec.loader is not None, f"cannot load {_HARNESS}"
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


_dbus = _load_dbus_fixtures()

# Re-exported fixtures: pytest registers fixtures found in a conftest's namespace.
private_bus = _dbus.private_bus
llmuxd = _dbus.llmuxd
PrivateBus = _dbus.PrivateBus
Llmuxd = _dbus.Llmuxd
BusCall = _dbus.BusCall

LLMUX = Path(sys.executable).with_name("llmux")
SHIM_START_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 180.0


def toml_value(value: Any) -> str:
    """Enough TOML for a shim config: strings, numbers, booleans and inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def to_toml(config: dict[str, Any]) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    for section, body in config.items():
        if not isinstance(body, dict):
            continue
        if section == "models":
            for name, model in body.items():
                lines.append(f"\n[models.{name}]")
                lines += [f"{k} = {toml_value(v)}" for k, v in model.items()]
        else:
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Shim:
    """A running `llmux serve` process and an HTTP client for it."""

    proc: subprocess.Popen[bytes]
    port: int
    config_path: Path
    log_path: Path
    tag: str
    client: httpx.Client

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def status(self) -> dict[str, Any]:
        answer = self.client.get(f"{self.url}/control/status")
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    def model_status(self, model: str) -> dict[str, Any]:
        found: dict[str, Any] = self.status()["models"][model]
        return found

    def complete(self, model: str, prompt: str = "the old sailor said",
                 max_tokens: int = 12) -> httpx.Response:
        return self.client.post(f"{self.url}/v1/completions",
                                json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                      "temperature": 0})

    def text(self, model: str) -> str:
        answer = self.complete(model)
        assert answer.status_code == 200, (
            f"{answer.status_code} {answer.text}\n{self.log()[-4000:]}")
        return str(answer.json()["choices"][0]["text"])

    def control(self, action: str, body: dict[str, Any]) -> httpx.Response:
        return self.client.post(f"{self.url}/control/{action}", json=body)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()
        return self.proc.returncode


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
    """start_shim(bus_address, {name: eviction}) -> a running shim; all of it ends after."""
    started: list[Shim] = []
    tag = secrets.token_hex(8)

    def start(bus_address: str, models: dict[str, str], **top: Any) -> Shim:
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
        config_path = tmp_path / f"shim-{len(started)}.toml"
        config_path.write_text(to_toml(config))
        log_path = tmp_path / f"shim-{len(started)}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [str(LLMUX), "serve", "--config", str(config_path), "--log-level", "debug"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        shim = Shim(proc, port, config_path, log_path, tag,
                    httpx.Client(timeout=REQUEST_TIMEOUT_S))
        started.append(shim)
        deadline = time.monotonic() + SHIM_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"llmux serve exited {proc.returncode}:\n{shim.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if shim.client.get(f"{shim.url}/health", timeout=2).status_code == 200:
                    return shim
            if time.monotonic() > deadline:
                raise AssertionError(f"llmux serve not healthy in {SHIM_START_TIMEOUT_S} s:\n"
                                     f"{shim.log()}")
            time.sleep(0.1)

    try:
        yield start
    finally:
        for shim in started:
            shim.stop()
        leftovers = kill_tagged(tag)
        assert not leftovers, f"engines left running after the shim stopped: {leftovers}"
