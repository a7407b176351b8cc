"""The model's on-disk checkpoint: written once, then loaded at every start like a real one.

Layout (Hugging Face style): <HF cache>/llmux-builtin/<model_path>/<backend>-<N>mb/
config.json + model.safetensors. Concurrent first starts of the same model serialize on
a lock file; config.json is written last, so its presence means the checkpoint is whole.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from llmux.shim.builtin import safetensors_io
from llmux.shim.builtin.paths import checkpoint_dir
from llmux.shim.builtin.safetensors_io import TensorSpec
from llmux.shim.builtin.vocab import VOCAB_SIZE

log = logging.getLogger(__name__)

BALLAST_NAME = "ballast.weight"
_BALLAST_BLOCK = 64 << 20
MIB = 1 << 20


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and identity of one built-in model; stored as config.json."""

    model_path: str
    backend: str
    weights_mb: int
    seed: int
    vocab_size: int = VOCAB_SIZE
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 512
    architecture: str = "LlmuxTinyForCausalLM"

    @classmethod
    def for_model(cls, model_path: str, backend: str, weights_mb: int) -> ModelConfig:
        """The seed comes from the model path, so each model name is a different model."""
        digest = hashlib.sha256(model_path.encode()).digest()
        return cls(model_path, backend, weights_mb, int.from_bytes(digest[:8], "little"))

    @property
    def directory(self) -> Path:
        return checkpoint_dir(self.model_path, self.backend, self.weights_mb)

    @property
    def weights_file(self) -> Path:
        return self.directory / "model.safetensors"

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = asdict(self)
        data["architectures"] = [data.pop("architecture")]
        data["torch_dtype"] = "float32"
        return data


def ballast_spec(config: ModelConfig) -> TensorSpec:
    """A deterministic U8 tensor of ``weights_mb`` MiB: the weight size knob."""
    total = config.weights_mb * MIB

    def chunks() -> Iterator[memoryview]:
        # One random block, rotated per chunk: deterministic, incompressible enough for
        # checkpoint images, and fast to produce (random.randbytes is ~0.2 GB/s).
        block = memoryview(random.Random(config.seed).randbytes(min(total, _BALLAST_BLOCK)))  # noqa: S311
        written, index = 0, 0
        while written < total:
            size = min(len(block), total - written)
            shift = (index * 4099) % len(block)
            rotated = [block[shift:], block[:shift]]
            left = size
            for piece in rotated:
                part = piece[: min(left, len(piece))]
                if part.nbytes:
                    yield part
                    left -= part.nbytes
            written += size
            index += 1

    return TensorSpec(BALLAST_NAME, "U8", (total,), chunks)


def ensure_checkpoint(
    config: ModelConfig, make_tensors: Callable[[ModelConfig], list[TensorSpec]]
) -> bool:
    """Write the checkpoint unless a complete one is there; True when it was written now."""
    directory = config.directory
    config_file = directory / "config.json"
    expected = config.to_json()
    if _is_complete(config_file, config.weights_file, expected):
        return False
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(config_file, config.weights_file, expected):
            return False
        for stale in directory.glob(".*.tmp"):  # left by a writer that was killed
            stale.unlink(missing_ok=True)
        log.info("Writing checkpoint for %s (%d MiB ballast) to %s",
                 config.model_path, config.weights_mb, directory)
        tensors = [*make_tensors(config)]
        if config.weights_mb:
            tensors.append(ballast_spec(config))
        metadata = {"format": "pt", "model_path": config.model_path}
        safetensors_io.write_file(config.weights_file, tensors, metadata)
        tmp = config_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(expected, indent=2, sort_keys=True))
        tmp.replace(config_file)
    return True


def _is_complete(config_file: Path, weights_file: Path, expected: dict[str, object]) -> bool:
    try:
        found = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return False
    return bool(found == json.loads(json.dumps(expected))) and weights_file.is_file()
