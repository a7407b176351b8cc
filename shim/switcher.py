"""Which model may serve now: admission, FIFO switching, drain and anti-thrashing.

Requests for an active model are admitted at once (a counter, no await): that
is the hot path. Any other request waits in one arrival-ordered queue; the
oldest waiter names the next model to switch to. A switch marks the model to
evict as closing (nothing new is admitted for it), waits for its in-flight
requests when ``drain_before_switch`` is set, evicts it, activates the target
and admits every request waiting for the target at once. A model that became
active less than ``min_active_secs`` ago is not evicted, and keeps admitting
its requests meanwhile, so two busy models do not thrash. Only one switch or
control action runs at a time; every decision is taken synchronously in
:meth:`Switcher._kick`, so there is no lock on the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from llmux.shim.config import Config, EvictionPolicy
from llmux.shim.errors import (
    HostRefused,
    ModelNotFound,
    RequestTimeout,
    ServiceUnavailable,
    ShimError,
)

log = logging.getLogger("llmux.switcher")


class SwitchTarget(Protocol):
    """The part of :class:`llmux.shim.lifecycle.Lifecycle` the switcher drives."""

    async def activate(self, model: str) -> Any: ...

    async def evict(self, model: str, policy: EvictionPolicy | None = None) -> Any: ...


#: (from_model or None, to_model, seconds, ok)
SwitchObserver = Callable[[str | None, str, float, bool], None]


class _Slot:
    __slots__ = ("active", "active_since", "closing", "in_flight", "last_switch_secs",
                 "last_wake", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.active = False
        self.active_since = 0.0
        self.closing = False  # being evicted: admit nothing new
        self.in_flight = 0
        self.last_wake: str | None = None
        self.last_switch_secs: float | None = None


class _Waiter:
    __slots__ = ("future", "model", "since", "timer")

    def __init__(self, model: str, future: asyncio.Future[None], since: float) -> None:
        self.model = model
        self.future = future
        self.since = since
        self.timer: asyncio.TimerHandle | None = None


@dataclass(frozen=True)
class ActionResult:
    """What a control action did, for the control API's answer."""

    model: str
    action: str
    changed: bool
    seconds: float
    state: str | None = None
    wake: str | None = None
    evicted: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "action": self.action,
                               "changed": self.changed, "seconds": round(self.seconds, 6)}
        if self.state is not None:
            out["state"] = self.state
        if self.action != "sleep":
            out["wake"] = self.wake
        if self.evicted is not None:
            out["evicted"] = self.evicted
        return out


