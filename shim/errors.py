"""The shim's error hierarchy.

Each class carries the HTTP status and the OpenAI error ``type`` it is answered
with, so the proxy turns any of them into a response in one place.
"""

from __future__ import annotations

from typing import Any

#: what a client that met a passing condition (503, 504) is told to wait before retrying
RETRY_AFTER_SECS = 5


class ShimError(Exception):
    http_status: int = 500
    error_type: str = "internal_error"
    #: sent as Retry-After: the condition passes by itself (a switch, a start-up), so a
    #: client may try again after this many seconds; None for errors a retry cannot mend
    retry_after_secs: int | None = None
    #: response headers besides content-type/length (lower-case names)
    extra_headers: tuple[tuple[bytes, bytes], ...] = ()

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def headers(self) -> list[tuple[str, str]]:
        """The response headers besides the content type and length."""
        out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.extra_headers]
        if self.retry_after_secs is not None:
            out.append(("retry-after", str(self.retry_after_secs)))
        return out

    def body(self) -> dict[str, Any]:
        """OpenAI-style error body, as the official client expects it."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code if self.code is not None else self.http_status,
            }
        }


class ConfigError(ShimError):
    """The configuration is invalid; ``problems`` lists every (key path, why)."""

    error_type = "config_error"

    def __init__(self, problems: list[tuple[str, str]], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  {path}: {why}" for path, why in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


class BadRequest(ShimError):
    http_status = 400
    error_type = "invalid_request_error"


class Unauthorized(ShimError):
    """No API key, or not a valid one (OpenAI's answer to a bad key)."""

    http_status = 401
    error_type = "authentication_error"
    #: RFC 6750: the scheme a client should use
    extra_headers = ((b"www-authenticate", b'Bearer realm="llmux"'),)


class Forbidden(ShimError):
    """A valid key that may not do this (an api key on /control/* when admin keys are set)."""

    http_status = 403
    error_type = "permission_error"


class ClientTimeout(ShimError):
    """The client did not send its request in time (slow or stalled body)."""

    http_status = 408
    error_type = "invalid_request_error"


#: how much of a client-supplied name an error message repeats
_SHOWN_NAME_CHARS = 128


def shown_name(name: str) -> str:
    """A client-supplied name as an error message repeats it: control characters escaped,
    cut to _SHOWN_NAME_CHARS (a megabyte of name is not echoed back)."""
    text = name if name.isprintable() else repr(name)[1:-1]
    if len(text) > _SHOWN_NAME_CHARS:
        return f"{text[:_SHOWN_NAME_CHARS]}... ({len(name)} characters)"
    return text


class ModelNotFound(ShimError):
    http_status = 404
    error_type = "invalid_request_error"

    def __init__(self, model: str | None, known: list[str]):
        what = (f"The model `{shown_name(model)}` does not exist" if model
                else "No model was named")
        super().__init__(
            f"{what}. Known models: {', '.join(sorted(known)) or '(none)'}",
            param="model",
            code="model_not_found",
        )


class PayloadTooLarge(ShimError):
    http_status = 413
    error_type = "invalid_request_error"


class UnsupportedMediaType(ShimError):
    http_status = 415
    error_type = "invalid_request_error"


class ServiceUnavailable(ShimError):
    """The model cannot be made ready (switch failed, engine died, shutting down)."""

    http_status = 503
    error_type = "service_unavailable"
    retry_after_secs: int | None = RETRY_AFTER_SECS


class NoRoom(ServiceUnavailable):
    """The model cannot be made resident under the configured limits (it exceeds the memory
    budget by itself, or pinned models hold the room): a retry will not mend it."""

    retry_after_secs = None


class RequestTimeout(ShimError):
    """request_timeout_secs passed while the request waited for its model."""

    http_status = 504
    error_type = "timeout"
    retry_after_secs: int | None = RETRY_AFTER_SECS


class EngineFailed(ShimError):
    """The engine process failed to start, died, or answered garbage."""

    http_status = 502
    error_type = "engine_error"


class Conflict(ShimError):
    """A control action that the model's current state does not allow."""

    http_status = 409
    error_type = "invalid_request_error"


class HostUnavailable(ShimError):
    """The host service (llmuxd) is needed but cannot be reached or refused."""

    http_status = 503
    error_type = "host_service_error"
    retry_after_secs: int | None = RETRY_AFTER_SECS


class HostRefused(ShimError):
    """The host service answered with one of its named errors (contract.ErrorName).

    ``http_status`` and ``error_type`` follow the error's kind (shim.backend's table):
    a missing checkpoint is 404, a busy model or taken PID/port 409, a full disk 507,
    ...; ``code`` is the D-Bus error name.
    """

    error_type = "host_service_error"

    def __init__(self, message: str, *, http_status: int, error_type: str | None = None,
                 code: str | None = None):
        super().__init__(message, code=code)
        self.http_status = http_status
        if error_type is not None:
            self.error_type = error_type
