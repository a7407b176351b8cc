"""The API server's side of the engine core: spawn it, talk to it over ZMQ, watch it.

As in vLLM v1 the API server binds both ipc:// sockets (random names under /tmp) and
starts the core as a plain child process that connects to them. A monitor task polls
the child (no pidfd or SIGCHLD tricks, which CRIU and uvicorn's signal handling make
fragile); when the core dies unexpectedly every waiting request fails at once and the
``on_death`` callback stops the server, which then exits non-zero.

The client also owns the tree's ``psm_<hex>`` shared-memory segment (see shm.py): created
here, named to the core in its config, unlinked by ``shutdown()`` once the core is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from llmux.shim.builtin import protocol, shm
from llmux.shim.builtin.backend import EngineError
from llmux.shim.builtin.protocol import CoreConfig

log = logging.getLogger("llmux.builtin.core_client")

_MONITOR_INTERVAL_SECS = 0.2
_SHUTDOWN_GRACE_SECS = 10.0


def ipc_address() -> str:
    """ipc://<tmp>/<uuid4>, as vLLM's get_open_zmq_ipc_path()."""
    return f"ipc://{tempfile.gettempdir()}/{uuid.uuid4()}"


@dataclass(frozen=True)
class TokenOutput:
    token_ids: list[int]
    finished: bool
    finish_reason: str | None


class EngineDeadError(EngineError):
    def __init__(self, message: str = "the engine core process died") -> None:
        super().__init__(message, 500, "InternalServerError")


