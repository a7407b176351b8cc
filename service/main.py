"""``llmuxd``: the host service's entry point.

Order at start: read the configuration, open the checkpoint engine (checks
CRIU and the state directory, cleans leftovers), export the objects, own
org.llmux.Host1, then tell systemd READY=1. SIGTERM: STOPPING=1, cancel the
running jobs (the core puts their processes back), release the name, exit 0.

Configuration: /etc/llmux/llmuxd.toml, flat keys, command-line flags win; its keys and
defaults are service/config.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from llmux.common import errors
from llmux.common.contract import DEFAULT_STATE_DIR
from llmux.service.config import DEFAULT_CONFIG, LOG_LEVELS, ConfigError, DaemonConfig
from llmux.service.config import load_config as read_file
from llmux.service.core.cuda import MODES as CUDA_MODES
from llmux.service.core.engine import CheckpointEngine
from llmux.service.dbus import HostServer, connect_bus
from llmux.service.journal import setup_logging
from llmux.service.notify import Notifier

log = logging.getLogger("llmuxd")

STOP_BOUND_SECS = 8.0
"""How long SIGTERM waits for the running jobs to end (systemd's stop and users expect
llmuxd to be gone within 10 s, whatever it was doing)."""

DURABLE_BOUND_SECS = 60.0
"""How long SIGTERM then waits for the work behind the last dumps: a checkpoint whose images
are still in the memory tier only (a tmpfs) would not survive the reboot that may follow.
Within the unit's TimeoutStopSec (90 s)."""


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
    """Built-in defaults < config file < command line; every unknown or refused key is
    listed (ConfigError)."""
    flags = {"bus": args.bus, "state_dir": args.state_dir, "criu": args.criu,
             "cuda_mode": args.cuda_mode, "log_level": args.log_level}
    return read_file(args.config, flags)


async def run(config: DaemonConfig, notifier: Notifier) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    engine = await CheckpointEngine.open(config.engine)
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
    await _finish_durable_copies(engine)
    watchdog.cancel()
    stopped.cancel()
    if not disconnected.done():
        bus.disconnect()  # type: ignore[no-untyped-call]
        await asyncio.gather(disconnected, return_exceptions=True)
    log.info("stopped")
    return code


async def _finish_durable_copies(engine: CheckpointEngine) -> None:
    """Names what a reboot would lose once the engine's background work is over."""
    lost = await engine.close(DURABLE_BOUND_SECS)
    if lost:
        log.warning("checkpoint(s) %s are in the memory tier only: a reboot loses them "
                    "(the next start of llmuxd copies them to disk if they are still there)",
                    ", ".join(lost))


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
