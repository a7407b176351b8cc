"""Fixtures of the shim's tests: process tracking, validated built-in configs, config files.

The raw built-in config (builtin_config_dict), its log folder and the in-loop shim are
tests/support/proxy_fixtures.py's, registered by the root conftest (tests/client uses them
too), so that every shim test module (supervisor, lifecycle, proxy, CLI) builds a real
configuration of real built-in engines on free loopback ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from llmux.shim.config import Config, config_from_dict
from tests.support.procs import pid_alive as running
from tests.support.procs import wait_until_async
from tests.support.proxy_fixtures import ConfigDict

# The built-in engines' backend (pure) is the root conftest's builtin_backend fixture; a
# test that wants PyTorch sets it in the model's env.


def pids_with_marker(marker: str) -> list[int]:
    """Running processes whose command line contains ``marker``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline and running(int(name)):
                found.append(int(name))
    return found


class ProcTracker:
    """Process helpers for tests; every tracked PID still running at teardown is killed."""

    running = staticmethod(running)
    pids_with_marker = staticmethod(pids_with_marker)

    def __init__(self) -> None:
        self.tracked: set[int] = set()

    def track(self, *pids: int) -> None:
        self.tracked.update(pids)

    def any_running(self, pids: list[int]) -> bool:
        return any(running(p) for p in pids)

    async def wait_gone(self, pids: list[int], within: float = 30.0) -> bool:
        """Until none of ``pids`` runs (death clean-up is asynchronous): True, or the
        test fails with wait_until's message."""
        return await wait_until_async(lambda: not self.any_running(pids), within,
                                      f"processes {pids} to be gone")

    def kill_leftovers(self) -> list[int]:
        leaked = [p for p in self.tracked if running(p)]
        for pid in leaked:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return leaked


@pytest.fixture
def procs() -> Iterator[ProcTracker]:
    """Process helpers; fails the test if a tracked process outlived it."""
    tracker = ProcTracker()
    yield tracker
    leaked = tracker.kill_leftovers()
    assert not leaked, f"processes leaked by the test (killed now): {leaked}"


@pytest.fixture
def builtin_config(builtin_config_dict: Callable[..., ConfigDict]) -> Callable[..., Config]:
    """Like builtin_config_dict, but validated into a Config."""

    def make(*args: Any, **kwargs: Any) -> Config:
        return config_from_dict(builtin_config_dict(*args, **kwargs), source="test")

    return make


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[ConfigDict, str], Path]:
    """Write a raw config as JSON (``.json``) or TOML (``.toml``, flat values only)."""

    def write(raw: ConfigDict, suffix: str = ".json") -> Path:
        path = tmp_path / f"config{suffix}"
        path.write_text(json.dumps(raw) if suffix == ".json" else _to_toml(raw))
        return path

    return write


def _to_toml(raw: ConfigDict) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return str(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(type(v))

    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for k, v in raw.items():
        if isinstance(v, dict) and k != "models":
            tables.append((k, v))
        elif k != "models":
            lines.append(f"{k} = {value(v)}")
    for k, v in tables:
        lines.append(f"\n[{k}]")
        lines += [f"{kk} = {value(vv)}" for kk, vv in v.items()]
    for name, m in raw.get("models", {}).items():
        lines.append(f"\n[models.{json.dumps(name)}]")
        lines += [f"{kk} = {value(vv)}" for kk, vv in m.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def sentinel_fd(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """An inheritable fd (no CLOEXEC) open in the test process: a child must not get it."""
    path = tmp_path / "sentinel"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.set_inheritable(fd, True)
    try:
        yield fd, path
    finally:
        os.close(fd)
