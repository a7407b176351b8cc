"""Two real vLLM engines behind `llmux serve`, driven by the official `openai` client.

Every answer must come from the model that was named: the two test models have different
random weights, so their greedy answers differ, and each one's answer is the same after a
stop and a cold start. The engines listen on loopback only, and what an engine's tree
leaves in /tmp and /dev/shm is gone once llmux has stopped it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llmux.common import resources
from tests.support.procs import pid_alive, wait_until
from tests.support.shimproc import Shim

pytestmark = [pytest.mark.vllm]

PROMPT = [{"role": "user", "content": "Tell me about the old sailor"}]
MAX_TOKENS = 8


def client_for(shim: Shim) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{shim.url}/v1", api_key="unused", timeout=420,
                         max_retries=0)


def chat(client: openai.OpenAI, model: str) -> str:
    r = client.chat.completions.create(model=model, messages=PROMPT,  # type: ignore[arg-type]
                                       max_tokens=MAX_TOKENS, temperature=0)
    assert r.model == model, r
    text = r.choices[0].message.content or ""
    assert text, r
    return text


def listeners(pids: list[int]) -> dict[int, str]:
    """port -> local address (hex, as /proc/net/tcp* writes it) of the tree's listeners."""
    inodes: set[str] = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = fd.readlink()
            except OSError:
                continue
            if str(target).startswith("socket:["):
                inodes.add(str(target)[8:-1])
    out: dict[int, str] = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pids[0]}/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:
                addr, port = f[1].rsplit(":", 1)
                out[int(port, 16)] = addr
    return out


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}


def test_openai_client_two_real_vllm_models(start_vllm_shim: Any) -> None:
    shim = start_vllm_shim({"alpha": "retain+stop", "beta": "retain+stop"})
    client = client_for(shim)
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {"alpha", "beta"}, listed

    alpha = chat(client, "alpha")
    a = shim.model_status("alpha")
    assert a["state"] == "running" and a["last_wake"] == "cold", a
    pids = list(a["pids"])
    assert len(pids) >= 3, f"vLLM's tree: API server, EngineCore, worker...: {pids}"
    port = shim.status()["models"]["alpha"]["port"]

    # the engine's HTTP listener is on loopback, never 0.0.0.0 or ::
    ports = listeners(pids)
    assert ports.get(port) == "0100007F", f"engine port {port} bound to {ports.get(port)}"
    wider = {p: addr for p, addr in ports.items() if addr not in LOOPBACK}
    assert not wider, f"listeners of the vLLM tree not on loopback: {wider}"
    # io_uring is unavailable in the tree (CRIU could not dump it)
    for pid in pids:
        assert "Seccomp:\t2" in Path(f"/proc/{pid}/status").read_text(), pid
    made = resources.bound_unix_paths(pids)
    assert any(p.startswith("/tmp/") for p in made), f"no ZMQ ipc socket files? {made}"

    # a switch: alpha is stopped, beta answers, differently
    beta = chat(client, "beta")
    assert beta != alpha, "two models with different weights gave the same greedy answer"
    assert shim.model_status("alpha")["state"] == "stopped"
    wait_until(lambda: not any(pid_alive(p) for p in pids), 60, "alpha's tree to end")
    left = [p for p in made if Path(p).exists()]
    assert not left, f"alpha's ipc socket files outlived its tree: {left}"
    tmp = Path(f"/tmp/llmux-engine-alpha-{port}")
    assert all(p.startswith(f"{tmp}/") for p in made), made
    assert not tmp.exists(), f"alpha's TMPDIR (vllm_dist_*, ipc sockets) outlived it: " \
                             f"{sorted(tmp.iterdir())}"

    # streaming gives the same greedy text, chunk by chunk
    stream = client.chat.completions.create(model="beta", messages=PROMPT,  # type: ignore[arg-type]
                                            max_tokens=MAX_TOKENS, temperature=0, stream=True)
    chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([c for c in chunks if c]) >= 2, chunks
    assert "".join(chunks) == beta

    # completions, and alpha again after a cold start: the same answer as the first time
    done = client.completions.create(model="alpha", prompt="the old sailor said",
                                     max_tokens=MAX_TOKENS, temperature=0)
    assert done.model == "alpha" and done.choices[0].text, done
    assert chat(client, "alpha") == alpha
    assert shim.model_status("alpha")["restarts"] == 0
    assert shim.model_status("beta")["state"] == "stopped"


def test_sleep_eviction_on_an_engine_without_sleep_mode_fails_clearly(
        start_vllm_shim: Any) -> None:
    """vLLM on CPU refuses --enable-sleep-mode: the error names the model and vLLM's reason,
    and a model that does not sleep keeps serving beside it."""
    shim = start_vllm_shim({"sleepy": "offload+keep_running", "plain": "retain+stop"},
                           names={"sleepy": "alpha", "plain": "beta"})
    r = shim.complete("sleepy")
    assert r.status_code == 503, r.text
    message = r.json()["error"]["message"]
    assert "sleepy" in message and "Sleep mode is not supported" in message, message
    status = shim.model_status("sleepy")
    assert status["state"] == "stopped", status
    assert "Sleep mode is not supported" in (status["last_error"] or ""), status
    ok = shim.complete("plain")
    assert ok.status_code == 200, ok.text
    with httpx.Client() as c:
        assert c.get(f"{shim.url}/health").status_code == 200
