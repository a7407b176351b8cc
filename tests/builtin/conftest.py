"""Fixtures for the built-in engine's tests: an isolated cache and engines per backend."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmux.shim.builtin.testing import EngineProcess, start_engine
from tests.support.builtin_engine import EngineEnv

HAVE_TORCH = importlib.util.find_spec("torch") is not None
BACKENDS = [
    pytest.param("torch", marks=pytest.mark.skipif(not HAVE_TORCH, reason="PyTorch not installed")),
    "pure",
]


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF and XDG caches of the engines under test (checkpoints, JIT logs)."""
    return tmp_path_factory.mktemp("builtin-cache")



@pytest.fixture(scope="session")
def engine_env(cache_root: Path) -> EngineEnv:
    """engine_env(backend): the environment that points an engine at the test cache."""

    def make(backend: str) -> dict[str, str]:
        return {
            "HF_HOME": str(cache_root / "hf"),
            "XDG_CACHE_HOME": str(cache_root / "xdg"),
            "LLMUX_BUILTIN_BACKEND": backend,
        }

    return make


@pytest.fixture(params=BACKENDS, scope="module")
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def shared_engine(engine_env: EngineEnv, backend: str) -> Iterator[EngineProcess]:
    """One engine per backend for the tests that do not change its state."""
    with start_engine("test-org/shared-model", weights_mb=4,
                      extra_env=engine_env(backend)) as engine:
        yield engine
