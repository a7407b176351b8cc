"""The API server process: vLLM's HTTP surface (OpenAI + sleep/wake dev endpoints).

Starlette under uvicorn with the httptools parser, on uvloop, as vLLM's API server
(``uvloop.run`` in cli.py). That is one of vLLM's inconvenient traits, copied on purpose:
uvloop's libuv sets up an io_uring instance, which CRIU cannot dump. The product starts
engines through ``python -m llmux.shim.launch`` (a seccomp filter that makes
``io_uring_setup`` fail, so libuv falls back to epoll); an engine started without it
holds an ``anon_inode:[io_uring]`` fd and cannot be checkpointed.

Every call that touches the model is a ZMQ round trip to the engine core; this process
only validates requests, (de)tokenizes and formats responses, as vLLM's API server does.
It also creates the tree's ``psm_<hex>`` shared-memory segment (see shm.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llmux.shim.builtin import openai_api, vocab
from llmux.shim.builtin.backend import SLEEP_TAGS, EngineError
from llmux.shim.builtin.core_client import EngineCoreClient, TokenOutput
from llmux.shim.builtin.openai_api import GenerationRequest

log = logging.getLogger("llmux.builtin.api_server")

VERSION = "0.1.0+llmux.builtin"


@dataclass(frozen=True)
class ServeArgs:
    """The parsed ``serve`` command line (see cli.py)."""

    model_path: str
    host: str
    port: int
    served_model_name: str
    weights_mb: int
    sleep_mode: bool
    seed: int
    device: str
    max_model_len: int
    enforce_eager: bool = False
    #: None: 64 MiB on a GPU, none on the CPU
    kv_cache_bytes: int | None = None


@dataclass
class AppState:
    args: ServeArgs
    created: int = field(default_factory=lambda: int(time.time()))
    client: EngineCoreClient | None = None
    server: uvicorn.Server | None = None
    exit_code: int = 0

    @property
    def engine(self) -> EngineCoreClient:
        if self.client is None:
            raise EngineError("the engine is still starting", 503, "ServiceUnavailableError")
        return self.client

    def on_engine_death(self) -> None:
        self.exit_code = 1
        if self.server is not None:
            self.server.should_exit = True


def error_response(exc: EngineError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def read_json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw) if raw else {}
    except ValueError as exc:
        raise EngineError(f"the request body is not valid JSON: {exc}") from exc
    except RecursionError:
        raise EngineError("the request body is nested too deeply") from None


def build_app(state: AppState) -> Starlette:
    args = state.args

    async def health(_request: Request) -> Response:
        client = state.client
        ready = client is not None and client.ready.done() and client.dead is None
        return Response(status_code=200 if ready else 503)

    async def version(_request: Request) -> Response:
        return JSONResponse({"version": VERSION})

    async def models(_request: Request) -> Response:
        return JSONResponse(openai_api.models_list(
            args.served_model_name, args.model_path, args.max_model_len, state.created))

    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    async def generate(request: Request, *, chat: bool) -> Response:
        try:
            parsed = openai_api.parse_request(
                await read_json(request), chat=chat, served_model_name=args.served_model_name,
                max_model_len=args.max_model_len)
            engine = state.engine
            if parsed.stream:
                return await stream_response(engine, parsed)
            results = await asyncio.gather(*(collect(engine, ids, parsed.max_tokens)
                                             for ids in parsed.prompts))
            return JSONResponse(openai_api.full_response(parsed, openai_api.new_id(chat), results))
        except EngineError as exc:
            return error_response(exc)

    async def sleep(request: Request) -> Response:
        raw = request.query_params.get("level", "1")
        try:
            if raw not in ("1", "2"):
                raise EngineError(f"sleep level must be 1 or 2, not {raw!r}", param="level")
            await state.engine.call("sleep", level=int(raw))
        except EngineError as exc:
            return error_response(exc)
        return Response(status_code=200)

    async def wake_up(request: Request) -> Response:
        tags = request.query_params.getlist("tags") or None
        try:
            unknown = sorted(set(tags or ()) - SLEEP_TAGS)
            if unknown:
                raise EngineError(f"unknown wake_up tag(s) {unknown}; known tags: "
                                  f"{sorted(SLEEP_TAGS)}", param="tags")
            await state.engine.call("wake_up", tags=tags)
        except EngineError as exc:
            return error_response(exc)
        return Response(status_code=200)

    async def is_sleeping(_request: Request) -> Response:
        try:
            return JSONResponse({"is_sleeping": bool(await state.engine.call("is_sleeping"))})
        except EngineError as exc:
            return error_response(exc)

    async def collective_rpc(request: Request) -> Response:
        try:
            body = await read_json(request)
            if not isinstance(body, dict) or not isinstance(body.get("method"), str):
                raise EngineError("the body must be a JSON object with a string 'method'",
                                  param="method")
            rpc_args, rpc_kwargs = body.get("args") or [], body.get("kwargs") or {}
            if not isinstance(rpc_args, list) or not isinstance(rpc_kwargs, dict):
                raise EngineError("'args' must be a list and 'kwargs' an object", param="args")
            results = await state.engine.call(
                "collective_rpc", method=body["method"], args=rpc_args, kwargs=rpc_kwargs)
        except EngineError as exc:
            return error_response(exc)
        return JSONResponse({"results": results})

    async def simple_call(method: str) -> Response:
        try:
            await state.engine.call(method)
        except EngineError as exc:
            return error_response(exc)
        return Response(status_code=200)

    async def reload_weights(_request: Request) -> Response:
        return await simple_call("reload_weights")

    async def reset_prefix_cache(_request: Request) -> Response:
        return await simple_call("reset_prefix_cache")

    async def engine_state(_request: Request) -> Response:
        try:
            engine = state.engine
            core_state = await engine.call("engine_state")
        except EngineError as exc:
            return error_response(exc)
        loop = asyncio.get_running_loop()
        return JSONResponse({"pid_api": os.getpid(), **core_state,
                             "api_event_loop": f"{type(loop).__module__}.{type(loop).__name__}",
                             "zmq_sockets": engine.socket_paths,
                             "shm_segments": engine.shm_paths,
                             "shm_counters": engine.shm_counters(),
                             "served_model_name": args.served_model_name,
                             "model_path": args.model_path})

    async def http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "NotFoundError" if exc.status_code == 404 else "BadRequestError"
        return error_response(EngineError(str(exc.detail), exc.status_code, kind))

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        client = EngineCoreClient(
            args.model_path, args.served_model_name, args.weights_mb, args.device,
            args.sleep_mode, args.seed, on_death=state.on_engine_death,
            enforce_eager=args.enforce_eager, kv_cache_bytes=args.kv_cache_bytes)
        state.client = client
        client.start()
        try:
            yield
        finally:
            await client.shutdown()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/ping", health, methods=["GET", "POST"]),
        Route("/version", version, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/sleep", sleep, methods=["POST"]),
        Route("/wake_up", wake_up, methods=["POST"]),
        Route("/is_sleeping", is_sleeping, methods=["GET"]),
        Route("/collective_rpc", collective_rpc, methods=["POST"]),
        Route("/reload_weights", reload_weights, methods=["POST"]),
        Route("/reset_prefix_cache", reset_prefix_cache, methods=["POST"]),
        Route("/engine_state", engine_state, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error})


async def collect(engine: EngineCoreClient, ids: list[int],
                  max_tokens: int) -> tuple[str, str | None, int]:
    tokens: list[int] = []
    finish_reason: str | None = None
    async with contextlib.aclosing(engine.generate(ids, max_tokens)) as outputs:
        async for output in outputs:
            tokens.extend(output.token_ids)
            finish_reason = output.finish_reason
    return vocab.decode(tokens), finish_reason, len(tokens)


async def stream_response(engine: EngineCoreClient, request: GenerationRequest) -> Response:
    """SSE; the first output is awaited before answering, so a sleeping engine gets a 503."""
    streams = [engine.generate(ids, request.max_tokens) for ids in request.prompts]
    try:
        first: TokenOutput | None = await anext(streams[0])
    except EngineError:
        for stream in streams:
            await stream.aclose()
        raise
    response_id, created = openai_api.new_id(request.chat), int(time.time())

    def sse(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

    async def events() -> AsyncIterator[str]:
        nonlocal first
        completion_tokens = 0
        try:
            for index, stream in enumerate(streams):
                if request.chat:
                    yield sse(openai_api.stream_chunk(request, response_id, created, index,
                                                      None, None, role=True))
                emitted = 0
                async with contextlib.aclosing(stream) as outputs:
                    pending = first
                    first = None
                    while True:
                        output = pending if pending is not None else await anext(outputs, None)
                        pending = None
                        if output is None:
                            break
                        text = vocab.decode(output.token_ids, leading_space=emitted > 0)
                        emitted += len(output.token_ids)
                        yield sse(openai_api.stream_chunk(request, response_id, created, index,
                                                          text, output.finish_reason))
                completion_tokens += emitted
            if request.include_usage:
                yield sse(openai_api.usage_chunk(request, response_id, created, completion_tokens))
        except EngineError as exc:
            yield sse(exc.body())
        finally:
            for stream in streams:
                await stream.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def bind_socket(host: str, port: int) -> socket.socket:
    """Bound before the engine starts (as vLLM does), so a port clash fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says
    # TCP, and without it every response waits ~40 ms on Nagle + delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(False)
    return sock


