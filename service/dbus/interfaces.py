"""The three interfaces of contract.py as dbus-next objects, generated from the contract.

Nothing here is written per method or per property: each class is built from a
``contract.Interface``, so what ``busctl introspect`` shows is the contract. Method
stubs never run: dispatch.py answers every method call of these interfaces before
dbus-next's own dispatch (it must know the caller first) and hands it to the one
handler marked ``@exports(<Method>)`` (exports.py). Properties are read from a
source (a record's ``to_properties()``), signals are sent with ``emit``.

Only dbus-next's public decorators are used (method, signal, dbus_property); the
signatures they need as annotations are given as the contract's strings. Property
getters never raise: dbus-next would put the traceback in the error text.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dbus_next.constants import PropertyAccess
from dbus_next.errors import DBusError
from dbus_next.service import ServiceInterface, dbus_property, method, signal

from llmux.common import contract
from llmux.common.contract import ErrorName, JobProgress, JobState, Operation

log = logging.getLogger(__name__)

_ZERO = {"s": "", "o": "/", "b": False, "d": 0.0}


def _zero(signature: str) -> Any:
    if signature.startswith("a"):
        return {} if signature.startswith("a{") else []
    return _ZERO.get(signature, 0)


class ContractObject(ServiceInterface):  # type: ignore[misc]
    """A contract.Interface served by dbus-next; subclasses are made by ``object_class``."""

    spec: ClassVar[contract.Interface]

    def __init__(self, source: Callable[[], Mapping[str, Any]]):
        super().__init__(self.spec.name)
        self._source = source
        self._last: dict[str, Any] = {p.name: _zero(p.signature) for p in self.spec.properties}
        self._read = False

    def values(self) -> dict[str, Any]:
        """The properties now; the last known ones if the source fails."""
        try:
            self._last = {**self._last, **self._source()}
            self._read = True
        except Exception:
            log.exception("reading the properties of %s failed; answering the last known",
                          self.spec.name)
        return self._last

    def refresh(self, *names: str) -> None:
        """Announces changed properties (PropertiesChanged): those named, else every changed one."""
        first = not self._read
        before = self._last
        after = self.values()
        if names:
            changed = {name: after[name] for name in names}
        elif first:
            return
        else:
            changed = {name: value for name, value in after.items() if before.get(name) != value}
        if changed:
            self.emit_properties_changed(changed)

    def emit(self, sig: contract.Signal, *args: Any) -> None:
        if sig not in self.spec.signals:
            raise ValueError(f"{sig.name} is not a signal of {self.spec.name}")
        getattr(self, sig.name)(*args)


def _stub(m: contract.Method) -> Any:
    def stub(self: ContractObject, *args: Any) -> None:
        # reached only if dispatch.py failed to claim a call
        raise DBusError(ErrorName.INTERNAL, "the call was not dispatched")  # type: ignore[no-untyped-call]

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + [
        inspect.Parameter(arg.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          annotation=arg.signature)
        for arg in m.args
    ]
    stub.__name__ = m.name
    stub.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        params, return_annotation=m.out_signature or inspect.Signature.empty
    )
    return method(name=m.name)(stub)


def _getter(p: contract.Property) -> Any:
    def get(self: ContractObject) -> Any:
        return self.values().get(p.name, _zero(p.signature))

    get.__name__ = p.name  # dbus-next reads the value back by this attribute name
    get.__annotations__ = {"return": p.signature}
    return dbus_property(access=PropertyAccess.READ, name=p.name)(get)


def _emitter(s: contract.Signal) -> Any:
    def emit(self: ContractObject, *args: Any) -> Any:
        return args[0] if len(s.args) == 1 else list(args)

    emit.__name__ = s.name
    emit.__annotations__ = {"return": s.signature}
    return signal(name=s.name)(emit)


def object_class(spec: contract.Interface) -> type[ContractObject]:
    attrs: dict[str, Any] = {"spec": spec, "__doc__": f"{spec.name} (from contract.py)"}
    for m in spec.methods:
        attrs[m.name] = _stub(m)
    for p in spec.properties:
        attrs[p.name] = _getter(p)
    for s in spec.signals:
        attrs[s.name] = _emitter(s)
    name = spec.name.rsplit(".", 1)[-1] + "Object"
    return type(name, (ContractObject,), attrs)


ManagerObject = object_class(contract.MANAGER)
JobObject = object_class(contract.JOB)
CheckpointObject = object_class(contract.CHECKPOINT_OBJECT)


@dataclass
class JobView:
    """The job's state as its D-Bus object shows it; jobs.py owns the updates."""

    id: int
    operation: Operation
    model: str
    state: JobState = JobState.RUNNING
    progress: JobProgress = field(default_factory=JobProgress)

    def properties(self) -> dict[str, Any]:
        own = {p.name: getattr(self, p.attr) for p in contract.JOB_OBJECT_PROPERTIES}
        own.update(Operation=str(self.operation), State=str(self.state))
        return {**own, **self.progress.to_properties()}
