"""The chat and completion endpoints without HTTP or a model: the event stream a chat or
completion job makes from scripted engine updates (role chunks, deltas, the <think> split,
usage, the error event, [DONE]) and the full responses it collects."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

from moeflow.engine.cost import CostSnapshot
from moeflow.engine.output_processor import RequestUpdate
from moeflow.server import responses, wire
from moeflow.server.metrics import ServerMetrics
from moeflow.server.serving import Choice, Job, ServerConfig
from moeflow.server.serving_chat import OpenAIServingChat
from moeflow.server.serving_completion import OpenAIServingCompletion
from moeflow.tokenizer import ReasoningSplitter, Tokenizer


class _Engine:
    """What OpenAIServing reads of an AsyncEngine."""

    tokenizer = Tokenizer.byte_level()
    max_model_len = 64
    vocab_size = 256


class _Serving(OpenAIServingChat, OpenAIServingCompletion):
    """Both endpoints over one engine and one metrics registry."""


def _serving(reasoning: str = "off", price_per_hour: float | None = None) -> _Serving:
    config = ServerConfig("m", reasoning=reasoning, price_per_hour=price_per_hour)
    return _Serving(_Engine(), config, ServerMetrics("tiny"))  # type: ignore[arg-type]


def _job(updates: list[RequestUpdate], *, chat: bool, splitter: bool = False) -> Job:
    async def merged() -> AsyncGenerator[tuple[int, RequestUpdate], None]:
        for u in updates:
            yield 0, u

    choice = Choice(0, 0, ReasoningSplitter() if splitter else None)
    return Job("id-1", 7, 0.0, [choice], merged(), 5, chat, False, True)


def _ids(text: str) -> list[int]:
    return _Engine.tokenizer.encode(text)


def _events(serving: _Serving, job: Job) -> list[Any]:
    async def run() -> list[str]:
        if job.chat:
            events = serving._sse(job, serving._role_chunks(job), serving._chat_chunk)
        else:
            events = serving._sse(job, [], serving._completion_chunk)
        return [e async for e in events]

    out = []
    for event in asyncio.run(run()):
        assert event.startswith("data: ") and event.endswith("\n\n")
        body = event[len("data: ") : -2]
        out.append(body if body == "[DONE]" else json.loads(body))
    return out


def test_chat_stream_splits_reasoning_and_ends_with_usage() -> None:
    updates = [
        RequestUpdate("r", _ids("<think>a"), text_delta="<think>a"),
        RequestUpdate("r", _ids("b</thi"), text_delta="b</thi"),
        RequestUpdate("r", _ids("nk>XY"), text_delta="nk>XY", finish_reason="stop"),
    ]
    serving = _serving(reasoning="on")
    events = _events(serving, _job(updates, chat=True, splitter=True))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [e["choices"][0]["delta"] for e in events[1:-2]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "ab"
    assert "".join(d.get("content", "") for d in deltas) == "XY"
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    num_tokens = sum(len(u.new_token_ids) for u in updates)
    assert events[-2] == responses.usage_chunk("id-1", 7, "m", responses.usage(5, num_tokens, 0))
    assert events[-1] == "[DONE]"


def test_completion_stream_error_event_ends_it_without_usage() -> None:
    updates = [
        RequestUpdate("r", _ids("ab"), text_delta="ab"),
        RequestUpdate("r", [], error="engine failure: boom"),
        RequestUpdate("r", _ids("c"), text_delta="c"),  # never read
    ]
    events = _events(_serving(), _job(updates, chat=False))
    assert events[0]["object"] == "text_completion" and events[0]["choices"][0]["text"] == "ab"
    assert events[1] == wire.error_body("engine failure: boom", "server_error")
    assert events[2:] == ["[DONE]"]


def test_full_responses_join_the_deltas() -> None:
    serving = _serving()
    updates = [
        RequestUpdate("r", _ids("He"), text_delta="H"),  # "e" held back
        RequestUpdate("r", _ids("y"), text_delta="ey", finish_reason="length"),
    ]
    job = _job(updates, chat=False)
    assert asyncio.run(serving._collect(job)) is None
    resp = serving._completion_response(job)
    assert resp["choices"][0]["text"] == "Hey" and resp["choices"][0]["finish_reason"] == "length"
    assert resp["usage"] == responses.usage(5, 3, 0)
    job = _job(updates, chat=True)
    asyncio.run(serving._collect(job))
    message = serving._chat_response(job)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Hey"}


def test_usage_carries_the_cost_of_the_query() -> None:
    """The last update's cost becomes usage.cost; reasoning_seconds is the decode time of the
    rows that sampled the reasoning tokens (here all of them: the prompt opened the block and
    it never closed); usd is the booked seconds at the price per hour."""
    ids = _ids("abcd")
    cost = CostSnapshot(3 * 10**8, 6 * 10**8, None, None, 2, (0, 10**8, 2 * 10**8, 3 * 10**8))
    updates = [
        RequestUpdate("r", ids[:2], text_delta="ab"),
        RequestUpdate("r", ids[2:], text_delta="cd", finish_reason="length", cost=cost),
    ]
    serving = _serving(reasoning="on", price_per_hour=36.0)
    job = _job(updates, chat=True)
    job.choices[0].splitter = ReasoningSplitter(in_reasoning=True)

    def reasoning_total() -> float | None:
        name, labels = "moeflow:request_reasoning_seconds_total", {"model_name": "tiny"}
        return serving.metrics.registry.get_sample_value(name, labels)

    assert reasoning_total() == 0
    usage = _events(serving, job)[-2]["usage"]
    assert usage["cost"] == {
        "prefill_seconds": 0.3,
        "decode_seconds": 0.6,
        "reasoning_seconds": 0.6,
        "cached_tokens": 2,
        "joules": None,
        "energy_source": None,
        "usd": 36.0 * 0.9 / 3600,
    }
    assert reasoning_total() == 0.6
