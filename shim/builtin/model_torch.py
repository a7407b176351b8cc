"""The PyTorch backend: a real (tiny, randomly initialised) transformer language model.

Two pre-norm decoder layers over the word-level vocabulary, run as plain functions over
a dict of tensors: moving weights between device and host for sleep levels is then a
matter of swapping dict entries, as vLLM's CuMemAllocator does with its pools.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmux.shim.builtin import safetensors_io
from llmux.shim.builtin.backend import EngineError, ModelBackend
from llmux.shim.builtin.checkpoint import ModelConfig
from llmux.shim.builtin.safetensors_io import TensorInfo, TensorSpec
from llmux.shim.builtin.vocab import EOS_ID

_DTYPES = {"F32": torch.float32, "U8": torch.uint8, "F16": torch.float16, "BF16": torch.bfloat16}
_STAGING = 64 << 20


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda was asked for, but CUDA is not available to PyTorch")
    return requested


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], float]]:
    """Every model tensor with its init scale (0: ones, -1: zeros)."""
    d, v, ff = config.hidden_size, config.vocab_size, config.intermediate_size
    shapes: dict[str, tuple[tuple[int, ...], float]] = {
        "model.embed_tokens.weight": ((v, d), 1.0),
        "model.embed_positions.weight": ((config.max_position_embeddings, d), 0.3),
    }
    for layer in range(config.num_layers):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "input_layernorm.weight": ((d,), 0.0),
            p + "input_layernorm.bias": ((d,), -1.0),
            p + "self_attn.qkv_proj.weight": ((3 * d, d), 1 / math.sqrt(d)),
            p + "self_attn.o_proj.weight": ((d, d), 1 / math.sqrt(d)),
            p + "post_attention_layernorm.weight": ((d,), 0.0),
            p + "post_attention_layernorm.bias": ((d,), -1.0),
            p + "mlp.up_proj.weight": ((ff, d), 1 / math.sqrt(d)),
            p + "mlp.down_proj.weight": ((d, ff), 1 / math.sqrt(ff)),
        }
    shapes |= {
        "model.norm.weight": ((d,), 0.0),
        "model.norm.bias": ((d,), -1.0),
        "lm_head.weight": ((v, d), 2.0 / math.sqrt(d)),
    }
    return shapes


def _raw(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without numpy and without a copy."""
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())).cast("B")


def _fixed_chunks(tensor: torch.Tensor) -> Callable[[], list[memoryview]]:
    def chunks() -> list[memoryview]:
        return [_raw(tensor)]

    return chunks


