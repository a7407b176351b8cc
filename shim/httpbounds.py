"""The bounds uvicorn leaves out: how long and how large a request's headers may be.

uvicorn's httptools protocol arms no timer on a new connection and cancels its keep-alive
timer on every byte received, so a client that opens a socket and sends nothing, or sends
its headers a byte every few seconds (slow loris), holds a connection and a file
descriptor for ever; nor does it limit the size of the headers. This protocol closes a
connection whose request headers are not complete within ``header_timeout_secs`` of the
connection's start (or of the previous response's end), answering 408 when part of a
request had arrived, and answers 431 to headers larger than MAX_HEADER_BYTES. The body is
bounded by the application (body_timeout_secs, max_body_bytes).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("llmux.http")

#: the request line plus every header, as received; nginx's default is 4 x 8 KiB
MAX_HEADER_BYTES = 64 << 10


#: how long a refused connection's further input is read and dropped before closing
LINGER_SECS = 2.0


class _HeaderLimit(Exception):
    """Raised in a parser callback: the parser stops, uvicorn answers (431 here)."""


def _plain(status: bytes, text: str) -> bytes:
    body = text.encode()
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
            + body)


def bounded_protocol(header_timeout_secs: float) -> type[HttpToolsProtocol]:
    """uvicorn's ``http`` protocol class with the header bounds (uvicorn.Config(http=...))."""

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _header_bytes = 0
        _too_large = False
        _partial = False
        _discarding = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._discarding:
                return
            if self._header_timer is not None:
                self._partial = True
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._header_bytes = 0
            if self._header_timer is None:
                self._arm()  # a pipelined request: its headers are bounded as well

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.timeout_keep_alive_task is not None:
                self._arm()  # idle again: the next request's headers are bounded

        def send_400_response(self, msg: str) -> None:
            if not self._too_large:
                super().send_400_response(msg)
                return
            self._reject(b"431 Request Header Fields Too Large",
                         f"request headers larger than {MAX_HEADER_BYTES} bytes")

        # -- the bounds

        def _count(self, n: int) -> None:
            self._header_bytes += n
            if self._header_bytes > MAX_HEADER_BYTES:
                self._too_large = True
                raise _HeaderLimit

        def _arm(self) -> None:
            self._disarm()
            self._partial = False
            self._header_timer = self.loop.call_later(header_timeout_secs, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                # a pipelined request's headers, behind a response still going out: no
                # answer may cut into that one; look again later
                self._header_timer = self.loop.call_later(header_timeout_secs, self._expired)
                return
            if self._partial:
                log.debug("action=header_timeout client=%s", _peer(self.client))
                self._reject(b"408 Request Timeout", f"request headers not complete within "
                             f"header_timeout_secs={header_timeout_secs:g}")
            else:
                self.transport.close()

        def _reject(self, status: bytes, text: str) -> None:
            """Answer, then close after LINGER_SECS of discarding what the client still
            sends: closing a socket with unread data resets it, and the client would lose
            the answer."""
            self._discarding = True
            self.transport.write(_plain(status, text))
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_SECS, self.transport.close)

    return BoundedHttpToolsProtocol


def _peer(client: Any) -> str:
    return f"{client[0]}:{client[1]}" if client else "-"
