"""The OpenAI API's answers as plain dicts in OpenAI's shapes: responses, SSE chunks, usage,
logprobs, and vLLM's /tokenize answer. Never imports torch or fastapi."""

from __future__ import annotations

import time
import uuid
from typing import Any


def new_id(prefix: str) -> str:
    """A response id: "chatcmpl-..." for chat, "cmpl-..." for completions."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """The `created` field: Unix seconds."""
    return int(time.time())


def usage(
    prompt_tokens: int, completion_tokens: int, reasoning_tokens: int = 0, cached_tokens: int = 0
) -> dict[str, Any]:
    """prompt_tokens counts each prompt once (whatever n); cached_tokens, those of them read from
    the prefix cache; completion_tokens counts reasoning tokens too (as OpenAI's does)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }


def logprobs_content_entry(
    token_text: str, logprob: float, top: list[tuple[str, float]]
) -> dict[str, Any]:
    """One entry of a chat choice's `logprobs.content` list; top: (token text, logprob)."""
    return {
        "token": token_text,
        "logprob": logprob,
        "bytes": _utf8(token_text),
        "top_logprobs": [{"token": t, "logprob": v, "bytes": _utf8(t)} for t, v in top],
    }


def tokenize_response(
    tokens: list[int], max_model_len: int, token_strs: list[str] | None = None
) -> dict[str, Any]:
    """vLLM's /tokenize answer: the ids, their count and the context they must fit."""
    return {
        "count": len(tokens),
        "max_model_len": max_model_len,
        "tokens": tokens,
        "token_strs": token_strs,
    }


def chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """A chat choice's `logprobs` from logprobs_content_entry results."""
    return {"content": entries}


def legacy_logprobs(
    tokens: list[str],
    token_logprobs: list[float],
    top_logprobs: list[dict[str, float]],
    text_offset: list[int],
) -> dict[str, Any]:
    """A completions choice's `logprobs`: parallel lists, one entry per generated token;
    top_logprobs maps token text -> logprob; text_offset is each token's start in the text."""
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def chat_completion_response(
    rid: str,
    created: int,
    model: str,
    choices: list[
        tuple[int, str, str | None, dict[str, Any] | None, str | None, list[dict[str, Any]]]
    ],
    usage_: dict[str, Any],
) -> dict[str, Any]:
    """choices: (index, content, reasoning_content or None, logprobs, finish_reason, tool
    calls); content is null when the model only called tools."""
    out = []
    for index, content, reasoning, logprobs, finish, tool_calls in choices:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if tool_calls and not content else content,
        }
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        if tool_calls:
            message["tool_calls"] = tool_calls
        out.append(
            {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}
        )
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": out,
        "usage": usage_,
    }


def chat_completion_chunk(
    rid: str,
    created: int,
    model: str,
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One SSE chunk of one choice. delta: {"role": "assistant"} first, then {"content": ...}
    and/or {"reasoning_content": ...}; the last one carries finish_reason."""
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        ],
    }


def completion_response(
    rid: str,
    created: int,
    model: str,
    choices: list[tuple[int, str, dict[str, Any] | None, str | None]],
    usage_: dict[str, Any],
) -> dict[str, Any]:
    """choices: (index, text, logprobs, finish_reason)."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}
            for i, text, lp, finish in choices
        ],
        "usage": usage_,
    }


def completion_chunk(
    rid: str,
    created: int,
    model: str,
    index: int,
    text: str,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One SSE chunk of one completions choice."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        ],
    }


def usage_chunk(
    rid: str, created: int, model: str, usage_: dict[str, Any], chat: bool = True
) -> dict[str, Any]:
    """The last chunk before [DONE] when stream_options.include_usage: no choices, only usage."""
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage_,
    }


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))
