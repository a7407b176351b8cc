"""Crash recovery: the jobs' journals, and the cure at start-up of what they record.

A dump writes its journal into its staging folder (the tree's PIDs with their start times,
then CRIU's); a restore writes ``<state>/.restoring-<model>.json`` (the files it put into
the target, the PIDs it restores, the moment from which processes born may be CRIU's).
Both are written durably before the step they describe. If llmuxd dies mid-job, start-up
(recover) reads them: a CRIU still running is killed, CRIU's stopped helpers too; a dump
that CRIU completed is finished off and salvaged, any other tree is let run again; what a
restore that did not finish left is killed and its put-back files are taken back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmux.common import proctree, resources
from llmux.service.core.durable import TEMP_SUFFIX, write_json_durably
from llmux.service.core.gone import wait_gone
from llmux.service.core.manifest import Manifest
from llmux.service.core.store import (
    IMAGES,
    JOURNAL,
    CheckpointStore,
    Staging,
    dump_completed,
)
from llmux.service.core.upperfiles import ViewRoot

log = logging.getLogger(__name__)

#: how long a cure waits for what it killed to be gone
KILL_WAIT_SECS = 10.0

# ---- the dump journal ------------------------------------------------------------------


def write_journal(staging: Staging, **values: object) -> None:
    """Merge ``values`` into the job's journal (the tree's and CRIU's PIDs with their start
    times), synced, so a service that dies mid-dump finds at start-up what to cure."""
    current = read_journal(staging.path)
    current.update(values)
    write_json_durably(staging.path / JOURNAL, current)


def read_journal(tmp: Path) -> dict[str, Any]:
    try:
        found = json.loads((tmp / JOURNAL).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _starts(journal: dict[str, Any], key: str) -> dict[int, int]:
    raw = journal.get(key)
    if not isinstance(raw, dict):
        return {}
    try:
        return {int(pid): int(start) for pid, start in raw.items()}
    except (TypeError, ValueError):
        return {}


def _kill_and_wait(starts: dict[int, int]) -> list[int]:
    killed = proctree.kill_exact(starts, signal.SIGKILL)
    if killed:
        wait_gone(lambda: proctree.same_processes(starts), KILL_WAIT_SECS)
    return killed


def cure_interrupted(tmp: Path) -> str:
    """Put right what a dump cut short by the service's death left behind, before its
    staging directory is salvaged or removed: a CRIU still running is killed (it would
    otherwise finish unseen, or hold the tree traced); then a tree whose dump completed is
    finished off as CRIU meant to (its images hold it), and any other is let run again
    (no job-control stop left). Returns what was done, for the log."""
    journal = read_journal(tmp)
    done = []
    criu = _starts(journal, "criu")
    if _kill_and_wait(criu):
        done.append(f"killed CRIU {sorted(criu)}")
    # CRIU's clones (its argv; this staging folder's name is unique) stay stopped when it
    # dies mid-dump
    clones = proctree.start_times(proctree.criu_clones("dump", tmp / IMAGES))
    if _kill_and_wait(clones):
        done.append(f"killed CRIU's helper tasks {sorted(clones)}")
    tree = _starts(journal, "tree")
    if not tree:
        return "; ".join(done)
    if dump_completed(tmp / IMAGES) and not journal.get("leave_running", False):
        killed = _kill_and_wait(tree)
        if killed:
            done.append(f"killed the rest of the dumped tree {killed}")
    else:
        for pid in proctree.same_processes(tree):
            if proctree.read_stat(pid) is not None and proctree.stopped([pid]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                done.append(f"continued stopped PID {pid}")
    return "; ".join(done)


def _cure_dump(store: CheckpointStore, tmp: Path) -> bool:
    """The start-up cure of one staging folder; True when its dump was salvaged."""
    cured = cure_interrupted(tmp)
    if cured:
        log.warning("%s: %s", tmp.name, cured)
    tree = _starts(read_journal(tmp), "tree")

    def runs(pending: Manifest) -> bool:
        return bool(proctree.same_processes(tree) if tree
                    else [p for p in pending.pids if proctree.exists(p)])

    return store.salvage(tmp, runs)


# ---- the restore journal ---------------------------------------------------------------

RESTORING = ".restoring-"
"""A running restore's journal in the state directory: <RESTORING><model>.json."""
RESTORE_FINISHED = "Restore finished successfully"


