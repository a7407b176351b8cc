"""Logs an operator can grep: journald fields when under systemd, key=value otherwise.

Under systemd (JOURNAL_STREAM names our stderr and the journal socket exists)
records go to journald through its native protocol, so ``journalctl -u llmuxd
MODEL=qwen3-0.6b`` or ``JOB_ID=7`` finds them. Elsewhere each record is one
stderr line ending in ``key=value`` pairs.
"""

from __future__ import annotations

import array
import errno
import json
import logging
import os
import socket
import struct
import sys
from collections.abc import Mapping
from typing import Any

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "llmuxd"
_EXTRA_KEY = "journal_fields"

# syslog priorities, as journald's PRIORITY= wants them
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def fields(**values: object) -> dict[str, Any]:
    """``extra=`` for a log call: fields(model=m, job_id=7) gives MODEL=, JOB_ID=."""
    return {_EXTRA_KEY: {key.upper(): str(value) for key, value in values.items()}}


def record_fields(record: logging.LogRecord) -> Mapping[str, str]:
    found: Mapping[str, str] = getattr(record, _EXTRA_KEY, {})
    return found


def _priority(levelno: int) -> int:
    for level, priority in sorted(_PRIORITY.items(), reverse=True):
        if levelno >= level:
            return priority
    return 7


def encode_entry(entries: Mapping[str, str]) -> bytes:
    """journald's native format: KEY=value lines, binary framing for multi-line values."""
    out = bytearray()
    for key, value in entries.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Sends each record as one journal entry over the native socket."""

    def __init__(self, socket_path: str = JOURNAL_SOCKET, identifier: str = IDENTIFIER):
        super().__init__()
        self.socket_path = socket_path
        self.identifier = identifier
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def entry(self, record: logging.LogRecord) -> dict[str, str]:
        entry = {
            "MESSAGE": self.format(record),
            "PRIORITY": str(_priority(record.levelno)),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
        }
        entry.update(record_fields(record))
        return entry

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._send(encode_entry(self.entry(record)))
        except Exception:
            self.handleError(record)

    def _send(self, payload: bytes) -> None:
        try:
            self._sock.sendto(payload, self.socket_path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            # too large for a datagram: journald accepts the entry in a sealed memfd
            fd = os.memfd_create("llmuxd-journal", os.MFD_CLOEXEC)
            try:
                os.write(fd, payload)
                rights = array.array("i", [fd]).tobytes()
                self._sock.sendmsg(
                    [], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, self.socket_path
                )
            finally:
                os.close(fd)

    def close(self) -> None:
        self._sock.close()
        super().close()


class KeyValueFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...`` with the traceback below."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        line = super().format(record)
        record.exc_info, record.exc_text = saved
        for key, value in record_fields(record).items():
            line += f" {key.lower()}={_quoted(value)}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _quoted(value: str) -> str:
    plain = value and not any(c.isspace() or c in "\"'=" for c in value)
    return value if plain else json.dumps(value)


def journal_available(environ: Mapping[str, str] = os.environ) -> bool:
    """True when systemd connected our stderr to the journal (sd_journal_stream_fd's rule)."""
    stream = environ.get("JOURNAL_STREAM", "")
    if not stream or not os.path.exists(JOURNAL_SOCKET):
        return False
    try:
        device, inode = (int(part) for part in stream.split(":", 1))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def setup_logging(level: str, environ: Mapping[str, str] = os.environ) -> None:
    handler: logging.Handler
    if journal_available(environ):
        handler = JournalHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
