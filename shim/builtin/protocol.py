"""Messages between the API server and the engine core (JSON over ZMQ PUSH/PULL).

vLLM v1 uses msgspec over the same socket pair; JSON keeps this dependency-free and the
traffic readable in logs. Requests flow API -> core on the input socket; token outputs,
utility results and errors flow core -> API on the output socket, tagged by request id.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

# API -> core
GENERATE = "generate"
ABORT = "abort"
UTILITY = "utility"
SHUTDOWN = "shutdown"
# core -> API
READY = "ready"
STARTUP_FAILED = "startup_failed"
OUTPUTS = "outputs"
RESULT = "result"
ERROR = "error"


@dataclass(frozen=True)
class CoreConfig:
    """Everything the engine core needs, passed as one JSON argument on its command line."""

    model_path: str
    served_model_name: str
    weights_mb: int
    device: str
    sleep_mode: bool
    seed: int
    input_address: str
    output_address: str
    parent_pid: int
    #: the POSIX shared-memory segment (``psm_<hex>`` in /dev/shm) the core writes its counters to
    shm_name: str
    #: the write end of the API server's multiprocessing resource-tracker pipe (passed down)
    resource_tracker_fd: int | None
    #: no CUDA graphs (vLLM's --enforce-eager)
    enforce_eager: bool = False
    #: bytes of KV cache the worker allocates (tag ``kv_cache``; vLLM's
    #: --kv-cache-memory-bytes); -1: 64 MiB on a GPU, none on the CPU
    kv_cache_bytes: int = -1

    def to_arg(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_arg(cls, raw: str) -> CoreConfig:
        return cls(**json.loads(raw))


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode(raw: bytes) -> dict[str, Any]:
    message = json.loads(raw)
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ValueError(f"malformed engine message: {raw[:200]!r}")
    return message
