"""The official `openai` client against the shim: chat, completions, streaming, models."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.support.proxy_fixtures import ShimFactory, direct_chat


async def test_openai_client_chat_completions_streaming_and_models(
        shim_factory: ShimFactory, http: httpx.AsyncClient) -> None:
    shim = await shim_factory(["a", "b"])
    client = openai.AsyncOpenAI(base_url=f"{shim.url}/v1", api_key="x", max_retries=0)
    try:
        models = await client.models.list()
        listed = {m.id: m for m in models.data}
        assert set(listed) == {"a", "b"}
        assert all((m.model_extra or {}).get("state") == "stopped" for m in listed.values())

        chat = await client.chat.completions.create(
            model="a", messages=[{"role": "user", "content": "hello there"}], max_tokens=8,
            temperature=0)
        text = chat.choices[0].message.content
        assert text and chat.model in ("a", "llmux-test/a")
        # the proxy's answer is the engine's own answer, byte for byte in content
        assert text == await direct_chat(http, shim, "a", "hello there")

        comp = await client.completions.create(model="a", prompt="once upon", max_tokens=6,
                                               temperature=0)
        assert comp.choices[0].text

        pieces: list[str] = []
        stream = await client.chat.completions.create(
            model="a", messages=[{"role": "user", "content": "hello there"}], max_tokens=8,
            temperature=0, stream=True)
        chunks = 0
        async for chunk in stream:
            chunks += 1
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        assert chunks >= 2
        assert "".join(pieces).strip() == text.strip()

        cstream = await client.completions.create(model="a", prompt="once upon", max_tokens=6,
                                                  temperature=0, stream=True)
        ctext = "".join([c.choices[0].text async for c in cstream if c.choices])
        assert ctext.strip() == (comp.choices[0].text or "").strip()

        # switching to b through the client, then listing shows the states
        other = await client.chat.completions.create(
            model="b", messages=[{"role": "user", "content": "hello there"}], max_tokens=8,
            temperature=0)
        assert other.choices[0].message.content
        states = {m.id: (m.model_extra or {}).get("state")
                  for m in (await client.models.list()).data}
        assert states == {"a": "sleeping", "b": "running"}

        with pytest.raises(openai.NotFoundError) as e:
            await client.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "x"}])
        assert "a, b" in str(e.value)
    finally:
        await client.close()


async def test_sync_openai_client(shim_factory: ShimFactory) -> None:
    """The synchronous client too, from a thread while the shim serves in this loop."""
    shim = await shim_factory(["a"])

    def use_sync_client() -> tuple[str, list[str]]:
        with openai.OpenAI(base_url=f"{shim.url}/v1", api_key="x", max_retries=0) as c:
            r = c.chat.completions.create(
                model="a", messages=[{"role": "user", "content": "sync"}], max_tokens=5)
            ids = [m.id for m in c.models.list().data]
            return r.choices[0].message.content or "", ids

    text, ids = await asyncio.to_thread(use_sync_client)
    assert text and ids == ["a"]
