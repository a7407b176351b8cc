"""Assembly of the shim: lifecycle, switcher, proxy, control API, metrics, servers.

``serve(config)`` is what ``llmux serve`` runs; ``run(config)`` wraps it in a
uvloop event loop (the shim may use uvloop; the engines must not).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import logging
import resource
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmux.shim.auth import KeyGate
from llmux.shim.config import Config
from llmux.shim.control import ControlAPI, StatusSource, error_json
from llmux.shim.engineclient import EngineClient
from llmux.shim.errors import ModelNotFound, ShimError
from llmux.shim.httpbounds import bounded_protocol
from llmux.shim.metrics import CONTENT_TYPE, ShimMetrics
from llmux.shim.placement import Placement, host_gpus
from llmux.shim.proxy import ASGIApp, ProxyApp, Receive, Scope, Send, send_error
from llmux.shim.switcher import Switcher
from llmux.shim.ui import HostCheckpoints, OperatorPage, SwitchHistory

log = logging.getLogger("llmux.app")

#: how long a shutdown waits for in-flight requests before cancelling them
SHUTDOWN_GRACE_SECS = 30
#: file descriptors beyond max_connections: engines' connections, logs, pipes
FD_HEADROOM = 1024


def build_app(config: Config, lifecycle: StatusSource, switcher: Switcher,
              engines: EngineClient, metrics: ShimMetrics, *,
              control: ControlAPI | None = None,
              history: SwitchHistory | None = None,
              checkpoints: HostCheckpoints | None = None,
              log_path: Callable[[str], Path] | None = None,
              stopping: Callable[[], bool] = lambda: False) -> ASGIApp:
    """The shim's ASGI app: the raw /v1 proxy in front of a Starlette app for the rest
    (the control API, /metrics and the operator's page /ui)."""
    if control is None:
        control = ControlAPI(config.models, switcher, lifecycle,
                             has_host=config.checkpoint is not None)
    page = OperatorPage(config, control.status_json, history or SwitchHistory(),
                        log_path=log_path, checkpoints=checkpoints, stopping=stopping)
    created = int(time.time())

    def model_entry(name: str) -> dict[str, Any]:
        st = lifecycle.status(name)
        return {"id": name, "object": "model", "created": created, "owned_by": "llmux",
                "root": config.models[name].model_path, "state": str(st.state),
                "active": switcher.is_active(name)}

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list",
                             "data": [model_entry(name) for name in config.models]})

    async def get_model(request: Request) -> Response:
        name = request.path_params["model"]
        if name not in config.models:
            missing: Response = error_json(ModelNotFound(name, list(config.models)))
            return missing
        return JSONResponse(model_entry(name))

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "active": switcher.active})

    description = openapi_document(list(config.models))

    async def openapi(request: Request) -> Response:
        return Response(description, media_type="application/json")

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        msg = (f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405)
               else str(exc.detail))
        return JSONResponse({"error": {"message": msg, "type": kind, "param": None,
                                       "code": exc.status_code}},
                            status_code=exc.status_code)

    async def shim_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ShimError)
        answer: Response = error_json(exc)
        return answer

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        *control.routes(),
        *page.routes(),
    ]
    rest = Starlette(routes=routes, exception_handlers={HTTPException: http_error,
                                                        ShimError: shim_error})
    return ProxyApp(config, switcher, engines, rest, count=metrics.count)


def openapi_document(models: list[str] | None = None) -> bytes:
    """The shim's OpenAPI description, shipped in the package (shim/openapi.json); with
    ``models``, the names a request may give are theirs (an enum of ModelName)."""
    raw = importlib.resources.files("llmux.shim").joinpath("openapi.json").read_bytes()
    if models is None:
        return raw
    doc = json.loads(raw)
    doc["components"]["schemas"]["ModelName"]["enum"] = sorted(models)
    return json.dumps(doc).encode()


def metrics_app(metrics: ShimMetrics, gate: KeyGate | None = None) -> ASGIApp:
    """The separate Prometheus port: /metrics only (behind ``gate`` with metrics_auth)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        refused = gate.check(scope) if gate is not None else None
        if refused is not None:
            await send_error(send, refused)
            return
        if scope["path"] != "/metrics":
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"only /metrics here\n"})
            return
        body = metrics.render()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE.encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: :func:`serve` owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def uvicorn_config(app: ASGIApp, host: str, port: int, *,
                   header_timeout_secs: float = Config.header_timeout_secs,
                   max_connections: int | None = None, **kw: Any) -> uvicorn.Config:
    """uvicorn as the shim runs it: httptools with header bounds (shim.httpbounds); over
    ``max_connections`` open connections a request is answered 503."""
    return uvicorn.Config(
        app, host=host, port=port, loop="none", http=bounded_protocol(header_timeout_secs),
        lifespan="off", access_log=False, server_header=False, date_header=False,
        log_config=None, timeout_graceful_shutdown=SHUTDOWN_GRACE_SECS, backlog=2048,
        limit_concurrency=max_connections, **kw)


def raise_fd_limit(wanted: int) -> None:
    """Lift the soft RLIMIT_NOFILE towards the hard one: each connection is a file
    descriptor, and systemd's and many containers' soft default (1024) is below
    max_connections; accept() failing with EMFILE would stall every client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("action=fd_limit soft=%d new=%d", soft, target)


