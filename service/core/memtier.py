"""How much of the host's memory the memory tier may hold, measured, never guessed.

The tier (a tmpfs) keeps a checkpoint's images after its dump so that a restore reads them
at memory speed; a durable copy goes to disk behind it. Its bytes are shared memory: the
kernel cannot reclaim them, and MemAvailable does not count them. So the tier takes memory
only while it leaves enough for the engines:

- the ceiling: ``memory_tier_limit_bytes``, or with AUTO (the default) half of the memory
  that would be available without the tier (MemAvailable plus the tier's own bytes). Half,
  because a restore from the tier brings the tree back beside its images: the tree needs
  about as much memory again as the copy it is restored from.
- the reserve: after keeping a copy, MemAvailable stays at or above max(1 GiB, 10% of
  MemTotal), whatever the ceiling: room for the kernel's watermarks, the page cache the
  engines read their files through and an engine's growth between two checks.

Both are measured from /proc/meminfo before a dump is kept in memory, before a restore and
every few seconds while the tier holds anything; over either, the oldest checkpoints'
memory copies are dropped first (only those with a complete copy on disk).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

AUTO = -1
"""memory_tier_limit_bytes for the automatic ceiling (AUTO_SHARE of the memory available
without the tier)."""
AUTO_SHARE = 0.5
RESERVE_MIN_BYTES = 1 << 30
RESERVE_SHARE = 0.10


@dataclass(frozen=True)
class Memory:
    """/proc/meminfo's MemAvailable and MemTotal, in bytes."""

    available: int
    total: int

    @classmethod
    def read(cls) -> Memory:
        found: dict[str, int] = {}
        with contextlib.suppress(OSError, ValueError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in ("MemAvailable", "MemTotal"):
                    found[key] = int(rest.split()[0]) * 1024
        return cls(found.get("MemAvailable", 0), found.get("MemTotal", 0))

    @property
    def reserve(self) -> int:
        """What MemAvailable must not fall below for the tier's sake."""
        return max(RESERVE_MIN_BYTES, int(self.total * RESERVE_SHARE))


def ceiling(limit: int, used: int, memory: Memory) -> int:
    """Most bytes the tier may hold now (``used``: what it holds)."""
    if limit == AUTO:
        return int(AUTO_SHARE * (memory.available + used))
    return max(limit, 0)


def fits(limit: int, used: int, need: int, memory: Memory) -> bool:
    """Whether ``need`` more bytes may go to the tier."""
    return (used + need <= ceiling(limit, used, memory)
            and memory.available - need >= memory.reserve)


def over(limit: int, used: int, memory: Memory, need: int = 0) -> bool:
    """Whether the tier must give memory back (``need``: what a job about to run takes)."""
    return (used > ceiling(limit, used, memory)
            or memory.available - need < memory.reserve)
