"""Weights loaded by several readers at once (LLMUX_BUILTIN_LOAD_THREADS): the same bytes
land in the same places as with one reader, and a short file is named, whoever reads it."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import httpx
import pytest

from llmux.shim.builtin import safetensors_io
from llmux.shim.builtin.safetensors_io import Chunk, SafetensorsError, TensorSpec
from llmux.shim.builtin.testing import EngineProcess, EngineStartError, start_engine
from tests.support.builtin_engine import EngineEnv, answers


def _write(path: Path, sizes: dict[str, int]) -> dict[str, bytes]:
    data = {name: random.Random(name).randbytes(n) for name, n in sizes.items()}
    specs = [TensorSpec(name, "U8", (len(raw),), lambda raw=raw: [raw])
             for name, raw in data.items()]
    safetensors_io.write_file(path, specs, {})
    return data


def test_chunks_cover_every_byte_once_in_file_order(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    _write(path, {"a": 1000, "b": 64, "c": 4096, "d": 1})
    infos = safetensors_io.read_header(path)
    chunks = safetensors_io.chunks_of(infos.values(), 100)
    assert all(0 < c.size <= 100 for c in chunks)
    assert [c.file_offset for c in chunks] == sorted(c.file_offset for c in chunks)
    for name, info in infos.items():
        mine = [c for c in chunks if c.name == name]
        assert sum(c.size for c in mine) == info.nbytes
        assert [c.start for c in mine] == list(range(0, info.nbytes, 100))
        assert all(c.file_offset == info.offset + c.start for c in mine)


@pytest.mark.parametrize("readers", [1, 4])
def test_parallel_read_puts_every_byte_in_place(tmp_path: Path, readers: int) -> None:
    path = tmp_path / "w.safetensors"
    data = _write(path, {"a": 300_001, "b": 77, "c": 1 << 18})
    infos = safetensors_io.read_header(path)
    out = {name: bytearray(info.nbytes) for name, info in infos.items()}
    # every reader's first chunk waits for the others': the readers really run at once
    together = threading.Barrier(readers, timeout=30)
    started: set[str] = set()

    def read(fd: int, chunk: Chunk) -> None:
        me = threading.current_thread().name
        if me not in started:
            started.add(me)
            together.wait()
        view = memoryview(out[chunk.name])[chunk.start : chunk.start + chunk.size]
        safetensors_io.pread_exactly(path, fd, view, chunk.file_offset)

    safetensors_io.read_parallel(path, safetensors_io.chunks_of(infos.values(), 4096),
                                 [read] * readers)
    assert {name: bytes(b) for name, b in out.items()} == data
    assert len(started) == readers


def test_a_short_file_is_named_and_stops_every_reader(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    _write(path, {"a": 1 << 16})
    infos = safetensors_io.read_header(path)
    os.truncate(path, path.stat().st_size - 10)
    sink = bytearray(1 << 16)

    def read(fd: int, chunk: Chunk) -> None:
        view = memoryview(sink)[chunk.start : chunk.start + chunk.size]
        safetensors_io.pread_exactly(path, fd, view, chunk.file_offset)

    with pytest.raises(SafetensorsError, match=f"{path.name}: unexpected end of file"):
        safetensors_io.read_parallel(path, safetensors_io.chunks_of(infos.values(), 1024),
                                     [read] * 3)


def _checksum(engine: EngineProcess) -> int:
    r = httpx.post(f"{engine.base_url}/collective_rpc", json={"method": "weights_checksum"},
                   timeout=60)
    assert r.status_code == 200, r.text
    value: int = r.json()["results"][0]
    return value


def test_four_readers_load_the_same_model_as_one(engine_env: EngineEnv) -> None:
    """At start and at the reload after a level-2 sleep (vLLM's discard-and-reload)."""
    pytest.importorskip("torch")
    model = "test-org/parallel-load"
    env = engine_env("torch")
    with start_engine(model, weights_mb=4, extra_env=env) as one:
        expected, checksum = answers(one), _checksum(one)
    with start_engine(model, weights_mb=4,
                      extra_env={**env, "LLMUX_BUILTIN_LOAD_THREADS": "4"}) as four:
        assert answers(four) == expected
        assert _checksum(four) == checksum
        url = four.base_url
        assert httpx.post(f"{url}/sleep", params={"level": 2}, timeout=60).status_code == 200
        assert httpx.post(f"{url}/wake_up", timeout=60).status_code == 200
        assert httpx.post(f"{url}/collective_rpc", json={"method": "reload_weights"},
                          timeout=60).status_code == 200
        assert _checksum(four) == checksum
        assert answers(four) == expected


def test_a_bad_reader_count_is_named(engine_env: EngineEnv) -> None:
    pytest.importorskip("torch")
    env = {**engine_env("torch"), "LLMUX_BUILTIN_LOAD_THREADS": "lots"}
    with pytest.raises(EngineStartError) as failed, \
            start_engine("test-org/parallel-load", weights_mb=1, extra_env=env):
        pass
    assert "LLMUX_BUILTIN_LOAD_THREADS='lots'" in str(failed.value)
