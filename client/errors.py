"""Error replies to exceptions: the service's own classes, by their D-Bus names.

An ``org.llmux.Error.*`` reply becomes the very class the service raised
(llmux.common.errors.BY_NAME); anything else the bus answers (its policy refused,
no llmuxd, no reply) is a BusError carrying the bus's own name.
"""

from __future__ import annotations

from llmux.common.contract import ERROR_PREFIX
from llmux.common.errors import BY_NAME, HostError

__all__ = ["CONNECTION_FAILED", "BusError", "ConnectionFailed", "HostError", "error_from_name"]

CONNECTION_FAILED = f"{ERROR_PREFIX}.Client.ConnectionFailed"


class BusError(HostError):
    """The bus answered, not llmuxd (org.freedesktop.DBus.Error.*): the name says why."""

    def __init__(self, dbus_name: str, message: str):
        super().__init__(message)
        self.dbus_name = dbus_name


class ConnectionFailed(BusError):
    """No connection to the bus (or it closed): a client-side name."""

    def __init__(self, message: str):
        super().__init__(CONNECTION_FAILED, message)


def error_from_name(dbus_name: str, message: str) -> HostError:
    cls = BY_NAME.get(dbus_name)
    return cls(message) if cls is not None else BusError(dbus_name, message)
