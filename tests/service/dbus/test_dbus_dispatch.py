"""The dispatcher alone on the private bus: who called, and what a caller may see of a failure."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from dbus_next.message import Message

from llmux.service.core.engine import Caller
from llmux.service.dbus.bus import connect_bus
from llmux.service.dbus.dispatch import Dispatcher, Reply, Route
from tests.support.llmuxd_harness import BUS_NAME, OBJECT_PATH, PrivateBus

pytestmark = pytest.mark.dbus


def on_manager(path: str) -> bool:
    return path == OBJECT_PATH


async def serve(private_bus: PrivateBus, route: Route):
    if os.geteuid() != 0:
        pytest.skip("only root may own org.llmux.Host1 under the project's policy")
    bus = await connect_bus(private_bus.address)
    dispatcher = Dispatcher(bus)
    dispatcher.add(on_manager, route)
    bus.add_message_handler(dispatcher.handle)
    await bus.request_name(BUS_NAME)
    return bus


async def test_the_caller_is_the_process_the_bus_saw(private_bus: PrivateBus) -> None:
    async def who(caller: Caller, msg: Message) -> Reply:
        comm = Path(f"/proc/{caller.pid}/comm").read_text().strip()
        return Reply("us", (caller.uid, comm))

    bus = await serve(private_bus, Route(BUS_NAME, "ListCheckpoints", "", who))
    try:
        result = await asyncio.to_thread(
            private_bus.busctl, "call", BUS_NAME, OBJECT_PATH, BUS_NAME, "ListCheckpoints"
        )
        assert result.stdout.strip() == 'us 0 "busctl"'
    finally:
        bus.disconnect()
        await bus.wait_for_disconnect()


async def test_an_unexpected_failure_is_internal_and_tells_nothing(
    private_bus: PrivateBus,
) -> None:
    async def broken(caller: Caller, msg: Message) -> Reply:
        raise RuntimeError("secret detail from /etc/shadow")

    bus = await serve(private_bus, Route(BUS_NAME, "ListCheckpoints", "", broken))
    try:
        result = await asyncio.to_thread(
            private_bus.busctl, "call", BUS_NAME, OBJECT_PATH, BUS_NAME, "ListCheckpoints"
        )
        assert result.error_name == "org.llmux.Error.Internal"
        assert "secret" not in result.error_message
        assert "Traceback" not in result.error_message and "RuntimeError" not in result.stderr
    finally:
        bus.disconnect()
        await bus.wait_for_disconnect()
