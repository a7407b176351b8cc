"""The seam between the lifecycle and the process strategies the host service carries out.

cuda_suspend and checkpoint need root on the host (CRIU, the CUDA checkpoint
API), so the shim never does them itself: it asks llmuxd over D-Bus. The
lifecycle sees only the ProcessBackend protocol; HostServiceBackend is the real
implementation (over llmux.client), and errors come back as shim errors naming the
operation: each of the service's own error classes with its HTTP status (HOST_ERRORS),
HostUnavailable (503) only when llmuxd cannot be reached or the bus refuses.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from llmux.client.errors import BusError
from llmux.common import errors
from llmux.common.contract import CheckpointInfo
from llmux.shim.config import Config
from llmux.shim.errors import Conflict, HostRefused, HostUnavailable, ShimError

log = logging.getLogger(__name__)

#: the service's errors as HTTP: (status, OpenAI-style error type); the rest is 502
HOST_ERRORS: dict[type[errors.HostError], tuple[int, str]] = {
    errors.InvalidArgument: (400, "invalid_request_error"),
    errors.AccessDenied: (403, "permission_error"),
    errors.NotFound: (404, "not_found_error"),
    errors.Busy: (409, "conflict_error"),
    errors.PidInUse: (409, "conflict_error"),
    errors.PortInUse: (409, "conflict_error"),
    errors.ManifestMismatch: (409, "conflict_error"),
    errors.NoSuchProcess: (410, "engine_error"),
    errors.Unsupported: (501, "unsupported_error"),
    errors.NoSpace: (507, "insufficient_storage"),
    errors.Cancelled: (503, "host_service_error"),
    errors.Timeout: (504, "timeout"),
    errors.CriuFailed: (502, "host_service_error"),
    errors.CudaFailed: (502, "host_service_error"),
    errors.StoreFailed: (502, "host_service_error"),
    errors.Internal: (502, "host_service_error"),
}


def host_error(what: str, e: BaseException) -> ShimError:
    """A failure of the host service as the shim answers it."""
    if isinstance(e, ShimError):
        return e
    text = f"host service: {what} failed: {_describe(e)}"
    if isinstance(e, errors.HostError) and not isinstance(e, BusError):
        status, kind = HOST_ERRORS.get(type(e), (502, "host_service_error"))
        return HostRefused(text, http_status=status, error_type=kind, code=e.dbus_name)
    return HostUnavailable(text, code=getattr(e, "dbus_name", None))


@dataclass(frozen=True)
class RestoredTree:
    """A process tree the host service restored into our container."""

    root_pid: int
    pids: list[int]


@dataclass(frozen=True)
class StoredCheckpoint:
    """A checkpoint llmuxd holds for one of our models."""

    gpus: list[int]
    """The GPUs its CUDA state is on (host indices), as given at the dump; empty: unknown."""


class ProcessBackend(Protocol):
    async def check(self) -> None:
        """Raise HostUnavailable with a clear message if llmuxd cannot be reached."""

    async def suspend(self, model: str, root_pid: int) -> None: ...

    async def resume(self, model: str, root_pid: int, *,
                     gpu_map: Mapping[int, int] | None = None) -> None:
        """``gpu_map``: old GPU to new GPU (host indices), every GPU of the CUDA state."""
        ...

    async def checkpoint(self, model: str, root_pid: int, *, weights_bytes: int,
                         gpus: Sequence[int] = ()) -> None:
        """Dump the tree to images; the tree is gone afterwards. ``gpus``: where its CUDA
        state is (host indices), kept with the checkpoint for a shim started later."""

    async def restore(self, model: str, *, keep_images: bool,
                      gpu_map: Mapping[int, int] | None = None,
                      replica: bool = False, port: int | None = None) -> RestoredTree:
        """``replica``: even while trees restored from the checkpoint run elsewhere.
        ``port``: the engine port this config gives the model; a checkpoint whose engine
        listened on another is refused before anything is restored (the restored engine
        would not be found where the shim looks for it)."""
        ...

    async def find_checkpoint(self, model: str) -> StoredCheckpoint | None:
        """The model's checkpoint llmuxd holds, or None."""
        ...


class RestoreChecker(Protocol):
    async def check_restore(self, model: str) -> str | None:
        """None when llmuxd would restore the checkpoint here; else its reason."""


