"""Helpers of the tests that drive llmuxd's jobs over D-Bus (tests/service/dbus and the
client's tests/client): a recorder of llmuxd's signals, and the checks of a restored counting
target (tests.support.llmuxd_harness.Target) and of a state directory after a job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dbus_next.aio.message_bus import MessageBus
from dbus_next.message import Message

from tests.support.llmuxd_harness import BUS_NAME, Target
from tests.support.procs import wait_until, wait_until_async


class SignalRecorder:
    """A second client that records every signal llmuxd sends."""

    def __init__(self, address: str):
        self.address = address
        self.bus: MessageBus | None = None
        self.signals: list[tuple[str, str, list[Any]]] = []

    async def __aenter__(self) -> SignalRecorder:
        self.bus = await MessageBus(bus_address=self.address).connect()
        self.bus.add_message_handler(self._record)
        await self.bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[f"type='signal',sender='{BUS_NAME}'"],
            )
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.bus is not None
        self.bus.disconnect()

    def _record(self, msg: Message) -> bool:
        if msg.message_type.name == "SIGNAL":
            self.signals.append((msg.member, msg.path, msg.body))
        return False

    def members(self, member: str) -> list[list[Any]]:
        return [body for name, _path, body in self.signals if name == member]

    def announced(self, path: str, prop: str) -> list[Any]:
        """Every value of ``prop`` that PropertiesChanged announced on ``path``, in order."""
        return [body[1][prop].value for name, on, body in self.signals
                if name == "PropertiesChanged" and on == path and prop in body[1]]

    async def wait_for(self, member: str, timeout: float = 60) -> list[Any]:
        found = await wait_until_async(lambda: self.members(member), timeout,
                                       f"a {member} signal")
        return found[-1]


def counts_on(target: Target, after: int) -> None:
    wait_until(lambda: target.last() > after + 3, 30, "the restored target to count on")
    numbers = [int(n) for n in target.log.read_text().split()]
    # one process, one memory: no restart from 1, no gap, no repeat
    assert numbers == list(range(1, len(numbers) + 1))


def no_half_checkpoints(state_dir: Path) -> None:
    leftovers = [p.name for p in state_dir.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    assert leftovers == []
