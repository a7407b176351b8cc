"""vLLM-style log lines on stderr: "INFO 11-22 22:01:02 [module] message"."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(process_label: str) -> None:
    level = os.environ.get("LLMUX_BUILTIN_LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"({process_label}) %(levelname)s %(asctime)s [%(name)s] %(message)s", "%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
