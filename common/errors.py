"""The host service's error hierarchy, one class per contract.ErrorName.

Each class carries its D-Bus error name, so the D-Bus face maps an exception to
a named error in one line, the core raises them without importing D-Bus, and the
client (llmux.client) raises the same classes again from the names (``BY_NAME``):
part of the contract, so it lives beside it, not in the service.
"""

from __future__ import annotations

from llmux.common.contract import ErrorName


class HostError(Exception):
    """Base of every error the service answers with; the message is for humans."""

    dbus_name: str = ErrorName.INTERNAL

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class NotFound(HostError):
    dbus_name = ErrorName.NOT_FOUND


class AccessDenied(HostError):
    dbus_name = ErrorName.ACCESS_DENIED


class InvalidArgument(HostError):
    dbus_name = ErrorName.INVALID_ARGUMENT


class NoSpace(HostError):
    dbus_name = ErrorName.NO_SPACE


class PidInUse(HostError):
    dbus_name = ErrorName.PID_IN_USE


class PortInUse(HostError):
    """A TCP port the checkpointed tree listened on is taken on this host."""

    dbus_name = ErrorName.PORT_IN_USE


class CriuFailed(HostError):
    """CRIU exited non-zero; the message carries the relevant log excerpt."""

    dbus_name = ErrorName.CRIU_FAILED


class CudaFailed(HostError):
    dbus_name = ErrorName.CUDA_FAILED


class ManifestMismatch(HostError):
    """The checkpoint was taken under conditions this host cannot restore."""

    dbus_name = ErrorName.MANIFEST_MISMATCH


class Busy(HostError):
    dbus_name = ErrorName.BUSY


class Cancelled(HostError):
    dbus_name = ErrorName.CANCELLED


class Timeout(HostError):
    dbus_name = ErrorName.TIMEOUT


class Unsupported(HostError):
    dbus_name = ErrorName.UNSUPPORTED


class NoSuchProcess(HostError):
    dbus_name = ErrorName.NO_SUCH_PROCESS


class StoreFailed(HostError):
    """The remote checkpoint store could not be used: unreachable, a missing bucket,
    credentials refused; the message names the store and what failed."""

    dbus_name = ErrorName.STORE_FAILED


class Internal(HostError):
    dbus_name = ErrorName.INTERNAL


BY_NAME: dict[str, type[HostError]] = {
    cls.dbus_name: cls
    for cls in (
        NotFound, AccessDenied, InvalidArgument, NoSpace, PidInUse, PortInUse, CriuFailed,
        CudaFailed, ManifestMismatch, Busy, Cancelled, Timeout, Unsupported, NoSuchProcess,
        StoreFailed, Internal,
    )
}
"""Every ErrorName to its class: what a client raises for an error reply."""
assert set(BY_NAME) == set(ErrorName), "one class per contract.ErrorName"
