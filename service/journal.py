"""Logs an operator can grep: journald fields when under systemd, key=value otherwise.

Under systemd (JOURNAL_STREAM names our stderr and the journal socket exists)
records go to journald through systemd's own Python binding (``systemd.journal``:
python3-systemd on the host, systemd-python from PyPI), so ``journalctl -u llmuxd
MODEL=qwen3-0.6b`` or ``JOB_ID=7`` finds them. Elsewhere each record is one
stderr line ending in ``key=value`` pairs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "llmuxd"
_EXTRA_KEY = "journal_fields"


def fields(**values: object) -> dict[str, Any]:
    """``extra=`` for a log call: fields(model=m, job_id=7) gives MODEL=, JOB_ID=."""
    return {_EXTRA_KEY: {key.upper(): str(value) for key, value in values.items()}}


def record_fields(record: logging.LogRecord) -> Mapping[str, str]:
    found: Mapping[str, str] = getattr(record, _EXTRA_KEY, {})
    return found


def _fields_as_attributes(record: logging.LogRecord) -> bool:
    """systemd.journal.JournalHandler sends a record's attributes: MODEL=, JOB_ID=, ..."""
    for key, value in record_fields(record).items():
        setattr(record, key, value)
    return True


def journal_handler(identifier: str = IDENTIFIER) -> logging.Handler:
    """systemd's JournalHandler, with our fields (fields()) as journal fields."""
    from systemd.journal import JournalHandler

    handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER=identifier)
    handler.addFilter(_fields_as_attributes)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


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
        handler = journal_handler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
