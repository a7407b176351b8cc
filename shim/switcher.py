"""Which model may serve now: admission, scheduling, drain, memory budget and TTL.

Requests for a serving model are admitted at once (a counter, no await, no lock): that
is the hot path. Any other request waits in one arrival-ordered queue. Scheduling
batches per model: while the serving model has requests in flight or arriving, they are
all admitted, up to the engine's concurrency (--max-num-seqs); the switcher moves on
when that model is idle, or when the oldest request waiting for another model has waited
``max_wait_secs`` (the starvation bound). Among waiting models the one whose oldest
request is oldest goes first; among models past their bound, higher ``priority`` first.
``max_wait_secs = 0`` is strict arrival order: the serving model stops admitting as soon
as another model's request waits. A model that became active less than
``min_active_secs`` ago is not evicted meanwhile.

Which models stay resident: ``max_active`` of them, or, with ``memory_budget_mb``, as
many as their measured memory allows; a model that does not fit evicts the least
recently used models that are not pinned. Before a model is brought up the free memory
of its device is checked (admission): when it is short, more models are evicted or its
requests get a 503 naming the shortfall. An idle model past its ``ttl_secs`` is evicted.
With several GPUs (llmux.shim.placement) each GPU is such a slot: the placement picks the
GPUs a model comes up on and the victims there; the decision is still taken here, in
``_kick``, one at a time.

A switch marks its victims closing (nothing new is admitted for them), waits for their
in-flight requests when ``drain_before_switch`` is set, evicts them, activates the
target and admits every request waiting for it. Only one switch or control action runs
at a time; every decision is taken synchronously in :meth:`Switcher._kick`. Each switch
ends with one :class:`~llmux.shim.transitions.Switch` to the observers (the metrics, the
page): what was put away and how, what came back and how, made of what ``evict`` and
``activate`` answered, with their times.
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
    NoRoom,
    RequestTimeout,
    ServiceUnavailable,
    ShimError,
)
from llmux.shim.memory import FreeMemory
from llmux.shim.placement import Placement
from llmux.shim.transitions import BroughtBack, PutAway, Switch, WakeKind

log = logging.getLogger("llmux.switcher")


class SwitchTarget(Protocol):
    """The part of :class:`llmux.shim.lifecycle.Lifecycle` the switcher drives."""

    async def activate(self, model: str) -> WakeKind | None:
        """How the model came back; None when it was running already."""
        ...

    async def evict(self, model: str, policy: EvictionPolicy | None = None) -> object:
        """The state it ended in."""
        ...


class MemoryView(Protocol):
    """The lifecycle's memory figures (it owns them; llmux.shim.memory measures them)."""

    def memory_mb(self, model: str) -> int:
        """What the model uses when running: measured, else its config estimate (0)."""
        ...

    def memory_source(self, model: str) -> str: ...

    async def admission(self, model: str) -> tuple[int, FreeMemory]:
        """(MiB the model still needs to come up, the free memory of its device)."""
        ...

    async def measure(self, model: str) -> Any: ...


#: called with each switch once it has ended
SwitchObserver = Callable[[Switch], None]


#: how often idle models are checked against their ttl_secs
HOUSEKEEPING_SECS = 0.5
#: resident models are measured again every this many housekeeping rounds
_MEASURE_EVERY = 10
#: no concurrency bound known
_UNBOUNDED = 1 << 62


