"""Real vLLM checkpointed by llmuxd (CRIU 4.2) and restored, again and again.

The shim switches models with `retain+checkpoint`: the evicted vLLM tree (API server,
EngineCore, worker, resource tracker) is dumped to disk and comes back by restore with the
same PIDs and the same greedy answer. The checkpoint is kept: it restores a second time,
also after the restored engine was stopped cleanly (which deletes vLLM's /dev/shm
segments: llmuxd carries them in the checkpoint).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import pid_alive, wait_until
from tests.support.zdtmcompare import assert_same, settled, usage

pytestmark = [pytest.mark.vllm, pytest.mark.criu, pytest.mark.dbus]

Shim = Any
Llmuxd = Any


def listed(daemon: Llmuxd) -> list[str]:
    call = daemon.busctl("--json=short", "call", "org.llmux.Host1", "/org/llmux/Host1",
                         "org.llmux.Host1", "ListCheckpoints")
    assert call.rc == 0, f"ListCheckpoints failed: {call.error_name} {call.error_message}"
    return [str(e[0]) for e in json.loads(call.stdout)["data"][0]]


def manifest(daemon: Llmuxd, model: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((daemon.state_dir / model / "manifest.json").read_text())
    return data


def answer(shim: Shim, model: str) -> str:
    return str(shim.text(model))


def gone(pids: list[int]) -> bool:
    return not any(pid_alive(p) for p in pids)


def assert_restored(shim: Shim, model: str, pids: list[int], first: str) -> None:
    assert answer(shim, model) == first
    status = shim.model_status(model)
    assert status["state"] == "running" and status["last_wake"] == "restore", (
        f"{status}\n{shim.log()[-4000:]}")
    assert sorted(status["pids"]) == sorted(pids), (status["pids"], pids)
    assert status["last_error"] is None, status


def test_real_vllm_checkpoint_restore_and_kept_checkpoint(
        llmuxd: Llmuxd, start_vllm_shim: Any) -> None:
    shim = start_vllm_shim({"alpha": "retain+checkpoint", "beta": "retain+stop"},
                           bus=llmuxd.bus.address)
    first = answer(shim, "alpha")
    pids = list(shim.model_status("alpha")["pids"])
    assert len(pids) >= 3, pids

    # a request for beta checkpoints alpha through llmuxd
    answer(shim, "beta")
    a = shim.model_status("alpha")
    assert a["state"] == "checkpointed", f"{a}\n{shim.log()[-4000:]}"
    wait_until(lambda: gone(pids), 30, "alpha's tree to be gone after the dump")
    assert "alpha" in listed(llmuxd)
    m = manifest(llmuxd, "alpha")
    assert sorted(m["pids"]) == sorted(pids)
    assert a["port"] in m["listen_ports"], m["listen_ports"]
    shm = [f["path"] for f in m["files"] if f["reason"] == "dev-shm"]
    assert any(Path(p).name.startswith("psm_") for p in shm), m["files"]
    # in the checkpoint now, and freed from the host's /dev/shm
    assert not [p for p in shm if Path(p).exists()], shm

    # alpha comes back by restore: same PIDs, same answer
    assert_restored(shim, "alpha", pids, first)
    assert shim.model_status("beta")["state"] == "stopped"

    # a second sleep/wake cycle (the control API), restored again
    r = shim.control("sleep", {"model": "alpha"})
    assert r.status_code == 200 and r.json()["state"] == "checkpointed", r.text
    wait_until(lambda: gone(pids), 30, "alpha's tree to be gone after the second dump")
    assert_restored(shim, "alpha", pids, first)

    # the shim stops: the restored engine is stopped cleanly and deletes its segments...
    shim.stop()
    wait_until(lambda: gone(pids), 60, "the restored tree to stop with the shim")
    assert not [p for p in shm if Path(p).exists()], "vLLM's clean stop keeps its segments?"
    # ... and the kept checkpoint restores once more, in a new shim (same engine port: the
    # restored server listens where it did)
    again = start_vllm_shim({"alpha": "retain+checkpoint", "beta": "retain+stop"},
                            bus=llmuxd.bus.address, extra={"alpha": {"port": a["port"]}})
    assert again.model_status("alpha")["state"] == "checkpointed"
    assert_restored(again, "alpha", pids, first)


#: 20 with LLMUX_LONG=1 (run once before a release); 3 in CI, enough to compare cycles 2
#: and 3 with cycle 1
VLLM_CYCLES = int(os.environ.get("LLMUX_VLLM_CYCLES",
                                 "20" if os.environ.get("LLMUX_LONG") == "1" else "3"))


def test_real_vllm_checkpoint_cycles_keep_the_tree_as_it_was(
        llmuxd: Llmuxd, start_vllm_shim: Any) -> None:
    """Sleep (checkpoint) / request (restore) cycles of real vLLM through the shim and
    llmuxd: each restored tree has cycle 1's fds, maps and mountinfo (zdtm's comparison),
    the same greedy answer, and llmuxd's and the shim's RSS and fds stay flat."""
    shim = start_vllm_shim({"alpha": "retain+checkpoint"}, bus=llmuxd.bus.address)
    first_answer = answer(shim, "alpha")
    pids = sorted(shim.model_status("alpha")["pids"])
    first = settled(pids)
    use: dict[str, list[tuple[int, int]]] = {"llmuxd": [], "shim": []}
    for cycle in range(1, VLLM_CYCLES + 1):
        r = shim.control("sleep", {"model": "alpha"})
        assert r.status_code == 200 and r.json()["state"] == "checkpointed", r.text
        wait_until(lambda: gone(pids), 60, f"cycle {cycle}: alpha's tree to go")
        assert_restored(shim, "alpha", pids, first_answer)
        assert_same(first, pids, f"cycle {cycle}")
        use["llmuxd"].append(usage(llmuxd.proc.pid))
        use["shim"].append(usage(shim.proc.pid))
    for who, seen in use.items():
        rss, fds = [u[0] for u in seen], [u[1] for u in seen]
        print(f"\n[vllm-cycles] {who}: RSS {rss[0] >> 20} -> {rss[-1] >> 20} MiB "
              f"(max {max(rss) >> 20}), fds {fds[0]} -> {fds[-1]} (max {max(fds)})")
        assert rss[-1] - rss[1] < 32 << 20, f"{who} RSS grew: {rss}"
        assert max(fds[1:]) <= fds[1], f"{who} fds grew: {fds}"
