"""The engine-core process: owns the model, serves requests from the API server over ZMQ.

Like vLLM v1's EngineCoreProc it is a busy loop: drain the input socket, advance every
running request by one token (a continuous batch of one-token steps, so a long request
never starves a short one), push the outputs. It exits when told to, on SIGTERM, or
when its parent API server is gone.

It attaches to the API server's ``psm_<hex>`` shared-memory segment (see shm.py) and
keeps two counters there: a heartbeat (one per loop pass) and the tokens generated.

The model itself, and on a GPU all CUDA state, lives in a worker process under this one
(worker.py), as vLLM's executor keeps it in ``VLLM::Worker``; this process holds no GPU
memory and never imports torch.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import zmq

from llmux.shim.builtin import protocol, shm
from llmux.shim.builtin.backend import EngineError, choose_backend
from llmux.shim.builtin.checkpoint import ModelConfig
from llmux.shim.builtin.logging_setup import setup_logging
from llmux.shim.builtin.paths import jit_log_path
from llmux.shim.builtin.protocol import CoreConfig
from llmux.shim.builtin.worker import WorkerClient, WorkerConfig, WorkerDied

log = logging.getLogger("llmux.builtin.engine_core")

_IDLE_POLL_MS = 500


@dataclass
class RunningRequest:
    request_id: str
    ids: list[int]
    remaining: int
    prompt_len: int = 0


class EngineCore:
    def __init__(self, config: CoreConfig) -> None:
        self.config = config
        self.stopping = False
        self.running: dict[str, RunningRequest] = {}
        self.aborted_requests = 0
        self.heartbeat = 0
        self.tokens_generated = 0
        self.segment = shm.attach_segment(config.shm_name, config.resource_tracker_fd)
        self.context = zmq.Context(io_threads=1)
        self.input = self.context.socket(zmq.PULL)
        self.output = self.context.socket(zmq.PUSH)
        self.input.connect(config.input_address)
        self.output.connect(config.output_address)
        self.backend: WorkerClient | None = None
        self.jit_log: IO[str] | None = None

    # -- start-up ------------------------------------------------------------------------
    def start(self) -> None:
        started = time.monotonic()
        config = self.config
        model = ModelConfig.for_model(config.model_path, choose_backend(), config.weights_mb)
        self._open_jit_log(model, config.device)
        worker = WorkerClient(WorkerConfig(
            model_path=config.model_path, weights_mb=config.weights_mb, device=config.device,
            sleep_mode=config.sleep_mode, enforce_eager=config.enforce_eager,
            kv_cache_bytes=config.kv_cache_bytes, fd=-1))
        self.backend = worker
        try:
            ready = worker.wait_ready()
        except WorkerDied as exc:
            raise EngineError(str(exc), 500, "InternalServerError") from exc
        if ready.pop("wrote_checkpoint", False):
            self._jit(f"wrote checkpoint {model.weights_file}")
        elapsed = time.monotonic() - started
        captured = "CUDA graphs captured" if ready.get("cuda_graphs") else "no CUDA graphs"
        self._jit(f"graphs ready for {model.model_path} on {ready['device']} in {elapsed:.2f}s "
                  f"({captured})")
        log.info("Model %s loaded by worker pid %d (%s backend, %s, %.1f MiB of weights) in %.2fs",
                 model.model_path, worker.pid, ready["backend"], ready["device"],
                 ready["weights_bytes"] / (1 << 20), elapsed)
        self._send({"type": protocol.READY, "pid": os.getpid(), **ready})

    def _open_jit_log(self, model: ModelConfig, device: str) -> None:
        """Held open for the process's life, like the caches of vLLM's compilers."""
        fingerprint = f"{model.model_path}|{model.backend}|{device}|{model.weights_mb}"
        path = jit_log_path(model.model_path.rsplit("/", 1)[-1], fingerprint)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.jit_log = open(path, "a", encoding="utf-8")  # noqa: SIM115 (held for life)
        self._jit(f"engine core pid {os.getpid()} starting: {fingerprint}")

    def _jit(self, line: str) -> None:
        if self.jit_log is not None:
            self.jit_log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
            self.jit_log.flush()

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.input, zmq.POLLIN)
        while not self.stopping:
            if os.getppid() != self.config.parent_pid:
                log.warning("API server (pid %d) is gone; engine core exiting",
                            self.config.parent_pid)
                return
            if self.backend is not None:
                self.backend.check_alive()  # as vLLM's executor watches its workers
            self.heartbeat += 1
            shm.write_counters(self.segment, self.heartbeat, self.tokens_generated)
            timeout = 0 if self.running else _IDLE_POLL_MS
            if poller.poll(timeout):
                self._drain_input()
            if self.running:
                self._step()

    def _drain_input(self) -> None:
        while not self.stopping:
            try:
                raw = self.input.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(protocol.decode(raw))

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        request_id = str(message.get("id", ""))
        if kind == protocol.SHUTDOWN:
            log.info("Shutdown requested by the API server")
            self.stopping = True
        elif kind == protocol.ABORT:
            if self.running.pop(request_id, None) is not None:
                self.aborted_requests += 1
        elif kind == protocol.GENERATE:
            try:
                self._backend().call("check_ready")
            except EngineError as exc:
                self._send_error(request_id, exc)
                return
            prompt = list(message["prompt_token_ids"])
            self.running[request_id] = RunningRequest(
                request_id, prompt, int(message["max_tokens"]), prompt_len=len(prompt)
            )
        elif kind == protocol.UTILITY:
            self._utility(request_id, str(message["method"]), message.get("kwargs") or {})
        else:
            log.error("Ignoring unknown message type %r", kind)

    def _step(self) -> None:
        backend = self._backend()
        outputs = []
        for request in list(self.running.values()):
            token = int(backend.call("next_token", request.ids,
                                     len(request.ids) == request.prompt_len))
            request.ids.append(token)
            request.remaining -= 1
            self.tokens_generated += 1
            finished = request.remaining <= 0
            outputs.append({
                "id": request.request_id,
                "token_ids": [token],
                "finished": finished,
                "finish_reason": "length" if finished else None,
            })
            if finished:
                del self.running[request.request_id]
        self._send({"type": protocol.OUTPUTS, "outputs": outputs})

    # -- utility calls (sleep, wake_up, collective_rpc, ...) -----------------------------
    def _utility(self, request_id: str, method: str, kwargs: dict[str, Any]) -> None:
        backend = self._backend()
        calls: dict[str, Callable[..., Any]] = {
            "sleep": self._sleep,
            "wake_up": lambda tags=None: backend.call("wake_up", tags),
            "is_sleeping": lambda: backend.call("is_sleeping"),
            "reload_weights": lambda: backend.call("reload_weights"),
            "reset_prefix_cache": lambda: backend.call("reset_prefix_cache"),
            "engine_state": self._engine_state,
            "weights_checksum": lambda: backend.call("weights_checksum"),
            "collective_rpc": self._collective_rpc,
        }
        try:
            call = calls.get(method)
            if call is None:
                raise EngineError(f"unknown engine utility {method!r}", 500, "InternalServerError")
            result = call(**kwargs)
        except EngineError as exc:
            self._send_error(request_id, exc)
        except WorkerDied:
            raise
        except Exception as exc:
            log.exception("Utility call %s failed", method)
            error = EngineError(f"{method} failed: {exc}", 500, "InternalServerError")
            self._send_error(request_id, error)
        else:
            self._send({"type": protocol.RESULT, "id": request_id, "result": result})

    def _sleep(self, level: int) -> None:
        backend = self._backend()
        for request_id in list(self.running):
            self._send_error(request_id, EngineError(
                "request aborted: the engine was put to sleep", 503, "ServiceUnavailableError"))
        self.running.clear()
        backend.call("sleep", level)
        self._jit(f"sleep level {level}: weights {backend.call('describe')['weights']}")

    def _engine_state(self) -> dict[str, Any]:
        state = dict(self._backend().call("describe"))
        state["pid_core"] = os.getpid()
        state["running_requests"] = len(self.running)
        state["aborted_requests"] = self.aborted_requests
        state["jit_log"] = self.jit_log.name if self.jit_log is not None else None
        state["tokens_generated"] = self.tokens_generated
        return state

    def _collective_rpc(self, method: str, args: list[Any] | None = None,
                        kwargs: dict[str, Any] | None = None) -> list[Any]:
        """One result per worker; this engine has a single worker (tensor parallel 1)."""
        backend = self._backend()
        args, kwargs = list(args or []), dict(kwargs or {})
        worker_methods: dict[str, Callable[..., Any]] = {
            "reload_weights": lambda: backend.call("reload_weights"),
            "reset_prefix_cache": lambda: backend.call("reset_prefix_cache"),
            "sleep": self._sleep,
            "wake_up": lambda tags=None: backend.call("wake_up", tags),
            "engine_state": self._engine_state,
            "weights_checksum": lambda: backend.call("weights_checksum"),
            "echo": lambda *a, **k: {"args": list(a), "kwargs": k},
        }
        call = worker_methods.get(method)
        if call is None:
            raise EngineError(
                f"unknown collective_rpc method {method!r}; known: {sorted(worker_methods)}")
        try:
            return [call(*args, **kwargs)]
        except TypeError as exc:
            raise EngineError(f"bad arguments for collective_rpc {method!r}: {exc}") from exc

    # -- plumbing ------------------------------------------------------------------------
    def _backend(self) -> WorkerClient:
        if self.backend is None:
            raise EngineError("the engine is still starting", 503, "ServiceUnavailableError")
        return self.backend

    def _send(self, message: dict[str, Any]) -> None:
        self.output.send(protocol.encode(message))

    def _send_error(self, request_id: str, exc: EngineError) -> None:
        self._send({"type": protocol.ERROR, "id": request_id, "status": exc.status,
                    "kind": exc.kind, "message": exc.message})

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
        self.output.close(linger=1000)
        self.input.close(linger=0)
        self.context.term()
        shm.release(self.segment, unlink=False)  # the API server owns (and unlinks) it
        if self.jit_log is not None:
            self.jit_log.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m llmux.shim.builtin.engine_core CONFIG_JSON", file=sys.stderr)
        return 2
    config = CoreConfig.from_arg(args[0])
    setup_logging(f"EngineCore pid={os.getpid()}")
    # torch warns at import when numpy is missing; the engine never needs numpy.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    core = EngineCore(config)

    def on_sigterm(_signum: int, _frame: object) -> None:
        core.stopping = True

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API server handles Ctrl-C
    try:
        try:
            core.start()
        except Exception as exc:
            log.exception("Engine core failed to start")
            core._send({"type": protocol.STARTUP_FAILED, "message": str(exc)})
            return 1
        try:
            core.run()
        except WorkerDied as exc:
            log.error("Engine core exiting: %s", exc)
            return 1
        return 0
    finally:
        core.close()
        log.info("Engine core exited")


if __name__ == "__main__":
    sys.exit(main())
