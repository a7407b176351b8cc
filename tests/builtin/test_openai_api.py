"""vLLM's OpenAI surface on the built-in engine: shapes, streaming, errors, concurrency."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from llmux.shim.builtin.testing import EngineProcess
from tests.support.procs import wait_until

MODEL = "test-org/shared-model"


def sse_events(body: str) -> list[str]:
    assert body.endswith("\n\n")
    events = [block for block in body.split("\n\n") if block]
    assert all(event.startswith("data: ") for event in events)
    return [event.removeprefix("data: ") for event in events]


def test_models_lists_the_served_model(shared_engine: EngineProcess) -> None:
    body = httpx.get(f"{shared_engine.base_url}/v1/models").json()
    assert body["object"] == "list"
    [model] = body["data"]
    assert model["id"] == MODEL
    assert model["object"] == "model"
    assert model["owned_by"] == "vllm"
    assert model["root"] == MODEL
    assert isinstance(model["max_model_len"], int)


def test_chat_completion_shape(shared_engine: EngineProcess) -> None:
    response = httpx.post(f"{shared_engine.base_url}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 7, "temperature": 0.7, "seed": 1})
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 7
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 7
    assert usage["total_tokens"] == usage["prompt_tokens"] + 7


def test_completion_shape_and_multiple_prompts(shared_engine: EngineProcess) -> None:
    url = f"{shared_engine.base_url}/v1/completions"
    single = httpx.post(url, json={"model": MODEL, "prompt": "the river", "max_tokens": 5}).json()
    assert single["id"].startswith("cmpl-")
    assert single["object"] == "text_completion"
    [choice] = single["choices"]
    assert len(choice["text"].split()) == 5
    assert choice["finish_reason"] == "length"
    assert single["usage"]["completion_tokens"] == 5
    both = httpx.post(url, json={"model": MODEL, "prompt": ["the river", "a dark night"],
                                 "max_tokens": 5}).json()
    assert [c["index"] for c in both["choices"]] == [0, 1]
    assert both["choices"][0]["text"] == choice["text"]
    assert both["usage"]["completion_tokens"] == 10


def test_model_field_may_be_omitted(shared_engine: EngineProcess) -> None:
    response = httpx.post(f"{shared_engine.base_url}/v1/completions",
                          json={"prompt": "hello", "max_tokens": 2})
    assert response.status_code == 200
    assert response.json()["model"] == MODEL


def test_streamed_chat_matches_the_full_answer(shared_engine: EngineProcess) -> None:
    request = {"model": MODEL, "messages": [{"role": "user", "content": "Sing a song"}],
               "max_tokens": 6}
    url = f"{shared_engine.base_url}/v1/chat/completions"
    full = httpx.post(url, json=request).json()["choices"][0]["message"]["content"]
    response = httpx.post(url, json={**request, "stream": True,
                                     "stream_options": {"include_usage": True}})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert content == full
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 6


def test_streamed_completion_without_usage(shared_engine: EngineProcess) -> None:
    request = {"model": MODEL, "prompt": "once upon a time", "max_tokens": 4}
    url = f"{shared_engine.base_url}/v1/completions"
    full = httpx.post(url, json=request).json()["choices"][0]["text"]
    events = sse_events(httpx.post(url, json={**request, "stream": True}).text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 4
    assert all("usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full


async def test_official_openai_client(shared_engine: EngineProcess) -> None:
    client = openai.AsyncOpenAI(base_url=f"{shared_engine.base_url}/v1", api_key="unused")
    try:
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        chat = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert chat.choices[0].message.content
        completion = await client.completions.create(model=MODEL, prompt="hi", max_tokens=3)
        assert completion.choices[0].text
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True)
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(pieces) == chat.choices[0].message.content
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="no-such-model", prompt="hi")
    finally:
        await client.close()


async def test_concurrent_requests_get_their_own_answers(shared_engine: EngineProcess) -> None:
    prompts = [f"question number {i} about the sea" for i in range(20)]
    url = f"{shared_engine.base_url}/v1/completions"
    async with httpx.AsyncClient(timeout=60) as client:
        async def ask(prompt: str) -> str:
            response = await client.post(url, json={"model": MODEL, "prompt": prompt,
                                                    "max_tokens": 8})
            assert response.status_code == 200
            text: str = response.json()["choices"][0]["text"]
            return text

        expected = [await ask(p) for p in prompts]
        together = await asyncio.gather(*(ask(p) for p in prompts))
    assert together == expected
    assert len(set(expected)) > 1


@pytest.mark.parametrize(("path", "body", "status", "kind", "words"), [
    ("/v1/completions", {"model": "other", "prompt": "x"}, 404, "NotFoundError", "other"),
    ("/v1/chat/completions", {"model": "other", "messages": [{"role": "user", "content": "x"}]},
     404, "NotFoundError", "does not exist"),
    ("/v1/completions", b"{not json", 400, "BadRequestError", "JSON"),
    ("/v1/completions", [1, 2], 400, "BadRequestError", "JSON object"),
    # nested deeper than the JSON parser's recursion: was a 500 with a RecursionError
    ("/v1/completions", b"[" * 30000 + b"]" * 30000, 400, "BadRequestError", "nested"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "BadRequestError", "max_tokens"),
    ("/v1/completions", {"prompt": 7}, 400, "BadRequestError", "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "BadRequestError", "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, "BadRequestError",
     "role"),
    ("/v1/completions", {"prompt": "x", "n": 3}, 400, "BadRequestError", "n must be 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100000}, 400, "BadRequestError",
     "maximum context length"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "BadRequestError", "stream"),
    ("/sleep?level=3", None, 400, "BadRequestError", "level"),
    ("/wake_up?tags=bogus", None, 400, "BadRequestError", "bogus"),
    ("/collective_rpc", {"method": "no_such_method"}, 400, "BadRequestError", "no_such_method"),
    ("/collective_rpc", {"args": []}, 400, "BadRequestError", "method"),
    ("/v1/embeddings", {"input": "x"}, 404, "NotFoundError", "Not Found"),
])
def test_bad_requests_get_openai_error_bodies(
    shared_engine: EngineProcess, path: str, body: object, status: int, kind: str, words: str
) -> None:
    url = f"{shared_engine.base_url}{path}"
    if isinstance(body, bytes):
        response = httpx.post(url, content=body, headers={"content-type": "application/json"})
    else:
        response = httpx.post(url, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == kind
    assert error["code"] == status
    assert words in error["message"]
    # The engine is unaffected by the bad request.
    ok = httpx.post(f"{shared_engine.base_url}/v1/completions", json={"prompt": "x"})
    assert ok.status_code == 200


def test_health_version_and_collective_rpc_echo(shared_engine: EngineProcess) -> None:
    base = shared_engine.base_url
    assert httpx.get(f"{base}/health").status_code == 200
    assert "version" in httpx.get(f"{base}/version").json()
    rpc = httpx.post(f"{base}/collective_rpc",
                     json={"method": "echo", "args": [1, "two"], "kwargs": {"k": 3}})
    assert rpc.json() == {"results": [{"args": [1, "two"], "kwargs": {"k": 3}}]}
    assert httpx.post(f"{base}/reset_prefix_cache").status_code == 200


def test_a_client_that_leaves_mid_stream_frees_the_engine(shared_engine: EngineProcess) -> None:
    base = shared_engine.base_url
    request = {"model": MODEL, "prompt": "a very long story", "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=request) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first chunk; closing the stream drops the connection
    wait_until(lambda: not httpx.get(f"{base}/engine_state").json()["running_requests"], 60,
               "the abandoned request to leave the engine")
    ok = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert ok.status_code == 200
