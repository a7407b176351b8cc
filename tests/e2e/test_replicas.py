"""One checkpoint restored by two containers at once (``replicas_from_checkpoint = true``).

Each restored tree has PID and network namespaces of its own (llmux.shim.pidns, netns), so
both listen on the model's port without colliding; llmuxd restores one at a time, the
second wake waiting for the first. Both answer as the checkpointed engine did; killing one
container leaves the other serving and the checkpoint kept. A container whose model does
not allow replicas is refused by name (Busy, with the count) and starts the model cold.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from llmux.service.core.pidns import inner_pids, owns_network
from tests.e2e.test_pidns_restore import live_trees
from tests.support.llmuxd_harness import Llmuxd
from tests.support.podman_shim import MODEL, Reaper, ShimFactory, free_port
from tests.support.procs import wait_until

pytestmark = [pytest.mark.podman, pytest.mark.criu, pytest.mark.dbus]


def _model(replicas: bool) -> dict[str, Any]:
    return {"model_path": "Qwen/Qwen3-0.6B", "engine": "builtin", "weights_mb": 16,
            "eviction": {"weights": "discard", "process": "checkpoint"},
            "startup_timeout_secs": 300, "replicas_from_checkpoint": replicas}


def test_two_containers_restore_one_checkpoint_at_once(
    llmuxd: Llmuxd, podman_rootfs: str, reaper: Reaper, tmp_path: Path
) -> None:
    _replicas(llmuxd, podman_rootfs, reaper, tmp_path, _model, None, refusal=True)


@pytest.mark.vllm
def test_two_containers_restore_one_real_vllm_checkpoint_at_once(
    llmuxd: Llmuxd, podman_rootfs: str, reaper: Reaper, tmp_path: Path, vllm_bed: Any
) -> None:
    def model(replicas: bool) -> dict[str, Any]:
        table: dict[str, Any] = vllm_bed.model("alpha", 0, "retain+checkpoint", "")
        table.pop("port")
        return {**table, "env": {"HF_HUB_OFFLINE": "1"}, "replicas_from_checkpoint": replicas}

    # no third container: a cold start of vLLM would only show again what the built-in
    # engine's run shows
    _replicas(llmuxd, podman_rootfs, reaper, tmp_path, model,
              {"vllm_command": str(vllm_bed.vllm)}, refusal=False)


def _replicas(llmuxd: Llmuxd, podman_rootfs: str, reaper: Reaper, tmp_path: Path,
              model: Callable[[bool], dict[str, Any]], top: dict[str, Any] | None, *,
              refusal: bool) -> None:
    engine_port = free_port()  # the model's port in every container's config

    def factory(name: str, replicas: bool) -> ShimFactory:
        return ShimFactory(
            rootfs=podman_rootfs, bus_dir=Path(llmuxd.bus.socket_path).parent,
            bus_address_in=f"unix:path=/run/llmux-bus/{Path(llmuxd.bus.socket_path).name}",
            workdir=tmp_path / name, engine_port=engine_port, model=model(replicas),
            top=top)

    factories = [factory("a", True), factory("b", True), factory("d", False)]
    fa, fb, fd = factories
    fb.hf = fd.hf = fa.hf  # one weights cache, as containers of one host share it
    try:
        a = fa.start("a")
        first = a.answer()
        reaper.watch(list(a.model_status()["pids"]))
        assert a.control("sleep")["state"] == "checkpointed"
        manifest = llmuxd.state_dir / MODEL / "manifest.json"
        assert json.loads(manifest.read_text())["net_namespace"] is True

        b = fb.start("b")
        assert b.model_status()["state"] == "checkpointed"
        with ThreadPoolExecutor(2) as pool:  # both wake at once
            answers = list(pool.map(lambda s: s.answer(), [a, b]))
        assert answers == [first, first]
        trees = []
        for shim in (a, b):
            status = shim.model_status()
            assert status["last_wake"] == "restore", f"{status}\n{shim.logs()}"
            reaper.watch(list(status["pids"]))
            trees.append(list(status["pids"]))
        assert not set(trees[0]) & set(trees[1])
        assert sorted(inner_pids(trees[0])) == sorted(inner_pids(trees[1])), "not one tree"
        assert all(owns_network(t[0]) for t in trees)
        assert live_trees(llmuxd) == 2

        if refusal:  # a third container, whose model allows no replica: Busy, cold start
            d = fd.start("d")
            assert d.answer() == first
            woke = d.model_status()
            assert woke["last_wake"] == "cold", woke
            assert "org.llmux.Error.Busy" in (woke["last_error"] or ""), woke
            assert "2 live tree(s)" in woke["last_error"], woke
            fd.cleanup()

        # killing one replica's container leaves the other serving, the checkpoint kept
        b.kill()
        b.remove()
        wait_until(lambda: live_trees(llmuxd) == 1, 60, "b's tree to be counted out")
        assert a.answer() == first
        assert a.model_status()["pids"] == trees[0]
        assert manifest.is_file()
    finally:
        leftovers = [pid for f in factories for pid in f.cleanup()]
        assert not leftovers, leftovers
