"""The shim's model transitions as types: what the lifecycle did, and what one switch did.

The lifecycle reports each transition as an :class:`Action` (its observer); the switcher
emits one :class:`Switch` per switch, built from the results it awaits (what
``evict`` and ``activate`` answered, and how long each took). The metrics and the
operator's page read these instead of matching action names or times.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class WakeKind(StrEnum):
    """How a model was brought back."""

    COLD = "cold"
    WAKE = "wake"
    RESUME = "resume"
    RESTORE = "restore"


class Action(StrEnum):
    """A lifecycle transition (the metrics' ``action`` label is its value)."""

    COLD_START = "cold_start"
    #: a cold start after a crash or a failed wake
    RESTART = "restart"
    WAKE = "wake"
    SLEEP = "sleep"
    #: a failed eviction that ended in stop (the GPU is freed anyway)
    ESCALATE = "escalate"
    #: the shim's shutdown
    STOP = "stop"

    @property
    def puts_away(self) -> bool:
        """An eviction: the model gives its memory back."""
        return self in (Action.SLEEP, Action.ESCALATE)

    @property
    def brings_back(self) -> bool:
        """The model serves again afterwards."""
        return self in (Action.WAKE, Action.COLD_START, Action.RESTART)


@dataclass(frozen=True)
class PutAway:
    """One eviction within a switch."""

    model: str
    #: the eviction policy it was asked for ("offload+keep_running", ...)
    strategy: str
    #: the state it ended in ("sleeping", "checkpointed", "stopped" after an escalation);
    #: None when the eviction failed unexpectedly
    state: str | None
    seconds: float


@dataclass(frozen=True)
class BroughtBack:
    """The switch's target, once it serves."""

    model: str
    #: None: it was running already
    how: WakeKind | None
    seconds: float


@dataclass(frozen=True)
class Switch:
    """One switch, as the switcher ran it: emitted once it has ended."""

    target: str
    #: every model evicted meanwhile, in order (the victims, then any that admission or
    #: the memory budget asked for)
    put_away: tuple[PutAway, ...]
    #: None when the target could not be brought up (``ok`` is then False)
    brought_back: BroughtBack | None
    seconds: float
    ok: bool
    #: unix time at its end
    at: float
    #: requests waiting when it ended (its target's are admitted just after)
    waiting: int

    @property
    def outcome(self) -> str:
        """The metrics' ``outcome`` label."""
        return "ok" if self.ok else "failed"

    @property
    def source(self) -> PutAway | None:
        """The first other model it put away: the one it switched from."""
        return next((p for p in self.put_away if p.model != self.target), None)

    @property
    def how(self) -> WakeKind | None:
        """How the target came back; None when it failed or was running already."""
        return self.brought_back.how if self.ok and self.brought_back else None


__all__ = ["Action", "BroughtBack", "PutAway", "Switch", "WakeKind"]