class EngineCoreClient:
    def __init__(self, model_path: str, served_model_name: str, weights_mb: int,
                 device: str, sleep_mode: bool, seed: int,
                 on_death: Callable[[], None], *, enforce_eager: bool = False,
                 kv_cache_bytes: int | None = None) -> None:
        self.context = zmq.asyncio.Context(io_threads=1)
        self.input_address = ipc_address()
        self.output_address = ipc_address()
        self.input = self.context.socket(zmq.PUSH)
        self.output = self.context.socket(zmq.PULL)
        self.input.bind(self.input_address)
        self.output.bind(self.output_address)
        self.segment = shm.create_segment()  # also starts the resource tracker
        self.config = CoreConfig(
            model_path=model_path, served_model_name=served_model_name, weights_mb=weights_mb,
            device=device, sleep_mode=sleep_mode, seed=seed,
            input_address=self.input_address, output_address=self.output_address,
            parent_pid=os.getpid(), shm_name=self.segment.name,
            resource_tracker_fd=shm.tracker_fd(), enforce_eager=enforce_eager,
            kv_cache_bytes=-1 if kv_cache_bytes is None else kv_cache_bytes)
        self.on_death = on_death
        self.process: subprocess.Popen[bytes] | None = None
        self.ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.dead: EngineError | None = None
        self.exit_code: int | None = None
        self._streams: dict[str, asyncio.Queue[TokenOutput | EngineError]] = {}
        self._calls: dict[str, asyncio.Future[Any]] = {}
        self._ids = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    @property
    def socket_paths(self) -> list[str]:
        return [a.removeprefix("ipc://") for a in (self.input_address, self.output_address)]

    @property
    def shm_paths(self) -> list[str]:
        return [f"{shm.SHM_DIR}/{self.segment.name}"]

    def shm_counters(self) -> dict[str, int]:
        """What the core last wrote to the shared segment (heartbeat, tokens generated)."""
        return shm.read_counters(self.segment)

    def start(self) -> None:
        argv = [sys.executable, "-m", "llmux.shim.builtin.engine_core", self.config.to_arg()]
        tracker = self.config.resource_tracker_fd
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, close_fds=True,
                                        pass_fds=() if tracker is None else (tracker,))
        log.info("Started engine core (pid %d)", self.process.pid)
        self._tasks = [asyncio.create_task(self._read_outputs(), name="engine-outputs"),
                       asyncio.create_task(self._monitor(), name="engine-monitor")]

    # -- requests ------------------------------------------------------------------------
    async def generate(
        self, prompt_ids: list[int], max_tokens: int
    ) -> AsyncGenerator[TokenOutput, None]:
        """Token outputs as the core produces them; aborts the request if abandoned."""
        self._check_alive()
        request_id = f"gen-{next(self._ids)}"
        queue: asyncio.Queue[TokenOutput | EngineError] = asyncio.Queue()
        self._streams[request_id] = queue
        finished = False
        try:
            await self._send({"type": protocol.GENERATE, "id": request_id,
                              "prompt_token_ids": prompt_ids, "max_tokens": max_tokens})
            while not finished:
                item = await queue.get()
                if isinstance(item, EngineError):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished and self.dead is None and not self._closing:
                # No await here: this also runs when a disconnected client's stream is closed.
                with contextlib.suppress(zmq.ZMQError):
                    self.input.send(protocol.encode({"type": protocol.ABORT, "id": request_id}),
                                    zmq.NOBLOCK)

    async def call(self, method: str, /, **kwargs: Any) -> Any:
        """A utility call (sleep, wake_up, engine_state, collective_rpc, ...)."""
        self._check_alive()
        request_id = f"call-{next(self._ids)}"
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[request_id] = future
        try:
            await self._send({"type": protocol.UTILITY, "id": request_id,
                              "method": method, "kwargs": kwargs})
            return await future
        finally:
            self._calls.pop(request_id, None)

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise self.dead
        if not self.ready.done():
            raise EngineError("the engine is still starting", 503, "ServiceUnavailableError")

    async def _send(self, message: dict[str, Any]) -> None:
        await self.input.send(protocol.encode(message))

    # -- background tasks ----------------------------------------------------------------
    async def _read_outputs(self) -> None:
        while True:
            message = protocol.decode(await self.output.recv())
            kind = message["type"]
            if kind == protocol.OUTPUTS:
                for out in message["outputs"]:
                    queue = self._streams.get(out["id"])
                    if queue is not None:
                        queue.put_nowait(TokenOutput(out["token_ids"], out["finished"],
                                                     out["finish_reason"]))
            elif kind == protocol.RESULT:
                future = self._calls.get(message["id"])
                if future is not None and not future.done():
                    future.set_result(message["result"])
            elif kind == protocol.ERROR:
                error = EngineError(message["message"], message["status"], message["kind"])
                self._deliver_error(message["id"], error)
            elif kind == protocol.READY:
                if not self.ready.done():
                    self.ready.set_result(message)
                log.info("Engine core ready: %s backend on %s",
                         message["backend"], message["device"])
            elif kind == protocol.STARTUP_FAILED:
                log.error("Engine core failed to start: %s", message["message"])
                self._fail_all(EngineError(f"engine failed to start: {message['message']}",
                                           500, "InternalServerError"))

    def _deliver_error(self, request_id: str, error: EngineError) -> None:
        queue = self._streams.get(request_id)
        if queue is not None:
            queue.put_nowait(error)
        future = self._calls.get(request_id)
        if future is not None and not future.done():
            future.set_exception(error)

    async def _monitor(self) -> None:
        assert self.process is not None
        while (code := self.process.poll()) is None:  # noqa: ASYNC110 (polling a child)
            await asyncio.sleep(_MONITOR_INTERVAL_SECS)
        self.exit_code = code
        if self._closing:
            return
        log.error("Engine core (pid %d) died unexpectedly with exit code %d; "
                  "shutting down the API server", self.process.pid, code)
        self._fail_all(EngineDeadError(f"the engine core process died (exit code {code})"))

    def _fail_all(self, error: EngineError) -> None:
        self.dead = error
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # retrieved: nobody may be waiting yet
        for request_id in [*self._streams, *self._calls]:
            self._deliver_error(request_id, error)
        self.on_death()

    # -- shutdown ------------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Ask the core to exit, then make sure it did; closes the sockets (and files)."""
        self._closing = True
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(zmq.ZMQError):
                await self.input.send(protocol.encode({"type": protocol.SHUTDOWN}), zmq.NOBLOCK)
            if not await self._wait_exit(process, _SHUTDOWN_GRACE_SECS):
                log.warning("Engine core did not exit; sending SIGTERM")
                process.terminate()
                if not await self._wait_exit(process, _SHUTDOWN_GRACE_SECS):
                    process.kill()
                    await self._wait_exit(process, _SHUTDOWN_GRACE_SECS)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.input.close(linger=0)
        self.output.close(linger=0)
        self.context.term()
        for path in self.socket_paths:  # libzmq leaves named ipc files behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        shm.release(self.segment, unlink=True)

    @staticmethod
    async def _wait_exit(process: subprocess.Popen[bytes], grace_secs: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_secs
        while process.poll() is None:
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True
