"""Keep-alive connection pools from the shim to each model's engine.

One aiohttp connector per model, so that :meth:`UpstreamPool.release` can close
every connection to one engine (the lifecycle does that before a CRIU dump: an
established TCP connection to the engine must not be part of the image) without
touching the others. aiohttp's connection reuse and its C HTTP parser make it
the cheapest well-kept client measured here for a pass-through.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
from yarl import URL

#: how long connecting to a local engine may take; it is on loopback, so a slow
#: connect means the engine is not listening (died, or not started yet)
CONNECT_TIMEOUT_SECS = 10.0


class UpstreamPool:
    """Lazily created per-model client sessions; :meth:`release` closes one model's."""

    def __init__(self, base_url: Callable[[str], str], *,
                 connect_timeout: float = CONNECT_TIMEOUT_SECS) -> None:
        self._base_url = base_url
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._bases: dict[str, str] = {}
        self._urls: dict[tuple[str, str], URL] = {}
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout,
                                              sock_connect=connect_timeout)
        self._closed = False

    def session(self, model: str) -> aiohttp.ClientSession:
        """The model's session (created on first use)."""
        s = self._sessions.get(model)
        if s is None or s.closed:
            if self._closed:
                raise RuntimeError("upstream pool is closed")
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
            )
            self._sessions[model] = s
        return s

    def url(self, model: str, path_qs: str) -> URL:
        """The engine URL for a request path, parsed once per (model, path)."""
        key = (model, path_qs)
        url = self._urls.get(key)
        if url is None:
            base = self._bases.get(model)
            if base is None:
                base = self._bases[model] = self._base_url(model).rstrip("/")
            url = URL(base + path_qs, encoded=True)
            if len(self._urls) < 1024:  # query strings could be unbounded; cache the common
                self._urls[key] = url
        return url

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
        """Close every connection to ``model``'s engine; the next request reconnects."""
        s = self._sessions.pop(model, None)
        if s is not None and not s.closed:
            await s.close()
            # let the transports' close callbacks run so the sockets are really gone
            await asyncio.sleep(0)

    async def aclose(self) -> None:
        self._closed = True
        sessions, self._sessions = self._sessions, {}
        for s in sessions.values():
            if not s.closed:
                await s.close()
