"""Placement with real engines: built-in engines on two declared GPU slots (``gpus = 2``).

The built-in engine does no CUDA; what is checked is what the shim decides and gives: each
engine's ``CUDA_VISIBLE_DEVICES`` (read from its /proc environ), which models serve at
once, which one a third model evicts, and what /control/status, /metrics and the page's
data say. The GPU tier (test_placement_gpu.py, tests/vllm) runs it on real GPUs.
"""

from __future__ import annotations

import httpx

from llmux.shim.app import Shim
from tests.support.proxy_fixtures import ShimFactory, proxy_chat


def _visible(pid: int) -> str | None:
    with open(f"/proc/{pid}/environ", "rb") as f:
        for item in f.read().split(b"\0"):
            if item.startswith(b"CUDA_VISIBLE_DEVICES="):
                return item.split(b"=", 1)[1].decode()
    return None


def _root(shim: Shim, model: str) -> int:
    eng = shim.supervisor.engine(model)
    assert eng is not None and eng.alive, f"{model} has no engine"
    return eng.root_pid


async def _status(http: httpx.AsyncClient, shim: Shim) -> dict[str, object]:
    r = await http.get(f"{shim.url}/control/status")
    r.raise_for_status()
    data: dict[str, object] = r.json()
    return data


async def test_two_models_serve_at_once_and_a_third_evicts_on_its_gpu(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b", "c"], top={"gpus": 2}, eviction="retain+stop",
                              c={"gpus": [1]})
    await proxy_chat(http, shim, "a", "hello")
    await proxy_chat(http, shim, "b", "hello")
    assert shim.switcher.active_models == ["a", "b"]  # one per GPU, both serving
    assert (_visible(_root(shim, "a")), _visible(_root(shim, "b"))) == ("0", "1")
    status = await _status(http, shim)
    models = status["models"]
    assert isinstance(models, dict)
    assert (models["a"]["gpus"], models["b"]["gpus"], models["c"]["gpus"]) == ([0], [1], None)
    gpus = status["gpus"]
    assert isinstance(gpus, list)
    assert [(g["index"], g["name"], g["models"]) for g in gpus] == [(0, "slot", ["a"]),
                                                                   (1, "slot", ["b"])]
    await proxy_chat(http, shim, "a", "again")  # a used last: b is the least recently used
    b_pid = _root(shim, "b")
    # c may only use GPU 1: b goes, not the older-used... a stays on GPU 0
    await proxy_chat(http, shim, "c", "hello")
    assert shim.switcher.active_models == ["a", "c"]
    assert shim.lifecycle.status("b").state == "stopped" and not shim.supervisor.pids("b")
    assert _visible(_root(shim, "c")) == "1" and _visible(_root(shim, "a")) == "0"
    assert b_pid not in shim.supervisor.pids("a") + shim.supervisor.pids("c")
    metrics = (await http.get(f"{shim.url}/metrics")).text
    assert 'llmux_model_gpu{gpu="1",model="c"} 1.0' in metrics
    assert 'llmux_gpu_models{gpu="0"} 1.0' in metrics
    page = (await http.get(f"{shim.url}/ui/api/state")).json()
    assert page["status"]["models"]["c"]["gpus"] == [1]


async def test_a_two_gpu_model_evicts_both_and_a_sleeping_one_wakes_where_it_sleeps(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b", "tp"], top={"gpus": 2},
                              tp={"gpu_count": 2, "eviction": "retain+stop"})
    await proxy_chat(http, shim, "a", "hello")
    await proxy_chat(http, shim, "b", "hello")
    await proxy_chat(http, shim, "tp", "hello")
    assert shim.switcher.active_models == ["tp"]
    assert _visible(_root(shim, "tp")) == "0,1"
    # a and b sleep (offload+keep_running) with their engines on GPUs 0 and 1
    assert shim.lifecycle.status("a").state == "sleeping"
    assert shim.lifecycle.status("a").gpus == [0]
    await proxy_chat(http, shim, "b", "again")  # wakes on GPU 1, where its engine is
    assert shim.switcher.active_models == ["b"]
    assert shim.lifecycle.status("b").gpus == [1] and _visible(_root(shim, "b")) == "1"
    assert shim.lifecycle.status("tp").state == "stopped"


async def test_a_sleeping_engine_evicts_on_its_own_gpu_not_the_older_one(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b", "c"], top={"gpus": 2})  # offload+keep_running
    for model in ("a", "b", "c"):  # c evicts a (least recently used): a sleeps on GPU 0
        await proxy_chat(http, shim, model, "hello")
    assert shim.lifecycle.status("a").state == "sleeping"
    assert (shim.lifecycle.status("c").gpus, _visible(_root(shim, "c"))) == ([0], "0")
    await proxy_chat(http, shim, "c", "again")  # b (GPU 1) is now the least recently used
    # a's engine holds its GPU 0: it can only wake there, so c goes, not the older b
    await proxy_chat(http, shim, "a", "again")
    assert shim.switcher.active_models == ["a", "b"]
    assert shim.lifecycle.status("c").state == "sleeping"
    assert shim.lifecycle.status("a").gpus == [0]
