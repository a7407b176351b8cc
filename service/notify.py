"""llmuxd's systemd face: READY, STATUS, WATCHDOG and STOPPING notifications.

Outside systemd (no NOTIFY_SOCKET) every call is a no-op. The variables are
taken out of the environment at start, as sd_notify's unset_environment does,
so that CRIU and the processes it restores do not inherit them.

Sends never block: they come from the event loop, and a datagram socket whose reader
lags (its queue is only net.unix.max_dgram_qlen = 10 deep by default) would otherwise
stall the whole daemon in sendall(). A message that does not fit is dropped; the next
STATUS or WATCHDOG supersedes it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import MutableMapping

from sdnotify import SystemdNotifier

log = logging.getLogger(__name__)

_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def watchdog_interval(environ: MutableMapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of WATCHDOG_USEC, or None when unset."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2 / 1_000_000


class Notifier:
    def __init__(self, environ: MutableMapping[str, str] = os.environ):
        self.enabled = bool(environ.get("NOTIFY_SOCKET"))
        self._notifier = SystemdNotifier(debug=False)  # connects while NOTIFY_SOCKET is set
        if self._notifier.socket is not None:
            self._notifier.socket.setblocking(False)
        self.dropped = 0
        self.watchdog_interval = watchdog_interval(environ)
        for name in _VARIABLES:
            environ.pop(name, None)
        self._status = ""

    def _send(self, state: str) -> None:
        sock = self._notifier.socket
        if not self.enabled or sock is None:
            return
        try:
            sock.send(state.encode())
        except BlockingIOError:
            self.dropped += 1
            log.debug("notify socket full: dropped %r (%d so far)", state, self.dropped)
        except OSError as e:
            log.debug("notify failed: %s", e)

    def ready(self, status: str) -> None:
        self._status = status
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        if status != self._status:
            self._status = status
            self._send(f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> None:
        self._status = status
        self._send(f"STOPPING=1\nSTATUS={status}")

    async def watchdog(self) -> None:
        """Pings from the event loop itself: a blocked loop stops them and systemd restarts us."""
        if self.watchdog_interval is None:
            return
        log.debug("watchdog ping every %.1f s", self.watchdog_interval)
        while True:
            self._send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)
