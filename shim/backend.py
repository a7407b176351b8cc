"""The seam between the lifecycle and the process strategies the host service carries out.

cuda_suspend and checkpoint need root on the host (CRIU, the CUDA checkpoint
API), so the shim never does them itself: it asks llmuxd over D-Bus. The
lifecycle sees only the ProcessBackend protocol; HostServiceBackend is the real
implementation, and errors come back as shim errors naming the operation.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from llmux.shim.config import Config
from llmux.shim.errors import HostUnavailable

log = logging.getLogger(__name__)

_NOT_FOUND = "org.llmux.Error.NotFound"


@dataclass(frozen=True)
class RestoredTree:
    """A process tree the host service restored into our container."""

    root_pid: int
    pids: list[int]


class ProcessBackend(Protocol):
    async def check(self) -> None:
        """Raise HostUnavailable with a clear message if llmuxd cannot be reached."""

    async def suspend(self, model: str, root_pid: int) -> None: ...

    async def resume(self, model: str, root_pid: int) -> None: ...

    async def checkpoint(self, model: str, root_pid: int, *, weights_bytes: int) -> None:
        """Dump the tree to images; the tree is gone afterwards."""

    async def restore(self, model: str, *, keep_images: bool) -> RestoredTree: ...

    async def has_checkpoint(self, model: str) -> bool: ...


class HostServiceBackend:
    """ProcessBackend over llmuxd's D-Bus API (llmux.shim.hostclient)."""

    def __init__(self, bus: str = "system", *, job_timeout_secs: float = 1800.0) -> None:
        self.bus = bus
        self.job_timeout_secs = job_timeout_secs
        self._client: Any = None
        self._lock = asyncio.Lock()

    async def _connected(self) -> Any:
        async with self._lock:
            if self._client is None:
                try:
                    from llmux.shim.hostclient import HostClient
                except ImportError as e:  # pragma: no cover - a broken installation
                    raise HostUnavailable(f"the host service client is missing: {e}") from e
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
        except HostUnavailable:
            raise
        except Exception as e:
            name = getattr(e, "dbus_name", None)
            raise HostUnavailable(f"host service: {what} of model {model} failed: "
                                  f"{_describe(e)}", code=name) from e

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

    async def resume(self, model: str, root_pid: int) -> None:
        await self._run("resume", model,
                        lambda c: c.resume(model, root_pid, timeout=self.job_timeout_secs))

    async def checkpoint(self, model: str, root_pid: int, *, weights_bytes: int) -> None:
        await self._run("checkpoint", model, lambda c: c.checkpoint(
            model, root_pid, leave_running=False, weights_bytes=weights_bytes,
            timeout=self.job_timeout_secs))

    async def restore(self, model: str, *, keep_images: bool) -> RestoredTree:
        result = await self._run("restore", model, lambda c: c.restore(
            model, keep_images=keep_images, timeout=self.job_timeout_secs))
        try:
            root = int(result["RootPid"])
            pids = [int(p) for p in result.get("Pids", [root])]
        except (KeyError, TypeError, ValueError) as e:
            raise HostUnavailable(f"host service: restore of model {model} answered without "
                                  f"a usable RootPid/Pids: {result!r}") from e
        return RestoredTree(root_pid=root, pids=pids)

    async def has_checkpoint(self, model: str) -> bool:
        client = await self._connected()
        try:
            return await client.get_checkpoint(model) is not None
        except Exception as e:
            if getattr(e, "dbus_name", None) == _NOT_FOUND:
                return False
            raise HostUnavailable(f"host service: cannot look up the checkpoint of model "
                                  f"{model}: {_describe(e)}",
                                  code=getattr(e, "dbus_name", None)) from e

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