class HostServiceBackend:
    """ProcessBackend over llmuxd's D-Bus API (llmux.client.hostclient)."""

    def __init__(self, bus: str = "system", *, job_timeout_secs: float = 1800.0) -> None:
        self.bus = bus
        self.job_timeout_secs = job_timeout_secs
        self._client: Any = None
        self._lock = asyncio.Lock()

    async def _connected(self) -> Any:
        async with self._lock:
            if self._client is None:
                from llmux.client.hostclient import HostClient

                client = HostClient(self.bus)
                try:
                    await client.connect()
                except Exception as e:
                    raise HostUnavailable(
                        f"cannot reach the llmux host service (llmuxd) on the {self.bus} bus: "
                        f"{_describe(e)}; is llmuxd running, and may this user talk to it?"
                    ) from e
                self._client = client
            return self._client

    async def _run(self, what: str, model: str, call: Any) -> Any:
        client = await self._connected()
        try:
            return await call(client)
        except Exception as e:
            raise host_error(f"{what} of model {model}", e) from e

    async def check(self) -> None:
        client = await self._connected()
        try:
            info = await client.info()
        except Exception as e:
            raise HostUnavailable(f"the llmux host service (llmuxd) on the {self.bus} bus does "
                                  f"not answer: {_describe(e)}") from e
        log.info("host service: %s", info)

    async def suspend(self, model: str, root_pid: int) -> None:
        await self._run("suspend", model,
                        lambda c: c.suspend(model, root_pid, timeout=self.job_timeout_secs))

    async def resume(self, model: str, root_pid: int, *,
                     gpu_map: Mapping[int, int] | None = None) -> None:
        await self._run("resume", model, lambda c: c.resume(
            model, root_pid, gpu_map=gpu_map, timeout=self.job_timeout_secs))

    async def checkpoint(self, model: str, root_pid: int, *, weights_bytes: int,
                         gpus: Sequence[int] = ()) -> None:
        await self._run("checkpoint", model, lambda c: c.checkpoint(
            model, root_pid, leave_running=False, weights_bytes=weights_bytes, gpus=gpus,
            timeout=self.job_timeout_secs))

    async def restore(self, model: str, *, keep_images: bool,
                      gpu_map: Mapping[int, int] | None = None,
                      replica: bool = False, port: int | None = None) -> RestoredTree:
        if port is not None:
            await self._check_port(model, port)
        result: CheckpointInfo = await self._run("restore", model, lambda c: c.restore(
            model, keep_images=keep_images, gpu_map=gpu_map, replica=replica,
            timeout=self.job_timeout_secs))
        if result.root_pid <= 0:
            raise HostUnavailable(f"host service: restore of model {model} answered without "
                                  f"a usable RootPid/Pids: {result!r}")
        return RestoredTree(root_pid=result.root_pid, pids=result.pids or [result.root_pid])

    async def _check_port(self, model: str, port: int) -> None:
        """The checkpoint's engine listened on ``port`` (a checkpoint not listed here, e.g.
        one only in the remote store, is left to the restore's own checks)."""
        client = await self._connected()
        try:
            info: CheckpointInfo | None = await client.get_checkpoint(model)
        except errors.NotFound:
            return
        except Exception as e:
            raise host_error(f"looking up the checkpoint of model {model}", e) from e
        if info is not None and info.listen_ports and port not in info.listen_ports:
            raise Conflict(
                f"model {model}: its checkpoint's engine listened on port(s) "
                f"{sorted(info.listen_ports)}, but this config gives it port {port}: the "
                f"restored engine would not answer there; the checkpoint is kept (give the "
                f"model its old port to restore it)")

    async def check_restore(self, model: str) -> str | None:
        """None when llmuxd would restore the model's checkpoint into this container; else
        llmuxd's reason (it runs the restore's own checks, touching nothing)."""
        ok, why = await self._run("restore check", model, lambda c: c.check_restore(model))
        return None if ok else str(why)

    async def find_checkpoint(self, model: str) -> StoredCheckpoint | None:
        client = await self._connected()
        try:
            info: CheckpointInfo | None = await client.get_checkpoint(model)
        except errors.NotFound:
            return None
        except Exception as e:
            raise host_error(f"looking up the checkpoint of model {model}", e) from e
        return None if info is None else StoredCheckpoint(gpus=list(info.gpus))

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            result = client.close()
            if asyncio.iscoroutine(result):
                await result


def backend_for(config: Config) -> HostServiceBackend | None:
    """The backend a config asks for: one when any model or a checkpoint section needs llmuxd."""
    if config.checkpoint is None and not config.needs_host:
        return None
    cp = config.checkpoint
    return HostServiceBackend(cp.bus if cp else "system",
                              job_timeout_secs=cp.job_timeout_secs if cp else 1800.0)


def _describe(e: BaseException) -> str:
    name = getattr(e, "dbus_name", None)
    message = getattr(e, "message", None) or str(e) or type(e).__name__
    return f"{name}: {message}" if name else message
