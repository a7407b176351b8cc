"""``@exports(contract.X)``: the one decorator that makes a coroutine the handler of a method.

As tuned's ``@exports.export(...)``, the signature is written once, next to the code,
here as the contract's declaration of the method. ``routes(owner)`` finds the marked
handlers of an object and makes the dispatcher's routes: the arguments arrive
unpacked, the a{sv} options read into the method's typed options (unknown names and
wrong types refused), and the handler's tuple goes back with the declared out signature.
Every method of the contract must have exactly one handler.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from dbus_next.message import Message
from dbus_next.signature import Variant

from llmux.common import contract, errors
from llmux.service.core.engine import Caller
from llmux.service.dbus.dispatch import Reply, Route

_MARK = "__llmux_exports__"

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


@dataclass(frozen=True)
class Call:
    """Who called, and on which object (a job's Cancel needs its path)."""

    caller: Caller
    path: str


def exports(method: contract.Method) -> Callable[[F], F]:
    """Marks ``async def handler(self, call: Call, *args) -> tuple | Reply`` as ``method``'s."""

    def mark(fn: F) -> F:
        setattr(fn, _MARK, method)
        return fn

    return mark


def read_options(method: contract.Method, raw: dict[str, Variant]) -> contract.Options:
    """a{sv} options into the method's typed options: unknown names and wrong types refused."""
    assert method.options is not None
    known = method.options.signatures()
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise errors.InvalidArgument(
            f"{method.name}: unknown option(s) {', '.join(unknown)}; "
            f"known: {', '.join(known) or 'none'}"
        )
    values: dict[str, Any] = {}
    for name, variant in raw.items():
        if variant.signature != known[name]:
            raise errors.InvalidArgument(
                f"{method.name}: option {name!r} has type {known[name]}, not {variant.signature}"
            )
        values[name] = variant.value
    return method.options(**values)


def _route(method: contract.Method, handler: Callable[..., Awaitable[Any]]) -> Route:
    async def serve(caller: Caller, msg: Message) -> Reply:
        args = list(msg.body)
        if method.options is not None:
            args[-1] = read_options(method, args[-1])
        result = await handler(Call(caller, msg.path), *args)
        if isinstance(result, Reply):
            return Reply(method.out_signature, result.body, result.after)
        return Reply(method.out_signature, () if result is None else tuple(result))

    return Route(method.interface, method.name, method.in_signature, serve)


def routes(owner: object) -> list[tuple[Callable[[str], bool], Route]]:
    """(path test, route) for every contract method, from ``owner``'s marked handlers."""
    handlers: dict[contract.Method, Callable[..., Awaitable[Any]]] = {}
    for name in dir(type(owner)):
        method = getattr(getattr(type(owner), name, None), _MARK, None)
        if method is None:
            continue
        if method in handlers:
            raise TypeError(f"two handlers for {method.interface}.{method.name}")
        handlers[method] = getattr(owner, name)
    found: list[tuple[Callable[[str], bool], Route]] = []
    for interface in contract.INTERFACES:
        for method in interface.methods:
            if method not in handlers:
                raise TypeError(f"no @exports handler for {method.interface}.{method.name}")
            found.append((interface.serves, _route(method, handlers.pop(method))))
    if handlers:
        raise TypeError(f"handlers for methods not in the contract: {list(handlers)}")
    return found
