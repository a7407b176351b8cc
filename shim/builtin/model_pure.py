"""The pure-Python backend: weights are byte buffers, text comes from a keyed hash.

Used where PyTorch is not installed (or LLMUX_BUILTIN_BACKEND=pure). The weights still
come from the checkpoint on disk and decide the output (the hash is keyed by a digest
of the embedding tensor), so a discarded or half-loaded model cannot answer.
"""

from __future__ import annotations

import hashlib
import random
import zlib
from collections.abc import Sequence

from llmux.shim.builtin import safetensors_io
from llmux.shim.builtin.backend import EngineError, ModelBackend
from llmux.shim.builtin.checkpoint import ModelConfig
from llmux.shim.builtin.safetensors_io import TensorSpec
from llmux.shim.builtin.vocab import EOS_ID

EMBED_NAME = "model.embed_tokens.weight"


class PureBackend(ModelBackend):
    name = "pure"

    def __init__(self, config: ModelConfig, device: str, sleep_mode: bool) -> None:
        if device not in ("auto", "cpu"):
            raise EngineError(f"--device {device} needs PyTorch; the pure backend runs on cpu")
        super().__init__(config, "cpu", sleep_mode)
        self._device_buffers: dict[str, bytearray] = {}
        self._host_buffers: dict[str, bytearray] = {}
        self._sizes: dict[str, int] = {}
        self._key = b""

    def make_checkpoint_tensors(self) -> list[TensorSpec]:
        size = self.config.vocab_size * self.config.hidden_size
        data = random.Random(self.config.seed ^ 0x5EED).randbytes(size)  # noqa: S311
        return [TensorSpec(EMBED_NAME, "U8", (size,), lambda: [data])]

    def _load_from_disk(self) -> None:
        path = self.config.weights_file
        infos = safetensors_io.read_header(path)
        if EMBED_NAME not in infos:
            raise EngineError(f"{path}: no tensor {EMBED_NAME!r}", 500, "InternalServerError")
        self._host_buffers = {}
        for name, info in infos.items():
            buffer = self._device_buffers.get(name)
            if buffer is None or len(buffer) != info.nbytes:
                buffer = bytearray(info.nbytes)
                self._device_buffers[name] = buffer
            safetensors_io.read_into(path, info, memoryview(buffer))
            self._sizes[name] = info.nbytes
        self._key = hashlib.blake2b(self._device_buffers[EMBED_NAME], digest_size=32).digest()

    def _offload(self) -> None:
        self._host_buffers = {name: bytearray(buf) for name, buf in self._device_buffers.items()}
        self._device_buffers = {}

    def _onload(self) -> None:
        self._device_buffers = self._host_buffers
        self._host_buffers = {}

    def _discard(self) -> None:
        self._device_buffers = {}
        self._host_buffers = {}
        self._key = b""

    def _allocate(self) -> None:
        self._device_buffers = {name: bytearray(size) for name, size in self._sizes.items()}

    def _predict(self, ids: Sequence[int], banned: set[int]) -> int:
        if not self._key:
            raise EngineError("weights are not loaded", 503, "ServiceUnavailableError")
        data = b"".join(i.to_bytes(2, "little") for i in ids)
        counter = 0
        while True:
            digest = hashlib.blake2b(
                data + counter.to_bytes(4, "little"), key=self._key, digest_size=64
            ).digest()
            for start in range(0, len(digest), 4):
                word = int.from_bytes(digest[start : start + 4], "little")
                candidate = word % self.config.vocab_size
                if candidate != EOS_ID and candidate not in banned:
                    return candidate
            counter += 1

    def weights_checksum(self) -> int:
        self.check_ready()
        return sum(zlib.crc32(buf) for buf in self._device_buffers.values())

    @property
    def weights_bytes(self) -> int:
        return sum(self._sizes.values())

    @property
    def resident_weight_bytes(self) -> int:
        buffers = [*self._device_buffers.values(), *self._host_buffers.values()]
        return sum(len(buf) for buf in buffers)