class Shim:
    """Every part of the shim, wired together; :func:`serve` and the tests use it."""

    def __init__(self, config: Config) -> None:
        from llmux.shim.lifecycle import Lifecycle
        from llmux.shim.supervisor import Supervisor

        self.config = config
        #: every call to an engine's API: the proxy's, the lifecycle's, the supervisor's
        self.engines = EngineClient(config.models)
        self.supervisor = Supervisor(config, engines=self.engines)
        from llmux.shim.backend import backend_for

        # A [checkpoint] section alone is enough: checkpoints left by an earlier container are
        # then restored on first use instead of cold-starting.
        backend = backend_for(config)
        self.lifecycle: Lifecycle = Lifecycle(config, self.supervisor, backend)
        #: several GPUs (NVML's, or the declared slots): each engine is given its own
        self.placement = Placement(config, host_gpus(config, self.lifecycle.meter.nvml()))
        self.lifecycle.place_on(self.placement)
        self.switcher = Switcher(config, self.lifecycle, memory=self.lifecycle,
                                 placement=self.placement)
        self.control = ControlAPI(config.models, self.switcher, self.lifecycle,
                                  has_host=config.checkpoint is not None)
        switcher = self.switcher
        self.metrics = ShimMetrics(in_flight=switcher.in_flight_all,
                                   queue_depth=lambda: switcher.queue_depth,
                                   active_models=lambda: switcher.active_models,
                                   status=self.control.status_json)
        #: switches and transitions for the operator's page (/ui)
        self.history = SwitchHistory()
        for observer in (self.metrics.observe_transition, self.history.observe_transition):
            self.lifecycle.add_observer(observer)
        for listener in (self.metrics.observe_switch, self.history.observe_switch):
            self.switcher.add_observer(listener)
        self.lifecycle.add_loss_listener(self.switcher.mark_failed)
        self.lifecycle.add_loss_listener(self.history.engine_lost)
        self.app = build_app(config, self.lifecycle, self.switcher, self.engines, self.metrics,
                             control=self.control, history=self.history,
                             checkpoints=HostCheckpoints(config, backend=backend),
                             log_path=self.supervisor.log_path,
                             stopping=lambda: self.servers[0].should_exit)
        bounds: dict[str, Any] = {"header_timeout_secs": config.header_timeout_secs,
                                  "max_connections": config.max_connections}
        self.servers = [_Server(uvicorn_config(self.app, config.host, config.port, **bounds))]
        if config.metrics_port:
            gate = KeyGate(config.auth)
            self.servers.append(_Server(uvicorn_config(
                metrics_app(self.metrics, gate if gate.enabled else None), config.host,
                config.metrics_port, **bounds)))
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::", "") else self.config.host
        return f"http://{host}:{self.config.port}"

    async def start(self) -> None:
        """End the engines a crashed predecessor left, check the strategies
        (lifecycle.start), then listen; raises if a port is taken."""
        raise_fd_limit(self.config.max_connections + FD_HEADROOM)
        await self.supervisor.end_leftovers()
        await self.lifecycle.start()
        self._tasks = [asyncio.create_task(s.serve(), name=f"llmux-uvicorn-{i}")
                       for i, s in enumerate(self.servers)]
        while not all(s.started for s in self.servers):
            if any(t.done() for t in self._tasks):
                await self.stop()
                raise SystemExit(f"llmux: cannot listen on {self.config.host}:"
                                 f"{self.config.port} (or metrics port {self.config.metrics_port})")
            await asyncio.sleep(0.02)
        log.info("action=listening port=%d metrics_port=%d models=%s", self.config.port,
                 self.config.metrics_port, ",".join(self.config.models))

    def request_stop(self) -> None:
        """Stop accepting (a second call cancels what is still in flight)."""
        for s in self.servers:
            if s.should_exit:
                s.force_exit = True
            s.should_exit = True

    async def wait(self) -> None:
        """Until the main server has ended (after :meth:`request_stop`)."""
        if self._tasks:
            await asyncio.wait([self._tasks[0]])

    async def stop(self) -> None:
        """Graceful: finish in-flight requests, 503 the queued ones, stop every engine."""
        if self._stopped:
            return
        self._stopped = True
        self.request_stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.switcher.aclose()
        t0 = time.monotonic()
        await self.lifecycle.aclose()
        await self.supervisor.aclose()
        await self.engines.aclose()
        log.info("action=stopped seconds=%.3f", time.monotonic() - t0)


async def serve(config: Config) -> None:
    """Run the shim until SIGTERM/SIGINT, then shut down gracefully.

    Stop accepting, let in-flight requests finish (SHUTDOWN_GRACE_SECS at most),
    answer still-queued ones with 503, stop every engine.
    """
    shim = Shim(config)
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        log.info("action=shutdown signal=%s", sig.name)
        shim.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await shim.start()
        await shim.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await shim.stop()


def run(config: Config) -> None:
    """Blocking entry for ``llmux serve``: serve() on uvloop, logs on stderr."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        asyncio.run(serve(config))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(config))
