"""Fixtures for the proxy/switcher/control tests: a whole shim running in the test's loop.

Registered by the root conftest (tests/shim and tests/client use them): shim_factory,
builtin_config_dict (a raw config of built-in models on free ports), log_dir, http.

The shim is the real one (uvicorn on a free loopback port, the real lifecycle
spawning real built-in engines); only the process boundary is saved, so that
the tests can look at the switcher's counters directly as well as over HTTP.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.procs import free_ports, marked_roots, pid_alive

if TYPE_CHECKING:
    # the shim's modules (starlette, uvicorn, httpx) are imported by the fixtures that use
    # them: the root conftest registers this module for every run, the GPU machine's too
    import httpx

    from llmux.shim.app import Shim

#: small weights keep engine start-up quick on a 2-core machine
TEST_WEIGHTS_MB = 4

ShimFactory = Callable[..., Awaitable["Shim"]]


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    d = tmp_path / "logs"
    d.mkdir()
    return d


ConfigDict = dict[str, Any]


@pytest.fixture
def builtin_config_dict(log_dir: Path) -> Callable[..., ConfigDict]:
    """Build a raw config (dict) of built-in-engine models on free ports.

    ``make(["a", "b"], eviction="offload+keep_running", a={"weights_mb": 8}, port=...)``:
    names, an optional eviction applied to every model, per-model overrides as
    keyword arguments named like the model, and top-level overrides in ``top``.
    """

    def make(names: list[str] | tuple[str, ...] = ("m1",), *, eviction: str | None = None,
             top: dict[str, Any] | None = None, **per_model: dict[str, Any]) -> ConfigDict:
        ports = free_ports(len(names) + 2)
        models: dict[str, Any] = {}
        for name, port in zip(names, ports[2:], strict=False):
            m: dict[str, Any] = {"model_path": f"llmux-test/{name}", "port": port,
                                 "engine": "builtin", "weights_mb": TEST_WEIGHTS_MB,
                                 "startup_timeout_secs": 120}
            if eviction is not None:
                m["eviction"] = eviction
            m.update(per_model.get(name.replace("-", "_"), {}))
            models[name] = m
        raw: dict[str, Any] = {"models": models, "host": "127.0.0.1", "port": ports[0],
                               "metrics_port": 0, "log_dir": str(log_dir)}
        raw.update(top or {})
        return raw

    return make


@pytest.fixture
async def shim_factory(builtin_config_dict: Callable[..., dict[str, Any]]
                       ) -> AsyncIterator[ShimFactory]:
    """``await make(["a", "b"], policy={...}, top={...}, a={...})`` -> a started Shim."""
    started: list[Shim] = []

    async def make(names: list[str] | tuple[str, ...] = ("a", "b"), *,
                   policy: dict[str, Any] | None = None, top: dict[str, Any] | None = None,
                   eviction: str | None = "offload+keep_running",
                   **per_model: dict[str, Any]) -> Shim:
        raw = builtin_config_dict(list(names), eviction=eviction, top=top, **per_model)
        raw["policy"] = {"min_active_secs": 0, "request_timeout_secs": 120,
                         **(policy or {})}
        from llmux.shim.app import Shim
        from llmux.shim.config import config_from_dict

        config = config_from_dict(raw, source="test")
        shim = Shim(config)
        started.append(shim)
        await shim.start()
        return shim

    yield make
    for shim in reversed(started):
        await shim.stop()
        for name in shim.config.models:
            assert not shim.supervisor.pids(name), f"engine of {name} left running"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    import httpx

    async with httpx.AsyncClient(timeout=120) as client:
        yield client


def chat_body(model: str, prompt: str, *, max_tokens: int = 8, stream: bool = False
              ) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream}


async def direct_chat(client: httpx.AsyncClient, shim: Shim, model: str, prompt: str,
                      max_tokens: int = 8) -> str:
    """The engine's own answer (bypassing the proxy); the engine must be running."""
    port = shim.config.models[model].port
    body = chat_body(model, prompt, max_tokens=max_tokens)
    r = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
    r.raise_for_status()
    return str(r.json()["choices"][0]["message"]["content"])


async def proxy_chat(client: httpx.AsyncClient, shim: Shim, model: str, prompt: str,
                     max_tokens: int = 8) -> str:
    r = await client.post(f"{shim.url}/v1/chat/completions",
                          json=chat_body(model, prompt, max_tokens=max_tokens))
    assert r.status_code == 200, r.text
    data = r.json()
    return str(data["choices"][0]["message"]["content"])


def sse_events(raw: bytes) -> list[Any]:
    out: list[Any] = []
    for block in raw.decode().split("\n\n"):
        block = block.strip()
        if not block.startswith("data:"):
            continue
        payload = block[5:].strip()
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def kill_pids(pids: list[int]) -> None:
    """Last-resort clean-up of processes a failed test may have left."""
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def engine_roots(shim: Shim, model: str) -> list[int]:
    """Roots of the process trees carrying the model's engine mark: more than one is a
    model loaded twice."""
    from llmux.shim.supervisor import ENGINE_MARK

    return marked_roots(f"{ENGINE_MARK}={shim.supervisor.mark(model)}")


def starts_logged(shim: Shim, model: str) -> int:
    """How many times the supervisor started the model's engine (one header each)."""
    path = shim.supervisor.log_path(model)
    return path.read_text(errors="replace").count(": starting ") if path.exists() else 0


def switches(shim: Shim) -> float:
    """Switches the shim has counted (the metric), any outcome."""
    text = shim.metrics.render().decode()
    return sum(float(m) for m in re.findall(
        r'^llmux_switch_duration_seconds_count\{[^}]*\} (\S+)$', text, re.M))


def untouched(shim: Shim) -> None:
    """No engine started, no switch made: what a refused request must leave."""
    assert switches(shim) == 0
    assert shim.switcher.active is None
    for name in shim.config.models:
        assert not shim.supervisor.pids(name), f"an engine of {name} was started"
        assert str(shim.lifecycle.status(name).state) == "stopped"
