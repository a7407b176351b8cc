"""The /v1 hot path: a raw ASGI callable that routes OpenAI requests by `model`.

Starlette serves the cold routes (listing, health, metrics, control); every
POST under /v1/ is handled here without a framework in between, because the
proxy's own cost per request and per streamed chunk is what the benchmark
(tests/bench/bench_proxy.py) measures. The body is read and parsed once; bad
input is answered before any engine or the switcher sees it; the upstream's
bytes (and SSE chunks as they arrive) go out untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp

from llmux.shim.config import Config
from llmux.shim.engineclient import EngineClient
from llmux.shim.errors import (
    BadRequest,
    EngineFailed,
    ModelNotFound,
    PayloadTooLarge,
    ShimError,
    UnsupportedMediaType,
)
from llmux.shim.switcher import Switcher

log = logging.getLogger("llmux.proxy")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: (model, http status) -> None, called once per proxied request
RequestCounter = Callable[[str, int], None]

#: never forwarded in either direction (RFC 9110 7.6.1, plus what the client recomputes)
_HOP_REQUEST = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te",
    b"trailer", b"upgrade", b"host", b"content-length", b"expect",
})
_HOP_RESPONSE = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te",
    b"trailer", b"upgrade",
})
_JSON_HEADERS = [(b"content-type", b"application/json")]
#: the engine is not there (refused) or went away (reset, closed): activate it again, retry
_UPSTREAM_GONE = (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)


class _EngineGone(Exception):
    """Connecting to the engine failed, or it closed the connection before answering."""


def error_response_parts(err: ShimError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = json.dumps(err.body()).encode()
    return err.http_status, [(b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode()),
                             *((k.encode(), v.encode()) for k, v in err.headers())], body


async def send_error(send: Send, err: ShimError) -> None:
    status, headers, body = error_response_parts(err)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _DisconnectWatch:
    """Cancels the request's task when the client goes away, while armed.

    uvicorn's ``send`` silently drops data once the client is gone, so without
    this a stream to a vanished client would hold its slot until the engine
    finished generating.
    """

    __slots__ = ("armed", "fired", "responded", "task", "watcher")

    def __init__(self, receive: Receive) -> None:
        self.armed = True
        self.fired = False
        self.responded = False  # the status went out (and was counted)
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.watcher = asyncio.ensure_future(receive())
        self.watcher.add_done_callback(self._done)

    def _done(self, f: asyncio.Future[Message]) -> None:
        if self.armed and not f.cancelled():
            self.fired = True
            self.task.cancel()

    def close(self) -> None:
        self.armed = False
        self.watcher.cancel()


class ProxyApp:
    """ASGI entry: POST /v1/* here, everything else to ``fallback``."""

    def __init__(self, config: Config, switcher: Switcher, engines: EngineClient,
                 fallback: ASGIApp, *, count: RequestCounter | None = None) -> None:
        self._models = config.models
        self._known = sorted(config.models)
        self._max_body = config.max_body_bytes
        self._switcher = switcher
        self._engines = engines
        self._fallback = fallback
        self._count = count if count is not None else (lambda model, status: None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] == "POST"
                and scope["path"].startswith("/v1/")):
            await self._handle(scope, receive, send)
        else:
            await self._fallback(scope, receive, send)

    # ---------------------------------------------------------------- request

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body, headers = await self._read(scope, receive)
            model = self._model_of(body)
        except ShimError as e:
            self._count("-", e.http_status)
            await send_error(send, e)
            return
        watch: _DisconnectWatch | None = None
        try:
            for attempt in (1, 2):
                if not self._switcher.try_enter(model):
                    if watch is None:
                        watch = _DisconnectWatch(receive)
                    await self._switcher.enter(model)
                try:
                    await self._relay(model, scope, body, headers, receive, send, watch)
                    return
                except _EngineGone as e:
                    if attempt == 2:
                        raise EngineFailed(
                            f"the engine of model `{model}` is not reachable: {e}",
                            code="engine_unreachable") from None
                    # the engine died (or was restarted): activate it again, retry once
                    log.warning("model=%s action=engine_unreachable error=%s retry=1", model, e)
                    self._switcher.mark_failed(model)
                finally:
                    self._switcher.leave(model)
        except ShimError as e:
            self._count(model, e.http_status)
            await send_error(send, e)
        except asyncio.CancelledError:
            if watch is not None and watch.fired:
                self._uncancel()
                if not watch.responded:
                    self._count(model, 499)
                log.info("model=%s action=client_disconnect path=%s", model, scope["path"])
                return
            raise
        finally:
            if watch is not None:
                watch.close()

    async def _read(self, scope: Scope,
                    receive: Receive) -> tuple[bytes, list[tuple[str, str]]]:
        ctype: bytes | None = None
        length: bytes | None = None
        fwd: list[tuple[str, str]] = []
        for k, v in scope["headers"]:
            if k == b"content-type":
                ctype = v
            elif k == b"content-length":
                length = v
                continue
            if k not in _HOP_REQUEST:
                fwd.append((k.decode("latin-1"), v.decode("latin-1")))
        if ctype is None:
            fwd.append(("content-type", "application/json"))
        elif not _is_json(ctype):
            raise UnsupportedMediaType(
                f"Content-Type must be application/json, got {ctype.decode('latin-1')!r}",
                code="unsupported_media_type")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                raise BadRequest("Content-Length is not a number",
                                 code="bad_content_length") from None
            if n > self._max_body:
                raise self._too_large(n)
        msg = await receive()
        body: bytes = msg.get("body", b"")
        if msg.get("more_body", False):
            parts = [body]
            size = len(body)
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    raise BadRequest("the client went away while sending the body")
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > self._max_body:
                    raise self._too_large(size, at_least=True)
                parts.append(chunk)
                if not msg.get("more_body", False):
                    break
            body = b"".join(parts)
        elif len(body) > self._max_body:
            raise self._too_large(len(body))
        return body, fwd

    def _too_large(self, n: int, at_least: bool = False) -> PayloadTooLarge:
        more = "at least " if at_least else ""
        return PayloadTooLarge(
            f"request body is {more}{n} bytes, above max_body_bytes={self._max_body}",
            code="payload_too_large")

    def _model_of(self, body: bytes) -> str:
        if not body:
            raise BadRequest("the request body is empty; a JSON object naming `model` is needed",
                             code="invalid_json")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON: {e}",
                             code="invalid_json") from None
        if not isinstance(data, dict):
            raise BadRequest("the request body must be a JSON object", code="invalid_json")
        model = data.get("model")
        if model is None or model == "":
            raise ModelNotFound(None, self._known)
        if not isinstance(model, str):
            raise BadRequest("`model` must be a string", param="model", code="invalid_model")
        if model not in self._models:
            raise ModelNotFound(model, self._known)
        return model

    # ------------------------------------------------------------------ relay

    async def _relay(self, model: str, scope: Scope, body: bytes,
                     headers: list[tuple[str, str]], receive: Receive, send: Send,
                     watch: _DisconnectWatch | None) -> None:
        qs: bytes = scope.get("query_string", b"")
        path_qs = scope["path"] + ("?" + qs.decode("latin-1") if qs else "")
        resp = await self._request(model, path_qs, body, headers)
        try:
            status = resp.status
            out = [(k, v) for k, v in resp.raw_headers if k.lower() not in _HOP_RESPONSE]
            if resp.content_length is not None:
                data = await resp.read()
                if watch is not None:
                    watch.armed = False
                    watch.responded = True
                self._count(model, status)
                await send({"type": "http.response.start", "status": status, "headers": out})
                await send({"type": "http.response.body", "body": data, "more_body": False})
                return
            out = [(k, v) for k, v in out if k.lower() != b"content-length"]
            if watch is None:
                watch = _DisconnectWatch(receive)
            watch.responded = True
            self._count(model, status)
            try:
                await send({"type": "http.response.start", "status": status, "headers": out})
                try:
                    async for chunk in resp.content.iter_any():
                        await send({"type": "http.response.body", "body": chunk,
                                    "more_body": True})
                except aiohttp.ClientError as e:
                    # the engine died mid-stream: the status is sent, so say it in the stream
                    # (the official client raises an APIError on an "error" event) and end it
                    log.warning("model=%s action=engine_lost_mid_stream error=%r", model, e)
                    if resp.content_type == "text/event-stream":
                        err = EngineFailed(f"the engine of model `{model}` stopped in the "
                                           "middle of this answer", code="engine_lost")
                        event = b"data: " + json.dumps(err.body()).encode() + b"\n\n"
                        await send({"type": "http.response.body", "body": event,
                                    "more_body": True})
                watch.armed = False
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except asyncio.CancelledError:
                if not watch.fired:
                    raise
                # the client went away mid-stream: end quietly, the slot is released above us
                self._uncancel()
                resp.close()  # drop the engine connection: the engine aborts the request
                log.info("model=%s action=client_disconnect path=%s", model, scope["path"])
            finally:
                watch.close()
        except BaseException:
            resp.close()
            raise
        finally:
            resp.release()

    async def _request(self, model: str, path_qs: str, body: bytes,
                       headers: list[tuple[str, str]]) -> aiohttp.ClientResponse:
        try:
            resp: aiohttp.ClientResponse = await self._engines.session(model).request(
                "POST", self._engines.url(model, path_qs), data=body, headers=headers,
                allow_redirects=False)
            return resp
        except _UPSTREAM_GONE as e:
            raise _EngineGone(str(e) or type(e).__name__) from None
        except aiohttp.ClientError as e:
            raise EngineFailed(f"the engine of model `{model}` failed: {e}",
                               code="engine_error") from None

    @staticmethod
    def _uncancel() -> None:
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()


def _is_json(ctype: bytes) -> bool:
    media = ctype.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/")
                                            and media.endswith(b"+json"))
