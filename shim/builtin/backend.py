"""What both model backends share: vLLM's sleep/wake state machine and the prefix cache.

A backend only moves buffers (device <-> host, discard, reload from disk) and computes
the next token; the rules of which transition is allowed when live here, once, so the
torch and pure-Python engines behave identically as seen over HTTP.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import logging
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from llmux.shim.builtin.checkpoint import ModelConfig

log = logging.getLogger(__name__)

SLEEP_TAGS = frozenset({"weights", "kv_cache"})
_PREFIX_CACHE_ENTRIES = 8192
#: vLLM's trait, copied where asked (=1): a prompt whose KV blocks are in the prefix cache is
#: prefilled by another kernel path than a cold one, and a model with near-tied logits (random
#: weights) then answers otherwise, the same way on every later hit, until the cache is reset
#: (a sleep). Seen with vLLM 0.24 on an H100, a Qwen3-8B-shaped model, no eviction at all.
PREFIX_DRIFT_ENV = "LLMUX_BUILTIN_PREFIX_DRIFT"
_RECENT_BANNED = 4


class WeightLocation(StrEnum):
    DEVICE = "device"
    HOST = "host"
    DISCARDED = "discarded"


class EngineError(Exception):
    """An error the API server returns as an OpenAI error body with this status."""

    def __init__(self, message: str, status: int = 400, kind: str = "BadRequestError",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind
        self.param = param

    def body(self) -> dict[str, Any]:
        """OpenAI's error body, as vLLM's ErrorResponse serialises it."""
        return {"error": {"message": self.message, "type": self.kind,
                          "param": self.param, "code": self.status}}


@dataclass
class SleepState:
    sleeping_tags: frozenset[str] = frozenset()
    level: int = 0

    @property
    def sleeping(self) -> bool:
        return bool(self.sleeping_tags)


def choose_backend() -> str:
    """LLMUX_BUILTIN_BACKEND=torch|pure, else torch when it is importable."""
    forced = os.environ.get("LLMUX_BUILTIN_BACKEND", "").strip().lower()
    if forced in ("torch", "pure"):
        return forced
    if forced:
        raise EngineError(f"LLMUX_BUILTIN_BACKEND={forced!r} is not one of: torch, pure")
    return "torch" if importlib.util.find_spec("torch") is not None else "pure"


def release_free_memory() -> None:
    """Give freed heap pages back to the kernel, so that RSS shows a level-2 sleep."""
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc_name).malloc_trim(0)


class ModelBackend(ABC):
    """Weights plus greedy next-token prediction, with vLLM's sleep levels."""

    name: str

    def __init__(self, config: ModelConfig, device: str, sleep_mode: bool) -> None:
        self.config = config
        self.device = device
        self.sleep_mode = sleep_mode
        self.location = WeightLocation.DISCARDED
        self.state = SleepState()
        self._prefix_cache: OrderedDict[tuple[int, ...], int] = OrderedDict()
        self.prefix_cache_hits = 0
        self._drift = os.environ.get(PREFIX_DRIFT_ENV) == "1"
        #: a cached prompt's first token, as the warm path computes it (PREFIX_DRIFT_ENV)
        self._warm_first: dict[tuple[int, ...], int] = {}

    # -- what a backend provides -------------------------------------------------------
    @abstractmethod
    def make_checkpoint_tensors(self) -> list[Any]:
        """The model's own tensors (TensorSpec) for a first checkpoint write."""

    @abstractmethod
    def _load_from_disk(self) -> None:
        """Read every tensor from the checkpoint into device buffers."""

    @abstractmethod
    def _offload(self) -> None:
        """Device buffers -> a host copy; the device copy is freed."""

    @abstractmethod
    def _onload(self) -> None:
        """Host copy -> device buffers; the host copy is freed."""

    @abstractmethod
    def _discard(self) -> None:
        """Free every weight buffer, on device and host."""

    @abstractmethod
    def _allocate(self) -> None:
        """Empty device buffers (a level-2 wake-up: memory back, contents invalid)."""

    @abstractmethod
    def _predict(self, ids: Sequence[int], banned: set[int]) -> int:
        """The greedy next token, never one of ``banned``."""

    @abstractmethod
    def weights_checksum(self) -> int:
        """A digest of every weight byte (equal before a sleep and after the wake)."""

    def _sleep_kv_cache(self) -> None:  # noqa: B027 (optional: backends without a KV cache)
        """Free the KV cache (every sleep level drops it, as vLLM's does)."""

    def _wake_kv_cache(self) -> None:  # noqa: B027 (optional: backends without a KV cache)
        """Memory for the KV cache again (contents invalid; the prefix cache was reset)."""

    @property
    @abstractmethod
    def weights_bytes(self) -> int:
        """Size of the full set of weights."""

    @property
    @abstractmethod
    def resident_weight_bytes(self) -> int:
        """Bytes of weight buffers allocated right now, device and host together."""

    # -- the state machine -------------------------------------------------------------
    def load(self) -> None:
        self._load_from_disk()
        self.location = WeightLocation.DEVICE

    def sleep(self, level: int) -> None:
        if not self.sleep_mode:
            raise EngineError(
                "sleep mode is not enabled: start the engine with --enable-sleep-mode")
        if level not in (1, 2):
            raise EngineError(f"sleep level must be 1 or 2, not {level!r}")
        if not self.state.sleeping:
            self._sleep_kv_cache()
        if level == 1 and self.location is WeightLocation.DEVICE:
            self._offload()
            self.location = WeightLocation.HOST
        elif level == 2 and self.resident_weight_bytes:
            self._discard()
            self.location = WeightLocation.DISCARDED
            release_free_memory()
        self.reset_prefix_cache()
        new_level = max(self.state.level, level) if self.state.sleeping else level
        self.state = SleepState(SLEEP_TAGS, new_level)
        log.info("Engine asleep at level %d (weights: %s)", self.state.level, self.location)

    def wake_up(self, tags: Sequence[str] | None) -> None:
        wanted = set(tags or SLEEP_TAGS)
        unknown = sorted(wanted - SLEEP_TAGS)
        if unknown:
            raise EngineError(f"unknown wake_up tag(s) {unknown}; known tags: {sorted(SLEEP_TAGS)}")
        if not self.state.sleeping:
            log.warning("wake_up: the engine is not sleeping")
            return
        if "weights" in wanted and "weights" in self.state.sleeping_tags:
            if self.location is WeightLocation.HOST:
                self._onload()
                self.location = WeightLocation.DEVICE
            elif self.location is WeightLocation.DISCARDED:
                self._allocate()
        if "kv_cache" in wanted and "kv_cache" in self.state.sleeping_tags:
            self._wake_kv_cache()
        left = self.state.sleeping_tags - wanted
        self.state = SleepState(frozenset(left), self.state.level if left else 0)
        log.info("Engine woke up %s (weights: %s, still sleeping: %s)",
                 sorted(wanted), self.location, sorted(left))

    def reload_weights(self) -> None:
        if "weights" in self.state.sleeping_tags:
            raise EngineError("cannot reload weights while they are asleep: POST /wake_up first")
        self._load_from_disk()
        self.location = WeightLocation.DEVICE
        self.reset_prefix_cache()
        log.info("Weights reloaded from %s", self.config.weights_file)

    def reset_prefix_cache(self) -> None:
        self._prefix_cache.clear()
        self._warm_first.clear()

    def check_ready(self) -> None:
        """Refuse to compute on weights that are not there (a clear error, never garbage)."""
        name = self.config.model_path
        if self.state.sleeping:
            raise EngineError(
                f"model {name!r} is sleeping (level {self.state.level}): POST /wake_up first",
                503, "ServiceUnavailableError")
        if self.location is not WeightLocation.DEVICE:
            raise EngineError(
                f"the weights of model {name!r} were discarded by /sleep?level=2: reload them "
                'with POST /collective_rpc {"method": "reload_weights"} or POST /reload_weights',
                503, "ServiceUnavailableError")

    def next_token(self, ids: Sequence[int], first: bool = False) -> int:
        """Greedy decoding, avoiding the last few tokens so the text does not loop at once.
        ``first``: ``ids`` is a request's whole prompt (its prefill)."""
        key = tuple(ids)
        cached = self._prefix_cache.get(key)
        if cached is not None:
            self._prefix_cache.move_to_end(key)
            self.prefix_cache_hits += 1
            if first and self._drift:
                warm = self._warm_first.get(key)
                if warm is None:
                    warm = self._predict(ids, {*ids[-_RECENT_BANNED:], cached})
                    if len(self._warm_first) >= _PREFIX_CACHE_ENTRIES:
                        self._warm_first.clear()
                    self._warm_first[key] = warm
                return warm
            return cached
        token = self._predict(ids, set(ids[-_RECENT_BANNED:]))
        self._prefix_cache[key] = token
        if len(self._prefix_cache) > _PREFIX_CACHE_ENTRIES:
            self._prefix_cache.popitem(last=False)
        return token

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": self.device,
            "weights": str(self.location),
            "weights_bytes": self.weights_bytes,
            "resident_weight_bytes": self.resident_weight_bytes,
            "sleeping": self.state.sleeping,
            "sleeping_tags": sorted(self.state.sleeping_tags),
            "level": self.state.level,
            "prefix_cache_entries": len(self._prefix_cache),
            "prefix_cache_hits": self.prefix_cache_hits,
            "checkpoint": str(self.config.weights_file),
        }


def create_backend(config: ModelConfig, device: str, sleep_mode: bool, *,
                   enforce_eager: bool = False, kv_cache_bytes: int = 0) -> ModelBackend:
    """The backend named in ``config`` (imported lazily: torch costs a second to import)."""
    if config.backend == "torch":
        from llmux.shim.builtin.model_torch import TorchBackend

        return TorchBackend(config, device, sleep_mode, enforce_eager=enforce_eager,
                            kv_cache_bytes=kv_cache_bytes)
    from llmux.shim.builtin.model_pure import PureBackend

    return PureBackend(config, device, sleep_mode)
