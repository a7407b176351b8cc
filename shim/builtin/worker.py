"""The worker process: holds the model, and on a GPU every piece of CUDA state, under the
engine core.

vLLM's engine core drives its model through an executor whose worker is a process of its
own (``VLLM::Worker``); the worker initialises torch.distributed before it loads weights
(world size 1 here: NCCL on a GPU, gloo on the CPU, a TCP store on loopback, plus the gloo
"CPU group" vLLM's GroupCoordinator makes), and owns the weights, the KV cache and the
CUDA graphs. The engine core talks to it over a Unix socket pair with length-prefixed
JSON calls, one at a time: ``{"method", "args"}`` -> ``{"result"}`` or ``{"error"}``.
The worker exits when the engine core is gone (end of file on the socket) or on SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from llmux.shim.builtin.backend import EngineError, ModelBackend, choose_backend, create_backend
from llmux.shim.builtin.checkpoint import ModelConfig, ensure_checkpoint
from llmux.shim.builtin.logging_setup import setup_logging

log = logging.getLogger("llmux.builtin.worker")

_HEADER = struct.Struct("<I")
DEFAULT_GPU_KV_CACHE_BYTES = 64 << 20


@dataclass(frozen=True)
class WorkerConfig:
    model_path: str
    weights_mb: int
    device: str
    sleep_mode: bool
    enforce_eager: bool
    kv_cache_bytes: int
    #: this end of the socket pair, inherited
    fd: int

    def to_arg(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_arg(cls, raw: str) -> WorkerConfig:
        return cls(**json.loads(raw))


class WorkerDied(RuntimeError):
    """The worker process is gone: the engine core cannot go on without its model."""


def send_message(sock: socket.socket, message: dict[str, Any]) -> None:
    raw = json.dumps(message, separators=(",", ":")).encode()
    sock.sendall(_HEADER.pack(len(raw)) + raw)


def recv_message(sock: socket.socket) -> dict[str, Any] | None:
    """The next message, or None at end of file."""
    head = _recv_exactly(sock, _HEADER.size)
    if head is None:
        return None
    (length,) = _HEADER.unpack(head)
    body = _recv_exactly(sock, length)
    if body is None:
        return None
    message: dict[str, Any] = json.loads(body)
    return message


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    parts: list[bytes] = []
    left = size
    while left:
        try:
            chunk = sock.recv(left)
        except InterruptedError:  # pragma: no cover (PEP 475 retries)
            continue
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


# -- the engine core's side ------------------------------------------------------------------
class WorkerClient:
    """Starts the worker and calls it; what the engine core holds instead of a backend."""

    def __init__(self, config: WorkerConfig) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = ours
        config = WorkerConfig(**{**asdict(config), "fd": theirs.fileno()})
        argv = [sys.executable, "-m", "llmux.shim.builtin.worker", config.to_arg()]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, close_fds=True,
                                        pass_fds=(theirs.fileno(),))
        theirs.close()
        log.info("Started worker (pid %d)", self.process.pid)

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise WorkerDied(f"the worker (pid {self.pid}) died, exit code {code}")

    def wait_ready(self) -> dict[str, Any]:
        """The worker's describe() once its model is loaded; EngineError if it failed."""
        return dict(self._reply("start-up"))

    def call(self, method: str, *args: Any) -> Any:
        try:
            send_message(self.sock, {"method": method, "args": list(args)})
        except OSError as exc:
            raise WorkerDied(f"the worker (pid {self.pid}) is gone: {exc}") from exc
        return self._reply(method)

    def _reply(self, what: str) -> Any:
        message = recv_message(self.sock)
        if message is None:
            code = self.process.poll()
            raise WorkerDied(f"the worker (pid {self.pid}) died during {what}"
                             + (f", exit code {code}" if code is not None else ""))
        if "error" in message:
            e = message["error"]
            raise EngineError(e["message"], e["status"], e["kind"], e.get("param"))
        return message.get("result")

    def close(self, timeout_secs: float = 30.0) -> None:
        """End of file tells the worker to exit; it is killed if it does not."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        try:
            self.process.wait(timeout=timeout_secs)
        except subprocess.TimeoutExpired:
            log.warning("Worker (pid %d) did not exit; killing it", self.process.pid)
            self.process.kill()
            self.process.wait()


# -- the worker's side ---------------------------------------------------------------------------
def init_distributed(device: str) -> dict[str, Any]:
    """torch.distributed as vLLM's init_distributed_environment + initialize_model_parallel
    leave it at world size 1: the default group (NCCL on a GPU, gloo on the CPU) over a TCP
    store, and a gloo group for CPU-side collectives, used once. vLLM's store listens on
    every interface; this one is handed a socket bound to loopback (engines stay there)."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        return {"distributed": None}
    if not dist.is_available():
        return {"distributed": None}
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    store = dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1", port, 1, True, timedelta(seconds=300), master_listen_fd=listener.detach())
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend=backend, store=store, world_size=1, rank=0)
    cpu_group = dist.new_group([0], backend="gloo")
    probe_tensor = torch.ones(1)
    dist.all_reduce(probe_tensor, group=cpu_group)
    return {"distributed": backend, "world_size": dist.get_world_size(),
            "distributed_store_port": port}


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.sock = socket.socket(fileno=config.fd)
        self.backend: ModelBackend | None = None
        self.facts: dict[str, Any] = {"pid_worker": os.getpid()}
        self.wrote_checkpoint = False

    def start(self) -> None:
        config = self.config
        backend_name = choose_backend()
        model = ModelConfig.for_model(config.model_path, backend_name, config.weights_mb)
        device = config.device
        if backend_name == "torch":
            from llmux.shim.builtin.model_torch import resolve_device

            device = resolve_device(device)
        self.facts |= init_distributed(device) if backend_name == "torch" else {}
        kv_cache_bytes = config.kv_cache_bytes
        if kv_cache_bytes < 0:
            kv_cache_bytes = DEFAULT_GPU_KV_CACHE_BYTES if device == "cuda" else 0
        backend = create_backend(model, device, config.sleep_mode,
                                 enforce_eager=config.enforce_eager,
                                 kv_cache_bytes=kv_cache_bytes)
        self.wrote_checkpoint = ensure_checkpoint(
            model, lambda _cfg: backend.make_checkpoint_tensors())
        backend.load()
        self.backend = backend

    def describe(self) -> dict[str, Any]:
        assert self.backend is not None
        return {**self.backend.describe(), **self.facts}

    def serve(self) -> None:
        assert self.backend is not None
        backend = self.backend
        calls: dict[str, Callable[..., Any]] = {
            "check_ready": backend.check_ready,
            "next_token": backend.next_token,
            "sleep": backend.sleep,
            "wake_up": backend.wake_up,
            "is_sleeping": lambda: backend.state.sleeping,
            "reload_weights": backend.reload_weights,
            "reset_prefix_cache": backend.reset_prefix_cache,
            "describe": self.describe,
            "weights_checksum": backend.weights_checksum,
        }
        while True:
            message = recv_message(self.sock)
            if message is None:
                log.info("The engine core closed the connection; worker exiting")
                return
            method = str(message.get("method"))
            call = calls.get(method)
            try:
                if call is None:
                    raise EngineError(f"unknown worker method {method!r}", 500,
                                      "InternalServerError")
                result = call(*message.get("args", []))
            except EngineError as exc:
                self._error(exc)
            except Exception as exc:
                log.exception("Worker call %s failed", method)
                self._error(EngineError(f"{method} failed: {exc}", 500, "InternalServerError"))
            else:
                send_message(self.sock, {"result": result})

    def _error(self, exc: EngineError) -> None:
        send_message(self.sock, {"error": {"message": exc.message, "status": exc.status,
                                           "kind": exc.kind, "param": exc.param}})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m llmux.shim.builtin.worker CONFIG_JSON", file=sys.stderr)
        return 2
    config = WorkerConfig.from_arg(args[0])
    setup_logging(f"Worker pid={os.getpid()}")
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API server handles Ctrl-C
    signal.signal(signal.SIGTERM, lambda _s, _f: sys.exit(0))
    worker = Worker(config)
    try:
        worker.start()
    except EngineError as exc:
        worker._error(exc)
        return 1
    except Exception as exc:
        log.exception("Worker failed to start")
        worker._error(EngineError(f"worker start-up failed: {exc}", 500, "InternalServerError"))
        return 1
    send_message(worker.sock, {"result": {**worker.describe(),
                                          "wrote_checkpoint": worker.wrote_checkpoint}})
    try:
        worker.serve()
    except (BrokenPipeError, ConnectionResetError):
        log.info("The engine core is gone; worker exiting")
    return 0


if __name__ == "__main__":
    sys.exit(main())
