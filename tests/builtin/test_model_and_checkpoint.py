"""A real tiny model: deterministic answers, one per model, from a checkpoint written once."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmux.shim.builtin.testing import EngineProcess, spawn_engine, start_engine
from tests.support.builtin_engine import PROMPTS, EngineEnv, answers


def engine_state(engine: EngineProcess) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{engine.base_url}/engine_state").json()
    return body


def test_same_answers_across_restarts_from_a_checkpoint_written_once(
    engine_env: EngineEnv, backend: str
) -> None:
    model = "test-org/restartable"
    with start_engine(model, weights_mb=2, extra_env=engine_env(backend)) as first:
        first_answers = answers(first)
        checkpoint = Path(str(engine_state(first)["checkpoint"]))
        written_at = checkpoint.stat().st_mtime_ns
        assert "Writing checkpoint" in first.log_text()
    with start_engine(model, weights_mb=2, extra_env=engine_env(backend)) as second:
        assert answers(second) == first_answers
        assert "Writing checkpoint" not in second.log_text()
    assert checkpoint.stat().st_mtime_ns == written_at
    assert len(set(first_answers)) == len(PROMPTS)


def test_checkpoint_is_hugging_face_style(engine_env: EngineEnv, backend: str,
                                          cache_root: Path) -> None:
    model = "test-org/layout"
    with start_engine(model, weights_mb=3, extra_env=engine_env(backend)) as engine:
        state = engine_state(engine)
    checkpoint = Path(str(state["checkpoint"]))
    assert checkpoint.name == "model.safetensors"
    assert checkpoint.is_relative_to(cache_root / "hf" / "llmux-builtin" / "test-org" / "layout")
    config = json.loads((checkpoint.parent / "config.json").read_text())
    assert config["model_path"] == model
    assert config["weights_mb"] == 3
    assert config["architectures"] == ["LlmuxTinyForCausalLM"]
    assert checkpoint.stat().st_size >= 3 << 20
    assert state["weights_bytes"] >= 3 << 20


@pytest.mark.skipif(importlib.util.find_spec("safetensors") is None,
                    reason="the safetensors package is not installed")
@pytest.mark.filterwarnings("ignore:Failed to initialize NumPy")
def test_checkpoint_opens_with_the_safetensors_library(engine_env: EngineEnv,
                                                       backend: str) -> None:
    from safetensors import safe_open

    with start_engine("test-org/compat", weights_mb=1, extra_env=engine_env(backend)) as engine:
        checkpoint = str(engine_state(engine)["checkpoint"])
    framework = "pt" if importlib.util.find_spec("torch") else "numpy"
    if framework == "numpy" and importlib.util.find_spec("numpy") is None:
        pytest.skip("neither torch nor numpy to read tensors with")
    with safe_open(checkpoint, framework=framework) as handle:
        names = set(handle.keys())
        assert {"model.embed_tokens.weight", "ballast.weight"} <= names
        assert handle.get_tensor("ballast.weight").shape[0] == 1 << 20
        embed = handle.get_tensor("model.embed_tokens.weight")
        assert embed.shape[0] > 0
        assert handle.metadata()["model_path"] == "test-org/compat"


def test_different_models_give_different_answers(engine_env: EngineEnv, backend: str) -> None:
    env = engine_env(backend)
    with start_engine("test-org/model-a", weights_mb=1, extra_env=env) as a, \
            start_engine("test-org/model-b", weights_mb=1, extra_env=env) as b:
        answers_a, answers_b = answers(a), answers(b)
    assert all(x != y for x, y in zip(answers_a, answers_b, strict=True))


def test_the_served_name_does_not_change_the_model(engine_env: EngineEnv, backend: str) -> None:
    env = engine_env(backend)
    with start_engine("test-org/model-a", weights_mb=1, extra_env=env) as plain:
        expected = answers(plain)
    with start_engine("test-org/model-a", weights_mb=1, extra_env=env,
                      extra_args=["--served-model-name", "renamed"]) as renamed:
        response = httpx.post(f"{renamed.base_url}/v1/completions",
                              json={"model": "renamed", "prompt": PROMPTS[0], "max_tokens": 10})
        assert response.json()["choices"][0]["text"] == expected[0]


def test_simultaneous_first_starts_write_the_checkpoint_once(engine_env: EngineEnv,
                                                             backend: str) -> None:
    env = engine_env(backend)
    engines = [spawn_engine("test-org/twins", weights_mb=8, extra_env=env) for _ in range(2)]
    try:
        for engine in engines:
            engine.wait_ready()
        assert answers(engines[0]) == answers(engines[1])
        logs = [engine.log_text() for engine in engines]
    finally:
        for engine in engines:
            engine.stop()
    assert sum(log.count("Writing checkpoint") for log in logs) == 1
