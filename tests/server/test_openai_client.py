"""The server through the official `openai` client: chat and completions, streamed and not, n > 1,
logprobs, seeds, stop strings; concatenated stream deltas equal the non-streamed text."""

from __future__ import annotations

import openai
import pytest

from tests.helpers.server import Server

MSG = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def client(tiny_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.base_url, api_key="unused", max_retries=0)


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_non_streaming_and_streaming_agree(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="tiny",
        messages=MSG,
        max_tokens=20,
        temperature=0,  # type: ignore[arg-type]
    )
    choice = resp.choices[0]
    assert choice.finish_reason in ("length", "stop")
    assert resp.usage is not None and resp.usage.completion_tokens == 20
    assert resp.usage.prompt_tokens > 0
    text = choice.message.content or ""
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MSG,  # type: ignore[arg-type]
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [choice.finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20


def test_completions_n_and_seed(client: openai.OpenAI) -> None:
    def create() -> openai.types.Completion:
        return client.completions.create(
            model="tiny", prompt="abc", max_tokens=12, temperature=1.0, n=3, seed=7, logprobs=0
        )

    a, b = create(), create()
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # different seeds per choice
    lengths = [len(c.logprobs.tokens or []) if c.logprobs else 0 for c in a.choices]
    assert all(0 < n <= 12 for n in lengths)
    assert a.usage is not None and a.usage.completion_tokens == sum(lengths)


def test_usage_counts_each_prompt_once_and_its_cached_tokens(client: openai.OpenAI) -> None:
    """prompt_tokens is the prompt's length whatever n; the same 40-token prompt again finds its
    two full 16-token blocks in the prefix cache."""
    prompt = list(range(100, 140))

    def create(n: int) -> openai.types.CompletionUsage:
        resp = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=4, temperature=0, n=n
        )
        assert resp.usage is not None
        return resp.usage

    first, again = create(2), create(1)
    assert first.prompt_tokens == again.prompt_tokens == 40
    assert first.completion_tokens == 8 and first.total_tokens == 48
    assert again.prompt_tokens_details is not None
    assert again.prompt_tokens_details.cached_tokens == 32
    chat = [
        client.chat.completions.create(
            model="tiny",
            messages=MSG,  # type: ignore[arg-type]
            max_tokens=2,
            n=n,
        ).usage
        for n in (1, 3)
    ]
    assert chat[0] is not None and chat[1] is not None
    assert chat[0].prompt_tokens == chat[1].prompt_tokens


def test_completions_streaming_equals_full(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=16, temperature=0)
    parts = client.completions.create(
        model="tiny", prompt=[1, 2, 3], max_tokens=16, temperature=0, stream=True
    )
    assert "".join(p.choices[0].text for p in parts if p.choices) == full.choices[0].text


def test_logprobs(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="tiny",
        messages=MSG,  # type: ignore[arg-type]
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = resp.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs))
    legacy = client.completions.create(
        model="tiny", prompt="abc", max_tokens=4, temperature=0, logprobs=2
    )
    lp = legacy.choices[0].logprobs
    assert lp is not None and len(lp.tokens or []) == 4 and len(lp.top_logprobs or []) == 4
    streamed = client.completions.create(
        model="tiny", prompt="abc", max_tokens=4, temperature=0, logprobs=2, stream=True
    )
    tokens, offsets = [], []
    for chunk in streamed:
        part = chunk.choices[0].logprobs if chunk.choices else None
        if part is not None:
            tokens += part.tokens or []
            offsets += part.text_offset or []
    assert tokens == lp.tokens and offsets == lp.text_offset


def test_stop_strings(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny", prompt="xyz", max_tokens=30, temperature=0)
    text = full.choices[0].text
    stop = text[10:12]
    cut = client.completions.create(
        model="tiny", prompt="xyz", max_tokens=30, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny", prompt="xyz", max_tokens=30, temperature=0, stop=[stop], stream=True
    )
    assert "".join(p.choices[0].text for p in streamed if p.choices) == cut.choices[0].text


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="a", max_tokens=2)
