"""The contract's records and errors round-trip, and each host error keeps its meaning in HTTP."""

from __future__ import annotations

import pytest

from llmux.client.errors import BusError
from llmux.common import contract, errors
from llmux.common.contract import CheckpointInfo, HostInfo, JobProgress
from llmux.shim.backend import host_error
from llmux.shim.errors import HostRefused, HostUnavailable


@pytest.mark.parametrize(("error", "status"), [
    (errors.NotFound, 404), (errors.ManifestMismatch, 409), (errors.Busy, 409),
    (errors.PidInUse, 409), (errors.PortInUse, 409), (errors.NoSpace, 507),
    (errors.InvalidArgument, 400), (errors.Unsupported, 501), (errors.Timeout, 504),
    (errors.CriuFailed, 502),
])
def test_the_shim_answers_each_host_error_with_its_status(
        error: type[errors.HostError], status: int) -> None:
    shim_error = host_error("restore of model m", error("the service's words"))
    assert isinstance(shim_error, HostRefused)
    assert shim_error.http_status == status
    assert shim_error.code == error.dbus_name
    assert "the service's words" in shim_error.message


def test_only_an_unreachable_service_is_503() -> None:
    shim_error = host_error("x", BusError("org.freedesktop.DBus.Error.ServiceUnknown", "gone"))
    assert isinstance(shim_error, HostUnavailable) and shim_error.http_status == 503


def test_records_round_trip_through_their_properties() -> None:
    info = CheckpointInfo(model="m", root_pid=7, pids=[7, 8], size_bytes=1 << 30)
    assert CheckpointInfo.from_properties(info.to_properties()) == info
    host = HostInfo(version="1", free_bytes=5)
    assert HostInfo.from_properties({**host.to_properties(), "Unknown": 1}) == host
    progress = JobProgress.from_properties({"Progress": 0.5}, job_id=3)
    assert (progress.fraction, progress.bytes, progress.job_id) == (0.5, 0, 3)


def test_the_contract_declares_each_member_once() -> None:
    for interface in contract.INTERFACES:
        names = [m.name for m in interface.methods] + [p.name for p in interface.properties]
        names += [s.name for s in interface.signals]
        assert len(names) == len(set(names)), interface.name
        assert all(m.interface == interface.name for m in interface.methods)
    assert contract.CHECKPOINT.in_signature == "sua{sv}"
    assert contract.CHECKPOINT_OBJECT.properties[2] == contract.Property("RootPid", "u", "root_pid")
