"""Which GPUs each engine is given: models placed over the host's GPUs.

A host with several GPUs is several slots, not one: each GPU has its own ``max_active``
and its own ``memory_budget_mb``. A model needs ``gpu_count`` GPUs (its
``--tensor-parallel-size`` by default) and may be held to some (``gpus``). Its engine is
given exactly its GPUs through ``CUDA_VISIBLE_DEVICES``; a model on k GPUs counts 1/k of
its measured memory on each (tensor-parallel shards are equal).

The switcher asks :meth:`Placement.plan` for the GPUs a model is to come up on and the
models to evict there: of every set of GPUs the model may use, the one that evicts the
fewest models (then the least memory, then the least recently used) wins; among equals,
the GPUs its CUDA state was on (no remapping), then the least used. An engine that is
alive with its CUDA context (sleeping) can only come back where it is; a suspended or
checkpointed one may come back on other GPUs of the same model, which llmuxd does through
the driver's device map (:meth:`gpu_map`); a stopped one starts anywhere.

The host's GPUs are NVML's; without NVML, the top-level ``gpus`` declares that many
slots so that the placement (device indices and budgets, nothing of CUDA) can be
exercised with the built-in engine. With fewer than two there is no placement: the host
is one slot, as before.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from llmux.shim.config import Config
from llmux.shim.errors import ConfigError, NoRoom

log = logging.getLogger(__name__)

#: the environment variable each engine's GPUs are given in
VISIBLE = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class Gpu:
    index: int
    #: NVML's product name ("NVIDIA H100 80GB HBM3"); "slot" for a declared one
    name: str
    #: NVML's total memory; 0 for a declared slot
    total_mb: int = 0


class Resident(Protocol):
    """A model the switcher has active (its _Slot)."""

    name: str
    pinned: bool

    def lru_key(self) -> tuple[bool, float]: ...


@dataclass(frozen=True)
class Plan:
    """Where a model comes up, and who is evicted there first."""

    gpus: tuple[int, ...]
    victims: tuple[str, ...]


def host_gpus(config: Config, nvml: Any) -> list[Gpu]:
    """The host's GPUs: NVML's (``nvml`` an initialised pynvml, or None), else the declared
    slots. Blocking (NVML): called once, at start."""
    if nvml is not None:
        out = []
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            name = nvml.nvmlDeviceGetName(h)
            out.append(Gpu(i, name.decode() if isinstance(name, bytes) else str(name),
                           int(nvml.nvmlDeviceGetMemoryInfo(h).total) >> 20))
        if out:
            return out
    return [Gpu(i, "slot") for i in range(config.gpus)]


class Placement:
    def __init__(self, config: Config, gpus: Sequence[Gpu]) -> None:
        self._config = config
        self.gpus: tuple[Gpu, ...] = tuple(gpus)
        self._need = {name: m.gpus_needed for name, m in config.models.items()}
        self._allowed = {name: tuple(m.gpus) or tuple(g.index for g in self.gpus)
                         for name, m in config.models.items()}
        #: the GPUs each model's engine is given (at its next start, resume or restore)
        self._target: dict[str, tuple[int, ...]] = {}
        #: the GPUs each model's CUDA state is on (its engine came up there)
        self._home: dict[str, tuple[int, ...]] = {}
        #: the model's engine holds a CUDA context on its GPUs (alive, not suspended): it
        #: can only come back there. Set by the app to the lifecycle's answer.
        self.stays_home: Callable[[str], bool] = lambda _model: False
        if self.gpus:
            self._check()

    @property
    def enabled(self) -> bool:
        """Two GPUs or more: a host of one GPU is the one slot it always was (engines see
        the GPU as they did, and no model can move)."""
        return len(self.gpus) >= 2

    def _check(self) -> None:
        """The models' GPUs against the host's (the config checked the declared slots)."""
        have = {g.index for g in self.gpus}
        problems = []
        for name, m in self._config.models.items():
            missing = sorted(set(m.gpus) - have)
            if missing:
                problems.append((f"models.{name}.gpus",
                                 f"GPU {missing[0]} does not exist: this host has GPUs "
                                 f"{sorted(have)}"))
            elif self._need[name] > len(self._allowed[name]):
                problems.append((f"models.{name}.gpu_count",
                                 f"the model needs {self._need[name]} GPUs, but this host "
                                 f"has {len(have)}"))
        if problems:
            raise ConfigError(problems, source=self._config.source)

    # ------------------------------------------------------------------ views

    def need(self, model: str) -> int:
        return self._need[model] if self.enabled else 0

    def devices(self, model: str) -> tuple[int, ...] | None:
        """The GPUs the model's engine is (or will next be) on; None before any."""
        return self._target.get(model) or self._home.get(model)

    def engine_env(self, model: str) -> dict[str, str]:
        """What the engine's environment gets: its GPUs, in the host's numbering."""
        gpus = self.devices(model)
        if not self.enabled or not self.need(model) or gpus is None:
            return {}
        return {VISIBLE: ",".join(map(str, gpus))}

    def gpu_map(self, model: str) -> dict[int, int]:
        """Old GPU to new GPU for every GPU of the model's CUDA state, when it is to come
        back elsewhere than where it was taken; {} when it comes back in place."""
        home, target = self._home.get(model), self._target.get(model)
        if not home or not target or home == target or len(home) != len(target):
            return {}
        return dict(zip(home, target, strict=True))

    def shares_gpu(self, a: str, b: str) -> bool:
        da, db = self.devices(a), self.devices(b)
        return bool(da and db and set(da) & set(db))

    def share_mb(self, model: str, mb: int) -> int:
        """What a model of ``mb`` MiB counts on each of its GPUs (rounded up)."""
        n = max(1, self.need(model))
        return -(-mb // n)

    def usage(self, residents: Iterable[str], memory_mb: Callable[[str], int],
              budget: int) -> list[dict[str, Any]]:
        """Each GPU: the resident models on it and the MiB they count there."""
        on: dict[int, list[str]] = {g.index: [] for g in self.gpus}
        used = dict.fromkeys(on, 0)
        for name in residents:
            for g in self.devices(name) or ():
                if g in on and self.need(name):
                    on[g].append(name)
                    used[g] += self.share_mb(name, memory_mb(name))
        return [{"index": g.index, "name": g.name, "total_mb": g.total_mb,
                 "models": on[g.index], "memory_used_mb": used[g.index],
                 "memory_budget_mb": budget} for g in self.gpus]

    # ------------------------------------------------------------------ decisions

    def plan(self, target: str, residents: Sequence[Resident], *,
             memory_mb: Callable[[str], int], budget: int, max_active: int) -> Plan:
        """The GPUs ``target`` comes up on and the models to evict there first; NoRoom
        naming why when no set of GPUs can take it (its pinned neighbours, its size)."""
        k = self.need(target)
        if k == 0:
            return Plan((), ())
        need = self.share_mb(target, memory_mb(target)) if budget else 0
        if budget and need > budget:
            raise NoRoom(
                f"model `{target}` needs {need} MiB on each of its {k} GPU(s), more than "
                f"memory_budget_mb = {budget} MiB of a GPU", code="model_exceeds_budget")
        others = [r for r in residents if r.name != target and self.need(r.name)]
        home = self._home.get(target)
        if self.stays_home(target) and home:
            candidates: list[tuple[int, ...]] = [home]
        else:
            candidates = list(itertools.combinations(sorted(self._allowed[target]), k))
        best: tuple[tuple[Any, ...], Plan] | None = None
        blocked: set[str] = set()
        for gpus in candidates:
            victims = self._victims(gpus, others, need, memory_mb, budget, max_active,
                                    blocked)
            if victims is None:
                continue
            load = sum(self._load(g, others, memory_mb, budget) for g in gpus)
            evicted = [r for r in others if r.name in victims]
            key = (len(victims), sum(memory_mb(v) for v in victims) if budget else 0,
                   max((r.lru_key() for r in evicted), default=(False, 0.0)),
                   gpus != home, load, gpus)
            if best is None or key < best[0]:
                best = (key, Plan(gpus, tuple(victims)))
        if best is None:
            where = (f"its GPUs {list(home)} (its engine is alive there)"
                     if len(candidates) == 1 and home == candidates[0] else
                     f"any {k} of GPUs {sorted(self._allowed[target])}")
            kept = ", ".join(sorted(blocked)) or "none"
            limit = (f"memory_budget_mb = {budget} MiB per GPU" if budget
                     else f"max_active = {max_active} per GPU")
            raise NoRoom(f"model `{target}` cannot be placed on {where}: the pinned model(s) "
                         f"{kept} keep them full ({limit})", code="no_gpu")
        self._target[target] = best[1].gpus
        return best[1]

    def _on(self, gpu: int, residents: Iterable[Resident]) -> list[Resident]:
        return [r for r in residents if gpu in (self.devices(r.name) or ())]

    def _load(self, gpu: int, residents: Iterable[Resident], memory_mb: Callable[[str], int],
              budget: int) -> int:
        on = self._on(gpu, residents)
        return sum(self.share_mb(r.name, memory_mb(r.name)) for r in on) if budget else len(on)

    def _victims(self, gpus: tuple[int, ...], residents: Sequence[Resident], need: int,
                 memory_mb: Callable[[str], int], budget: int, max_active: int,
                 blocked: set[str]) -> list[str] | None:
        """Least recently used models on ``gpus`` evicted until each fits; None if the
        pinned ones keep one of them full (their names added to ``blocked``)."""
        left = [r for r in residents if set(self.devices(r.name) or ()) & set(gpus)]
        victims: list[str] = []

        def fits(g: int) -> bool:
            on = self._on(g, left)
            if budget:
                return sum(self.share_mb(r.name, memory_mb(r.name)) for r in on) + need <= budget
            return len(on) + 1 <= max_active

        for r in sorted((r for r in left if not r.pinned), key=lambda r: r.lru_key()):
            if all(fits(g) for g in gpus):
                break
            victims.append(r.name)
            left.remove(r)
        if all(fits(g) for g in gpus):
            return victims
        blocked.update(r.name for r in left if r.pinned)
        return None

    def over_budget(self, target: str, residents: Sequence[Resident],
                    memory_mb: Callable[[str], int], budget: int) -> str | None:
        """After ``target`` was measured: the least recently used evictable model on one of
        its GPUs that is over ``budget``; None when they all fit."""
        for g in self.devices(target) or ():
            on = self._on(g, residents)
            if sum(self.share_mb(r.name, memory_mb(r.name)) for r in on) <= budget:
                continue
            movable = sorted((r for r in on if not r.pinned and r.name != target),
                             key=lambda r: r.lru_key())
            if movable:
                return movable[0].name
        return None

    def found_home(self, model: str, gpus: Sequence[int]) -> None:
        """A checkpoint found at start-up holds CUDA state on ``gpus`` (as recorded at its
        dump): its restore lands there unless moved. GPUs this host lacks, or a count the
        model no longer needs, are logged and left out: the driver then restores it where
        it was taken, whatever the plan says."""
        have = {g.index for g in self.gpus}
        if not self.need(model):
            return
        if len(gpus) != self.need(model) or not set(gpus) <= have:
            log.warning("model=%s action=checkpoint_gpus_ignored gpus=%s host_gpus=%s "
                        "need=%d", model, _gpus(gpus), _gpus(sorted(have)), self.need(model))
            return
        self._home[model] = tuple(gpus)

    def came_up(self, model: str) -> None:
        """The model's engine runs on the GPUs it was given: its CUDA state is there now."""
        gpus = self._target.get(model)
        if gpus is not None:
            if self._home.get(model) not in (None, gpus):
                log.info("model=%s action=moved from_gpus=%s to_gpus=%s", model,
                         _gpus(self._home[model]), _gpus(gpus))
            self._home[model] = gpus


def _gpus(gpus: Sequence[int]) -> str:
    return ",".join(map(str, gpus))
