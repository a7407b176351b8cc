"""Fixtures of the D-Bus face's tests; the harness itself is llmuxd_harness.py (a unique
module name: several test folders have a conftest.py)."""

from llmuxd_harness import llmuxd, private_bus, spawn_target

__all__ = ["llmuxd", "private_bus", "spawn_target"]
