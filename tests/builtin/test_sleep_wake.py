"""vLLM's sleep levels on the built-in engine, seen through /is_sleeping and /engine_state."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmux.shim.builtin.testing import EngineProcess, start_engine
from tests.support.builtin_engine import EngineEnv

MIB = 1 << 20


@pytest.fixture(scope="module")
def sleepy_engine(engine_env: EngineEnv, backend: str) -> Iterator[EngineProcess]:
    with start_engine("test-org/sleepy", weights_mb=4, extra_env=engine_env(backend)) as running:
        yield running


@pytest.fixture
def awake_engine(sleepy_engine: EngineProcess) -> Iterator[EngineProcess]:
    """The module's engine, put back awake with its weights loaded after every test."""
    yield sleepy_engine
    if sleepy_engine.process.poll() is None:
        post(sleepy_engine, "/wake_up")
        if state(sleepy_engine)["weights"] != "device":
            post(sleepy_engine, "/reload_weights")


def state(engine: EngineProcess) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{engine.base_url}/engine_state").json()
    return body


def is_sleeping(engine: EngineProcess) -> bool:
    body = httpx.get(f"{engine.base_url}/is_sleeping").json()
    assert set(body) == {"is_sleeping"}
    value: bool = body["is_sleeping"]
    return value


def post(engine: EngineProcess, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{engine.base_url}{path}", timeout=60, **kwargs)


def answer(engine: EngineProcess) -> httpx.Response:
    return post(engine, "/v1/completions", json={"prompt": "the old tower", "max_tokens": 6})


def text(engine: EngineProcess) -> str:
    response = answer(engine)
    assert response.status_code == 200, response.text
    value: str = response.json()["choices"][0]["text"]
    return value


def worker_rss(engine: EngineProcess) -> int:
    """The worker process holds the weights (the engine core holds none)."""
    status = Path(f"/proc/{state(engine)['pid_worker']}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


def test_awake_state(awake_engine: EngineProcess) -> None:
    current = state(awake_engine)
    assert current["weights"] == "device"
    assert current["device"] in ("cpu", "cuda")
    assert current["sleeping"] is False and current["level"] == 0
    assert current["weights_bytes"] >= 4 * MIB
    assert current["resident_weight_bytes"] == current["weights_bytes"]
    assert not is_sleeping(awake_engine)


def test_level_1_offloads_and_wakes_with_the_same_weights(awake_engine: EngineProcess) -> None:
    before = text(awake_engine)
    assert post(awake_engine, "/sleep", params={"level": 1}).status_code == 200
    assert is_sleeping(awake_engine)
    asleep = state(awake_engine)
    assert (asleep["weights"], asleep["level"], asleep["sleeping"]) == ("host", 1, True)
    assert asleep["resident_weight_bytes"] == asleep["weights_bytes"]
    assert asleep["prefix_cache_entries"] == 0
    refused = answer(awake_engine)
    assert refused.status_code == 503
    assert "sleeping" in refused.json()["error"]["message"]
    streamed = post(awake_engine, "/v1/completions", json={"prompt": "x", "stream": True})
    assert streamed.status_code == 503
    assert post(awake_engine, "/wake_up").status_code == 200
    awake = state(awake_engine)
    assert (awake["weights"], awake["level"], awake["sleeping"]) == ("device", 0, False)
    assert not is_sleeping(awake_engine)
    assert text(awake_engine) == before


def test_level_2_discards_and_reload_reads_the_checkpoint_again(
        awake_engine: EngineProcess) -> None:
    before = text(awake_engine)
    assert post(awake_engine, "/sleep?level=2").status_code == 200
    asleep = state(awake_engine)
    assert (asleep["weights"], asleep["level"], asleep["resident_weight_bytes"]) == (
        "discarded", 2, 0)
    assert is_sleeping(awake_engine)
    refused = post(awake_engine, "/reload_weights")
    assert refused.status_code == 400 and "wake_up first" in refused.json()["error"]["message"]
    assert post(awake_engine, "/wake_up").status_code == 200
    woken = state(awake_engine)
    assert (woken["weights"], woken["sleeping"], woken["level"]) == ("discarded", False, 0)
    assert not is_sleeping(awake_engine)
    refused = answer(awake_engine)
    assert refused.status_code == 503
    assert "reload_weights" in refused.json()["error"]["message"]
    rpc = post(awake_engine, "/collective_rpc", json={"method": "reload_weights"})
    assert rpc.status_code == 200 and rpc.json() == {"results": [None]}
    reloaded = state(awake_engine)
    assert reloaded["weights"] == "device"
    assert reloaded["resident_weight_bytes"] == reloaded["weights_bytes"]
    assert text(awake_engine) == before


def test_wake_up_by_tags_like_vllm(awake_engine: EngineProcess) -> None:
    before = text(awake_engine)
    assert post(awake_engine, "/sleep?level=1").status_code == 200
    assert post(awake_engine, "/wake_up?tags=weights").status_code == 200
    partly = state(awake_engine)
    assert partly["weights"] == "device"
    assert partly["sleeping_tags"] == ["kv_cache"]
    assert is_sleeping(awake_engine)
    assert answer(awake_engine).status_code == 503
    assert post(awake_engine, "/wake_up?tags=kv_cache").status_code == 200
    assert not is_sleeping(awake_engine)
    assert text(awake_engine) == before
    # Both tags in one call, repeated query parameters as vLLM takes them.
    assert post(awake_engine, "/sleep?level=2").status_code == 200
    assert post(awake_engine, "/wake_up?tags=weights&tags=kv_cache").status_code == 200
    assert not is_sleeping(awake_engine)
    assert post(awake_engine, "/reload_weights").status_code == 200
    assert text(awake_engine) == before


def test_level_2_after_level_1_drops_the_host_copy(awake_engine: EngineProcess) -> None:
    assert post(awake_engine, "/sleep?level=1").status_code == 200
    assert post(awake_engine, "/sleep?level=2").status_code == 200
    current = state(awake_engine)
    assert (current["weights"], current["level"], current["resident_weight_bytes"]) == (
        "discarded", 2, 0)
    assert post(awake_engine, "/wake_up").status_code == 200
    assert post(awake_engine, "/reload_weights").status_code == 200
    assert state(awake_engine)["weights"] == "device"


def test_wake_up_when_awake_is_harmless(awake_engine: EngineProcess) -> None:
    before = text(awake_engine)
    assert post(awake_engine, "/wake_up").status_code == 200
    assert state(awake_engine)["weights"] == "device"
    assert text(awake_engine) == before


def test_sleep_needs_sleep_mode(engine_env: EngineEnv) -> None:
    with start_engine("test-org/no-sleep", weights_mb=1, sleep_mode=False,
                      extra_env=engine_env("pure")) as engine:
        refused = post(engine, "/sleep?level=1")
        assert refused.status_code == 400
        assert "--enable-sleep-mode" in refused.json()["error"]["message"]
        assert not is_sleeping(engine)


@pytest.mark.parametrize("backend", ["pure", "torch"], indirect=True)
def test_level_2_frees_the_memory_and_reload_brings_it_back(
    engine_env: EngineEnv, backend: str
) -> None:
    with start_engine("test-org/heavy", weights_mb=256, extra_env=engine_env(backend),
                      extra_args=["--device", "cpu"]) as engine:
        before = text(engine)
        loaded = worker_rss(engine)
        assert post(engine, "/sleep?level=2").status_code == 200
        freed = worker_rss(engine)
        assert loaded - freed > 200 * MIB, (loaded, freed)
        assert post(engine, "/wake_up").status_code == 200
        assert post(engine, "/collective_rpc", json={"method": "reload_weights"}).status_code == 200
        assert worker_rss(engine) - freed > 200 * MIB
        assert text(engine) == before


def test_kv_cache_is_dropped_by_sleep_and_back_after_wake(engine_env: EngineEnv) -> None:
    """--kv-cache-memory-bytes: a KV cache of that size, dropped by every sleep (as vLLM's)."""
    with start_engine("test-org/kv", weights_mb=1, extra_env=engine_env("torch"),
                      extra_args=["--device", "cpu", "--kv-cache-memory-bytes", "8M"]) as engine:
        assert state(engine)["kv_cache_bytes"] == 8 * MIB
        before = text(engine)
        assert post(engine, "/sleep?level=1").status_code == 200
        assert post(engine, "/wake_up", params={"tags": "kv_cache"}).status_code == 200
        assert state(engine)["sleeping_tags"] == ["weights"]
        assert post(engine, "/wake_up").status_code == 200
        assert text(engine) == before