class _Slot:
    __slots__ = ("active", "active_since", "closing", "in_flight", "last_used", "limit", "name",
                 "pinned", "priority", "ttl")

    def __init__(self, name: str, *, limit: int | None = None, pinned: bool = False,
                 priority: int = 0, ttl: float = 0.0) -> None:
        self.name = name
        self.active = False
        self.active_since = 0.0
        self.closing = False  # being evicted: admit nothing new
        self.in_flight = 0
        self.limit = limit or _UNBOUNDED
        self.pinned = pinned
        self.priority = priority
        self.ttl = ttl
        #: when its last request ended (or it became active); None: never active
        self.last_used: float | None = None

    def lru_key(self) -> tuple[bool, float]:
        """Busy models count as used now; the rest by when their last request ended."""
        return self.in_flight > 0, self.last_used or 0.0


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
                 memory: MemoryView | None = None,
                 on_switch: SwitchObserver | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 placement: Placement | None = None) -> None:
        self._config = config
        #: several GPUs: max_active and the budget are per GPU (llmux.shim.placement)
        self._placement = placement if placement is not None and placement.enabled else None
        self._target = target
        self._memory = memory
        self._observers: list[SwitchObserver] = [] if on_switch is None else [on_switch]
        #: the evictions of the switch running now (one switch at a time); None between
        self._put_away: list[PutAway] | None = None
        #: each model's last bring-up by a switch
        self._brought_back: dict[str, BroughtBack] = {}
        self._clock = clock
        self._slots = {name: _Slot(name, limit=m.max_concurrency, pinned=m.pinned,
                                   priority=m.priority, ttl=m.ttl_secs)
                       for name, m in config.models.items()}
        self._queue: dict[_Waiter, None] = {}  # insertion-ordered: arrival order
        self._busy = False  # a switch or control action is running
        self._not_busy = asyncio.Event()
        self._not_busy.set()
        self._drained = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._housekeeper: asyncio.TimerHandle | None = None
        self._rounds = 0
        #: the active models being drained for a switch (they admit nothing new meanwhile)
        self._draining: list[_Slot] = []
        self._task: asyncio.Task[None] | None = None
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        policy = config.policy
        self._max_active = config.max_active
        self._min_active = policy.min_active_secs
        self._max_wait = policy.max_wait_secs
        #: batching per model (max_wait_secs > 0), else strict arrival order
        self._batching = policy.max_wait_secs > 0
        self._budget = policy.memory_budget_mb if memory is not None else 0
        self._drain = policy.drain_before_switch
        self._timeout = policy.request_timeout_secs
        self._ttl_models = any(sl.ttl > 0 and not sl.pinned for sl in self._slots.values())
        self.switches = 0
        #: evictions by the memory budget, by admission and by ttl_secs
        self.evictions = 0
        #: the longest any admitted request waited in the queue (the benchmark reads it)
        self.longest_wait_secs = 0.0

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

    def add_observer(self, observer: SwitchObserver) -> None:
        """Called with each :class:`Switch` once it has ended."""
        self._observers.append(observer)

    def idle_secs(self, model: str) -> float | None:
        """Seconds since the model's last request ended; 0 while it serves one; None
        before it was ever active."""
        s = self._slots[model]
        if s.in_flight > 0:
            return 0.0
        if s.last_used is None:
            return None
        return max(0.0, self._clock() - s.last_used)

    @property
    def memory_budget_mb(self) -> int:
        return self._budget

    def gpu_usage(self) -> list[dict[str, Any]]:
        """Each GPU's resident models and memory; [] without placement."""
        p = self._placement
        if p is None:
            return []
        mem = self._memory
        return p.usage(self.active_models, mem.memory_mb if mem is not None else _zero,
                       self._budget)

    def memory_used_mb(self) -> int:
        """What the resident (active) models use: their measured memory."""
        if self._memory is None:
            return 0
        return sum(self._memory.memory_mb(s.name) for s in self._slots.values() if s.active)

    # --------------------------------------------------------------- admission

    def try_enter(self, model: str) -> bool:
        """Admit at once if the model is serving; the proxy's hot path."""
        s = self._slots[model]
        if s.active and not s.closing and s.in_flight < s.limit and (
            self._batching or not self._queue
            or self._clock() - s.active_since < self._min_active
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
        n = s.in_flight
        if n == 0:
            s.last_used = self._clock()
            if s.closing or self._queue:
                self._drained.set()
                self._kick()
        elif n + 1 == s.limit and self._queue:
            self._kick()  # a place freed up for a request waiting for the engine's concurrency

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
        if self._draining and not all(v.active for v in self._draining):
            # evicted meanwhile (a control sleep): the rest serve again
            for v in self._draining:
                v.closing = False
            self._draining = []
        now = self._clock()
        slots = self._slots
        other_waiting = False
        heads: dict[str, _Waiter] = {}  # the oldest waiter of each model not serving
        for w in list(self._queue):
            if w.future.done():
                del self._queue[w]
                continue
            s = slots[w.model]
            if s.active and not s.closing and s.in_flight < s.limit and (
                self._batching or not other_waiting or now - s.active_since < self._min_active
            ):
                s.in_flight += 1
                w.future.set_result(None)
                del self._queue[w]
                if now - w.since > self.longest_wait_secs:
                    self.longest_wait_secs = now - w.since
                continue
            if not s.active:
                other_waiting = True
                if w.model not in heads:
                    heads[w.model] = w
        if not heads:
            if self._draining and not self._busy:
                # nobody waits for another model any more (they timed out or left):
                # the models being drained serve again instead of being evicted for nothing
                for v in self._draining:
                    v.closing = False
                    log.info("model=%s action=drain_cancelled", v.name)
                self._draining = []
                if self._queue:
                    self._kick()
            return
        if self._busy:
            return
        head = self._pick(heads, now)
        target = slots[head.model]
        victims = self._draining
        if not victims:
            planned = self._plan(target)
            if planned is None:
                self._kick()  # the target's waiters were answered; others may wait
                return
            if not planned:
                self._start([], target.name)
                return
            wait = max(v.active_since + self._min_active for v in planned) - now
            if wait > 0:
                self._wake_in(wait)
                return
            due = (not self._batching or now - head.since >= self._max_wait
                   or all(v.in_flight == 0 for v in planned))
            if not due:
                oldest = min(heads.values(), key=lambda w: w.since)
                self._wake_in(oldest.since + self._max_wait - now)
                return
            for v in planned:
                v.closing = True
                log.info("model=%s action=drain in_flight=%d next=%s", v.name, v.in_flight,
                         target.name)
            victims = self._draining = planned
        if self._drain and any(v.in_flight > 0 for v in victims):
            return  # leave() kicks again when each reaches 0
        self._draining = []
        self._start([v.name for v in victims], target.name)

    def _pick(self, heads: dict[str, _Waiter], now: float) -> _Waiter:
        """The model to switch to: past their bound, by priority then age; else by age."""
        late = [w for w in heads.values() if now - w.since >= self._max_wait]
        if late:
            return max(late, key=lambda w: (self._slots[w.model].priority, -w.since))
        return min(heads.values(), key=lambda w: w.since)

    def _evictable(self, but: _Slot | None = None) -> list[_Slot]:
        """Resident models a switch or the budget may evict, least recently used first."""
        return sorted((s for s in self._slots.values()
                       if s.active and not s.pinned and s is not but),
                      key=_Slot.lru_key)

    def _plan(self, target: _Slot) -> list[_Slot] | None:
        """The models to evict so that ``target`` fits (max_active, or the memory budget);
        None when it cannot fit at all (its waiters are answered with the reason)."""
        active = [s for s in self._slots.values() if s.active]
        if self._placement is not None:
            return self._plan_placed(target, active)
        if self._budget and self._memory is not None:
            mem = self._memory
            need = mem.memory_mb(target.name)
            if need > self._budget:
                self._fail_waiters(target.name, NoRoom(
                    f"model `{target.name}` needs {need} MiB "
                    f"({_source_words(mem.memory_source(target.name))}), more than "
                    f"memory_budget_mb = {self._budget} MiB by itself",
                    code="model_exceeds_budget"))
                return None
            used = sum(mem.memory_mb(s.name) for s in active)
            victims: list[_Slot] = []
            for s in self._evictable():
                if used + need <= self._budget:
                    break
                victims.append(s)
                used -= mem.memory_mb(s.name)
            if used + need > self._budget:
                pinned = [s.name for s in active if s.pinned]
                self._fail_waiters(target.name, NoRoom(
                    f"model `{target.name}` needs {need} MiB but the pinned model(s) "
                    f"{', '.join(pinned)} keep {used} MiB of memory_budget_mb = "
                    f"{self._budget} MiB", code="memory_budget_pinned"))
                return None
            return victims
        if len(active) < self._max_active:
            return []
        evictable = self._evictable()
        if not evictable:
            self._fail_waiters(target.name, NoRoom(
                f"model `{target.name}` cannot be activated: max_active = {self._max_active} "
                f"and every active model is pinned ({', '.join(s.name for s in active)})",
                code="all_pinned"))
            return None
        return evictable[:len(active) - self._max_active + 1]

    def _plan_placed(self, target: _Slot, active: list[_Slot]) -> list[_Slot] | None:
        """_plan over several GPUs: the placement picks the GPUs and the victims there."""
        assert self._placement is not None
        mem = self._memory
        try:
            plan = self._placement.plan(
                target.name, active, memory_mb=mem.memory_mb if mem is not None else _zero,
                budget=self._budget, max_active=self._max_active)
        except NoRoom as e:
            self._fail_waiters(target.name, e)
            return None
        return [self._slots[v] for v in plan.victims]

    def _wake_in(self, delay: float) -> None:
        """Kick again in ``delay`` seconds (one timer: the earliest wins)."""
        due = self._clock() + delay
        if self._timer is not None:
            if self._timer_due <= due:
                return
            self._timer.cancel()
        self._timer_due = due
        self._timer = asyncio.get_running_loop().call_later(max(delay, 0.0), self._tick)

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

    def _start(self, victims: list[str], target: str) -> None:
        self._begin()
        self._task = asyncio.get_running_loop().create_task(
            self._switch(victims, target), name=f"llmux-switch-{target}")

    async def _switch(self, victims: list[str], target: str) -> None:
        t0 = self._clock()
        ok = False
        put_away: list[PutAway] = []
        self._put_away = put_away
        self._brought_back.pop(target, None)
        try:
            for victim in victims:
                await self._evict(victim, None)
            ok = await self._bring_up(target)
        except BaseException:  # cancelled at shutdown: nothing may stay busy
            self._fail_waiters(target, ServiceUnavailable(
                f"switching to model `{target}` was interrupted", code="switch_failed"))
            raise
        finally:
            self._put_away = None
            self.switches += 1
            done = Switch(target=target, put_away=tuple(put_away),
                          brought_back=self._brought_back.get(target) if ok else None,
                          seconds=self._clock() - t0, ok=ok, at=time.time(),
                          waiting=len(self._queue))
            log.info("model=%s action=switch from=%s ok=%s seconds=%.3f", target,
                     ",".join(victims) or "-", ok, done.seconds)
            for observer in list(self._observers):
                try:
                    observer(done)
                except Exception:
                    log.exception("switch observer %r failed", observer)
            self._end()

    async def _bring_up(self, target: str) -> bool:
        """Admission, activation, then the budget with the model's measured memory."""
        if self._memory is not None:
            try:
                await self._make_room(target)
            except ShimError as e:
                log.error("model=%s action=admission error=%s", target, e.message)
                self._fail_waiters(target, e)
                return False
        if not await self._activate(target):
            return False
        if self._budget and self._memory is not None:
            return await self._fit_budget(target)
        return True

    async def _make_room(self, target: str) -> None:
        """Evict least recently used models until the device has what ``target`` needs;
        raise ServiceUnavailable naming the shortfall when evicting cannot cover it."""
        mem = self._memory
        assert mem is not None
        while True:
            need, free = await mem.admission(target)
            if need <= free.mb:
                return
            short = need - free.mb
            candidates = self._evictable(but=self._slots[target])
            p = self._placement
            if p is not None:  # only models on the target's GPUs free memory there
                candidates = [s for s in candidates if p.shares_gpu(s.name, target)]
            freeable = sum(mem.memory_mb(s.name) for s in candidates)
            if not candidates or freeable < short:
                also = (f"; evicting the resident model(s) "
                        f"{', '.join(s.name for s in candidates)} would free only "
                        f"{freeable} MiB" if candidates else "")
                raise ServiceUnavailable(
                    f"not enough memory for model `{target}`: it needs {need} MiB, "
                    f"{free.what} is {free.mb} MiB, short by {short} MiB{also}",
                    code="insufficient_memory")
            log.info("model=%s action=admission short_mb=%d evict=%s", target, short,
                     candidates[0].name)
            await self._drain_and_evict(candidates[0], f"admission of {target}")

    async def _fit_budget(self, target: str) -> bool:
        """After a start: the measured memory replaces the estimate; evict what no longer
        fits (least recently used first), or the model itself if it alone is too big."""
        mem = self._memory
        assert mem is not None
        mine = mem.memory_mb(target)
        if self._placement is not None:
            mine = self._placement.share_mb(target, mine)
        if mine > self._budget:
            err = NoRoom(
                f"model `{target}` uses {mine} MiB "
                f"({_source_words(mem.memory_source(target))}), more than "
                f"memory_budget_mb = {self._budget} MiB by itself", code="model_exceeds_budget")
            log.error("model=%s action=over_budget used_mb=%d budget_mb=%d", target, mine,
                      self._budget)
            s = self._slots[target]
            if s.in_flight == 0:  # nothing was admitted for it yet: put it away first
                await self._evict(target, None)
            self._fail_waiters(target, err)
            return False
        while (victim := self._over_budget(target)) is not None:
            await self._drain_and_evict(victim, f"memory budget ({target} measured)")
        return True

    def _over_budget(self, target: str) -> _Slot | None:
        """The next model to evict because the budget (of one of the target's GPUs) is
        exceeded now that the target was measured; None when everything fits."""
        mem = self._memory
        assert mem is not None
        p = self._placement
        if p is not None:
            active = [s for s in self._slots.values() if s.active]
            name = p.over_budget(target, active, mem.memory_mb, self._budget)
            return None if name is None else self._slots[name]
        if self.memory_used_mb() <= self._budget:
            return None
        candidates = self._evictable(but=self._slots[target])
        return candidates[0] if candidates else None

    async def _drain_and_evict(self, s: _Slot, why: str) -> None:
        s.closing = True
        log.info("model=%s action=evict_for why=%r in_flight=%d", s.name, why, s.in_flight)
        if self._drain:
            while s.in_flight > 0:
                self._drained.clear()
                await self._drained.wait()
        self.evictions += 1
        await self._evict(s.name, None)

    # ------------------------------------------------------------ housekeeping

    def _housekeep_soon(self) -> None:
        if self._housekeeper is None and not self._closed and (
                self._ttl_models or self._memory is not None):
            self._housekeeper = asyncio.get_running_loop().call_later(
                HOUSEKEEPING_SECS, self._housekeep)

    def _housekeep(self) -> None:
        """ttl_secs: evict an idle model; now and then, measure the resident ones again."""
        self._housekeeper = None
        if self._closed or not any(s.active for s in self._slots.values()):
            return
        self._rounds += 1
        now = self._clock()
        if self._ttl_models and not self._busy:
            waited = {w.model for w in self._queue}
            for s in self._slots.values():
                if (s.active and s.ttl > 0 and not s.pinned and not s.closing
                        and s.in_flight == 0 and s.name not in waited
                        and s.last_used is not None and now - s.last_used >= s.ttl):
                    self._begin()
                    self._task = asyncio.get_running_loop().create_task(
                        self._ttl_evict(s, now - s.last_used), name=f"llmux-ttl-{s.name}")
                    break
        if self._memory is not None and self._rounds % _MEASURE_EVERY == 0:
            task = asyncio.get_running_loop().create_task(self._measure_resident())
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)
        self._housekeep_soon()

    async def _ttl_evict(self, s: _Slot, idle: float) -> None:
        try:
            log.info("model=%s action=ttl_evict idle_secs=%.1f ttl_secs=%g", s.name, idle,
                     s.ttl)
            self.evictions += 1
            await self._evict(s.name, None)
        finally:
            self._end()

    async def _measure_resident(self) -> None:
        assert self._memory is not None
        for s in list(self._slots.values()):
            if s.active and not s.closing:
                try:
                    await self._memory.measure(s.name)
                except Exception as e:
                    log.warning("model=%s action=measure error=%r", s.name, e)

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
        seconds = self._clock() - t0
        if self._put_away is not None:
            strategy = policy or self._config.models[name].eviction
            self._put_away.append(PutAway(name, str(strategy),
                                          None if state is None else str(state), seconds))
        log.info("model=%s action=evict state=%s seconds=%.3f", name, state, seconds)
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
        s.active_since = s.last_used = self._clock()
        self._housekeep_soon()
        up = BroughtBack(name, None if kind is None else WakeKind(str(kind)),
                         s.active_since - t0)
        self._brought_back[name] = up
        log.info("model=%s action=activate wake=%s seconds=%.3f", name, up.how, up.seconds)
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
        up = self._brought_back.get(model) if changed else None
        return ActionResult(model, "wake", changed, self._clock() - t0,
                            wake=None if up is None or up.how is None else str(up.how),
                            evicted=evicted)

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
        if self._housekeeper is not None:
            self._housekeeper.cancel()
        for side in list(self._side_tasks):
            side.cancel()
        err = ServiceUnavailable("the shim is shutting down", code="shutting_down")
        for w in list(self._queue):
            if not w.future.done():
                w.future.set_exception(err)
        self._queue.clear()
        task = self._task
        if task is not None and not task.done():
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(task), timeout=60)



def _zero(_model: str) -> int:
    return 0


def _source_words(source: str) -> str:
    return {"nvml": "measured by NVML", "pss": "measured as the engine's PSS",
            "config": "its memory_mb"}.get(source, source)
