"""Prometheus metrics of the shim, in a registry of its own.

Per-request counts are plain dict increments on the hot path; a custom
collector turns them (and the switcher's live in-flight and queue figures)
into series only when /metrics is scraped. Rare events (switches, sleep/wake
transitions, engine restarts) use prometheus-client's own types directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmux.shim.transitions import Action, Switch

log = logging.getLogger("llmux.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0,
            1800.0)


class _Live(Collector):
    def __init__(self, metrics: ShimMetrics) -> None:
        self._m = metrics

    def describe(self) -> Iterator[Metric]:
        """The names only, so that registering does not read live state yet."""
        yield CounterMetricFamily("llmux_requests", "", labels=["model", "status"])
        yield GaugeMetricFamily("llmux_requests_in_flight", "", labels=["model"])
        yield GaugeMetricFamily("llmux_queue_depth", "")
        yield GaugeMetricFamily("llmux_model_active", "", labels=["model"])
        if self._m.status is not None:
            for name, (doc, labels) in _MEMORY_GAUGES.items():
                yield GaugeMetricFamily(name, doc, labels=labels)

    def collect(self) -> Iterator[Metric]:
        m = self._m
        req = CounterMetricFamily("llmux_requests", "Proxied /v1 requests by model and status",
                                  labels=["model", "status"])
        for (model, status), n in list(m.requests.items()):
            req.add_metric([model, str(status)], n)
        yield req
        in_flight = m.in_flight()
        g = GaugeMetricFamily("llmux_requests_in_flight", "Requests being served, by model",
                              labels=["model"])
        for model, n in in_flight.items():
            g.add_metric([model], n)
        yield g
        yield GaugeMetricFamily("llmux_queue_depth", "Requests waiting for their model",
                                value=m.queue_depth())
        active = GaugeMetricFamily("llmux_model_active", "1 while the model may serve",
                                   labels=["model"])
        current = set(m.active_models())
        for model in in_flight:
            active.add_metric([model], 1 if model in current else 0)
        yield active
        if m.status is not None:
            yield from _memory_gauges(m.status())


#: the memory and scheduling figures of /control/status, as gauges
_MEMORY_GAUGES: dict[str, tuple[str, list[str]]] = {
    "llmux_memory_budget_mb": ("[policy] memory_budget_mb (0: off)", []),
    "llmux_memory_used_mb": ("Memory the resident models use, as measured", []),
    "llmux_model_memory_mb": ("The model's measured memory, by source (nvml or pss)",
                              ["model", "source"]),
    "llmux_model_pinned": ("1 if the model is never evicted by a switch, budget or TTL",
                           ["model"]),
    "llmux_model_ttl_secs": ("Idle seconds after which the model is evicted (0: never)",
                             ["model"]),
    "llmux_model_idle_secs": ("Seconds since the model's last request ended", ["model"]),
    "llmux_model_priority": ("The model's priority past max_wait_secs", ["model"]),
    "llmux_model_gpu": ("1 for each GPU the model's engine is on or was last given",
                        ["model", "gpu"]),
    "llmux_gpu_memory_used_mb": ("Memory the resident models count on the GPU", ["gpu"]),
    "llmux_gpu_memory_budget_mb": ("memory_budget_mb of each GPU (0: off)", ["gpu"]),
    "llmux_gpu_models": ("Resident models on the GPU", ["gpu"]),
}


def _memory_gauges(status: Mapping[str, Any]) -> Iterator[Metric]:
    g = {name: GaugeMetricFamily(name, doc, labels=labels)
         for name, (doc, labels) in _MEMORY_GAUGES.items()}
    g["llmux_memory_budget_mb"].add_metric([], status.get("memory_budget_mb") or 0)
    g["llmux_memory_used_mb"].add_metric([], status.get("memory_used_mb") or 0)
    for model, d in status.get("models", {}).items():
        if d.get("memory_mb") is not None:
            g["llmux_model_memory_mb"].add_metric([model, str(d.get("memory_source"))],
                                                  d["memory_mb"])
        g["llmux_model_pinned"].add_metric([model], 1 if d.get("pinned") else 0)
        g["llmux_model_ttl_secs"].add_metric([model], d.get("ttl_secs") or 0)
        if d.get("idle_secs") is not None:
            g["llmux_model_idle_secs"].add_metric([model], d["idle_secs"])
        g["llmux_model_priority"].add_metric([model], d.get("priority") or 0)
        for gpu in d.get("gpus") or ():
            g["llmux_model_gpu"].add_metric([model, str(gpu)], 1)
    for gpu in status.get("gpus") or ():
        label = [str(gpu["index"])]
        g["llmux_gpu_memory_used_mb"].add_metric(label, gpu["memory_used_mb"])
        g["llmux_gpu_memory_budget_mb"].add_metric(label, gpu["memory_budget_mb"])
        g["llmux_gpu_models"].add_metric(label, len(gpu["models"]))
    yield from g.values()


class ShimMetrics:
    """The shim's metrics; feed it from the proxy, the switcher and the lifecycle."""

    def __init__(self, *, in_flight: Callable[[], Mapping[str, int]],
                 queue_depth: Callable[[], int],
                 active_models: Callable[[], list[str]],
                 status: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        #: /control/status's figures (memory, pinned, ttl_secs, idle_secs, priority)
        self.status = status
        self.requests: dict[tuple[str, int], int] = {}
        self.in_flight = in_flight
        self.queue_depth = queue_depth
        self.active_models = active_models
        self.registry.register(_Live(self))
        self.switch_seconds = Histogram(
            "llmux_switch_duration_seconds", "Switching the active model (evict + activate)",
            ["model", "outcome"], buckets=_BUCKETS, registry=self.registry)
        self.sleep_seconds = Histogram(
            "llmux_sleep_duration_seconds", "Putting a model away, by eviction strategy",
            ["model", "strategy"], buckets=_BUCKETS, registry=self.registry)
        self.wake_seconds = Histogram(
            "llmux_wake_duration_seconds", "Bringing a model back, by strategy",
            ["model", "strategy"], buckets=_BUCKETS, registry=self.registry)
        self.transition_seconds = Histogram(
            "llmux_transition_duration_seconds", "Every lifecycle transition, by action",
            ["model", "action", "strategy"], buckets=_BUCKETS, registry=self.registry)
        self.engine_restarts = Counter(
            "llmux_engine_restarts", "Engines started again after dying",
            ["model"], registry=self.registry)

    # hot path: one dict update
    def count(self, model: str, status: int) -> None:
        key = (model, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def observe_switch(self, switch: Switch) -> None:
        """A switcher ``SwitchObserver``."""
        self.switch_seconds.labels(switch.target, switch.outcome).observe(switch.seconds)

    def observe_transition(self, model: str, action: Action, strategy: str,
                           seconds: float) -> None:
        """A lifecycle ``TransitionObserver``."""
        self.transition_seconds.labels(model, action.value, strategy).observe(seconds)
        if action.puts_away:
            self.sleep_seconds.labels(model, strategy).observe(seconds)
        elif action.brings_back:
            self.wake_seconds.labels(model, strategy).observe(seconds)
        if action is Action.RESTART:
            self.engine_restarted(model)
        log.info("model=%s action=%s strategy=%s seconds=%.3f", model, action, strategy,
                 seconds)

    def engine_restarted(self, model: str) -> None:
        self.engine_restarts.labels(model).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
