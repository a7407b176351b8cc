"""Start the built-in engine from tests and benchmarks, and always clean it up.

    with start_engine("org/model-a", free_port(), weights_mb=8) as engine:
        httpx.get(f"{engine.base_url}/v1/models")

    async with await start_engine_async("org/model-a", free_port()) as engine:
        ...

The engine runs in its own session (process group), so ``stop()`` ends the API server
and its engine core together even if one of them was killed or restored separately.

It is started as the product starts engines: through ``python -m llmux.shim.launch``,
which makes io_uring unavailable so uvloop's libuv uses epoll and CRIU can dump the
tree. ``io_uring=True`` starts it bare (vLLM's trait shows: an io_uring fd).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

from llmux.shim.launch import launcher_argv

DEFAULT_START_TIMEOUT_SECS = 120.0


class EngineStartError(RuntimeError):
    """The engine exited or did not answer /health in time; carries its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out (bind to port 0), free at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def engine_argv(model_path: str, port: int, *, weights_mb: int = 64, sleep_mode: bool = True,
                host: str = "127.0.0.1", extra_args: Sequence[str] = (),
                io_uring: bool = False) -> list[str]:
    """The command line, shaped like ``vllm serve MODEL --port PORT ...``.

    Wrapped in ``python -m llmux.shim.launch --`` as the supervisor does, unless
    ``io_uring`` (then the API server's uvloop sets up an io_uring CRIU cannot dump).
    """
    argv = [sys.executable, "-m", "llmux.shim.builtin", "serve", model_path, "--host", host,
            "--port", str(port), "--weights-mb", str(weights_mb)]
    if sleep_mode:
        argv.append("--enable-sleep-mode")
    argv = [*argv, *extra_args]
    return argv if io_uring else launcher_argv(argv)


@dataclass
class EngineProcess:
    """A running built-in engine (API server process plus its engine-core child)."""

    model_path: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    host: str = "127.0.0.1"
    _own_log: bool = field(default=True, repr=False)

    @property
    def pid(self) -> int:
        """The API server's PID (also the process group and session id)."""
        return self.process.pid

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def child_pids(self) -> list[int]:
        """Direct children of the API server (engine core, resource tracker), from /proc."""
        children: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                children += [int(p) for p in task.read_text().split()]
        return children

    def tree_pids(self) -> list[int]:
        """The API server and every process under it (engine core, its worker, the resource
        tracker), parents first: what a checkpoint of the engine holds."""
        found, i = [self.pid], 0
        while i < len(found):
            for task in Path(f"/proc/{found[i]}/task").glob("*/children"):
                with contextlib.suppress(OSError):
                    found += [int(p) for p in task.read_text().split() if int(p) not in found]
            i += 1
        return found

    def _check_not_exited(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise EngineStartError(
                f"engine {self.model_path!r} exited with status {code} before it was ready; "
                f"log tail:\n{self.log_text()[-3000:]}")

    def wait_ready(self, timeout_secs: float = DEFAULT_START_TIMEOUT_SECS) -> None:
        """Block until GET /health answers 200."""
        deadline = time.monotonic() + timeout_secs
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                self._check_not_exited()
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        return
                time.sleep(0.1)
        raise EngineStartError(f"engine {self.model_path!r} not ready after {timeout_secs:.0f}s; "
                               f"log tail:\n{self.log_text()[-3000:]}")

    async def wait_ready_async(self, timeout_secs: float = DEFAULT_START_TIMEOUT_SECS) -> None:
        """Like wait_ready, without blocking the event loop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_secs
        async with httpx.AsyncClient(timeout=2.0) as client:
            while loop.time() < deadline:
                self._check_not_exited()
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.base_url}/health")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise EngineStartError(f"engine {self.model_path!r} not ready after {timeout_secs:.0f}s; "
                               f"log tail:\n{self.log_text()[-3000:]}")

    def stop(self, grace_secs: float = 15.0) -> int | None:
        """SIGTERM to the whole group, SIGKILL after ``grace_secs``; the API server's status."""
        pgid = self.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace_secs)
        deadline = time.monotonic() + grace_secs
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _group_alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        code = self.process.wait()
        deadline = time.monotonic() + grace_secs
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._own_log:
            with contextlib.suppress(FileNotFoundError):
                self.log_path.unlink()
        return code

    async def stop_async(self, grace_secs: float = 15.0) -> int | None:
        return await asyncio.to_thread(self.stop, grace_secs)

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    async def __aenter__(self) -> EngineProcess:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop_async()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A group whose only members are zombies still answers; look for a live member.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def spawn_engine(model_path: str, port: int | None = None, *, weights_mb: int = 64,
                 extra_env: Mapping[str, str] | None = None, extra_args: Sequence[str] = (),
                 sleep_mode: bool = True, log_path: Path | None = None,
                 io_uring: bool = False) -> EngineProcess:
    """Start the engine without waiting for it (its own session, output to a log file)."""
    port = free_port() if port is None else port
    own_log = log_path is None
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="llmux-builtin-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    env = {**os.environ, "NO_COLOR": "1", **(extra_env or {})}
    argv = engine_argv(model_path, port, weights_mb=weights_mb, sleep_mode=sleep_mode,
                       extra_args=extra_args, io_uring=io_uring)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   env=env, start_new_session=True, close_fds=True)
    return EngineProcess(model_path, port, process, log_path, _own_log=own_log)


def start_engine(model_path: str, port: int | None = None, *, weights_mb: int = 64,
                 extra_env: Mapping[str, str] | None = None, extra_args: Sequence[str] = (),
                 sleep_mode: bool = True, log_path: Path | None = None,
                 timeout_secs: float = DEFAULT_START_TIMEOUT_SECS,
                 io_uring: bool = False) -> EngineProcess:
    """Start the engine and wait for /health; stops it again if it never gets ready."""
    engine = spawn_engine(model_path, port, weights_mb=weights_mb, extra_env=extra_env,
                          extra_args=extra_args, sleep_mode=sleep_mode, log_path=log_path,
                          io_uring=io_uring)
    try:
        engine.wait_ready(timeout_secs)
    except BaseException:
        engine.stop()
        raise
    return engine


async def start_engine_async(model_path: str, port: int | None = None, *, weights_mb: int = 64,
                             extra_env: Mapping[str, str] | None = None,
                             extra_args: Sequence[str] = (), sleep_mode: bool = True,
                             log_path: Path | None = None,
                             timeout_secs: float = DEFAULT_START_TIMEOUT_SECS,
                             io_uring: bool = False) -> EngineProcess:
    """start_engine for async tests: the event loop keeps running while the engine starts."""
    engine = spawn_engine(model_path, port, weights_mb=weights_mb, extra_env=extra_env,
                          extra_args=extra_args, sleep_mode=sleep_mode, log_path=log_path,
                          io_uring=io_uring)
    try:
        await engine.wait_ready_async(timeout_secs)
    except BaseException:
        await engine.stop_async()
        raise
    return engine
