"""The POSIX shared-memory segment the API server and the engine core both map.

vLLM's multiprocessing keeps ``psm_<hex>`` segments in /dev/shm
(``multiprocessing.shared_memory``), mapped by several processes of the tree; so does
this engine. The API server creates one (auto-generated name) and hands its name to the
engine core, which attaches and writes its counters there (a heartbeat and the number of
tokens generated); the API server reads them for ``/engine_state``.

The inconvenient traits are kept on purpose, since vLLM has them too:

* Creating the segment registers it with multiprocessing's resource tracker, which
  starts a resource-tracker child process of the API server. The engine core adopts that
  tracker's pipe (passed down as an inherited fd, as multiprocessing's spawn does for its
  children), so the tree has one tracker, not one per process.
* A clean stop (SIGTERM) unlinks the segment; a SIGKILLed tree (tracker included) leaves
  it behind in /dev/shm.
* The segment is a file-backed MAP_SHARED mapping: CRIU does not put its contents in the
  images, so a restore needs the file as it was at dump time.
"""

from __future__ import annotations

import struct
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

SHM_DIR = "/dev/shm"
SHM_SIZE = 1 << 20
#: at offset 0: heartbeat (engine-core loop passes), tokens generated; native u64s
COUNTERS = struct.Struct("=QQ")


def create_segment(size: int = SHM_SIZE) -> SharedMemory:
    """A fresh zeroed ``psm_<hex>`` segment, registered with this process's resource tracker."""
    return SharedMemory(create=True, size=size)


def tracker_fd() -> int | None:
    """The write end of this process's resource-tracker pipe (None if it has no tracker)."""
    return resource_tracker.getfd()


def attach_segment(name: str, tracker: int | None) -> SharedMemory:
    """Attach to the API server's segment, sharing its resource tracker.

    Attaching registers the name with the resource tracker too (Python < 3.13 has no
    ``track=False``); adopting the parent's tracker first, as a multiprocessing spawn
    child does, keeps that from starting a second tracker in the engine core.
    """
    if tracker is not None:
        resource_tracker._resource_tracker._fd = tracker  # type: ignore[attr-defined]
    return SharedMemory(name=name, create=False)


def _mapped(segment: SharedMemory) -> memoryview:
    buf = segment.buf
    if buf is None:
        raise ValueError(f"shared memory segment {segment.name} is closed")
    return buf


def write_counters(segment: SharedMemory, heartbeat: int, tokens_generated: int) -> None:
    COUNTERS.pack_into(_mapped(segment), 0, heartbeat, tokens_generated)


def read_counters(segment: SharedMemory) -> dict[str, int]:
    heartbeat, tokens_generated = COUNTERS.unpack_from(_mapped(segment), 0)
    return {"heartbeat": heartbeat, "tokens_generated": tokens_generated}


def release(segment: SharedMemory, *, unlink: bool) -> None:
    """Unmap the segment; with ``unlink`` also remove it from /dev/shm (and the tracker)."""
    segment.close()
    if unlink:
        try:
            segment.unlink()
        except FileNotFoundError:
            resource_tracker.unregister(f"/{segment.name}", "shared_memory")
