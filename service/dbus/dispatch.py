"""Answers the method calls of our interfaces, knowing who called.

dbus-next does not tell a method handler who called (its issue #129). Its
user message handlers run before its own dispatch (BaseMessageBus._process_message),
so ``Dispatcher.handle`` claims the METHOD_CALLs of org.llmux.Host1 and
org.llmux.Host1.Job (the routes exports.py makes from the contract), asks
the bus daemon for the sender's PID and UID, runs the route and sends the
reply itself. Every failure is answered with a name from contract.ErrorName:
dbus-next would answer an exception with the Python traceback in the text.
Introspection, properties and ObjectManager calls are left to dbus-next.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import ErrorType, MessageFlag, MessageType
from dbus_next.message import Message

from llmux.common import errors
from llmux.service.core.engine import Caller
from llmux.service.dbus.bus import caller_of, connected, exported, property_names
from llmux.service.journal import fields

log = logging.getLogger(__name__)

PROPERTIES = "org.freedesktop.DBus.Properties"
UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"
_PROPERTY_SIGNATURES = {"Get": "ss", "GetAll": "s", "Set": "ssv"}


@dataclass(frozen=True)
class Reply:
    signature: str = ""
    body: tuple[Any, ...] = ()
    after: Callable[[], None] | None = None  # runs once the reply is queued


Handler = Callable[[Caller, Message], Awaitable[Reply]]


@dataclass(frozen=True)
class Route:
    interface: str
    member: str
    signature: str
    handler: Handler


class Dispatcher:
    def __init__(self, bus: MessageBus):
        self._bus = bus
        self._routes: list[tuple[Callable[[str], bool], Route]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, on_path: Callable[[str], bool], route: Route) -> None:
        self._routes.append((on_path, route))

    def _find(self, msg: Message) -> Route | None:
        for on_path, route in self._routes:
            if route.member != msg.member or not on_path(msg.path):
                continue
            if msg.interface in (None, route.interface):
                return route
        return None

    def handle(self, msg: Message) -> bool:
        """The bus's message handler: True claims the call for us."""
        if msg.message_type != MessageType.METHOD_CALL:
            return False
        if msg.interface == PROPERTIES:
            # dbus-next answers a bad Properties call right, but logs each at ERROR level
            # with a traceback: those are answered here, only good ones left to it
            refusal = self._property_refusal(msg)
            if refusal is None:
                return False
            self._reply(msg, refusal)
            return True
        route = self._find(msg)
        if route is None:
            return False
        task = asyncio.create_task(self._serve(msg, route))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _property_refusal(self, msg: Message) -> Message | None:
        """The error a Properties call gets, or None when dbus-next may answer it."""
        if not exported(self._bus, msg.path):
            return Message.new_error(msg, UNKNOWN_OBJECT, f"no object at {msg.path}")
        expected = _PROPERTY_SIGNATURES.get(msg.member or "")
        if expected is None:
            return Message.new_error(msg, ErrorType.UNKNOWN_METHOD.value,
                                     f"{PROPERTIES} has no method {msg.member}")
        if msg.signature != expected:
            return Message.new_error(msg, ErrorType.INVALID_ARGS.value,
                                     f"{PROPERTIES}.{msg.member} takes ({expected}), "
                                     f"not ({msg.signature})")
        if msg.member == "Set":
            return Message.new_error(msg, ErrorType.PROPERTY_READ_ONLY.value,
                                     "llmuxd's properties are read-only")
        interface = msg.body[0]
        names = property_names(self._bus, msg.path, interface)
        if names is None:
            return Message.new_error(msg, ErrorType.UNKNOWN_INTERFACE.value,
                                     f"no interface {interface!r} at {msg.path}")
        if msg.member == "Get" and msg.body[1] not in names:
            return Message.new_error(msg, ErrorType.UNKNOWN_PROPERTY.value,
                                     f"{interface} has no property {msg.body[1]!r}")
        return None

    async def _serve(self, msg: Message, route: Route) -> None:
        reply_fields: dict[str, Any] = fields(method=route.member, sender=msg.sender)
        after = None
        try:
            if msg.signature != route.signature:
                raise errors.InvalidArgument(
                    f"{route.member} takes ({route.signature}), not ({msg.signature})"
                )
            caller = await caller_of(self._bus, msg.sender)
            reply_fields["journal_fields"].update(
                CALLER_PID=str(caller.pid), CALLER_UID=str(caller.uid)
            )
            result = await route.handler(caller, msg)
            answer = Message.new_method_return(msg, result.signature, list(result.body))
            after = result.after
        except errors.HostError as exc:
            reply_fields["journal_fields"]["ERROR"] = exc.dbus_name
            log.info("%s refused: %s", route.member, exc, extra=reply_fields)
            answer = Message.new_error(msg, exc.dbus_name, str(exc))
        except asyncio.CancelledError:
            answer = Message.new_error(msg, errors.Cancelled.dbus_name, "llmuxd is stopping")
        except Exception:
            log.exception("%s failed unexpectedly", route.member, extra=reply_fields)
            answer = Message.new_error(
                msg,
                errors.Internal.dbus_name,
                f"internal error in llmuxd answering {route.member}; see the daemon's log",
            )
        self._reply(msg, answer)
        if after is not None:
            after()

    def _reply(self, msg: Message, answer: Message) -> None:
        if not msg.flags & MessageFlag.NO_REPLY_EXPECTED and connected(self._bus):
            self._bus.send(answer)

    async def drain(self) -> None:
        """Waits for the calls being answered (WaitJob ends when its job does)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)
