"""OpenAI request validation and response shapes, matching vLLM's serving_chat/completion.

Requests are checked completely before anything reaches the engine core, and every
problem becomes a 400 naming the offending field.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmux.shim.builtin import vocab
from llmux.shim.builtin.backend import EngineError

DEFAULT_MAX_TOKENS_COMPLETION = 16
DEFAULT_MAX_TOKENS_CHAT = 32


def bad(message: str, param: str | None = None) -> EngineError:
    return EngineError(message, 400, "BadRequestError", param)


@dataclass(frozen=True)
class GenerationRequest:
    """One validated /v1/chat/completions or /v1/completions request."""

    chat: bool
    model: str
    prompts: list[list[int]]
    max_tokens: int
    stream: bool
    include_usage: bool


def parse_request(body: object, *, chat: bool, served_model_name: str,
                  max_model_len: int) -> GenerationRequest:
    if not isinstance(body, Mapping):
        raise bad("the request body must be a JSON object")
    model = body.get("model", served_model_name)
    if not isinstance(model, str):
        raise bad("'model' must be a string", "model")
    if model != served_model_name:
        raise EngineError(f"The model `{model}` does not exist.", 404, "NotFoundError", "model")
    if chat:
        prompts = [vocab.encode(_chat_prompt(body.get("messages")))]
        raw_max = body.get("max_completion_tokens", body.get("max_tokens"))
        default_max, prompt_param = DEFAULT_MAX_TOKENS_CHAT, "messages"
    else:
        prompts = [vocab.encode(text) for text in _completion_prompts(body.get("prompt"))]
        raw_max = body.get("max_tokens")
        default_max, prompt_param = DEFAULT_MAX_TOKENS_COMPLETION, "prompt"
    max_tokens = default_max if raw_max is None else raw_max
    if isinstance(max_tokens, float) and max_tokens.is_integer():
        max_tokens = int(max_tokens)  # 4.0, as vLLM's (lax) request models take it
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad(f"max_tokens must be a positive integer, got {raw_max!r}", "max_tokens")
    n = body.get("n", 1)
    if n not in (1, None):
        raise bad(f"n must be 1 (this engine returns one choice per prompt), got {n!r}", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise bad("'stream_options' must be an object", "stream_options")
    for field in ("temperature", "top_p", "seed"):
        value = body.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise bad(f"{field!r} must be a number, got {value!r}", field)
    for ids in prompts:
        if len(ids) + max_tokens > max_model_len:
            raise bad(
                f"This model's maximum context length is {max_model_len} tokens. However, you "
                f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the {prompt_param}, "
                f"{max_tokens} in the completion). Please reduce the length of the "
                f"{prompt_param} or completion.", prompt_param)
    return GenerationRequest(chat, model, prompts, max_tokens, stream,
                             bool(options.get("include_usage", False)))


def _chat_prompt(messages: object) -> str:
    """role: content lines, then "assistant:", a stand-in for a chat template."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    lines = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise bad(f"messages[{index}] must be an object with a string 'role'", "messages")
        lines.append(f"{message['role']}: {_content_text(message.get('content'), index)}")
    lines.append("assistant:")
    return "\n".join(lines)


def _content_text(content: object, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise bad(f"messages[{index}].content: only text parts are supported", "messages")
            parts.append(str(part.get("text", "")))
        return " ".join(parts)
    raise bad(f"messages[{index}].content must be a string or a list of parts", "messages")


def _completion_prompts(prompt: object) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [vocab.decode(prompt)]
    raise bad("'prompt' must be a string, a non-empty list of strings or of token ids", "prompt")


# -- responses (the shapes of vLLM's protocol.py) -------------------------------------------
def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens, "prompt_tokens_details": None}


def full_response(request: GenerationRequest, response_id: str,
                  results: list[tuple[str, str | None, int]]) -> dict[str, Any]:
    """``results``: (text, finish_reason, completion tokens) per prompt."""
    choices: list[dict[str, Any]] = []
    for index, (text, finish_reason, _count) in enumerate(results):
        if request.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text,
                                       "reasoning_content": None, "tool_calls": []}
            choices.append({"index": index, "message": message, "logprobs": None,
                            "finish_reason": finish_reason, "stop_reason": None})
        else:
            choices.append({"index": index, "text": text, "logprobs": None,
                            "finish_reason": finish_reason, "stop_reason": None,
                            "prompt_logprobs": None})
    prompt_tokens = sum(len(p) for p in request.prompts)
    completion_tokens = sum(count for _text, _reason, count in results)
    return {"id": response_id, "object": "chat.completion" if request.chat else "text_completion",
            "created": int(time.time()), "model": request.model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens), "prompt_logprobs": None}


def stream_chunk(request: GenerationRequest, response_id: str, created: int, index: int,
                 text: str | None, finish_reason: str | None, *,
                 role: bool = False) -> dict[str, Any]:
    choice: dict[str, Any]
    if request.chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None,
                  "finish_reason": finish_reason, "stop_reason": None}
    return {"id": response_id,
            "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": created, "model": request.model, "choices": [choice]}


def usage_chunk(request: GenerationRequest, response_id: str, created: int,
                completion_tokens: int) -> dict[str, Any]:
    return {"id": response_id,
            "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": created, "model": request.model, "choices": [],
            "usage": usage(sum(len(p) for p in request.prompts), completion_tokens)}


def models_list(served_model_name: str, model_path: str, max_model_len: int,
                created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{
        "id": served_model_name, "object": "model", "created": created, "owned_by": "vllm",
        "root": model_path, "parent": None, "max_model_len": max_model_len,
        "permission": [{
            "id": f"modelperm-{uuid.uuid5(uuid.NAMESPACE_URL, served_model_name).hex}",
            "object": "model_permission", "created": created, "allow_create_engine": False,
            "allow_sampling": True, "allow_logprobs": True, "allow_search_indices": False,
            "allow_view": True, "allow_fine_tuning": False, "organization": "*",
            "group": None, "is_blocking": False}],
    }]}
