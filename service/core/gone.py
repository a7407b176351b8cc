"""Waiting for processes to be gone: one polling loop, a blocking and an awaitable face.

``present()`` says which of the awaited processes are still there (its own test: a PID
still taken, or the very processes of a journal, by start time); the wait ends when it
says none, or at the deadline, and returns what was left.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator

POLL_SECS = 0.05

Present = Callable[[], list[int]]


def _polls(present: Present, within: float, interval: float) -> Generator[float, None, list[int]]:
    """The loop itself: yields how long to sleep, returns what is left at the end."""
    deadline = time.monotonic() + within
    left = present()
    while left and time.monotonic() < deadline:
        yield interval
        left = present()
    return left


def wait_gone(present: Present, within: float, interval: float = POLL_SECS) -> list[int]:
    """Block until ``present()`` is empty or ``within`` seconds passed; what is left."""
    polls = _polls(present, within, interval)
    while True:
        try:
            time.sleep(next(polls))
        except StopIteration as end:
            left: list[int] = end.value
            return left


async def wait_gone_async(present: Present, within: float,
                          interval: float = POLL_SECS) -> list[int]:
    """wait_gone for a coroutine: sleeps without blocking the loop (and can be cancelled)."""
    polls = _polls(present, within, interval)
    while True:
        try:
            await asyncio.sleep(next(polls))
        except StopIteration as end:
            left: list[int] = end.value
            return left
