"""API keys of the shim's HTTP API, checked on the raw ASGI scope before anything else.

Which key a path needs (when keys are configured):
  /health, /openapi.json      none
  /ui, /ui/static/*           none: the operator page's static files (a browser opening the
                              page cannot send a Bearer header; the page sends the typed key
                              with every call for data)
  /metrics                    none, or any key with ``metrics_auth = true``
  /control/*, /ui/api/*       an admin key when admin keys are set, else an api key
  anything else (/v1/*, ...)  an api key (an admin key too) when api keys are set

Keys are compared as SHA-256 digests with ``hmac.compare_digest`` against every
configured key (no early exit, equal lengths), so neither the time nor the length of
the comparison tells a client how close it came. Neither a key nor a presented token
is ever logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, MutableMapping
from typing import Any

from llmux.shim.config import AuthConfig
from llmux.shim.errors import Forbidden, ShimError, Unauthorized

#: open even when keys are set: liveness, and the API's own description
OPEN_PATHS = frozenset({"/health", "/openapi.json", "/ui", "/ui/"})
_PAGE_FILES = "/ui/static/"
#: what can change or reveal the models' state: the control API and the page's data
_CONTROL = ("/control/", "/ui/api/")

_MISSING = ("You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
_INVALID = "Incorrect API key provided."
_NOT_ADMIN = ("This key may not use /control/*: an admin key is needed "
              "([auth] admin_keys).")


def _digest(key: str | bytes) -> bytes:
    raw = key.encode() if isinstance(key, str) else key
    return hashlib.sha256(raw).digest()


def _matches(token: bytes, digests: tuple[bytes, ...]) -> bool:
    """Constant time over every key: no early exit on a match."""
    presented = _digest(token)
    found = False
    for d in digests:
        found |= hmac.compare_digest(presented, d)
    return found


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The token of an ``Authorization: Bearer TOKEN`` header (scheme case-insensitive)."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() != b"bearer":
                return None
            token = token.strip()
            return token or None
    return None


class KeyGate:
    """The check of one request's key; ``check(scope)`` -> None (pass) or the error."""

    def __init__(self, auth: AuthConfig) -> None:
        self._api = tuple(_digest(k) for k in sorted(auth.api_key_set))
        self._admin = tuple(_digest(k) for k in sorted(auth.admin_key_set))
        self._any = self._api + self._admin
        self._metrics = auth.metrics_auth
        #: False: every request passes without a look at its headers
        self.enabled = auth.enabled

    def check(self, scope: MutableMapping[str, Any]) -> ShimError | None:
        path: str = scope["path"]
        if path in OPEN_PATHS or path.startswith(_PAGE_FILES):
            return None
        if path == "/metrics":
            return self._verify(scope, self._any) if self._metrics else None
        if path == "/control" or path.startswith(_CONTROL):
            if self._admin:
                return self._verify(scope, self._admin, weaker=self._api)
            return self._verify(scope, self._api) if self._api else None
        return self._verify(scope, self._any) if self._api else None

    @staticmethod
    def _verify(scope: MutableMapping[str, Any], allowed: tuple[bytes, ...],
                weaker: tuple[bytes, ...] = ()) -> ShimError | None:
        token = bearer_token(scope["headers"])
        if token is None:
            return Unauthorized(_MISSING, code="missing_api_key")
        if _matches(token, allowed):
            return None
        if weaker and _matches(token, weaker):
            return Forbidden(_NOT_ADMIN, code="admin_key_required")
        return Unauthorized(_INVALID, code="invalid_api_key")
