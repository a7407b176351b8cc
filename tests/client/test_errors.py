"""The client's errors (client/errors.py): every error name of the contract comes back as
the service's own class, and an error of the bus itself keeps its name."""

from __future__ import annotations

import pytest

from llmux.client.errors import BusError, error_from_name
from llmux.common import errors
from llmux.common.contract import ErrorName


@pytest.mark.parametrize("name", list(ErrorName))
def test_every_error_name_comes_back_as_the_services_own_class(name: str) -> None:
    exc = error_from_name(name, "why")
    assert type(exc) is errors.BY_NAME[name]
    assert exc.dbus_name == name and exc.message == "why"


def test_an_error_of_the_bus_keeps_its_name() -> None:
    exc = error_from_name("org.freedesktop.DBus.Error.AccessDenied", "policy")
    assert isinstance(exc, BusError) and exc.dbus_name.endswith("AccessDenied")
