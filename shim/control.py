"""The control API, compatible with the original llmux: sleep, wake, switch, status.

Every action goes through the switcher, so it takes its turn with request
driven switches and drains in-flight requests exactly as they do.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmux.shim.config import (
    EvictionPolicy,
    ModelConfig,
    PolicyError,
    ProcessStrategy,
    WeightStrategy,
)
from llmux.shim.errors import (
    BadRequest,
    ModelNotFound,
    PayloadTooLarge,
    ShimError,
    UnsupportedMediaType,
)
from llmux.shim.switcher import Switcher

log = logging.getLogger("llmux.control")

#: a control request is a model name and a strategy: anything larger is not one
MAX_CONTROL_BODY_BYTES = 65536
#: states in which an engine process of the model exists (worth evicting)
_EVICTABLE = frozenset({"running", "sleeping", "suspended"})


class StatusLike(Protocol):
    @property
    def state(self) -> Any: ...

    def to_json(self) -> dict[str, Any]: ...


class StatusSource(Protocol):
    """What the control API reads from the lifecycle."""

    def status(self, model: str) -> StatusLike: ...

    def statuses(self) -> Mapping[str, StatusLike]: ...


def error_json(err: ShimError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.http_status, headers=dict(err.headers()))


class ControlAPI:
    def __init__(self, models: Mapping[str, ModelConfig], switcher: Switcher,
                 lifecycle: StatusSource, *, has_host: bool = True) -> None:
        """``has_host``: the config has a [checkpoint] section (llmuxd may be used)."""
        self._models = models
        self._has_host = has_host
        self._switcher = switcher
        self._lifecycle = lifecycle

    def routes(self) -> list[Route]:
        return [
            Route("/control/status", self.status, methods=["GET"]),
            Route("/control/sleep", self.sleep, methods=["POST"]),
            Route("/control/wake", self.wake, methods=["POST"]),
            Route("/control/switch", self.switch, methods=["POST"]),
        ]

    # ---------------------------------------------------------------- routes

    def status_json(self) -> dict[str, Any]:
        models: dict[str, Any] = {}
        for name, st in self._lifecycle.statuses().items():
            d = st.to_json()
            d.setdefault("state", str(st.state))
            d.setdefault("pids", [])
            d.setdefault("last_wake", None)
            d.setdefault("memory_mb", None)
            d.setdefault("memory_source", "config")
            m = self._models[name]
            idle = self._switcher.idle_secs(name)
            d["active"] = self._switcher.is_active(name)
            d["in_flight"] = self._switcher.in_flight(name)
            d["queued"] = self._switcher.queued(name)
            d["pinned"] = m.pinned
            d["ttl_secs"] = m.ttl_secs
            d["idle_secs"] = None if idle is None else round(idle, 3)
            d["priority"] = m.priority
            models[name] = d
        return {
            "active": self._switcher.active,
            "active_models": self._switcher.active_models,
            "queue_depth": self._switcher.queue_depth,
            "switching": self._switcher.switching,
            "memory_budget_mb": self._switcher.memory_budget_mb,
            "memory_used_mb": self._switcher.memory_used_mb(),
            "gpus": self._switcher.gpu_usage(),
            "models": models,
        }

    async def status(self, request: Request) -> Response:
        return JSONResponse(self.status_json())

    async def sleep(self, request: Request) -> Response:
        try:
            body = await _json_body(request, allowed={"model", "strategy", "level"})
            model = self._model(body)
            policy = self._policy(model, body)
            lifecycle = self._lifecycle
            result = await self._switcher.sleep(
                model, policy,
                is_running=lambda: str(lifecycle.status(model).state) in _EVICTABLE)
        except ShimError as e:
            return error_json(e)
        out = result.to_json()
        out["state"] = str(self._lifecycle.status(model).state)
        out["strategy"] = str(policy or self._models[model].eviction)
        log.info("model=%s action=control_sleep changed=%s state=%s seconds=%.3f", model,
                 result.changed, out["state"], result.seconds)
        return JSONResponse(out)

    async def wake(self, request: Request) -> Response:
        return await self._wake(request, "wake")

    async def switch(self, request: Request) -> Response:
        return await self._wake(request, "switch")

    async def _wake(self, request: Request, action: str) -> Response:
        try:
            body = await _json_body(request, allowed={"model"})
            model = self._model(body)
            result = await self._switcher.wake(model)
        except ShimError as e:
            return error_json(e)
        out = result.to_json()
        out["action"] = action
        out["state"] = str(self._lifecycle.status(model).state)
        log.info("model=%s action=control_%s changed=%s wake=%s seconds=%.3f", model, action,
                 result.changed, result.wake, result.seconds)
        return JSONResponse(out)

    # ---------------------------------------------------------------- input

    def _model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if model is None or model == "":
            raise ModelNotFound(None, list(self._models))
        if not isinstance(model, str):
            raise BadRequest("`model` must be a string", param="model")
        if model not in self._models:
            raise ModelNotFound(model, list(self._models))
        return model

    def _policy(self, model: str, body: dict[str, Any]) -> EvictionPolicy | None:
        """``strategy``: "offload+keep_running", or {"weights": .., "process": ..}.

        ``level`` (1 or 2, as vLLM's /sleep) is accepted as a shorthand for
        offload or discard with the engine kept running.
        """
        raw = body.get("strategy")
        level = body.get("level")
        if raw is not None and level is not None:
            raise BadRequest("give either `strategy` or `level`, not both", param="strategy")
        if level is not None:
            if level not in (1, 2) or isinstance(level, bool):
                raise BadRequest(f"`level` must be 1 or 2, got {level!r}", param="level")
            w = WeightStrategy.OFFLOAD if level == 1 else WeightStrategy.DISCARD
            return EvictionPolicy(w, ProcessStrategy.KEEP_RUNNING)
        if raw is None:
            return None
        try:
            policy = EvictionPolicy.parse(raw, self._models[model].eviction)
        except PolicyError as e:
            raise BadRequest(e.message, param=f"strategy.{e.key}" if e.key
                             else "strategy") from None
        if policy.needs_host and not self._has_host:
            # refused before anything is evicted: no weights put away for a process
            # strategy that cannot follow
            raise BadRequest(f"the process strategy {policy.process} needs the llmux host "
                             "service (llmuxd), and none is configured (add a [checkpoint] "
                             "section)", param="strategy", code="host_service_not_configured")
        return policy


async def _json_body(request: Request, *, allowed: set[str]) -> dict[str, Any]:
    ctype = request.headers.get("content-type")
    if ctype is not None and ctype.split(";", 1)[0].strip().lower() != "application/json":
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {ctype!r}")
    raw = await request.body()
    if len(raw) > MAX_CONTROL_BODY_BYTES:
        raise PayloadTooLarge(f"control request body is {len(raw)} bytes, above "
                              f"{MAX_CONTROL_BODY_BYTES}", code="payload_too_large")
    try:
        body = json.loads(raw) if raw else None
    except ValueError as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest('the request body must be a JSON object like {"model": "NAME"}')
    unknown = set(body) - allowed
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))} "
                         f"(allowed: {', '.join(sorted(allowed))})")
    return body
