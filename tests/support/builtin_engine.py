"""The built-in engine's tests' shared pieces: the engine_env fixture's type and the
answers an engine gives to fixed prompts (to compare two engines, or one before and after)."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from llmux.shim.builtin.testing import EngineProcess

#: engine_env(backend) -> the environment that points an engine at the test cache, with
#: LLMUX_BUILTIN_BACKEND=backend (tests/builtin/conftest.py)
EngineEnv = Callable[[str], dict[str, str]]
PROMPTS = ["the king and the queen", "a cold night in the forest", "what is the answer"]


def answers(engine: EngineProcess) -> list[str]:
    out = []
    for prompt in PROMPTS:
        response = httpx.post(f"{engine.base_url}/v1/completions",
                              json={"prompt": prompt, "max_tokens": 10})
        assert response.status_code == 200
        out.append(response.json()["choices"][0]["text"])
    return out
