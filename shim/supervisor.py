"""Engine supervisor: spawns, watches, adopts and stops one engine process tree per model.

The supervisor knows processes, not policies nor HTTP: the lifecycle decides when an
engine starts or stops, and every call to an engine's API (the /health polls here
included) goes through :class:`llmux.shim.engineclient.EngineClient`. Process trees are
read with the /proc code the shim shares with llmuxd (llmux.common.proctree, resources).

Every engine is watched through a pidfd, for the ones spawned here and for trees
handed over by the host service alike, so that a death is noticed at once without
polling and a recycled PID can never be signalled by mistake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmux.common import proctree, resources
from llmux.shim import netns, pidns
from llmux.shim.config import Config, EngineKind, ModelConfig
from llmux.shim.engineclient import ENGINE_HOST, EngineClient
from llmux.shim.errors import Conflict, EngineFailed, ModelNotFound
from llmux.shim.launch import launcher_argv

log = logging.getLogger(__name__)

#: (model, exit code or None when unknown, i.e. an adopted process) -> None
DeathListener = Callable[[str, int | None], None]

#: environment every engine gets. UV_USE_IO_URING: libuv's io_uring rings cannot be dumped
#: by CRIU (recent libuv ignores it; llmux.shim.launch is what makes io_uring unavailable).
#: GLOO_SOCKET_IFNAME: vLLM's CPU workers open a dozen gloo listeners on whatever the host
#: name resolves to; one host, one process group: loopback.
ENGINE_ENV = {"NO_COLOR": "1", "VLLM_SERVER_DEV_MODE": "1", "UV_USE_IO_URING": "0",
              "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo"}

#: the environment variable naming the engine a process belongs to (see Supervisor.mark)
ENGINE_MARK = "LLMUX_ENGINE"

LOG_TAIL_LINES = 20
_POLL_SECS = 0.05
_KILL_WAIT_SECS = 10.0
_LAUNCHER_EXIT_SECS = 2.0
_LAUNCH_REPORT_SECS = 30.0


@dataclass
class EngineProcess:
    """One engine's process tree, spawned here or adopted."""

    model: str
    root_pid: int
    adopted: bool
    log_path: Path
    started_at: float = field(default_factory=time.time)
    #: set for engines spawned here: we are the parent and reap them
    popen: subprocess.Popen[bytes] | None = None
    #: pidfds of every member known so far (root first); pidfds never point at a recycled PID
    pidfds: dict[int, int] = field(default_factory=dict)
    returncode: int | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    #: health seen once: a death after this point is a crash, before it a start-up failure
    ready: bool = False
    #: set while someone else (a checkpoint) or stop() is ending the tree on purpose
    exit_expected: bool = False
    #: the root leads its own process group (always for spawned engines)
    leads_group: bool = True
    #: the one termination in progress; stop() and a crash clean-up share it
    ending: asyncio.Future[None] | None = None
    #: the /dev/shm segments the tree made, which outlive it: removed when
    #: it is stopped or dies; after a checkpoint llmuxd keeps them in it and removes them
    made: set[str] = field(default_factory=set)

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()