@dataclass
class RestoreJournal:
    """A restore's journal: what a service killed mid-restore leaves in the target, for
    start-up to take back where nothing uses it."""

    path: Path
    entry: dict[str, object] = field(default_factory=dict)

    @classmethod
    def begin(cls, root: Path, model: str, *, view_pid: int | None, paths: list[str],
              pids: list[int], log_path: Path) -> RestoreJournal:
        """Written before CRIU starts: what is born from here on may be its work, even if
        the service dies before criu_start is noted."""
        journal = cls(root / f"{RESTORING}{model}.json", {
            "view": proctree.start_times([view_pid]) if view_pid else None,
            "paths": paths, "pids": pids, "criu_start": None,
            "floor": proctree.now_ticks(), "log": str(log_path)})
        write_json_durably(journal.path, journal.entry)
        return journal

    def note_criu(self, criu_pid: int) -> None:
        self.entry["criu_start"] = proctree.start_times([criu_pid]).get(criu_pid)
        write_json_durably(self.path, self.entry)

    @property
    def since(self) -> object:
        """From when a process among the restored PIDs is CRIU's work."""
        return self.entry.get("criu_start") or self.entry.get("floor")

    def end(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def kill_half_restored(pids: Sequence[int], since: object, images: Path | None = None,
                       ) -> list[int]:
    """SIGKILL what a CRIU restore that did not finish left: the processes among ``pids``
    born after it began (made by it, not a PID reused before), and its own helper tasks,
    which stay stopped when CRIU dies (clones of CRIU: its argv, these ``images``). Waits a
    while for them to go."""
    if not isinstance(since, int):
        return []
    hit = []
    for pid in pids:
        st = proctree.read_stat(pid)
        if st is not None and st.state not in ("Z", "X") and st.start_time >= since:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                hit.append(pid)
    if images is not None:
        for pid in proctree.criu_clones("restore", images, since):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                hit.append(pid)
    wait_gone(lambda: [p for p in hit if proctree.exists(p)], KILL_WAIT_SECS)
    if hit:
        log.warning("killed PIDs %s, restored in part by a CRIU that did not finish", hit)
    return hit


def _take_torn_journals(root: Path) -> None:
    """A journal write cut short: the complete version it was to replace (if any) is
    beside it; a complete first version is taken as the journal, anything else goes."""
    for partial in sorted(root.glob(f"{RESTORING}*.json{TEMP_SUFFIX}")):
        whole = partial.with_name(partial.name.removesuffix(TEMP_SUFFIX))
        try:
            if whole.exists():
                raise ValueError("superseded")
            json.loads(partial.read_text())
            partial.rename(whole)
        except (OSError, ValueError):
            partial.unlink(missing_ok=True)


def _restore_finished(log_path: object) -> bool:
    try:
        with open(str(log_path), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            return RESTORE_FINISHED.encode() in f.read()
    except (OSError, TypeError):
        return False


def take_back_interrupted_restores(root: Path) -> list[str]:
    """Files a restore put into its target before the service died under it (their
    journal says which): removed where nothing uses them. A restore that had finished
    has its tree using them; a target container that is gone took them along."""
    removed: list[str] = []
    _take_torn_journals(root)
    for journal in sorted(root.glob(f"{RESTORING}*.json")):
        try:
            data = json.loads(journal.read_text())
            view = {int(k): int(v) for k, v in (data.get("view") or {}).items()}
            paths = [str(p) for p in data.get("paths", [])]
        except (OSError, ValueError, TypeError, AttributeError):
            data, view, paths = None, {}, []
        alive = proctree.same_processes(view) if view else []
        if data is not None and not _restore_finished(data.get("log")):
            kill_half_restored([int(p) for p in data.get("pids", [])],
                               data.get("criu_start") or data.get("floor"),
                               Path(str(data.get("log"))).parent)
        if data is not None and (not view or alive):
            with contextlib.suppress(OSError), ViewRoot(alive[0] if alive else None) as v:
                removed += [str(p) for p in resources.remove_unused(
                    v.path / p.lstrip("/") for p in paths)]
        journal.unlink(missing_ok=True)
    if removed:
        log.warning("removed files put back by interrupted restores: %s", removed)
    return removed


# ---- start-up --------------------------------------------------------------------------


def sweep_shm(store: CheckpointStore, busy_models: set[str]) -> list[str]:
    """Remove /dev/shm segments that a checkpoint holds a copy of and nothing uses
    (left by a restored tree that was killed, with its container for instance)."""
    paths = {
        f.path
        for m in store.manifests()
        if m.model not in busy_models  # a restore may have just put them back
        for f in m.files
        if f.reason == "dev-shm"
    }
    removed = resources.remove_unused(Path(p) for p in sorted(paths))
    if removed:
        log.info("removed %d unused /dev/shm file(s) kept in checkpoints", len(removed))
    return [str(p) for p in removed]


def recover(store: CheckpointStore) -> None:
    """The start-up cure: interrupted dumps cured (salvaged when CRIU completed them),
    crash leftovers removed, manifests loaded, interrupted restores taken back, unused
    /dev/shm copies swept. Runs before any job (in a thread: it blocks)."""
    cleaned = store.prepare(cure=lambda tmp: _cure_dump(store, tmp))
    if cleaned:
        log.info("removed leftovers of interrupted dumps: %s", ", ".join(cleaned))
    take_back_interrupted_restores(store.root)
    sweep_shm(store, set())
