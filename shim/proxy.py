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

from llmux.shim.auth import KeyGate
from llmux.shim.config import Config
from llmux.shim.engineclient import EngineClient
from llmux.shim.errors import (
    BadRequest,
    ClientTimeout,
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
        self._gate = KeyGate(config.auth)
        self._body_timeout = config.body_timeout_secs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._fallback(scope, receive, send)
            return
        if self._gate.enabled:
            refused = self._gate.check(scope)
            if refused is not None:
                self._count("-", refused.http_status)
                await send_error(send, refused)
                return
        if scope["method"] == "POST" and scope["path"].startswith("/v1/"):
            await self._handle(scope, receive, send)
        else:
            await self._fallback(scope, _bounded_receive(receive, self._body_timeout), send)

    # ---------------------------------------------------------------- request

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body, headers = await self._read(scope, receive)
            model = self._model_of(body, scope["path"])
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
            elif k == b"authorization" and self._gate.enabled:
                continue  # the shim's key, not the engine's
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
        try:
            async with asyncio.timeout(self._body_timeout):
                body = await self._read_body(receive)
        except TimeoutError:
            raise ClientTimeout(
                f"the request body did not arrive within body_timeout_secs="
                f"{self._body_timeout:g}", code="body_timeout") from None
        return body, fwd

    async def _read_body(self, receive: Receive) -> bytes:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise BadRequest("the client went away while sending the body")
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
        return body

    def _too_large(self, n: int, at_least: bool = False) -> PayloadTooLarge:
        more = "at least " if at_least else ""
        return PayloadTooLarge(
            f"request body is {more}{n} bytes, above max_body_bytes={self._max_body}",
            code="payload_too_large")

    def _model_of(self, body: bytes, path: str) -> str:
        if not body:
            raise BadRequest("the request body is empty; a JSON object naming `model` is needed",
                             code="invalid_json")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON: {e}",
                             code="invalid_json") from None
        except RecursionError:
            raise BadRequest("the request body is nested too deeply", code="invalid_json"
                             ) from None
        if not isinstance(data, dict):
            raise BadRequest("the request body must be a JSON object", code="invalid_json")
        model = data.get("model")
        if model is None or model == "":
            raise ModelNotFound(None, self._known)
        if not isinstance(model, str):
            raise BadRequest("`model` must be a string", param="model", code="invalid_model")
        if model not in self._models:
            raise ModelNotFound(model, self._known)
        spec = _GENERATION_FIELDS.get(path)
        if spec is not None:
            _check_fields(data, spec)
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


def _is_int(v: Any) -> bool:
    """An integer, or a float without a fraction (5.0: what Python clients send after a
    division, and vLLM's models accept)."""
    if isinstance(v, float):
        return v.is_integer()
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


#: (field, test, what it must be): the OpenAI schema's types of the fields that every
#: engine reads; a request failing one is refused here, before it can cause a switch
_Rule = tuple[str, Callable[[Any], bool], str]
_COMMON: tuple[_Rule, ...] = (
    ("stream", lambda v: isinstance(v, bool), "a boolean"),
    ("max_tokens", lambda v: _is_int(v) and v >= 1, "an integer of at least 1"),
    ("n", lambda v: _is_int(v) and v >= 1, "an integer of at least 1"),
    ("temperature", _is_number, "a number"),
    ("top_p", _is_number, "a number"),
    ("presence_penalty", _is_number, "a number"),
    ("frequency_penalty", _is_number, "a number"),
    ("seed", _is_int, "an integer"),
    ("stop", lambda v: isinstance(v, str) or _is_str_list(v),
     "a string or a list of strings"),
    ("stream_options", lambda v: isinstance(v, dict), "an object"),
    ("user", lambda v: isinstance(v, str), "a string"),
)
#: path -> (required fields, rules)
_GENERATION_FIELDS: dict[str, tuple[tuple[str, ...], tuple[_Rule, ...]]] = {
    "/v1/chat/completions": (("messages",), (
        ("messages", lambda v: isinstance(v, list) and bool(v)
         and all(isinstance(m, dict) for m in v), "a non-empty list of message objects"),
        ("max_completion_tokens", lambda v: _is_int(v) and v >= 1,
         "an integer of at least 1"),
        *_COMMON)),
    "/v1/completions": ((), (
        ("prompt", lambda v: isinstance(v, str) or (isinstance(v, list) and bool(v)),
         "a string or a non-empty list"),
        *_COMMON)),
}


def _check_fields(data: dict[str, Any],
                  spec: tuple[tuple[str, ...], tuple[_Rule, ...]]) -> None:
    """400 for a missing or mistyped field (null is always allowed: the default)."""
    required, rules = spec
    for name in required:
        if data.get(name) is None:
            raise BadRequest(f"`{name}` is required", param=name, code="missing_field")
    for name, ok, what in rules:
        value = data.get(name)
        if value is not None and not ok(value):
            raise BadRequest(f"`{name}` must be {what}, got {_shown(value)}", param=name,
                             code="invalid_type")


def _shown(value: Any) -> str:
    """A wrong value as an error names it: small numbers as they are, else the type."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float) and len(repr(value)) <= 24:
        return repr(value)
    names: dict[type, str] = {str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _bounded_receive(receive: Receive, timeout_secs: float) -> Receive:
    """``receive`` for the cold routes: a body that has not arrived within ``timeout_secs``
    of the request's start is a ClientTimeout (408) instead of a task held forever."""
    deadline = asyncio.get_running_loop().time() + timeout_secs

    async def bounded() -> Message:
        try:
            async with asyncio.timeout_at(deadline):
                return await receive()
        except TimeoutError:
            raise ClientTimeout(f"the request body did not arrive within body_timeout_secs="
                                f"{timeout_secs:g}", code="body_timeout") from None

    return bounded


def _is_json(ctype: bytes) -> bool:
    media = ctype.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/")
                                            and media.endswith(b"+json"))
