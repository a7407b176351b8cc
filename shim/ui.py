"""The operator's page: ``GET /ui`` and the data it reads.

One static page (``shim/static/``, shipped in the wheel; no build step, nothing fetched
from elsewhere) that polls ``/ui/api/state`` once a second and follows one engine log
at a time through server-sent events. Nothing here touches the proxy's hot path: the
switch history is fed by the switcher's and the lifecycle's observers (rare events), and
every log read runs in a worker thread, bounded in bytes per read and in followers.
The page's actions are the control API's own routes (``/control/sleep``, ``/wake``), so
they follow whatever access rules that API has.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from llmux.shim.backend import RestoreChecker
from llmux.shim.config import Config
from llmux.shim.errors import ShimError
from llmux.shim.transitions import Action, Switch

log = logging.getLogger("llmux.ui")

STATIC_DIR = Path(__file__).resolve().with_name("static")

#: switches and log lines kept in memory (the page shows the newest)
HISTORY_LIMIT = 200
#: a log stream starts with at most this much of the file's end
LOG_BACKLOG_BYTES = 64 << 10
#: at most this much is read per tick; a faster writer is skipped ahead (and told so)
LOG_CHUNK_BYTES = 256 << 10
#: a line without its newline yet is sent anyway past this length
LOG_LINE_LIMIT = 16 << 10
LOG_POLL_SECS = 0.5
LOG_KEEPALIVE_SECS = 15.0
#: log streams open at once, over every page
MAX_LOG_FOLLOWERS = 32
#: how long one computed status is reused: any number of open pages costs the shim at most
#: two status computations a second (each reads /proc for the engines' PIDs)
STATUS_CACHE_SECS = 0.5
#: how long one look at the host's checkpoints is reused
CHECKPOINTS_CACHE_SECS = 5.0
CHECKPOINTS_TIMEOUT_SECS = 5.0

#: the page is the shim's own: scripts, styles and data from this origin only
_PAGE_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data:; base-uri 'none'; "
                                "form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

# ------------------------------------------------------------------------ switch history


@dataclass
class SwitchHistory:
    """A bounded record of switches and transitions, for the page (never read by the proxy).

    Fed by :class:`llmux.shim.switcher.Switcher`'s switch observer (one
    :class:`~llmux.shim.transitions.Switch` each, with its evictions and its bring-up) and
    the lifecycle's transition observer (the log's lines).
    """

    limit: int = HISTORY_LIMIT
    switches: deque[dict[str, Any]] = field(init=False)
    lines: deque[tuple[int, str]] = field(init=False)
    _seq: int = 0
    #: model -> {"how", "secs", "at"} of the switch that last brought it back
    came_back: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the lifecycle's last action that brought each model back (cold_start, restart, wake)
    _brought_back_by: dict[str, Action] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.switches = deque(maxlen=self.limit)
        self.lines = deque(maxlen=self.limit)

    @property
    def seq(self) -> int:
        return self._seq

    def _line(self, text: str) -> None:
        self._seq += 1
        stamp = time.strftime("%H:%M:%S", time.localtime())
        self.lines.append((self._seq, f"{stamp} {text}"))

    def lines_since(self, seq: int) -> list[dict[str, Any]]:
        return [{"seq": s, "text": t} for s, t in self.lines if s > seq]

    def observe_transition(self, model: str, action: Action, strategy: str,
                           seconds: float) -> None:
        """A lifecycle ``TransitionObserver``."""
        if action.brings_back:
            self._brought_back_by[model] = action
        self._line(f"{model}: {action} ({strategy}) {seconds:.3f} s")

    def observe_switch(self, switch: Switch) -> None:
        """A switcher ``SwitchObserver``: one entry per switch."""
        source = switch.source
        up = switch.brought_back
        how = switch.how
        if how is not None and up is not None:
            action = self._brought_back_by.get(switch.target)
            self.came_back[switch.target] = {"how": how.value, "secs": round(up.seconds, 3),
                                             "at": switch.at,
                                             "action": action.value if action else None}
        entry = {
            "at": switch.at, "from": source.model if source else None, "to": switch.target,
            "ok": switch.ok, "seconds": round(switch.seconds, 3),
            "strategy": source.strategy if source else None,
            "sleep_secs": round(source.seconds, 3) if source else None,
            "wake": None if how is None else how.value,
            "wake_secs": round(up.seconds, 3) if up else None,
            "waiting": switch.waiting,
        }
        self.switches.append(entry)
        parts = [f"switch {entry['from'] or '-'} -> {switch.target}: "
                 f"{'ok' if switch.ok else 'FAILED'} in {switch.seconds:.3f} s"]
        if source:
            parts.append(f"sleep {source.strategy} {source.seconds:.3f} s")
        if up:
            parts.append(f"{how or 'running'} {up.seconds:.3f} s")
        parts.append(f"{switch.waiting} waiting")
        self._line("; ".join(parts))

    def engine_lost(self, model: str) -> None:
        """A lifecycle loss listener."""
        self._line(f"{model}: engine exited unexpectedly")


# ------------------------------------------------------------------------ log following


@dataclass
class LogChunk:
    lines: list[str]
    #: the file was replaced or truncated since the last read (the page starts over)
    reset: bool = False
    skipped_bytes: int = 0
    missing: bool = False


class LogFollower:
    """Reads what was appended to one file since the last call; blocking, so run it in
    a thread. Bounded: the first read takes the file's last ``backlog`` bytes, each later
    one at most ``chunk`` bytes (a writer faster than that is skipped ahead)."""

    def __init__(self, path: Path, *, backlog: int = LOG_BACKLOG_BYTES,
                 chunk: int = LOG_CHUNK_BYTES, line_limit: int = LOG_LINE_LIMIT) -> None:
        self.path = path
        self.backlog = backlog
        self.chunk = chunk
        self.line_limit = line_limit
        self._ident: tuple[int, int] | None = None
        self._offset = 0
        self._rest = b""
        self._drop_partial = False
        self._missing_told = False

    def read(self) -> LogChunk:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            first = not self._missing_told
            self._missing_told = True
            was = self._ident is not None
            self._ident = None
            return LogChunk([], reset=was, missing=first or was)
        self._missing_told = False
        reset = False
        ident = (st.st_dev, st.st_ino)
        if ident != self._ident or st.st_size < self._offset:
            reset = self._ident is not None
            self._ident = ident
            self._offset = max(0, st.st_size - self.backlog)
            self._rest = b""
            self._drop_partial = self._offset > 0
        pending = st.st_size - self._offset
        if pending <= 0:
            return LogChunk([], reset=reset)
        skipped = 0
        if pending > self.chunk:
            skipped = pending - self.chunk
            self._offset += skipped
            self._rest = b""
            self._drop_partial = True
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read(min(pending, self.chunk))
        self._offset += len(data)
        data = self._rest + data
        parts = data.split(b"\n")
        self._rest = parts.pop()
        if self._drop_partial and parts:
            parts.pop(0)  # the tail of a line whose start was not read
            self._drop_partial = False
        if len(self._rest) > self.line_limit:
            parts.append(self._rest)
            self._rest = b""
        lines = [p.decode(errors="replace").rstrip("\r").rsplit("\r", 1)[-1] for p in parts]
        return LogChunk(lines, reset=reset, skipped_bytes=skipped)


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# ------------------------------------------------------------------------ host checkpoints


class HostCheckpoints:
    """The host's checkpoints as llmuxd lists them, and whether each can be restored here.

    A short-lived D-Bus connection per look, reused for CHECKPOINTS_CACHE_SECS, so that
    any number of open pages costs llmuxd a few calls every few seconds at most. Whether
    a checkpoint restores here is llmuxd's to say (CheckRestore, through the shim's
    backend: the restore's own checks, for this container), never a copy of its rules.
    """

    def __init__(self, config: Config, *, backend: RestoreChecker | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._backend = backend
        self._clock = clock
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._lock = asyncio.Lock()

    async def snapshot(self) -> dict[str, Any]:
        async with self._lock:
            now = self._clock()
            if self._cached is not None and now - self._cached[0] < CHECKPOINTS_CACHE_SECS:
                return self._cached[1]
            try:
                found = await asyncio.wait_for(self._look(), CHECKPOINTS_TIMEOUT_SECS)
            except TimeoutError:
                found = self._absent(f"the llmux host service (llmuxd) did not answer within "
                                     f"{CHECKPOINTS_TIMEOUT_SECS:g} s")
            self._cached = (self._clock(), found)
            return found

    def _absent(self, reason: str) -> dict[str, Any]:
        return {"available": False, "reason": reason, "host": None, "checkpoints": []}

    async def _look(self) -> dict[str, Any]:
        cp = self._config.checkpoint
        if cp is None:
            return self._absent("no host service is configured: the shim's config has no "
                                "[checkpoint] section (bus = ...), so llmuxd is not used")
        from llmux.client.errors import ConnectionFailed
        from llmux.client.hostclient import HostClient
        from llmux.common.errors import HostError

        client = HostClient(cp.bus)
        try:
            try:
                await client.connect()
            except ConnectionFailed as e:
                return self._absent(f"cannot reach the llmux host service (llmuxd): "
                                    f"{e.message}")
            try:
                info = await client.info()
            except HostError as e:
                return self._absent(f"the llmux host service (llmuxd) on the {cp.bus} bus "
                                    f"does not answer: {_host_message(e)}")
            host = {"version": info.version, "criu_version": info.criu_version,
                    "kernel_release": info.kernel_release,
                    "driver_version": info.driver_version, "free_bytes": info.free_bytes,
                    "bus": cp.bus}
            try:
                found = await client.list_checkpoints()
            except HostError as e:
                out = self._absent(f"llmuxd refused to list its checkpoints: "
                                   f"{_host_message(e)}")
                out["host"] = host
                return out
        finally:
            with contextlib.suppress(Exception):
                await client.close()
        whys = await asyncio.gather(*(self.why_not_here(c.model) for c in found))
        rows = []
        for c, why in zip(found, whys, strict=True):
            rows.append({"model": c.model, "size_bytes": c.size_bytes, "created": c.created,
                         "criu_version": c.criu_version, "kernel_release": c.kernel_release,
                         "driver_version": c.driver_version, "cuda": bool(c.cuda_pids),
                         "dump_seconds": c.dump_seconds, "restorable": why is None,
                         "why_not": why})
        return {"available": True, "reason": None if rows else "llmuxd holds no checkpoints",
                "host": host, "checkpoints": rows}

    async def why_not_here(self, model: str) -> str | None:
        """Why this shim could not restore the checkpoint of ``model``: not one of its
        models, or llmuxd's reason; None when it would restore."""
        if model not in self._config.models:
            return "no model of that name is configured in this shim"
        if self._backend is None:
            return "this shim has no host service backend to restore it with"
        try:
            return await self._backend.check_restore(model)
        except ShimError as e:
            return f"llmuxd could not check it: {e.message}"


