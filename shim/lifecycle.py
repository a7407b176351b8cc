"""The model lifecycle: one state machine per model over eviction and wake.

States: running, sleeping (engine alive, weights offloaded/discarded or kept),
suspended (CUDA state moved to host memory by llmuxd), checkpointed (the tree
dumped to images by llmuxd and gone), stopped. Eviction applies the weights
strategy first (vLLM /sleep) and then the process strategy; activation undoes
whatever was done. A failed eviction escalates to stop so the GPU is freed; a
failed wake falls back to a cold start. The switcher decides *when*; this module
only knows *how*, one transition per model at a time. It is the one owner of model
state: an engine's death reaches it (from the supervisor) and it tells the listeners
given to :meth:`Lifecycle.add_loss_listener` (the switcher stops admitting for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from llmux.common.contract import ErrorName
from llmux.common.proctree import pss_bytes as proctree_pss
from llmux.shim.backend import ProcessBackend, RestoredTree
from llmux.shim.config import (
    Config,
    EngineKind,
    EvictionPolicy,
    ModelConfig,
    ProcessStrategy,
    WeightStrategy,
)
from llmux.shim.errors import (
    ConfigError,
    Conflict,
    EngineFailed,
    HostRefused,
    HostUnavailable,
    ModelNotFound,
    ShimError,
)
from llmux.shim.memory import FreeMemory, Measurement, MemoryMeter, MemorySource
from llmux.shim.placement import Placement
from llmux.shim.supervisor import Supervisor
from llmux.shim.transitions import Action, WakeKind
from llmux.shim.weightfiles import Prefetched, prefetch, weight_files

log = logging.getLogger(__name__)
T = TypeVar("T")


class ModelState(StrEnum):
    RUNNING = "running"
    SLEEPING = "sleeping"
    SUSPENDED = "suspended"
    CHECKPOINTED = "checkpointed"
    STOPPED = "stopped"


#: (model, action, strategy, seconds). Strategy: the eviction policy as
#: "offload+keep_running", "cold", or "restore" for a checkpoint found at start-up.
TransitionObserver = Callable[[str, Action, str, float], None]

#: (model) -> None: the model's engine died without being asked to
LossListener = Callable[[str], None]

#: engine states in which a process tree of ours exists
#: how often a replica's wake asks again while llmuxd restores the checkpoint elsewhere
REPLICA_RETRY_SECS = 0.5

_ALIVE_STATES = frozenset({"running", "sleeping", "suspended"})
_WEIGHT_LEVEL = {WeightStrategy.RETAIN: 0, WeightStrategy.OFFLOAD: 1, WeightStrategy.DISCARD: 2}


@dataclass
class ModelStatus:
    name: str
    state: ModelState
    pids: list[int]
    last_wake: WakeKind | None
    eviction: EvictionPolicy
    port: int
    engine: str
    #: unix time of the last state change
    since: float
    #: vLLM sleep level the engine is in: 0 none, 1 weights in host memory, 2 discarded,
    #: None unknown (a checkpoint found at start-up)
    sleep_level: int | None = 0
    #: the policy of the eviction that put the model in its current state
    evicted_with: EvictionPolicy | None = None
    restarts: int = 0
    last_error: str | None = None
    #: measured MiB when running (kept while it is away), None before its first start
    memory_mb: int | None = None
    memory_source: MemorySource = MemorySource.CONFIG
    #: the GPUs (host indices) its engine is on or was last given; None: no placement
    gpus: list[int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "pids": list(self.pids),
            "last_wake": self.last_wake.value if self.last_wake else None,
            "eviction": str(self.eviction),
            "port": self.port,
            "engine": self.engine,
            "since": self.since,
            "sleep_level": self.sleep_level,
            "evicted_with": str(self.evicted_with) if self.evicted_with else None,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "memory_mb": self.memory_mb,
            "memory_source": self.memory_source.value,
            "gpus": self.gpus,
        }


@dataclass
class _Model:
    config: ModelConfig
    state: ModelState = ModelState.STOPPED
    last_wake: WakeKind | None = None
    since: float = field(default_factory=time.time)
    sleep_level: int | None = 0
    evicted_with: EvictionPolicy | None = None
    restarts: int = 0
    last_error: str | None = None
    crashed: bool = False
    #: the last measurement of the running engine; it replaces the config's memory_mb
    memory: Measurement | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def set(self, state: ModelState) -> None:
        self.state = state
        self.since = time.time()


class Lifecycle:
    def __init__(self, config: Config, supervisor: Supervisor, backend: ProcessBackend | None,
                 *, observer: TransitionObserver | None = None,
                 engine_call_timeout_secs: float = 600.0,
                 meter: MemoryMeter | None = None) -> None:
        self.config = config
        #: measures engines' memory and the devices' free memory (off the event loop)
        self.meter = meter if meter is not None else MemoryMeter()
        self.supervisor = supervisor
        #: every call to an engine's API (the proxy's too): one pool per model
        self.engines = supervisor.engines
        self.backend = backend
        self._observers: list[TransitionObserver] = [] if observer is None else [observer]
        self._loss_listeners: list[LossListener] = []
        #: bound on one /sleep, /wake_up or reload call (offloading large weights is slow)
        self.engine_call_timeout_secs = engine_call_timeout_secs
        self._models = {name: _Model(m) for name, m in config.models.items()}
        #: why the configured host service was dropped at start-up, for later errors
        self._host_problem: str | None = None
        self._transitions: set[asyncio.Future[Any]] = set()
        #: which GPUs each engine is given (several GPUs); None: the host is one slot
        self.placement: Placement | None = None
        supervisor.add_death_listener(self._on_death)

    def place_on(self, placement: Placement) -> None:
        """Give each engine its GPUs (``CUDA_VISIBLE_DEVICES``) and move a suspended or
        checkpointed one to other GPUs where the switcher placed it."""
        if not placement.enabled:
            return
        self.placement = placement
        self.supervisor.extra_env = placement.engine_env
        placement.stays_home = self.stays_home

    def stays_home(self, model: str) -> bool:
        """Its engine holds a CUDA context on its GPUs (running or sleeping): it can come
        back only there. A suspended or checkpointed one can move (llmuxd remaps it)."""
        return self._effective_state(self._rec(model)) in (ModelState.RUNNING,
                                                           ModelState.SLEEPING)

    # ------------------------------------------------------------------ start-up

    async def start(self) -> None:
        """Check that every configured strategy can be carried out; find existing checkpoints.

        A host strategy without a backend is refused here, never downgraded.
        """
        needing = [m for m in self.config.models.values() if m.eviction.needs_host]
        if needing and self.backend is None:
            raise ConfigError(
                [(f"models.{m.name}.eviction.process",
                  f"{m.eviction.process} is carried out by the llmux host service (llmuxd), "
                  "but no host service is configured: add a [checkpoint] section (bus = ...) "
                  "or choose keep_running or stop") for m in needing],
                source=self.config.source)
        if self.backend is None:
            for m in self.config.models.values():
                if m.checkpoint_path is not None:
                    log.warning("model %s: checkpoint_path is set but no host service is "
                                "configured; it will cold-start", m.name)
            return
        try:
            await self.backend.check()
        except HostUnavailable as e:
            if needing:
                raise
            log.warning("%s; no model's eviction needs it, going on without it", e.message)
            self._host_problem = e.message
            self.backend = None
            return
        for name, rec in self._models.items():
            cp = rec.config.checkpoint_path
            found = await self.backend.find_checkpoint(name)
            if found is not None or (cp is not None and cp.exists()):
                rec.set(ModelState.CHECKPOINTED)
                rec.sleep_level = None
                log.info("model %s: a checkpoint exists; the first request restores it", name)
            if found is not None and found.gpus and self.placement is not None:
                self.placement.found_home(name, found.gpus)

    # ------------------------------------------------------------------ queries

    def _rec(self, model: str) -> _Model:
        try:
            return self._models[model]
        except KeyError:
            raise ModelNotFound(model, list(self._models)) from None

    def _effective_state(self, rec: _Model) -> ModelState:
        if rec.state in _ALIVE_STATES and not self.supervisor.is_alive(rec.config.name):
            return ModelState.STOPPED
        return rec.state

    def status(self, model: str) -> ModelStatus:
        rec = self._rec(model)
        state = self._effective_state(rec)
        alive = state in _ALIVE_STATES
        m = rec.config
        return ModelStatus(
            name=m.name, state=state,
            pids=self.supervisor.pids(m.name) if alive else [],
            last_wake=rec.last_wake, eviction=m.eviction, port=m.port, engine=m.engine.value,
            since=rec.since, sleep_level=rec.sleep_level if alive or
            state is ModelState.CHECKPOINTED else 0,
            evicted_with=rec.evicted_with, restarts=rec.restarts, last_error=rec.last_error,
            memory_mb=rec.memory.mb if rec.memory else None,
            memory_source=rec.memory.source if rec.memory else MemorySource.CONFIG,
            gpus=self._gpus(m.name))

    def _gpus(self, model: str) -> list[int] | None:
        p = self.placement
        gpus = p.devices(model) if p is not None and p.need(model) else None
        return None if gpus is None else list(gpus)

    def statuses(self) -> dict[str, ModelStatus]:
        return {name: self.status(name) for name in self._models}

    def add_loss_listener(self, listener: LossListener) -> None:
        """Called (model) when a model's engine dies without being asked to."""
        self._loss_listeners.append(listener)

    def _on_death(self, model: str, returncode: int | None) -> None:
        rec = self._models.get(model)
        if rec is None:
            return
        rec.crashed = True
        rec.last_error = f"engine exited unexpectedly (exit code {returncode})"
        if not rec.lock.locked():
            rec.set(ModelState.STOPPED)
            rec.sleep_level = 0
        for listener in list(self._loss_listeners):
            try:
                listener(model)
            except Exception:
                log.exception("loss listener failed for model %s", model)

    def add_observer(self, observer: TransitionObserver) -> None:
        """Called (model, action, strategy, seconds) after each transition."""
        self._observers.append(observer)

    def _observe(self, model: str, action: Action, strategy: str, seconds: float) -> None:
        log.info("model %s: %s (%s) took %.3f s", model, action, strategy, seconds)
        for observer in list(self._observers):
            try:
                observer(model, action, strategy, seconds)
            except Exception:
                log.exception("transition observer %r failed", observer)

    # ------------------------------------------------------------------ memory

    def memory_mb(self, model: str) -> int:
        """What the model uses running: its last measurement, else memory_mb (0: unknown)."""
        rec = self._rec(model)
        return rec.memory.mb if rec.memory else rec.config.memory_mb

    def memory_source(self, model: str) -> str:
        rec = self._rec(model)
        return (rec.memory.source if rec.memory else MemorySource.CONFIG).value

    async def measure(self, model: str) -> Measurement | None:
        """Measure the running engine's tree (off the event loop) and remember it."""
        rec = self._rec(model)
        if self._effective_state(rec) is not ModelState.RUNNING or rec.lock.locked():
            return None
        m = await asyncio.to_thread(self._measure_tree, model)
        if m is not None and rec.state is ModelState.RUNNING:
            if rec.memory != m:
                log.info("model %s: uses %d MiB (%s)", model, m.mb, m.source)
            rec.memory = m
        return m

    def _measure_tree(self, model: str) -> Measurement | None:
        return self.meter.measure(self.supervisor.pids(model))

    async def admission(self, model: str) -> tuple[int, FreeMemory]:
        """(MiB the model still needs to run, the free memory where it will live).

        The need is its running memory less what its tree (a sleeping or suspended
        engine) holds there already; the device is the GPU when it was measured there
        or, before any measurement, when the host has one and the engine is not told to
        run on the CPU.
        """
        rec = self._rec(model)
        full = self.memory_mb(model)
        alive = self._effective_state(rec) in _ALIVE_STATES

        def read() -> tuple[int, FreeMemory]:
            gpu = (rec.memory.source is MemorySource.NVML if rec.memory
                   else self.meter.has_gpu and not rec.config.on_cpu)
            held = 0
            if alive:
                pids = self.supervisor.pids(model)
                held = (self.meter.gpu_bytes(pids) if gpu
                        else proctree_pss(pids)) >> 20
            return max(0, full - held), self.meter.free(gpu, self._gpus(model))

        return await asyncio.to_thread(read)

    def memory_used_mb(self) -> int:
        """What the running models use, as last measured."""
        return sum(self.memory_mb(name) for name, rec in self._models.items()
                   if self._effective_state(rec) is ModelState.RUNNING)

    # ------------------------------------------------------------------ activate

    async def activate(self, model: str) -> WakeKind | None:
        """Make the model running and healthy, whatever its state, and measure it.

        Returns how it was brought up, or None when it was already running.
        Raises EngineFailed when even a cold start fails (state: stopped). A
        caller that is cancelled (a request timeout) does not cut the
        transition short: it completes, so that no half-restored tree is lost.
        """
        rec = self._rec(model)
        kind = await self._unbroken(self._activate(rec))
        if kind is not None or rec.memory is None:
            await self.measure(model)
        return kind

    async def _activate(self, rec: _Model) -> WakeKind | None:
        model = rec.config.name
        async with rec.lock:
            state = self._effective_state(rec)
            if state is ModelState.RUNNING:
                return None
            crashed = rec.crashed or (rec.state in _ALIVE_STATES and state is ModelState.STOPPED)
            # last_error tells of this transition (a failed wake behind a cold start), not of
            # one long past that later successes have overtaken
            rec.last_error = None
            t0 = time.monotonic()
            if state is ModelState.STOPPED:
                return await self._cold_start(rec, restart=crashed, t0=t0)
            try:
                kind = await self._warm_start(rec, state)
                await self.engines.probe(model)
            except Exception as e:
                msg = _why(e)
                log.error("model %s: wake from %s failed (%s); falling back to a cold start",
                          model, state, msg)
                rec.last_error = f"wake from {state} failed: {msg}"
                await self.supervisor.stop(model)
                return await self._cold_start(rec, restart=True, t0=t0, retry=False)
            strategy = str(rec.evicted_with) if rec.evicted_with else kind.value
            self._done_waking(rec, kind)
            self._observe(model, Action.WAKE, strategy, time.monotonic() - t0)
            return kind

    async def _cold_start(self, rec: _Model, *, restart: bool, t0: float,
                          retry: bool = True) -> WakeKind:
        """Spawn and probe; an engine that starts but fails the probe is stopped and
        started once more (``retry``), then reported as failed."""
        name = rec.config.name
        await self.supervisor.stop(name)  # whatever is left of a dead tree
        try:
            await self.supervisor.spawn(name)
            try:
                await self.engines.probe(name)
            except EngineFailed as e:
                if not retry:
                    raise
                log.error("%s; stopping it and starting it once more", e.message)
                await self.supervisor.stop(name)
                await self.supervisor.spawn(name)
                await self.engines.probe(name)
        except ShimError as e:
            await self.supervisor.stop(name)
            rec.set(ModelState.STOPPED)
            rec.sleep_level = 0
            rec.last_error = e.message
            raise
        if restart:
            rec.restarts += 1
        self._done_waking(rec, WakeKind.COLD)
        self._observe(name, Action.RESTART if restart else Action.COLD_START, "cold",
                      time.monotonic() - t0)
        return WakeKind.COLD

    def _done_waking(self, rec: _Model, kind: WakeKind) -> None:
        rec.crashed = False
        rec.last_wake = kind
        rec.sleep_level = 0
        rec.evicted_with = None
        rec.set(ModelState.RUNNING)
        if self.placement is not None:
            self.placement.came_up(rec.config.name)

    async def _warm_start(self, rec: _Model, state: ModelState) -> WakeKind:
        name = rec.config.name
        if state is ModelState.SLEEPING:
            await self._wake_weights(rec)
            return WakeKind.WAKE
        backend = self._need_backend(name, str(state))
        if state is ModelState.SUSPENDED:
            eng = self.supervisor.engine(name)
            assert eng is not None  # state SUSPENDED is effective only while it is alive
            async with self._weights_ahead(rec):
                await backend.resume(name, eng.root_pid, **self._moved(name))
                await self.supervisor.wait_healthy(
                    name, within_secs=self.engine_call_timeout_secs)
                await self._wake_weights(rec)
            return WakeKind.RESUME
        if state is ModelState.CHECKPOINTED:
            keep = self.config.checkpoint.keep_images if self.config.checkpoint else True
            async with self._weights_ahead(rec):
                await asyncio.to_thread(self.supervisor.prepare_tmp_dir, name, fresh=False)
                tree = await self._restore(backend, rec, keep)
                await self.supervisor.adopt(name, tree.root_pid, tree.pids)
                await self.supervisor.wait_healthy(name)
                await self._wake_weights(rec)
            return WakeKind.RESTORE
        raise Conflict(f"model {name}: cannot activate from state {state}")

    @contextlib.asynccontextmanager
    async def _weights_ahead(self, rec: _Model) -> AsyncIterator[None]:
        """While a tree whose weights were discarded comes back (restore or CUDA resume),
        their files are read into the page cache, so that the reload after it finds them
        there (weightfiles.py). The outcome is logged."""
        level = rec.sleep_level
        if level is None:  # a checkpoint from an earlier run: its configured eviction
            level = _WEIGHT_LEVEL[rec.config.eviction.weights]
        if level != 2:
            yield
            return
        stop = threading.Event()
        config, env = rec.config, self.supervisor.env(rec.config)

        def ahead() -> Prefetched:
            return prefetch(weight_files(config, env), stop)

        task = asyncio.create_task(asyncio.to_thread(ahead))
        try:
            yield
        except BaseException:
            stop.set()
            raise
        finally:
            try:
                done = await task
            except Exception as e:  # the wake itself decides; this only reads ahead
                log.warning("model=%s action=prefetch_weights failed: %s", config.name, e)
            else:
                log.info("model=%s action=prefetch_weights files=%d mib=%d seconds=%.3f%s",
                         config.name, done.files, done.bytes >> 20, done.seconds,
                         f" skipped={done.skipped!r}" if done.skipped else "")

    async def _restore(self, backend: ProcessBackend, rec: _Model, keep: bool) -> RestoredTree:
        """The restore; a replica's (replicas_from_checkpoint) waits while llmuxd restores
        the same checkpoint for another container (one restore of a checkpoint at a time:
        Busy), within the job timeout."""
        name = rec.config.name
        options: dict[str, Any] = {**self._moved(name), "port": rec.config.port}
        if not rec.config.replicas_from_checkpoint:
            return await backend.restore(name, keep_images=keep, **options)
        options["replica"] = True
        bound = self.config.checkpoint.job_timeout_secs if self.config.checkpoint else 1800.0
        deadline = time.monotonic() + bound
        while True:
            try:
                return await backend.restore(name, keep_images=keep, **options)
            except HostRefused as e:
                if e.code != ErrorName.BUSY or time.monotonic() >= deadline:
                    raise
                log.info("model %s: %s; trying again", name, e.message)
                await asyncio.sleep(REPLICA_RETRY_SECS)

    def _moved(self, model: str) -> dict[str, dict[int, int]]:
        """The resume's or restore's device map where the placement moved the model: old
        GPU to new GPU, each GPU of its CUDA state (the driver wants them all)."""
        gpu_map = self.placement.gpu_map(model) if self.placement is not None else {}
        if gpu_map:
            log.info("model=%s action=move_gpus map=%s", model, gpu_map)
        return {"gpu_map": gpu_map} if gpu_map else {}

    async def _wake_weights(self, rec: _Model) -> None:
        """Undo /sleep: wake_up, reload discarded weights, drop the stale prefix cache."""
        name = rec.config.name
        level = rec.sleep_level
        if level is None:
            # a checkpoint from an earlier run: ask the engine whether it sleeps; the
            # level is not knowable, and reloading is always correct (only slower)
            r = await self._call(name, "GET", "/is_sleeping")
            level = 2 if r.json().get("is_sleeping") else 0
        if level == 0:
            return
        if level >= 2:
            # vLLM's order for level 2: weights memory first, reload, then the KV cache,
            # so that the peak never holds both an empty KV cache and half-loaded weights
            await self._call(name, "POST", "/wake_up", params={"tags": "weights"})
            await self._call(name, "POST", "/collective_rpc", json={"method": "reload_weights"})
            await self._call(name, "POST", "/wake_up", params={"tags": "kv_cache"})
        else:
            await self._call(name, "POST", "/wake_up")
        await self._call(name, "POST", "/reset_prefix_cache")

    async def _call(self, model: str, method: str, path: str, **kw: Any) -> Any:
        return await self.engines.call(model, method, path,
                                       timeout_secs=self.engine_call_timeout_secs, **kw)

    def _need_backend(self, model: str, what: str) -> ProcessBackend:
        if self.backend is None:
            why = (f"which is unavailable: {self._host_problem}" if self._host_problem
                   else "and none is configured (add a [checkpoint] section)")
            raise HostUnavailable(f"model {model}: {what} needs the llmux host service "
                                  f"(llmuxd), {why}")
        return self.backend

    # ------------------------------------------------------------------ evict

    async def evict(self, model: str, policy: EvictionPolicy | None = None) -> ModelState:
        """Apply the weights strategy, then the process strategy; return the new state.

        A policy that needs the host service when there is none is refused
        (HostUnavailable) before anything is touched. Any failure on the way
        escalates to stop, so that the GPU is freed, and the observer is told.
        """
        rec = self._rec(model)
        policy = policy or rec.config.eviction
        if policy.weights is not WeightStrategy.RETAIN and not rec.config.sleep_mode:
            raise Conflict(f"model {model}: eviction {policy} puts the weights to sleep, but "
                           "its engine runs without vLLM's sleep mode (set sleep_mode = true "
                           "for it, or keep the weights: retain)")
        if policy.needs_host:
            self._need_backend(model, f"eviction {policy}")
        return await self._unbroken(self._evict_locked(rec, policy))

    async def _evict_locked(self, rec: _Model, policy: EvictionPolicy) -> ModelState:
        model = rec.config.name
        async with rec.lock:
            state = self._effective_state(rec)
            if state is ModelState.STOPPED:
                if rec.state is not ModelState.STOPPED:
                    rec.set(ModelState.STOPPED)
                    rec.sleep_level = 0
                return ModelState.STOPPED
            if state is ModelState.CHECKPOINTED:
                return state
            if state is ModelState.SUSPENDED and policy.process is not ProcessStrategy.STOP:
                return state
            if state is ModelState.SLEEPING and policy.process is ProcessStrategy.KEEP_RUNNING:
                return state  # already evicted; the weights cannot sleep twice
            t0 = time.monotonic()
            rec.last_error = None
            try:
                new_state = await self._evict(rec, state, policy)
            except Exception as e:
                msg = _why(e)
                log.error("model %s: eviction %s failed (%s); escalating to stop",
                          model, policy, msg)
                rec.last_error = f"eviction {policy} failed: {msg}"
                self.supervisor.expect_exit(model, False)
                await self.supervisor.stop(model)
                rec.set(ModelState.STOPPED)
                rec.sleep_level = 0
                rec.evicted_with = policy
                self._observe(model, Action.ESCALATE, str(policy), time.monotonic() - t0)
                return ModelState.STOPPED
            rec.evicted_with = policy
            rec.set(new_state)
            self._observe(model, Action.SLEEP, str(policy), time.monotonic() - t0)
            return new_state

    async def _evict(self, rec: _Model, state: ModelState, policy: EvictionPolicy) -> ModelState:
        name = rec.config.name
        if state is ModelState.RUNNING:
            level = _WEIGHT_LEVEL[policy.weights]
            if level:
                await self._call(name, "POST", "/sleep", params={"level": str(level)})
            rec.sleep_level = level
        process = policy.process
        if process is ProcessStrategy.KEEP_RUNNING:
            return ModelState.SLEEPING
        if process is ProcessStrategy.STOP:
            await self.supervisor.stop(name)
            rec.sleep_level = 0
            return ModelState.STOPPED
        backend = self._need_backend(name, f"eviction {policy}")
        eng = self.supervisor.engine(name)
        if eng is None or not eng.alive:
            raise EngineFailed(f"model {name}: the engine died during eviction")
        if process is ProcessStrategy.CUDA_SUSPEND:
            await backend.suspend(name, eng.root_pid)
            return ModelState.SUSPENDED
        # no established TCP connection into the tree at dump time
        await self.engines.prepare_dump(name, root_pid=eng.root_pid)
        self.supervisor.expect_exit(name)
        await backend.checkpoint(name, eng.root_pid, weights_bytes=self._weights_bytes(rec),
                                 gpus=self._gpus(name) or ())
        await self.supervisor.wait_exit(name)
        return ModelState.CHECKPOINTED

    def _weights_bytes(self, rec: _Model) -> int:
        """A size hint for llmuxd's free-space check: weights still in the process."""
        m = rec.config
        if m.engine is not EngineKind.BUILTIN or rec.sleep_level == 2:
            return 0
        return int(m.weights_mb) << 20

    async def _unbroken(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a transition to its end even if the caller is cancelled meanwhile."""
        task = asyncio.ensure_future(coro)
        self._transitions.add(task)
        task.add_done_callback(self._transitions.discard)
        task.add_done_callback(_settle)
        return await asyncio.shield(task)

    # ------------------------------------------------------------------ shutdown

    async def aclose(self) -> None:
        """Stop every engine we run; checkpoints stay where they are."""
        async def stop(rec: _Model) -> None:
            async with rec.lock:
                name = rec.config.name
                if self.supervisor.engine(name) is None:
                    return
                t0 = time.monotonic()
                await self.supervisor.stop(name)
                if rec.state is not ModelState.CHECKPOINTED:
                    rec.set(ModelState.STOPPED)
                    rec.sleep_level = 0
                self._observe(name, Action.STOP, "stop", time.monotonic() - t0)

        if self._transitions:  # let transitions whose callers gave up finish first
            await asyncio.gather(*self._transitions, return_exceptions=True)
        await asyncio.gather(*(stop(r) for r in self._models.values()))
        closer = getattr(self.backend, "aclose", None)
        if closer is not None:
            with contextlib.suppress(Exception):
                await closer()


def _settle(task: asyncio.Future[Any]) -> None:
    """Retrieve a finished transition's error, which its caller may no longer await."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("transition ended with %r", task.exception())


def _why(e: BaseException) -> str:
    return e.message if isinstance(e, ShimError) else (str(e) or type(e).__name__)


__all__ = ["Action", "Lifecycle", "LossListener", "ModelState", "ModelStatus",
           "TransitionObserver", "WakeKind"]
