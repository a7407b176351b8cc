"""A shim that dies hard (SIGKILL, OOM) leaves its engines running: they lead their own
sessions. The next shim must end them before it serves, or it would meet "address in use"
on the model's port, or load the model twice; so must it a tree llmuxd restored for it, which
lives in a mount namespace of its own. What is not its own (another shim's engine, another
container's, in another network namespace) must be left alone."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from pathlib import Path
from typing import Any

from llmux.shim.supervisor import ENGINE_MARK
from tests.support.procs import free_port, pid_alive, wait_until
from tests.support.shimproc import shims_for_test


def _config(tmp_path: Path, tag: str, model_port: int) -> dict[str, Any]:
    return {
        "host": "127.0.0.1", "port": free_port(), "metrics_port": 0,
        "log_dir": str(tmp_path / "engine-logs"),
        "policy": {"min_active_secs": 0},
        "models": {"alpha": {
            "model_path": "llmux-crash/alpha", "port": model_port, "engine": "builtin",
            "weights_mb": 4, "startup_timeout_secs": 120,
            "env": {"LLMUX_TEST_TAG": tag, "XDG_CACHE_HOME": str(tmp_path / "cache"),
                    "HF_HOME": str(tmp_path / "hf")}}},
    }


def _stand_in(mark: str, *unshare: str) -> subprocess.Popen[bytes]:
    """A process carrying an engine mark, in these namespaces or new ones (``unshare``
    options: ``--mount``, ``--net``)."""
    argv = ["sleep", "300"]
    if unshare:
        argv = ["unshare", *unshare, "--", *argv]
    proc = subprocess.Popen(argv, env={**os.environ, ENGINE_MARK: mark}, start_new_session=True)
    kinds = [ns for option, ns in (("--mount", "mnt"), ("--net", "net")) if option in unshare]
    wait_until(lambda: all(os.readlink(f"/proc/{proc.pid}/ns/{ns}")
                           != os.readlink(f"/proc/self/ns/{ns}") for ns in kinds),
               10, "the stand-in to enter its namespaces")
    return proc


def test_engines_of_a_killed_shim_are_ended_by_the_next_one(tmp_path: Path) -> None:
    tag = secrets.token_hex(8)
    model_port = free_port()
    config = _config(tmp_path, tag, model_port)
    # not ours: another shim's engine (same name, other port) and, with --pid=host, an engine
    # with our very mark in another container (another network namespace)
    other_shim = _stand_in(f"alpha:{free_port()}")
    other_container = _stand_in(f"alpha:{model_port}", "--mount", "--net")
    restored: subprocess.Popen[bytes] | None = None
    try:
        with shims_for_test(tmp_path, tag) as launch:
            first = launch(config)
            before = first.text("alpha")
            old_pids = first.model_status("alpha")["pids"]
            assert old_pids, first.status()

            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(30)
            assert all(pid_alive(p) for p in old_pids), "the engine should outlive SIGKILL"
            # ours too: what a restore by llmuxd leaves, our mark in a mount namespace of
            # its own (and our network namespace)
            restored = _stand_in(f"alpha:{model_port}", "--mount", "--propagation", "private")

            second = launch(config)
            # ended before the new shim listens: /health answering means it is done
            gone = [p for p in old_pids if not pid_alive(p)]
            assert gone == old_pids, f"left running: {set(old_pids) - set(gone)}"
            assert "an earlier shim left running" in second.log()
            assert restored.wait(10) is not None, "the restored stand-in should be ended"
            assert second.text("alpha") == before  # the model starts afresh, same answer
            assert set(second.model_status("alpha")["pids"]).isdisjoint(old_pids)
            assert other_shim.poll() is None and other_container.poll() is None
    finally:
        for p in (other_shim, other_container, restored):
            if p is not None:
                p.kill()
                p.wait()
