"""Every call from the shim to an engine's HTTP API, through one keep-alive pool per model.

The proxy's pass-through, the lifecycle's vLLM calls (/sleep, /wake_up, reload), the
supervisor's /health polls and the readiness probe all go through :class:`EngineClient`,
with one HTTP library (aiohttp: its connection reuse and C parser make it the cheapest
well-kept client measured here for a pass-through). One session per model, so that
:meth:`EngineClient.release` closes every connection to one engine without touching the
others; :meth:`EngineClient.prepare_dump` is the connection hygiene before a CRIU dump.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from llmux.common import resources
from llmux.shim import netns
from llmux.shim.config import ModelConfig
from llmux.shim.errors import EngineFailed, ModelNotFound

log = logging.getLogger(__name__)

#: engines listen here only
ENGINE_HOST = "127.0.0.1"

#: how long connecting to a local engine may take; it is on loopback, so a slow
#: connect means the engine is not listening (died, or not started yet)
CONNECT_TIMEOUT_SECS = 10.0

#: errors that mean "no answer from the engine" (refused, reset, timed out)
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)


@dataclass(frozen=True)
class EngineReply:
    """An engine's answer to a direct call, read whole."""

    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self) -> Any:
        return jsonlib.loads(self.content)


class EngineClient:
    """Lazily created per-model client sessions to the engines of ``models``."""

    def __init__(self, models: Mapping[str, ModelConfig], *,
                 connect_timeout: float = CONNECT_TIMEOUT_SECS) -> None:
        self._models = models
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._bases: dict[str, str] = {}
        self._urls: dict[tuple[str, str], URL] = {}
        self._connect_timeout = connect_timeout
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout,
                                              sock_connect=connect_timeout)
        self._closed = False

    def base_url(self, model: str) -> str:
        base = self._bases.get(model)
        if base is None:
            m = self._models.get(model)
            if m is None:
                raise ModelNotFound(model, list(self._models))
            base = self._bases[model] = f"http://{ENGINE_HOST}:{m.port}"
        return base

    def session(self, model: str) -> aiohttp.ClientSession:
        """The model's session (created on first use)."""
        s = self._sessions.get(model)
        if s is None or s.closed:
            if self._closed:
                raise RuntimeError("engine client is closed")
            m = self._models[model]
            sock = netns.socket_path(m.name, m.port)
            connector: aiohttp.BaseConnector
            if sock.exists():
                # the engine's tree has a network of its own: through its forwarder
                connector = aiohttp.UnixConnector(str(sock), limit=0, keepalive_timeout=60.0)
            else:
                connector = aiohttp.TCPConnector(
                    limit=0,  # the switcher, not the pool, bounds concurrency
                    keepalive_timeout=60.0,
                    force_close=False,
                    enable_cleanup_closed=False,
                )
            s = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # engines set no cookies; skip the jar
                timeout=self._timeout,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
                raise_for_status=False,
                trust_env=False,  # never through an environment proxy
            )
            self._sessions[model] = s
        return s

    def url(self, model: str, path_qs: str) -> URL:
        """The engine URL for a request path, parsed once per (model, path)."""
        key = (model, path_qs)
        url = self._urls.get(key)
        if url is None:
            url = URL(self.base_url(model) + path_qs, encoded=True)
            if len(self._urls) < 1024:  # query strings could be unbounded; cache the common
                self._urls[key] = url
        return url

    # ------------------------------------------------------------------ direct calls

    async def _fetch(self, model: str, method: str, path: str, *, json: Any = None,
                     params: Mapping[str, str] | None = None,
                     timeout_secs: float) -> EngineReply:
        timeout = aiohttp.ClientTimeout(total=timeout_secs,
                                        connect=min(self._connect_timeout, timeout_secs))
        async with self.session(model).request(
                method, self.base_url(model) + path, json=json, params=params,
                timeout=timeout, allow_redirects=False) as r:
            return EngineReply(r.status, await r.read())

    async def call(self, model: str, method: str, path: str, *,
                   json: Any = None, params: Mapping[str, str] | None = None,
                   timeout_secs: float = 30.0) -> EngineReply:
        """Call the engine's own HTTP API directly (not through the proxy).

        Raises EngineFailed on a transport error or a status >= 400.
        """
        try:
            r = await self._fetch(model, method, path, json=json, params=params,
                                  timeout_secs=timeout_secs)
        except TimeoutError as e:
            raise EngineFailed(f"model {model}: {method} {path} timed out after "
                               f"{timeout_secs:g} s") from e
        except (aiohttp.ClientError, OSError) as e:
            raise EngineFailed(f"model {model}: {method} {path} failed: {e!r}") from e
        if r.status_code >= 400:
            raise EngineFailed(f"model {model}: {method} {path} answered {r.status_code}: "
                               f"{r.text[:300]}")
        return r

    async def healthy(self, model: str, timeout_secs: float = 5.0) -> bool:
        """Does the engine answer /health with 200 within ``timeout_secs``?"""
        try:
            r = await self._fetch(model, "GET", "/health", timeout_secs=timeout_secs)
        except TRANSPORT_ERRORS:
            return False
        return r.status_code == 200

    async def probe(self, model: str, within_secs: float | None = None) -> None:
        """One greedy token through the engine's completion API, within a bound.

        /health alone is not readiness: vLLM answers 200 there while its EngineCore's
        output thread is dead and every request hangs. Raises EngineFailed.
        """
        m = self._models[model]
        bound = m.probe_timeout_secs if within_secs is None else within_secs
        body = {"model": m.name, "prompt": "ready?", "max_tokens": 1, "temperature": 0}
        what = f"model {model}: readiness probe (a one-token completion)"
        try:
            async with asyncio.timeout(bound):
                r = await self._fetch(model, "POST", "/v1/completions", json=body,
                                      timeout_secs=bound)
        except TimeoutError:
            raise EngineFailed(f"{what} got no answer within {bound:g} s "
                               "(probe_timeout_secs): the engine answers /health but "
                               "does not serve") from None
        except (aiohttp.ClientError, OSError) as e:
            raise EngineFailed(f"{what} failed: {e!r}") from e
        try:
            ok = r.status_code == 200 and bool(r.json().get("choices"))
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            raise EngineFailed(f"{what} answered {r.status_code}: {r.text[:300]}")

    # ------------------------------------------------------------------ connections

    def open_connections(self, model: str) -> int:
        """Pooled (idle) plus acquired connections to the model's engine."""
        s = self._sessions.get(model)
        if s is None or s.closed:
            return 0
        conn = s.connector
        if conn is None:
            return 0
        idle = sum(len(v) for v in getattr(conn, "_conns", {}).values())
        acquired = len(getattr(conn, "_acquired", ()))
        return idle + acquired

    async def release(self, model: str) -> None:
        """Close every connection to ``model``'s engine; the next call reconnects."""
        s = self._sessions.pop(model, None)
        if s is not None and not s.closed:
            await s.close()
            # let the transports' close callbacks run so the sockets are really gone
            await asyncio.sleep(0)

    async def prepare_dump(self, model: str, within_secs: float = 2.0,
                           root_pid: int | None = None) -> None:
        """Before a CRIU dump: close our connections to the engine, then wait until no TCP
        connection to its port is open (in the network of ``root_pid``, the tree's root:
        the engine's own, where its forwarder's connections end once ours are closed). A
        connection dumped half-closed comes back with its 4-tuple, which a later restore
        can find taken (EADDRNOTAVAIL); a forwarder's still joined to ours would be a
        unix socket whose peer is outside the tree. Clients other than the shim may hold
        one; after ``within_secs`` the dump goes on and CRIU carries what is left
        (--tcp-established)."""
        await self.release(model)
        port = self._models[model].port
        where: int | str = "self" if root_pid is None else root_pid
        deadline = time.monotonic() + within_secs
        for _ in range(10_000):  # kernel state: nothing to await but time
            try:
                left = resources.connections_to(port, where)
            except OSError:  # the tree is gone: nothing to wait for
                return
            if not left or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        if left:
            log.warning("model %s: %d connection(s) to port %d still open before the dump",
                        model, left, port)

    async def aclose(self) -> None:
        self._closed = True
        sessions, self._sessions = self._sessions, {}
        for s in sessions.values():
            if not s.closed:
                await s.close()