async def serve(args: ServeArgs) -> int:
    """Serve until stopped; run it on uvloop (``uvloop.run``), as cli.main does.

    ``server.serve()`` runs on the caller's loop: ``loop="uvloop"`` below only says so
    (uvicorn applies it in ``Server.run()``, which vLLM does not use either).
    """
    sock = bind_socket(args.host, args.port)
    state = AppState(args)
    config = uvicorn.Config(
        build_app(state), loop="uvloop", http="httptools", ws="none", lifespan="on",
        log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    state.server = server
    log.info("Serving %s as %r on http://%s:%d", args.model_path, args.served_model_name,
             args.host, args.port)
    # uvicorn re-raises the signal that stopped it once it is done; with these handlers in
    # place that re-raise is a no-op and the process exits with its own status instead.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _s, _f: None)
    ready_task = asyncio.create_task(_log_when_ready(state))
    try:
        await server.serve(sockets=[sock])
    finally:
        ready_task.cancel()
        sock.close()
    if state.exit_code:
        log.error("API server exiting with status %d: the engine core died", state.exit_code)
    else:
        log.info("API server and engine core shut down")
    return state.exit_code


async def _log_when_ready(state: AppState) -> None:
    while state.client is None:  # noqa: ASYNC110 (set by the lifespan, once)
        await asyncio.sleep(0.05)
    with contextlib.suppress(EngineError):
        info = await state.client.ready
        log.info("Engine ready (pid %d, %s backend on %s); /health is now 200",
                 info["pid"], info["backend"], info["device"])
