"""The daemon's bus connection and the one question it asks the bus daemon.

This is the one module that touches dbus-next's private internals (the rest of
the service goes through the helpers here): dbus-next 0.2.3 is its last release,
and it has no public API for what follows, so the workarounds are kept together.

- ``exported``, ``property_names`` and ``connected`` read MessageBus._path_exports,
  ServiceInterface._get_properties and _disconnected: the dispatcher answers every
  Properties call that would fail itself (dbus-next would log each one at ERROR level
  with a traceback: a flood any local user could cause), and nothing is sent on a
  closed connection.
- dbus-next 0.2.3 (its last release) emits ObjectManager.InterfacesAdded and
InterfacesRemoved from the added object's own path. The D-Bus specification,
GDBus and sd-bus clients expect them from the manager's path, so HostBus sends
them from /org/llmux/Host1, where clients subscribe.
"""

from __future__ import annotations

import logging
from typing import Any

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import BusType, MessageType
from dbus_next.message import Message
from dbus_next.service import ServiceInterface

from llmux.common import errors
from llmux.common.contract import OBJECT_PATH
from llmux.service.core.engine import Caller

log = logging.getLogger(__name__)

OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
BUS_DAEMON = "org.freedesktop.DBus"


class HostBus(MessageBus):  # type: ignore[misc]
    """MessageBus whose ObjectManager signals come from the manager object."""

    def _emit_interface_added(self, path: str, interface: ServiceInterface) -> None:
        if self._disconnected or not path.startswith(OBJECT_PATH + "/"):
            return

        def send(iface: Any, values: Any, _user_data: Any, err: Exception | None) -> None:
            if err is not None:
                log.error("reading properties of %s at %s failed: %s", iface.name, path, err)
            self._send_manager_signal(
                "InterfacesAdded", "oa{sa{sv}}", [path, {interface.name: values or {}}]
            )

        ServiceInterface._get_all_property_values(interface, send)  # type: ignore[no-untyped-call]

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        if self._disconnected or not path.startswith(OBJECT_PATH + "/"):
            return
        self._send_manager_signal("InterfacesRemoved", "oas", [path, removed_interfaces])

    def _send_manager_signal(self, member: str, signature: str, body: list[Any]) -> None:
        self.send(Message.new_signal(path=OBJECT_PATH, interface=OBJECT_MANAGER, member=member,
                                     signature=signature, body=body))


def exported(bus: MessageBus, path: str) -> bool:
    """Whether an object is exported at ``path`` (dbus-next has no public question for it)."""
    return path in bus._path_exports


#: interfaces every object has, without properties of their own
_STANDARD = frozenset({"org.freedesktop.DBus.Properties", "org.freedesktop.DBus.Introspectable",
                       "org.freedesktop.DBus.Peer", "org.freedesktop.DBus.ObjectManager"})


def property_names(bus: MessageBus, path: str, interface: str) -> frozenset[str] | None:
    """The properties ``interface`` has at ``path``; None when it has no such interface."""
    if interface in _STANDARD:
        return frozenset()
    for exported_interface in bus._path_exports.get(path, ()):
        if exported_interface.name == interface:
            props: list[Any] = ServiceInterface._get_properties(  # type: ignore[no-untyped-call]
                exported_interface)
            return frozenset(p.name for p in props if not p.disabled)
    return None


def connected(bus: MessageBus) -> bool:
    return not bus._disconnected


async def connect_bus(bus: str) -> HostBus:
    """``system``, ``session`` or a D-Bus address such as ``unix:path=/run/x``."""
    try:  # dbus-next opens the socket in the constructor already
        if bus == "system":
            connection = HostBus(bus_type=BusType.SYSTEM)
        elif bus == "session":
            connection = HostBus(bus_type=BusType.SESSION)
        else:
            connection = HostBus(bus_address=bus)
        await connection.connect()
    except Exception as exc:
        raise errors.HostError(f"cannot connect to the {bus} bus: {exc}") from exc
    return connection


async def caller_of(bus: MessageBus, sender: str) -> Caller:
    """The sender's PID and UID as the bus daemon saw them at connect time.

    Never a PID the caller claims: dbus-next does not pass the sender to method
    handlers (its issue #129), so the dispatcher asks the bus daemon itself.
    """
    reply = await bus.call(
        Message(
            destination=BUS_DAEMON,
            path="/org/freedesktop/DBus",
            interface=BUS_DAEMON,
            member="GetConnectionCredentials",
            signature="s",
            body=[sender],
        )
    )
    if reply is None:
        raise errors.Internal("the bus connection closed")
    if reply.message_type == MessageType.ERROR:
        detail = reply.body[0] if reply.body else reply.error_name
        raise errors.AccessDenied(f"cannot identify the caller {sender}: {detail}")
    credentials: dict[str, Any] = reply.body[0]
    pid = credentials.get("ProcessID")
    uid = credentials.get("UnixUserID")
    if pid is None or uid is None:
        raise errors.AccessDenied(f"the bus does not report the PID and UID of {sender}")
    return Caller(pid=int(pid.value), uid=int(uid.value))