class Supervisor:
    def __init__(self, config: Config, *, engines: EngineClient | None = None,
                 grace_secs: float = 10.0, health_interval_secs: float = 0.25) -> None:
        self.config = config
        self.grace_secs = grace_secs
        self.health_interval_secs = health_interval_secs
        #: the engines' HTTP API (readiness); made and closed here unless given
        self.engines = engines if engines is not None else EngineClient(config.models)
        self._owns_client = engines is None
        self._engines: dict[str, EngineProcess] = {}
        self._listeners: list[DeathListener] = []
        self._tasks: set[asyncio.Task[None]] = set()
        #: more environment per model: its GPUs (set by the lifecycle's placement)
        self.extra_env: Callable[[str], dict[str, str]] = _no_env

    # ------------------------------------------------------------------ queries

    def model(self, name: str) -> ModelConfig:
        try:
            return self.config.models[name]
        except KeyError:
            raise ModelNotFound(name, list(self.config.models)) from None

    def engine(self, model: str) -> EngineProcess | None:
        return self._engines.get(model)

    def is_alive(self, model: str) -> bool:
        eng = self._engines.get(model)
        return eng is not None and eng.alive

    def pids(self, model: str) -> list[int]:
        """The live tree: root first, then its descendants and its process group."""
        eng = self._engines.get(model)
        if eng is None or not eng.alive:
            return []
        return _tree_pids(eng.root_pid)

    def log_path(self, model: str) -> Path:
        return Path(self.config.log_dir) / f"{model}.log"

    def add_death_listener(self, listener: DeathListener) -> None:
        """Called (model, exit code) when a ready engine dies without being asked to."""
        self._listeners.append(listener)

    # ------------------------------------------------------------------ argv and env

    def argv(self, m: ModelConfig) -> list[str]:
        """The engine's argv (its cmdline once running); never passed through a shell.

        On loopback only: the proxy is the engine's one client, and vLLM's dev endpoints
        (/sleep, /collective_rpc) must not be reachable from the network. spawn() runs it
        through llmux.shim.launch (io_uring unavailable, so that CRIU can dump the tree).
        """
        common = ["serve", m.model_path, "--host", ENGINE_HOST, "--port", str(m.port),
                  "--served-model-name", m.name]
        if m.sleep_mode:
            common.append("--enable-sleep-mode")
        if m.command is not None:
            prefix = list(m.command)
        elif m.engine is EngineKind.BUILTIN:
            prefix = [sys.executable, "-m", "llmux.shim.builtin"]
        else:
            prefix = [self.config.vllm_command]
        argv = [*prefix, *common]
        if m.engine is EngineKind.BUILTIN:
            argv += ["--weights-mb", str(m.weights_mb)]
        return [*argv, *m.extra_args]

    def env(self, m: ModelConfig) -> dict[str, str]:
        return {**os.environ, **ENGINE_ENV, "TMPDIR": str(self.tmp_dir(m.name)), **m.env,
                **self.extra_env(m.name), ENGINE_MARK: self.mark(m.name)}

    def mark(self, model: str) -> str:
        """What every process of the model's engine carries in its environment: a shim
        started again after a crash finds its predecessor's engines by it."""
        return f"{model}:{self.model(model).port}"

    def tmp_dir(self, model: str) -> Path:
        """The engine's own TMPDIR: vLLM's ZMQ ipc sockets, its vllm_dist_* file store and
        torch's caches land here, not among other processes' files in /tmp. Removed when
        the tree is stopped or dies; kept when it ends by a checkpoint (a restore binds
        its sockets here again)."""
        return netns.engine_tmp_dir(model, self.model(model).port)

    def prepare_tmp_dir(self, model: str, *, fresh: bool) -> None:
        """Create the model's TMPDIR (empty for a cold start, kept for a restore)."""
        path = self.tmp_dir(model)
        if fresh:
            shutil.rmtree(path, ignore_errors=True)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)

    # ------------------------------------------------------------------ spawn

    async def spawn(self, model: str) -> EngineProcess:
        """Start the model's engine and wait until /health answers 200.

        Raises EngineFailed (naming the model, the exit code and the log's last
        lines) when it exits or stays unhealthy; nothing is left running then.
        """
        m = self.model(model)
        await self._clear_ended(model, "an engine is already running")
        # a new tree: no pooled connection to the last one, and the way to it chosen anew
        # (its unix socket or its port: llmux.shim.netns)
        await self.engines.release(model)
        argv = self.argv(m)
        if shutil.which(argv[0]) is None:
            raise EngineFailed(f"model {model}: cannot start engine {argv[0]!r}: not found "
                               "or not executable")
        log_path = self._open_log_header(model, argv)
        await asyncio.to_thread(self.prepare_tmp_dir, model, fresh=True)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        report_r, report_w = os.pipe()
        try:
            # subprocess.Popen, not the event loop's subprocess support: uvloop ignores
            # close_fds and would leak every inheritable fd of the shim into the engine
            proc = await asyncio.to_thread(
                subprocess.Popen, launcher_argv(argv), stdin=subprocess.DEVNULL, stdout=fd,
                stderr=fd, env={**self.env(m), pidns.ENV_REPORT_FD: str(report_w),
                                        netns.ENV_PORT: str(m.port), netns.ENV_SOCKET: str(
                                            netns.socket_path(m.name, m.port))},
                close_fds=True, pass_fds=(report_w,), start_new_session=True)
        except OSError as e:
            os.close(report_r)
            raise EngineFailed(f"model {model}: cannot start engine {argv[0]!r}: "
                               f"{e.strerror or e}") from e
        finally:
            os.close(fd)
            os.close(report_w)
        eng = EngineProcess(model=model, root_pid=proc.pid, adopted=False, log_path=log_path,
                            popen=proc)
        self._engines[model] = eng
        self._watch(eng, proc.pid)
        init = await asyncio.to_thread(_read_init_pid, report_r)
        if init is not None:
            # the tree's root is the init of its PID namespace; the launcher, its parent,
            # stays a member (it ends as the init ends)
            self._open_pidfd(eng, init)
            if init in eng.pidfds and not _pidfd_exited(eng.pidfds[proc.pid]):
                asyncio.get_running_loop().remove_reader(eng.pidfds[proc.pid])
                eng.root_pid = init
                self._watch(eng, init, opened=True)
        log.info("model %s: engine started, pid %d, log %s", model, proc.pid, log_path)
        try:
            await self._wait_healthy(eng, m.startup_timeout_secs)
        except BaseException:
            await self._end(eng, self.grace_secs)
            raise
        self._learn_members(eng)
        eng.ready = True
        await self._learn_files(eng)
        return eng

    def _open_log_header(self, model: str, argv: list[str]) -> Path:
        log_dir = self.config.log_dir
        log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.log_path(model)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"--- llmux {time.strftime('%Y-%m-%dT%H:%M:%S')}: starting "
                         f"{' '.join(argv)}\n".encode())
        finally:
            os.close(fd)
        return path

    async def wait_healthy(self, model: str, within_secs: float | None = None) -> None:
        """Wait until the model's engine (spawned or adopted) answers /health with 200."""
        eng = self._require(model)
        await self._wait_healthy(eng, within_secs if within_secs is not None
                                 else self.model(model).startup_timeout_secs)
        eng.ready = True
        await self._learn_files(eng)

    async def _learn_files(self, eng: EngineProcess) -> None:
        pids = [p for p, fd in eng.pidfds.items() if not _pidfd_exited(fd)]
        eng.made |= await asyncio.to_thread(_made_files, pids)

    async def _wait_healthy(self, eng: EngineProcess, within_secs: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_secs
        while True:
            if not eng.alive:
                raise EngineFailed(self._death_message(eng, "during start-up"))
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise EngineFailed(
                    f"model {eng.model}: engine (pid {eng.root_pid}) did not answer /health "
                    f"within {within_secs:g} s (startup_timeout_secs){self._tail_text(eng)}")
            if await self.engines.healthy(eng.model, min(5.0, max(remaining, 0.1))):
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(eng.exited.wait(),
                                       min(self.health_interval_secs,
                                           max(deadline - loop.time(), 0.0)))

    # ------------------------------------------------------------------ leftovers

    async def end_leftovers(self) -> list[int]:
        """End the engines an earlier shim left running (it was SIGKILLed or crashed: the
        engines lead their own sessions and outlive it). Run once at start-up, before any
        engine exists here, so whatever carries one of our marks belongs to nobody: left
        alone it would hold the model's port and GPU memory, and a new start would meet
        "address in use" or load the model twice. Only processes in this network namespace
        count: with --pid=host another container's engines are visible, and are not ours,
        while a tree llmuxd restored for us lives in a mount namespace of its own but in
        ours for the network. A mark names the model's port, and one network namespace has
        one holder of a port: whatever carries our mark here would keep us from serving.
        Returns the PIDs ended."""
        marks = {self.mark(name).encode(): name for name in self.config.models}
        found = await asyncio.to_thread(_marked_processes, marks)
        ended: list[int] = []
        for model, pids in found.items():
            log.warning("model %s: ending the engine an earlier shim left running: pids %s",
                        model, pids)
            root = pids[0]
            st = proctree.read_stat(root)
            eng = EngineProcess(model=model, root_pid=root, adopted=True,
                                log_path=self.log_path(model),
                                leads_group=st is not None and st.pgrp == root)
            for pid in pids:
                self._open_pidfd(eng, pid)
            eng.made |= await asyncio.to_thread(_made_files, pids)
            await self._end(eng, self.grace_secs)
            ended += pids
        return ended

    # ------------------------------------------------------------------ adopt

    async def adopt(self, model: str, root_pid: int, pids: Iterable[int] = ()) -> EngineProcess:
        """Track a tree this supervisor did not spawn (one the host service restored).

        The tree is watched through pidfds and stopped like a spawned one, but
        it is never reaped here (it is not our child) and never treated as a
        stray. Health is the caller's to wait for (wait_healthy).
        """
        self.model(model)
        await self._clear_ended(model, f"cannot adopt pid {root_pid}, an engine is already tracked")
        await self.engines.release(model)  # a new tree: the way to it may be another
        eng = EngineProcess(model=model, root_pid=root_pid, adopted=True,
                            log_path=self.log_path(model))
        try:
            eng.pidfds[root_pid] = os.pidfd_open(root_pid)
            eng.leads_group = os.getpgid(root_pid) == root_pid
        except ProcessLookupError:
            raise EngineFailed(f"model {model}: cannot adopt pid {root_pid}: "
                               "no such process") from None
        self._engines[model] = eng
        self._watch(eng, root_pid, opened=True)
        for pid in pids:
            self._open_pidfd(eng, pid)
        self._learn_members(eng)
        log.info("model %s: adopted engine tree %s", model, sorted(eng.pidfds))
        return eng

    # ------------------------------------------------------------------ death watch

    def _watch(self, eng: EngineProcess, pid: int, *, opened: bool = False) -> None:
        if not opened:
            # our unreaped child: its PID cannot have been recycled, even if it exited
            eng.pidfds[pid] = os.pidfd_open(pid)
        asyncio.get_running_loop().add_reader(eng.pidfds[pid], self._on_root_readable, eng)

    def _on_root_readable(self, eng: EngineProcess) -> None:
        fd = eng.pidfds.get(eng.root_pid)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
        self._spawn_task(self._root_exited(eng))

    async def _root_exited(self, eng: EngineProcess) -> None:
        if eng.popen is not None and eng.popen.pid != eng.root_pid:
            # the launcher ends right after the init it waits for: its status is the engine's
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(eng.popen.wait, _LAUNCHER_EXIT_SECS)
        self._reap(eng)
        if eng.exited.is_set():
            return
        eng.exited.set()
        if eng.exit_expected or not eng.ready:
            return
        log.error("%s", self._death_message(eng, "unexpectedly"))
        for listener in list(self._listeners):
            try:
                listener(eng.model, eng.returncode)
            except Exception:
                log.exception("death listener failed for model %s", eng.model)
        # the API server is gone: end what is left of the tree (the GPU-holding core)
        eng.exit_expected = True
        await self._end(eng, self.grace_secs)

    def _spawn_task(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ stop

    async def stop(self, model: str, *, grace_secs: float | None = None) -> int | None:
        """End the model's whole tree: SIGTERM, then SIGKILL after the grace period.

        Signals go to the process group and to every descendant found through
        /proc, since a restored tree may not share our process group. Returns
        the root's exit code when known. A model with no engine is a no-op.
        """
        eng = self._engines.get(model)
        if eng is None:
            return None
        eng.exit_expected = True
        await self._end(eng, self.grace_secs if grace_secs is None else grace_secs)
        return eng.returncode

    def expect_exit(self, model: str, expected: bool = True) -> None:
        """Someone else (a checkpoint) is about to end the tree: not a crash."""
        eng = self._engines.get(model)
        if eng is not None:
            eng.exit_expected = expected

    async def wait_exit(self, model: str, within_secs: float = _KILL_WAIT_SECS) -> int | None:
        """Wait until every member of the tree has gone (after a checkpoint), then forget it.

        Raises EngineFailed if a member is still there after ``within_secs``;
        the tree stays tracked then.
        """
        eng = self._engines.get(model)
        if eng is None:
            return None
        self._learn_members(eng)
        left = await self._wait_gone(eng, within_secs)
        if left:
            raise EngineFailed(f"model {model}: processes {left} still exist {within_secs:g} s "
                               "after the tree should have ended")
        self._reap(eng)
        self._forget(eng)
        return eng.returncode

    async def _clear_ended(self, model: str, busy: str) -> None:
        """Conflict ("model M: BUSY (pid P)") while the model's tracked engine lives;
        a tracked engine that has ended is finished first."""
        current = self._engines.get(model)
        if current is not None:
            if current.alive:
                raise Conflict(f"model {model}: {busy} (pid {current.root_pid})")
            await self._finish_ending(current)

    async def _finish_ending(self, eng: EngineProcess) -> None:
        """A dead engine's clean-up (the rest of its tree) completes before a successor."""
        if eng.ending is not None:
            await asyncio.shield(eng.ending)
        self._forget(eng)

    async def _end(self, eng: EngineProcess, grace: float) -> None:
        """Terminate the tree once; concurrent callers share the one termination."""
        if eng.ending is None:
            eng.ending = asyncio.ensure_future(self._terminate(eng, grace))
        await asyncio.shield(eng.ending)

    async def _terminate(self, eng: EngineProcess, grace: float) -> None:
        self._learn_members(eng)
        self._signal_tree(eng, signal.SIGTERM)
        self._signal_tree(eng, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        left = await self._wait_gone(eng, grace)
        if left:
            log.warning("model %s: %s still running %g s after SIGTERM, sending SIGKILL",
                        eng.model, left, grace)
            self._learn_members(eng)
            self._signal_tree(eng, signal.SIGKILL)
            left = await self._wait_gone(eng, _KILL_WAIT_SECS)
            if left:
                log.error("model %s: %s survived SIGKILL (uninterruptible sleep?)",
                          eng.model, left)
        self._reap(eng)
        if not left:
            if self.env(self.model(eng.model))["TMPDIR"] == str(self.tmp_dir(eng.model)):
                await asyncio.to_thread(shutil.rmtree, self.tmp_dir(eng.model), True)
            removed = await asyncio.to_thread(resources.remove_unused,
                                              [Path(p) for p in eng.made])
            if removed:
                log.info("model %s: removed the segments the engine left behind: %s",
                         eng.model, ", ".join(map(str, removed)))
        self._forget(eng)

    @staticmethod
    def _reap(eng: EngineProcess) -> None:
        """Collect exit statuses (never blocks): the spawned root's, and those of members
        that became our children (orphans re-parented to us when this process is a child
        subreaper). An unreaped zombie keeps its PID, and a restore needs those PIDs free."""
        if eng.popen is not None and eng.returncode is None:
            eng.returncode = eng.popen.poll()
        for pid in list(eng.pidfds):
            if eng.popen is not None and pid == eng.popen.pid:
                continue
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)

    def _signal_tree(self, eng: EngineProcess, sig: signal.Signals) -> None:
        # the group as a whole catches a fork racing with the scan; only while the
        # root has not exited, so that the group id cannot have been recycled
        root_fd = eng.pidfds.get(eng.root_pid)
        if eng.leads_group and root_fd is not None and not _pidfd_exited(root_fd):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(eng.root_pid, sig)
        for fd in eng.pidfds.values():
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(fd, sig)

    async def _wait_gone(self, eng: EngineProcess, within_secs: float) -> list[int]:
        """Wait for every known member to exit; return those still running."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_secs
        while True:
            left = [pid for pid, fd in eng.pidfds.items() if not _pidfd_exited(fd)]
            if not left or loop.time() >= deadline:
                return left
            await asyncio.sleep(_POLL_SECS)

    def _learn_members(self, eng: EngineProcess) -> None:
        """Open pidfds for the root's descendants and the members of its group.

        After the root died its children are reparented, but they keep its
        process group, which cannot be recycled while it has members.
        """
        stats = proctree.all_stats()
        root_fd = eng.pidfds.get(eng.root_pid)
        pids: list[int] = []
        if root_fd is not None and not _pidfd_exited(root_fd):
            pids = proctree.descendants(eng.root_pid, stats)
        if eng.leads_group:
            pids += proctree.group(eng.root_pid, stats)
        for pid in pids:
            self._open_pidfd(eng, pid)

    @staticmethod
    def _open_pidfd(eng: EngineProcess, pid: int) -> None:
        if pid in eng.pidfds:
            return
        with contextlib.suppress(ProcessLookupError):
            eng.pidfds[pid] = os.pidfd_open(pid)

    def _forget(self, eng: EngineProcess) -> None:
        loop = asyncio.get_running_loop()
        for fd in eng.pidfds.values():
            loop.remove_reader(fd)
            os.close(fd)
        eng.pidfds.clear()
        eng.exited.set()
        if self._engines.get(eng.model) is eng:
            del self._engines[eng.model]

    def _require(self, model: str) -> EngineProcess:
        eng = self._engines.get(model)
        if eng is None:
            raise EngineFailed(f"model {model}: no engine is running")
        return eng

    # ------------------------------------------------------------------ log and HTTP

    def log_tail(self, model: str, lines: int = LOG_TAIL_LINES) -> list[str]:
        return _tail(self.log_path(model), lines)

    def _tail_text(self, eng: EngineProcess) -> str:
        tail = _tail(eng.log_path, LOG_TAIL_LINES)
        if not tail:
            return f" (log {eng.log_path} is empty)"
        body = "\n".join(f"    {line}" for line in tail)
        return f"; last lines of {eng.log_path}:\n{body}"

    def _death_message(self, eng: EngineProcess, when: str) -> str:
        code = "unknown" if eng.returncode is None else str(eng.returncode)
        if eng.returncode is not None and eng.returncode < 0:
            code = f"{eng.returncode} ({signal.Signals(-eng.returncode).name})"
        reason = engine_reason(_tail(eng.log_path, 200))
        said = f": {reason}" if reason else ""
        return (f"model {eng.model}: engine (pid {eng.root_pid}) exited {when}, "
                f"exit code {code}{said}{self._tail_text(eng)}")

    async def aclose(self) -> None:
        """Stop every engine tracked here (spawned or adopted); close the client if ours."""
        await asyncio.gather(*(self.stop(m) for m in list(self._engines)),
                             return_exceptions=True)
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._owns_client:
            await self.engines.aclose()


# ---------------------------------------------------------------------- /proc helpers


def _no_env(_model: str) -> dict[str, str]:
    return {}


def _pidfd_exited(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def _read_init_pid(fd: int) -> int | None:
    """The PID the launcher reports for the init of the engine's PID namespace; None when
    it ran the engine without one (it closed the pipe unwritten) or died first."""
    try:
        p = select.poll()  # not select(): a shim holding thousands of connections has fds
        p.register(fd, select.POLLIN)  # past FD_SETSIZE (1024)
        ready = p.poll(_LAUNCH_REPORT_SECS * 1000)
        data = os.read(fd, 32) if ready else b""
    finally:
        os.close(fd)
    try:
        return int(data.decode().strip()) or None
    except ValueError:
        return None


def _tree_pids(root: int) -> list[int]:
    """root, its live descendants, and the members of its process group when it leads one."""
    stats = proctree.all_stats()
    found = proctree.descendants(root, stats)
    if found and any(st.pid == root and st.pgrp == root for st in stats):
        seen = set(found)
        found += [p for p in proctree.group(root, stats) if p not in seen]
    return found


def _marked_processes(marks: dict[bytes, str]) -> dict[str, list[int]]:
    """model -> its processes (root first: the one whose parent is not among them) found by
    the engine mark in their environment, in this process's network namespace only."""
    try:
        own_ns = os.stat("/proc/self/ns/net")
    except OSError:
        return {}
    me = os.getpid()
    found: dict[str, list[int]] = {}
    stats = proctree.all_stats()
    for st in stats:
        if st.pid == me:
            continue
        try:
            ns = os.stat(f"/proc/{st.pid}/ns/net")
            if (ns.st_ino, ns.st_dev) != (own_ns.st_ino, own_ns.st_dev):
                continue
            with open(f"/proc/{st.pid}/environ", "rb") as f:
                env = f.read()
        except OSError:  # gone, or a kernel thread
            continue
        for entry in env.split(b"\0"):
            if entry.startswith(ENGINE_MARK.encode() + b"="):
                model = marks.get(entry[len(ENGINE_MARK) + 1:])
                if model is not None:
                    found.setdefault(model, []).append(st.pid)
                break
    parents = {st.pid: st.ppid for st in stats}
    for pids in found.values():
        members = set(pids)
        pids.sort(key=lambda p: (parents.get(p) in members, p))
    return found


def _made_files(pids: list[int]) -> set[str]:
    """The tree's /dev/shm segments (its ipc sockets and file stores are in its TMPDIR),
    when its /dev/shm is ours: a restored tree sees the same one through a mount namespace
    of its own; in any other case its paths would name files that are not its."""
    try:
        same = all(os.stat(f"/proc/{pid}/root/dev/shm").st_dev == os.stat("/dev/shm").st_dev
                   for pid in pids)
    except OSError:
        same = False
    if not same:
        return set()
    live, _ = resources.open_paths(pids)
    return set(resources.shm_paths(live))


_VALUE_ERROR = re.compile(r"Value error, (.+?)(?:\s*\[type=.*)?$")
_RAISED = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception)):\s*(.+)$")


def engine_reason(lines: list[str]) -> str | None:
    """The engine's own words for why it stopped, from its log: a pydantic "Value error"
    (vLLM's config checks), else the last "SomethingError: why" line."""
    for line in reversed(lines):
        m = _VALUE_ERROR.search(line)
        if m:
            return m[1].strip()
    for line in reversed(lines):
        m = _RAISED.match(line)
        if m and m[1] not in ("ValidationError",):
            return f"{m[1]}: {m[2].strip()}"
    return None


def _tail(path: Path, lines: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            data = f.read()
    except OSError:
        return []
    return data.decode(errors="replace").splitlines()[-lines:]
