"""``llmuxd``: the host service's entry point.

Order at start: read the configuration, open the checkpoint engine (checks
CRIU and the state directory, cleans leftovers), export the objects, own
org.llmux.Host1, then tell systemd READY=1. SIGTERM: STOPPING=1, cancel the
running jobs (the core puts their processes back), release the name, exit 0.

Configuration (/etc/llmux/llmuxd.toml, flat keys; command-line flags win):
    bus = "system"                 # "system", "session" or a D-Bus address
    state_dir = "/var/lib/llmux/checkpoints"
    criu = "criu"                  # path of the criu binary
    cuda_mode = "api"              # api | binary | plugin | off
    cuda_checkpoint = "cuda-checkpoint"
    cuda_plugin_dir = "/usr/lib/criu/"
    ghost_limit_bytes = 536870912
    criu_timeout_secs = 120.0          # a stuck CRIU is killed after this long (the tree
    criu_timeout_secs_per_gib = 60.0   # thawed), plus this per GiB of images
    log_level = "info"
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from llmux.common import errors
from llmux.common.contract import DEFAULT_STATE_DIR
from llmux.service.core.engine import CheckpointEngine, EngineConfig
from llmux.service.dbus import HostServer, connect_bus
from llmux.service.journal import setup_logging
from llmux.service.notify import Notifier

log = logging.getLogger("llmuxd")

DEFAULT_CONFIG = Path("/etc/llmux/llmuxd.toml")
CUDA_MODES = ("api", "binary", "plugin", "off")
LOG_LEVELS = ("debug", "info", "warning", "error")
STOP_BOUND_SECS = 8.0
"""How long SIGTERM waits for the running jobs to end (systemd's stop and users expect
llmuxd to be gone within 10 s, whatever it was doing)."""


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class DaemonConfig:
    bus: str = "system"
    state_dir: str = DEFAULT_STATE_DIR
    criu: str = "criu"
    cuda_mode: str = "api"
    cuda_checkpoint: str = "cuda-checkpoint"
    cuda_plugin_dir: str = "/usr/lib/criu/"
    ghost_limit_bytes: int = 512 << 20
    #: the memory tier for checkpoint images: a tmpfs folder and the most bytes in it (0: off)
    memory_tier_dir: str = "/dev/shm/llmux-checkpoints"
    memory_tier_limit_bytes: int = 0
    criu_timeout_secs: float = 120.0
    criu_timeout_secs_per_gib: float = 60.0
    log_level: str = "info"

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            state_dir=Path(self.state_dir),
            criu_path=self.criu,
            cuda_mode=self.cuda_mode,
            cuda_checkpoint_path=self.cuda_checkpoint,
            cuda_plugin_dir=self.cuda_plugin_dir,
            ghost_limit_bytes=self.ghost_limit_bytes,
            memory_tier_dir=Path(self.memory_tier_dir),
            memory_tier_limit_bytes=self.memory_tier_limit_bytes,
            criu_timeout_secs=self.criu_timeout_secs,
            criu_timeout_secs_per_gib=self.criu_timeout_secs_per_gib,
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llmuxd",
        description="llmux host service: CRIU and CUDA checkpoints over D-Bus (org.llmux.Host1)",
    )
    parser.add_argument("--bus", help='"system" (default), "session" or a D-Bus address')
    parser.add_argument("--state-dir", dest="state_dir", help=f"default {DEFAULT_STATE_DIR}")
    parser.add_argument("--criu", help="path of the criu binary (default: criu on PATH)")
    parser.add_argument("--cuda-mode", dest="cuda_mode", choices=CUDA_MODES)
    parser.add_argument(
        "--config",
        type=Path,
        help=f"TOML configuration file (default {DEFAULT_CONFIG}, if present)",
    )
    parser.add_argument("--log-level", dest="log_level", choices=LOG_LEVELS)
    return parser.parse_args(argv)


def load_config(args: argparse.Namespace) -> DaemonConfig:
    """Built-in defaults < config file < command line; unknown or mistyped keys are errors."""
    path: Path | None = args.config
    values: dict[str, Any] = {}
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    if path is not None:
        try:
            values = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    defaults = DaemonConfig()
    known = {f.name: type(getattr(defaults, f.name)) for f in fields(DaemonConfig)}
    problems = [f"unknown key {key!r}" for key in values if key not in known]
    for key, value in values.items():
        if key in known and known[key] is float and type(value) is int:
            values[key] = value = float(value)
        if key in known and type(value) is not known[key]:
            problems.append(f"{key} must be a {known[key].__name__}, not {type(value).__name__}")
    for key in ("criu_timeout_secs", "criu_timeout_secs_per_gib"):
        bound = values.get(key)
        if isinstance(bound, float) and (bound < 0 or (bound == 0 and key == "criu_timeout_secs")):
            problems.append(f"{key} must be positive")
    if values.get("cuda_mode", "api") not in CUDA_MODES:
        problems.append(f"cuda_mode must be one of {', '.join(CUDA_MODES)}")
    if str(values.get("log_level", "info")).lower() not in LOG_LEVELS:
        problems.append(f"log_level must be one of {', '.join(LOG_LEVELS)}")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    for key in known:
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    return DaemonConfig(**values)


async def run(config: DaemonConfig, notifier: Notifier) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    engine = await CheckpointEngine.open(config.engine_config())
    bus = await connect_bus(config.bus)
    server = HostServer(engine, bus, on_status=notifier.status)
    try:
        await server.start()
    except errors.HostError:
        bus.disconnect()  # type: ignore[no-untyped-call]
        raise
    notifier.ready(server.status_line())
    log.info("ready on the %s bus; state in %s", config.bus, config.state_dir)
    watchdog = asyncio.create_task(notifier.watchdog())
    stopped = asyncio.create_task(stop.wait())
    disconnected = asyncio.ensure_future(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
    await asyncio.wait({stopped, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if disconnected.done():
        log.error("lost the bus connection; exiting so that systemd restarts llmuxd")
        code = 1
    notifier.stopping()
    log.info("stopping: cancelling %d running job(s)", len(server.jobs.running()))
    try:
        await asyncio.wait_for(server.stop(), STOP_BOUND_SECS)
    except TimeoutError:
        # A job stuck in the kernel (a /proc read of a task in D state, a CRIU that does
        # not die) must not keep llmuxd from stopping: its journal lets the next start
        # cure what it leaves; worker threads cannot be joined, so leave at once.
        log.error("jobs did not end within %.0f s of SIGTERM; exiting anyway", STOP_BOUND_SECS)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(1)
    watchdog.cancel()
    stopped.cancel()
    if not disconnected.done():
        bus.disconnect()  # type: ignore[no-untyped-call]
        await asyncio.gather(disconnected, return_exceptions=True)
    log.info("stopped")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"llmuxd: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    notifier = Notifier()
    try:
        return asyncio.run(run(config, notifier))
    except errors.HostError as exc:
        log.error("cannot start: %s", exc)
        notifier.status(f"failed: {exc}")
        return 1
    except OSError as exc:
        log.error("cannot start: %s", exc)
        notifier.status(f"failed: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