def _host_message(e: BaseException) -> str:
    name = getattr(e, "dbus_name", None)
    message = getattr(e, "message", None) or str(e) or type(e).__name__
    return f"{name}: {message}" if name else message


# ------------------------------------------------------------------------ the page


class OperatorPage:
    """The routes of ``/ui``: the page, its static files and its three data endpoints."""

    def __init__(self, config: Config, status: Callable[[], dict[str, Any]],
                 history: SwitchHistory, *,
                 log_path: Callable[[str], Path] | None = None,
                 checkpoints: HostCheckpoints | None = None,
                 stopping: Callable[[], bool] = lambda: False) -> None:
        self._config = config
        self._status = status
        self.history = history
        self._log_path = log_path or (lambda m: Path(config.log_dir) / f"{m}.log")
        self._checkpoints = checkpoints or HostCheckpoints(config)
        #: true once the shim stops accepting: log streams end, so that they do not hold
        #: the graceful shutdown (it waits for open responses) for its whole grace period
        self._stopping = stopping
        self.followers = 0
        self._status_at = -STATUS_CACHE_SECS
        self._status_json: dict[str, Any] = {}

    def _cached_status(self) -> dict[str, Any]:
        now = time.monotonic()
        if now - self._status_at >= STATUS_CACHE_SECS:
            self._status_json = self._status()
            self._status_at = now
        return self._status_json

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/ui", self.page, methods=["GET"]),
            Route("/ui/", self.page, methods=["GET"]),
            Mount("/ui/static", app=StaticFiles(directory=STATIC_DIR), name="ui-static"),
            Route("/ui/api/state", self.state, methods=["GET"]),
            Route("/ui/api/checkpoints", self.checkpoints, methods=["GET"]),
            Route("/ui/api/logs/{model}", self.logs, methods=["GET"]),
        ]

    async def page(self, request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8",
                            headers=_PAGE_HEADERS)

    async def state(self, request: Request) -> Response:
        """The control status, the last switches and the switch log since ``since``."""
        try:
            since = int(request.query_params.get("since", "0"))
        except ValueError:
            return _bad("`since` must be an integer (the last seq the page has)")
        h = self.history
        return JSONResponse({
            "status": self._cached_status(),
            "came_back": h.came_back,
            "switches": list(h.switches)[-50:],
            "log": h.lines_since(since)[-HISTORY_LIMIT:],
            "seq": h.seq,
            "models": {name: {"log_path": str(self._log_path(name))}
                       for name in self._config.models},
            "time": time.time(),
        })

    async def checkpoints(self, request: Request) -> Response:
        return JSONResponse(await self._checkpoints.snapshot())

    async def logs(self, request: Request) -> Response:
        model = request.path_params["model"]
        if model not in self._config.models:
            return JSONResponse(
                {"error": {"message": f"model {model!r} not found; configured: "
                                      f"{', '.join(self._config.models)}",
                           "type": "not_found_error", "param": "model", "code": 404}},
                status_code=404)
        if self.followers >= MAX_LOG_FOLLOWERS:
            return JSONResponse(
                {"error": {"message": f"too many log streams open ({MAX_LOG_FOLLOWERS}); "
                                      "close a page", "type": "server_busy", "param": None,
                           "code": 503}},
                status_code=503, headers={"Retry-After": "5"})
        follower = LogFollower(self._log_path(model))
        return StreamingResponse(self._follow(model, follower), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    async def _follow(self, model: str, follower: LogFollower) -> AsyncIterator[bytes]:
        self.followers += 1
        try:
            yield b"retry: 2000\n\n"
            yield _sse("open", {"model": model, "path": str(follower.path)})
            quiet_since = time.monotonic()
            while not self._stopping():
                chunk = await asyncio.to_thread(follower.read)
                if chunk.lines or chunk.reset or chunk.skipped_bytes or chunk.missing:
                    yield _sse("lines", {"lines": chunk.lines, "reset": chunk.reset,
                                         "skipped_bytes": chunk.skipped_bytes,
                                         "missing": chunk.missing})
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= LOG_KEEPALIVE_SECS:
                    yield b": keepalive\n\n"
                    quiet_since = time.monotonic()
                await asyncio.sleep(LOG_POLL_SECS)
        finally:
            self.followers -= 1


def _bad(message: str) -> Response:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error",
                                   "param": None, "code": 400}}, status_code=400)


__all__ = ["HostCheckpoints", "LogFollower", "OperatorPage", "SwitchHistory"]
