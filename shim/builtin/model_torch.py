"""The PyTorch backend: a real (tiny, randomly initialised) transformer language model.

Two pre-norm decoder layers over the word-level vocabulary, run as plain functions over
a dict of tensors. On the CPU, sleep levels swap dict entries. On a GPU the tensors live
where vLLM's sleep mode puts them: in CUDA virtual memory of cumem.CuMemAllocator, tagged
``weights`` and ``kv_cache``; a sleep unmaps it (level 1 first copies the weights to pinned
host memory) and a wake maps it again at the same addresses, so the tensors and the CUDA
graph captured at start (the output head, unless --enforce-eager) stay valid.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmux.shim.builtin import safetensors_io
from llmux.shim.builtin.backend import EngineError, ModelBackend
from llmux.shim.builtin.checkpoint import ModelConfig
from llmux.shim.builtin.cumem import CuMemAllocator, release_pinned_cache
from llmux.shim.builtin.safetensors_io import TensorInfo, TensorSpec
from llmux.shim.builtin.vocab import EOS_ID

log = logging.getLogger(__name__)
_DTYPES = {"F32": torch.float32, "U8": torch.uint8, "F16": torch.float16, "BF16": torch.bfloat16}
_STAGING = 32 << 20
#: readers of a weights load (LLMUX_BUILTIN_LOAD_THREADS); 1 reads like vLLM's default loader,
#: more like its streaming loaders (`--load-format runai_streamer`, concurrency N)
_LOAD_THREADS_ENV = "LLMUX_BUILTIN_LOAD_THREADS"
_CHECKSUM_SLICE = 16 << 20


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


def load_threads() -> int:
    """How many readers load the weights: $LLMUX_BUILTIN_LOAD_THREADS, default 1."""
    raw = os.environ.get(_LOAD_THREADS_ENV, "1").strip() or "1"
    if not raw.isdigit() or not 1 <= int(raw) <= 64:
        raise EngineError(f"{_LOAD_THREADS_ENV}={raw!r} is not a number of readers from 1 to 64",
                          500, "InternalServerError")
    return int(raw)


class _StagedCopy:
    """One reader of a load to the GPU: two pinned staging buffers and a stream of its own,
    so that its read of one chunk overlaps the host-to-GPU copy of the one before."""

    def __init__(self, path: Path, targets: dict[str, torch.Tensor]) -> None:
        self.path, self.targets = path, targets
        self.device = torch.cuda.current_device()
        self.buffers = [torch.empty(_STAGING, dtype=torch.uint8, pin_memory=True)
                        for _ in range(2)]
        self.done = [torch.cuda.Event(), torch.cuda.Event()]  # type: ignore[no-untyped-call]
        self.stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        self.turn = 0

    def __call__(self, fd: int, chunk: safetensors_io.Chunk) -> None:
        turn, self.turn = self.turn, self.turn ^ 1
        self.done[turn].synchronize()  # its previous copy has left the buffer
        staging = self.buffers[turn][: chunk.size]
        safetensors_io.pread_exactly(self.path, fd, _raw(staging), chunk.file_offset)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            target = self.targets[chunk.name][chunk.start : chunk.start + chunk.size]
            target.copy_(staging, non_blocking=True)
            self.done[turn].record(self.stream)


def _fixed_chunks(tensor: torch.Tensor) -> Callable[[], list[memoryview]]:
    def chunks() -> list[memoryview]:
        return [_raw(tensor)]

    return chunks


class TorchBackend(ModelBackend):
    name = "torch"

    def __init__(self, config: ModelConfig, device: str, sleep_mode: bool, *,
                 enforce_eager: bool = False, kv_cache_bytes: int = 0) -> None:
        super().__init__(config, resolve_device(device), sleep_mode)
        self._weights: dict[str, torch.Tensor] = {}
        self._host: dict[str, torch.Tensor] = {}
        self._infos: dict[str, TensorInfo] = {}
        self.enforce_eager = enforce_eager
        self.kv_cache_bytes = kv_cache_bytes
        self._kv_cache: torch.Tensor | None = None
        self._allocator: Any = None
        self._graph: Any = None
        self._graph_in: torch.Tensor | None = None
        self._graph_out: torch.Tensor | None = None
        torch.set_num_threads(1)
        if self.device == "cuda":
            self._allocator = CuMemAllocator(torch.cuda.current_device())

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
        if self._allocator is not None:
            self._load_to_cumem(path, infos)
            return
        raws: dict[str, memoryview] = {}
        for name, info in infos.items():
            target = self._weights.get(name)
            dtype = _DTYPES[info.dtype]
            if target is None or tuple(target.shape) != info.shape or target.dtype != dtype:
                target = torch.empty(info.shape, dtype=dtype, device=self.device)
                self._weights[name] = target
            raws[name] = _raw(target)

        def read(fd: int, chunk: safetensors_io.Chunk) -> None:
            view = raws[chunk.name][chunk.start : chunk.start + chunk.size]
            safetensors_io.pread_exactly(path, fd, view, chunk.file_offset)

        safetensors_io.read_parallel(path, safetensors_io.chunks_of(infos.values(), _STAGING),
                                     [read] * load_threads())
        self._infos = infos
        if self._kv_cache is None and self.kv_cache_bytes:
            self._kv_cache = torch.zeros(self.kv_cache_bytes, dtype=torch.uint8)

    def _load_to_cumem(self, path: Path, infos: dict[str, TensorInfo]) -> None:
        """Weights into the ``weights`` pool (made at the first load), KV cache into its own;
        then the output head's CUDA graph, captured once over those fixed addresses."""
        allocator = self._allocator
        if "weights" not in allocator.pools:
            total = sum((i.nbytes + 511) // 512 * 512 for i in infos.values())
            allocator.create_pool("weights", total)
            self._weights = {name: allocator.tensor("weights", info.shape, _DTYPES[info.dtype])
                             for name, info in infos.items()}
            if self.kv_cache_bytes:
                allocator.create_pool("kv_cache", self.kv_cache_bytes)
                self._kv_cache = allocator.tensor("kv_cache", (self.kv_cache_bytes,), torch.uint8)
                self._kv_cache.zero_()
        elif allocator.mapped_bytes("weights") == 0:
            allocator.wake_up(["weights"])
        self._infos = infos
        self._copy_file_to_device(path, infos)
        if self._graph is None and not self.enforce_eager:
            self._capture_graph()

    def _copy_file_to_device(self, path: Path, infos: dict[str, TensorInfo]) -> None:
        """Stream through pinned staging buffers, ``load_threads()`` readers at once, so an
        8 GB load needs no 8 GB on the host and several reads are in flight."""
        targets = {name: self._weights[name].view(-1).view(torch.uint8) for name in infos}
        readers = [_StagedCopy(path, targets) for _ in range(load_threads())]
        safetensors_io.read_parallel(path, safetensors_io.chunks_of(infos.values(), _STAGING),
                                     readers)
        torch.cuda.synchronize()
        del readers
        release_pinned_cache()

    def _capture_graph(self) -> None:
        """The output head (final norm, lm_head) as a CUDA graph over static buffers, as
        vLLM captures its decode steps at start; replayed for every token."""
        w, d = self._weights, self.config.hidden_size
        static_in = torch.zeros(d, device=self.device)
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm-up: cuBLAS handles and workspaces before capture
                self._head(static_in, w)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            static_out = self._head(static_in, w)
        self._graph, self._graph_in, self._graph_out = graph, static_in, static_out

    @staticmethod
    def _head(h: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        h = F.layer_norm(h, (h.shape[-1],), w["model.norm.weight"], w["model.norm.bias"])
        return F.linear(h, w["lm_head.weight"]).float()

    def _offload(self) -> None:
        if self._allocator is not None:
            self._allocator.sleep(offload_tags=["weights"], tags=["weights"])
            self._free_device_cache()
            return
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
        if self._allocator is not None:
            self._allocator.wake_up(["weights"])
            return
        if self.device == "cpu":  # the host copy simply becomes the live weights again
            self._weights = self._host
        else:
            self._weights = {name: t.to(self.device, non_blocking=False)
                             for name, t in self._host.items()}
        self._host = {}

    def _discard(self) -> None:
        if self._allocator is not None:
            self._allocator.drop_backups("weights")
            self._allocator.sleep(offload_tags=[], tags=["weights"])
            self._free_device_cache()
            return
        self._weights = {}
        self._host = {}
        self._free_device_cache()

    def _allocate(self) -> None:
        if self._allocator is not None:
            self._allocator.wake_up(["weights"])
            return
        self._weights = {
            name: torch.empty(info.shape, dtype=_DTYPES[info.dtype], device=self.device)
            for name, info in self._infos.items()
        }

    def _sleep_kv_cache(self) -> None:
        if self._allocator is not None:
            self._allocator.sleep(offload_tags=[], tags=["kv_cache"])
        elif self.kv_cache_bytes:
            self._kv_cache = None

    def _wake_kv_cache(self) -> None:
        if self._allocator is not None:
            self._allocator.wake_up(["kv_cache"])
        elif self.kv_cache_bytes:
            self._kv_cache = torch.zeros(self.kv_cache_bytes, dtype=torch.uint8)

    def weights_checksum(self) -> int:
        """A sum over every weight byte: equal before a sleep and after the wake. Summed a
        slice at a time: an int64 copy of 8 GB of bytes would take 64 GB of the GPU."""
        self.check_ready()
        total = 0
        for tensor in self._weights.values():
            flat = tensor.reshape(-1).view(torch.uint8)
            for start in range(0, flat.numel(), _CHECKSUM_SLICE):
                part = flat[start : start + _CHECKSUM_SLICE]
                total += int(part.sum(dtype=torch.int64).item())
        self._free_device_cache()
        return total

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
        if self._graph is not None and self._graph_in is not None and self._graph_out is not None:
            self._graph_in.copy_(x[-1])
            self._graph.replay()
            logits = self._graph_out.clone()
        else:
            logits = self._head(x[-1], w)
        logits[[EOS_ID, *banned]] = -math.inf
        return int(torch.argmax(logits).item())

    def describe(self) -> dict[str, Any]:
        state = super().describe()
        state["cuda_graphs"] = self._graph is not None
        state["kv_cache_bytes"] = self.kv_cache_bytes
        if self.device == "cuda":
            mapped = self._allocator.mapped_bytes()
            # torch's own allocator plus the cumem pools (which torch does not see)
            state["cuda_memory_allocated"] = int(torch.cuda.memory_allocated()) + mapped
            state["cuda_memory_reserved"] = int(torch.cuda.memory_reserved()) + mapped
            state["cumem_mapped_bytes"] = mapped
            state["cumem_backup_bytes"] = self._allocator.backup_bytes()
            state["cumem_weights_mapped_bytes"] = self._allocator.mapped_bytes("weights")
            state["cumem_kv_cache_mapped_bytes"] = self._allocator.mapped_bytes("kv_cache")
            state["cumem_timings"] = dict(self._allocator.timings)
            state["cumem_spare_pinned_bytes"] = self._allocator.spare_bytes
        return state

    @property
    def weights_bytes(self) -> int:
        return sum(info.nbytes for info in self._infos.values())

    @property
    def resident_weight_bytes(self) -> int:
        if self._allocator is not None:
            return int(self._allocator.mapped_bytes("weights")
                       + self._allocator.backup_bytes("weights"))
        tensors = [*self._weights.values(), *self._host.values()]
        return sum(t.numel() * t.element_size() for t in tensors)
