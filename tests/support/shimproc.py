"""A `llmux serve` process for tests: its TOML config, its start, an HTTP client for it.

Shared by tests/integration (built-in engines), tests/vllm (real vLLM), tests/browser and
the shim's process-level tests: ``tests.support.shimproc``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

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


def launch_shim(config: dict[str, Any], config_path: Path, log_path: Path, tag: str,
                *, request_timeout_s: float = REQUEST_TIMEOUT_S,
                start_timeout_s: float = SHIM_START_TIMEOUT_S,
                wrapper: tuple[str, ...] = ()) -> Shim:
    """Write the config, start `llmux serve --config` and wait for its /health.

    ``wrapper``: argv put before llmux's (e.g. prlimit with its options)."""
    config_path.write_text(to_toml(config))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [*wrapper, str(LLMUX), "serve", "--config", str(config_path), "--log-level",
             "debug"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    shim = Shim(proc, int(config["port"]), config_path, log_path, tag,
                httpx.Client(timeout=request_timeout_s, trust_env=False))
    deadline = time.monotonic() + start_timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"llmux serve exited {proc.returncode}:\n{shim.log()}")
        with contextlib.suppress(httpx.HTTPError):
            if shim.client.get(f"{shim.url}/health", timeout=2).status_code == 200:
                return shim
        if time.monotonic() > deadline:
            shim.stop()
            raise AssertionError(f"llmux serve not healthy in {start_timeout_s} s:\n"
                                 f"{shim.log()}")
        time.sleep(0.1)


@contextlib.contextmanager
def shims_for_test(workdir: Path, tag: str) -> Iterator[Callable[..., Shim]]:
    """launch(config, **launch_shim's options) -> a running shim, its files shim-N.toml and
    shim-N.log in workdir; on leaving, all are stopped and no engine with the tag may be left."""
    from tests.support.procs import stop_shims

    started: list[Shim] = []

    def launch(config: dict[str, Any], **options: Any) -> Shim:
        n = len(started)
        shim = launch_shim(config, workdir / f"shim-{n}.toml", workdir / f"shim-{n}.log", tag,
                           **options)
        started.append(shim)
        return shim

    try:
        yield launch
    finally:
        stop_shims(started, tag)