class Switcher:
    def __init__(self, config: Config, target: SwitchTarget, *,
                 on_switch: SwitchObserver | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._target = target
        self._on_switch = on_switch
        self._clock = clock
        self._slots = {name: _Slot(name) for name in config.models}
        self._queue: dict[_Waiter, None] = {}  # insertion-ordered: arrival order
        self._busy = False  # a switch or control action is running
        self._not_busy = asyncio.Event()
        self._not_busy.set()
        self._drained = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        #: the active model being drained for a switch (admits nothing new meanwhile)
        self._draining: _Slot | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._max_active = config.max_active
        self._min_active = config.policy.min_active_secs
        self._drain = config.policy.drain_before_switch
        self._timeout = config.policy.request_timeout_secs
        self.switches = 0

    # ------------------------------------------------------------------ views

    @property
    def active(self) -> str | None:
        """The active model (the first one, when max_active > 1)."""
        for s in self._slots.values():
            if s.active:
                return s.name
        return None

    @property
    def active_models(self) -> list[str]:
        return [s.name for s in self._slots.values() if s.active]

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def queued(self, model: str) -> int:
        return sum(1 for w in self._queue if w.model == model)

    def in_flight(self, model: str) -> int:
        return self._slots[model].in_flight

    def in_flight_all(self) -> dict[str, int]:
        return {name: s.in_flight for name, s in self._slots.items()}

    def is_active(self, model: str) -> bool:
        return self._slots[model].active

    @property
    def switching(self) -> bool:
        return self._busy

    def last_wake(self, model: str) -> str | None:
        return self._slots[model].last_wake

    # --------------------------------------------------------------- admission

    def try_enter(self, model: str) -> bool:
        """Admit at once if the model is serving; the proxy's hot path."""
        s = self._slots[model]
        if s.active and not s.closing and (
            not self._queue or self._clock() - s.active_since < self._min_active
        ):
            s.in_flight += 1
            return True
        return False

    async def enter(self, model: str, max_wait: float | None = -1.0) -> None:
        """Wait until ``model`` serves and count one request in flight.

        ``max_wait`` defaults to ``request_timeout_secs``; None waits for ever.
        Raises RequestTimeout (504) or ServiceUnavailable (503).
        """
        s = self._slots.get(model)
        if s is None:
            raise ModelNotFound(model, list(self._slots))
        if self.try_enter(model):
            return
        if self._closed:
            raise ServiceUnavailable("the shim is shutting down", code="shutting_down")
        loop = asyncio.get_running_loop()
        w = _Waiter(model, loop.create_future(), self._clock())
        limit = self._timeout if max_wait is not None and max_wait < 0 else max_wait
        if limit is not None:
            w.timer = loop.call_later(limit, self._expire, w, limit)
        self._queue[w] = None
        self._kick()
        try:
            await w.future
        except asyncio.CancelledError:
            # the client went away while waiting; if it was admitted meanwhile, undo it
            if w.future.done() and not w.future.cancelled() and w.future.exception() is None:
                self.leave(model)
            self._forget(w)
            raise
        finally:
            if w.timer is not None:
                w.timer.cancel()

    def leave(self, model: str) -> None:
        s = self._slots[model]
        s.in_flight -= 1
        if s.in_flight == 0 and (s.closing or self._queue):
            self._drained.set()
            self._kick()

    @contextlib.asynccontextmanager
    async def acquire(self, model: str, max_wait: float | None = -1.0) -> AsyncIterator[None]:
        """``async with switcher.acquire(model):`` holds one in-flight slot."""
        await self.enter(model, max_wait)
        try:
            yield
        finally:
            self.leave(model)

    def mark_failed(self, model: str) -> None:
        """The model's engine is gone (connection refused): activate it again next time."""
        s = self._slots[model]
        if s.active and not s.closing:
            log.warning("model=%s action=engine_lost active=false", model)
            s.active = False
            self._kick()

    # -------------------------------------------------------------- scheduling

    def _expire(self, w: _Waiter, limit: float) -> None:
        if w.future.done():
            return
        active = ", ".join(self.active_models) or "none"
        w.future.set_exception(RequestTimeout(
            f"model `{w.model}` was not ready within request_timeout_secs={limit:g} "
            f"(active: {active}; {len(self._queue) - 1} other request(s) waiting)",
            code="request_timeout"))
        self._forget(w)

    def _forget(self, w: _Waiter) -> None:
        if self._queue.pop(w, 0) is None:
            self._kick()

    def _kick(self) -> None:
        """Admit what can be admitted; start the next switch if one is due."""
        if self._closed:
            return
        if self._draining is not None and not self._draining.active:
            self._draining = None  # evicted meanwhile (a control sleep)
        now = self._clock()
        slots = self._slots
        other_waiting = False
        head: _Waiter | None = None
        for w in list(self._queue):
            if w.future.done():
                del self._queue[w]
                continue
            s = slots[w.model]
            if s.active and not s.closing and (
                not other_waiting or now - s.active_since < self._min_active
            ):
                s.in_flight += 1
                w.future.set_result(None)
                del self._queue[w]
                continue
            if not s.active:
                other_waiting = True
                if head is None:
                    head = w
        if head is None:
            victim = self._draining
            if victim is not None and not self._busy:
                # nobody waits for another model any more (they timed out or left):
                # the model being drained serves again instead of being evicted for nothing
                self._draining = None
                victim.closing = False
                log.info("model=%s action=drain_cancelled", victim.name)
                if self._queue:
                    self._kick()
            return
        if self._busy:
            return
        active = [s for s in slots.values() if s.active]
        if len(active) < self._max_active:
            self._start(None, head.model)
            return
        # a victim: the one being drained, else the longest-active one past min_active
        victim = self._draining
        if victim is None:
            victim = min(active, key=lambda s: s.active_since)
            wait = victim.active_since + self._min_active - now
            if wait > 0:
                if self._timer is None:
                    self._timer = asyncio.get_running_loop().call_later(wait, self._tick)
                return
            victim.closing = True
            self._draining = victim
            log.info("model=%s action=drain in_flight=%d next=%s", victim.name,
                     victim.in_flight, head.model)
        if self._drain and victim.in_flight > 0:
            return  # leave() kicks again when it reaches 0
        self._draining = None
        self._start(victim.name, head.model)

    def _tick(self) -> None:
        self._timer = None
        self._kick()

    def _begin(self) -> None:
        self._busy = True
        self._not_busy.clear()

    def _end(self) -> None:
        self._busy = False
        self._not_busy.set()
        self._kick()

    def _start(self, victim: str | None, target: str) -> None:
        self._begin()
        self._task = asyncio.get_running_loop().create_task(
            self._switch(victim, target), name=f"llmux-switch-{target}")

    async def _switch(self, victim: str | None, target: str) -> None:
        t0 = self._clock()
        ok = False
        try:
            if victim is not None:
                await self._evict(victim, None)
            ok = await self._activate(target)
        except BaseException:  # cancelled at shutdown: nothing may stay busy
            self._fail_waiters(target, ServiceUnavailable(
                f"switching to model `{target}` was interrupted", code="switch_failed"))
            raise
        finally:
            seconds = self._clock() - t0
            self.switches += 1
            if self._on_switch is not None:
                self._on_switch(victim, target, seconds, ok)
            log.info("model=%s action=switch from=%s ok=%s seconds=%.3f", target,
                     victim or "-", ok, seconds)
            self._end()

    async def _evict(self, name: str, policy: EvictionPolicy | None, *,
                     strict: bool = False) -> Any:
        """Evict; ``strict`` re-raises (the model is untouched: a refused policy)."""
        s = self._slots[name]
        s.closing = True
        t0 = self._clock()
        try:
            state = await self._target.evict(name, policy)
        except Exception as e:
            s.closing = False
            if strict:
                raise
            # the lifecycle escalates failures to stop itself; this is the unexpected rest
            log.error("model=%s action=evict error=%r", name, e)
            state = None
        s.active = False
        s.closing = False
        log.info("model=%s action=evict state=%s seconds=%.3f", name, state,
                 self._clock() - t0)
        return state

    async def _activate(self, name: str) -> bool:
        s = self._slots[name]
        t0 = self._clock()
        try:
            kind = await self._target.activate(name)
        except Exception as e:
            msg = e.message if isinstance(e, ShimError) else f"{type(e).__name__}: {e}"
            log.error("model=%s action=activate error=%s", name, msg)
            err = ServiceUnavailable(f"switching to model `{name}` failed: {msg}",
                                     code="switch_failed")
            if isinstance(e, HostRefused):  # the host service's own error: its status
                err.http_status, err.error_type = e.http_status, e.error_type
            self._fail_waiters(name, err)
            return False
        s.active = True
        s.closing = False
        s.active_since = self._clock()
        s.last_wake = None if kind is None else str(kind)
        s.last_switch_secs = s.active_since - t0
        log.info("model=%s action=activate wake=%s seconds=%.3f", name, s.last_wake,
                 s.last_switch_secs)
        return True

    def _fail_waiters(self, model: str, error: ShimError) -> None:
        for w in list(self._queue):
            if w.model == model:
                if not w.future.done():
                    w.future.set_exception(error)
                del self._queue[w]

    # --------------------------------------------------------- control actions

    async def _exclusive(self) -> None:
        while self._busy:
            await self._not_busy.wait()
        self._begin()

    async def sleep(self, model: str, policy: EvictionPolicy | None = None,
                    *, is_running: Callable[[], bool] | None = None) -> ActionResult:
        """Evict ``model`` now (draining it first), whatever min_active_secs says."""
        s = self._slot(model)
        await self._exclusive()
        t0 = self._clock()
        try:
            running = s.active or (is_running is not None and is_running())
            if not running:
                return ActionResult(model, "sleep", False, 0.0)
            s.closing = True
            if self._drain:
                while s.in_flight > 0:
                    self._drained.clear()
                    await self._drained.wait()
            state = await self._evict(model, policy, strict=True)
            return ActionResult(model, "sleep", True, self._clock() - t0,
                                state=None if state is None else str(state))
        finally:
            s.closing = False
            self._end()

    async def wake(self, model: str, max_wait: float | None = None) -> ActionResult:
        """Make ``model`` active through the normal queue (FIFO, min_active, drain)."""
        s = self._slot(model)
        was_active = s.active and not s.closing
        before = self.active_models
        switches = self.switches
        t0 = self._clock()
        await self.enter(model, max_wait)
        self.leave(model)
        changed = not was_active and self.switches != switches
        evicted = next((m for m in before if m != model and not self._slots[m].active), None)
        return ActionResult(model, "wake", changed, self._clock() - t0,
                            wake=s.last_wake if changed else None, evicted=evicted)

    def _slot(self, model: str) -> _Slot:
        """The model's slot (the control API checked the request's `model` already)."""
        s = self._slots.get(model)
        if s is None:
            raise ModelNotFound(model, list(self._slots))
        return s

    async def aclose(self) -> None:
        """Refuse new waiters; answer the queued ones with 503."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        err = ServiceUnavailable("the shim is shutting down", code="shutting_down")
        for w in list(self._queue):
            if not w.future.done():
                w.future.set_exception(err)
        self._queue.clear()
        task = self._task
        if task is not None and not task.done():
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(task), timeout=60)