class TorchBackend(ModelBackend):
    name = "torch"

    def __init__(self, config: ModelConfig, device: str, sleep_mode: bool) -> None:
        super().__init__(config, resolve_device(device), sleep_mode)
        self._weights: dict[str, torch.Tensor] = {}
        self._host: dict[str, torch.Tensor] = {}
        self._infos: dict[str, TensorInfo] = {}
        torch.set_num_threads(1)

    def make_checkpoint_tensors(self) -> list[TensorSpec]:
        generator = torch.Generator().manual_seed(self.config.seed & 0x7FFF_FFFF_FFFF_FFFF)
        specs = []
        for name, (shape, scale) in tensor_shapes(self.config).items():
            if scale == 0.0:
                tensor = torch.ones(shape)
            elif scale < 0:
                tensor = torch.zeros(shape)
            else:
                tensor = torch.randn(shape, generator=generator) * scale
            specs.append(TensorSpec(name, "F32", shape, _fixed_chunks(tensor)))
        return specs

    def _load_from_disk(self) -> None:
        path = self.config.weights_file
        infos = safetensors_io.read_header(path)
        missing = sorted(set(tensor_shapes(self.config)) - set(infos))
        if missing:
            raise EngineError(f"{path}: missing tensors {missing}", 500, "InternalServerError")
        self._host = {}
        for name, info in infos.items():
            target = self._weights.get(name)
            dtype = _DTYPES[info.dtype]
            if target is None or tuple(target.shape) != info.shape or target.dtype != dtype:
                target = torch.empty(info.shape, dtype=dtype, device=self.device)
                self._weights[name] = target
            if self.device == "cpu":
                safetensors_io.read_into(path, info, _raw(target))
            else:
                self._copy_to_device(path, info, target)
        self._infos = infos

    @staticmethod
    def _copy_to_device(path: Path, info: TensorInfo, target: torch.Tensor) -> None:
        """Stream through one pinned staging buffer, so a 4 GB load needs no 4 GB on host."""
        flat = target.view(-1).view(torch.uint8)
        size = min(_STAGING, max(info.nbytes, 1))
        staging = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        offset = 0
        for chunk in safetensors_io.iter_chunks(path, info, _STAGING):
            size = len(chunk)
            _raw(staging)[:size] = chunk
            flat[offset : offset + size].copy_(staging[:size])
            torch.cuda.synchronize()
            offset += size

    def _offload(self) -> None:
        # A comprehension, so that no loop variable keeps a device tensor alive past here.
        self._host = {name: self._host_copy(tensor) for name, tensor in self._weights.items()}
        self._weights = {}
        self._free_device_cache()

    def _host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device == "cpu":
            return tensor.clone()
        copy = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        copy.copy_(tensor)
        return copy

    def _onload(self) -> None:
        if self.device == "cpu":  # the host copy simply becomes the live weights again
            self._weights = self._host
        else:
            self._weights = {name: t.to(self.device, non_blocking=False)
                             for name, t in self._host.items()}
        self._host = {}

    def _discard(self) -> None:
        self._weights = {}
        self._host = {}
        self._free_device_cache()

    def _allocate(self) -> None:
        self._weights = {
            name: torch.empty(info.shape, dtype=_DTYPES[info.dtype], device=self.device)
            for name, info in self._infos.items()
        }

    def _free_device_cache(self) -> None:
        """Hand freed memory back to the driver, cuBLAS's cached workspaces included."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear_workspaces is not None:
                clear_workspaces()
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def _predict(self, ids: Sequence[int], banned: set[int]) -> int:
        cfg, w = self.config, self._weights
        context = list(ids[-cfg.max_position_embeddings :]) or [EOS_ID]
        tokens = torch.tensor(context, device=self.device)
        positions = torch.arange(len(context), device=self.device)
        x = w["model.embed_tokens.weight"][tokens] + w["model.embed_positions.weight"][positions]
        heads, d = cfg.num_heads, cfg.hidden_size
        for layer in range(cfg.num_layers):
            p = f"model.layers.{layer}."
            h = F.layer_norm(x, (d,), w[p + "input_layernorm.weight"],
                             w[p + "input_layernorm.bias"])
            qkv = F.linear(h, w[p + "self_attn.qkv_proj.weight"])
            q, k, v = (qkv[:, i * d : (i + 1) * d].view(len(context), heads, d // heads)
                       .transpose(0, 1) for i in range(3))
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            merged = attn.transpose(0, 1).reshape(len(context), d)
            x = x + F.linear(merged, w[p + "self_attn.o_proj.weight"])
            h = F.layer_norm(x, (d,), w[p + "post_attention_layernorm.weight"],
                             w[p + "post_attention_layernorm.bias"])
            up = F.gelu(F.linear(h, w[p + "mlp.up_proj.weight"]))
            x = x + F.linear(up, w[p + "mlp.down_proj.weight"])
        h = F.layer_norm(x[-1], (d,), w["model.norm.weight"], w["model.norm.bias"])
        logits = F.linear(h, w["lm_head.weight"]).float()
        logits[[EOS_ID, *banned]] = -math.inf
        return int(torch.argmax(logits).item())

    def describe(self) -> dict[str, Any]:
        state = super().describe()
        if self.device == "cuda":
            state["cuda_memory_allocated"] = int(torch.cuda.memory_allocated())
            state["cuda_memory_reserved"] = int(torch.cuda.memory_reserved())
        return state

    @property
    def weights_bytes(self) -> int:
        return sum(info.nbytes for info in self._infos.values())

    @property
    def resident_weight_bytes(self) -> int:
        tensors = [*self._weights.values(), *self._host.values()]
        return sum(t.numel() * t.element_size() for t in tensors)
