"""The D-Bus face's tests: their fixtures (private_bus, llmuxd, spawn_counter) are
tests/support/llmuxd_harness.py's, registered once by the root conftest."""
