"""The output processor on a tiny random model: a finished text is decode(token_ids); a stop
string finishes the request through the engine (its blocks freed at once) and is cut from the
text; LLM.stream's deltas join to LLM.generate's text; the overlap schedule's penalty path (which
reads pending tokens before launching) ends a stop string where the plain schedule does."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from moeflow import LLM, SamplingParams
from moeflow.engine.output_processor import OutputProcessor
from moeflow.sampling_params import FinishReason
from tests.helpers.engine import assert_idle


@pytest.fixture(scope="module")
def llm(tiny_checkpoints: dict[str, Path]) -> LLM:
    return LLM(str(tiny_checkpoints["llama"]), dtype="float32", device="cpu", max_model_len=256)


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(3, 40))] for _ in range(n)]


def test_final_text_is_the_full_decode_and_the_stream(llm: LLM) -> None:
    prompts = _prompts(8, seed=21)
    params = SamplingParams(temperature=0.9, seed=5, max_tokens=24, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.text == llm.tokenizer.decode(out.token_ids)
        assert out.finish_reason == "length" and len(out.token_ids) == 24
        assert "".join(llm.stream(prompt, params)) == out.text
    assert_idle(llm)


def test_stop_string_finishes_through_the_engine(llm: LLM) -> None:
    prompt = _prompts(1, seed=22)[0]
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = llm.generate([prompt], greedy)[0]
    text = full.text
    stop = text[len(text) // 3 : len(text) // 3 + 3]
    assert stop
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])

    outputs = OutputProcessor(llm.engine)
    state = outputs.add_request(prompt, params)
    stepped = 0
    while not state.finished:
        outputs.process(llm.engine.step())
        stepped += 1
    # The request ended on the step that completed the stop string, through LLMEngine.abort.
    assert state.req.finish_reason is FinishReason.STOP and state.req.stop_reason == stop
    assert state.req.is_finished and not llm.engine.requests
    assert stepped == len(state.token_ids)  # one token a step, the first from the prefill
    assert state.text.text == text[: text.index(stop)]
    assert state.token_ids == full.token_ids[: len(state.token_ids)]
    update = state.take_update()
    assert (update.finish_reason, update.stop_reason, update.text_delta) == (
        "stop",
        stop,
        state.text.text,
    )
    assert_idle(llm)

    out = llm.generate([prompt], params)[0]
    assert (out.text, out.token_ids, out.stop_reason) == (
        state.text.text,
        state.token_ids,
        stop,
    )
    assert "".join(llm.stream(prompt, params)) == out.text
    assert_idle(llm)


def test_requests_added_elsewhere_are_skipped(llm: LLM) -> None:
    outputs = OutputProcessor(llm.engine)
    mine = outputs.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=3))
    theirs = llm.engine.add_request([4, 5, 6], SamplingParams(temperature=0, max_tokens=3))
    seen: set[str] = set()
    while llm.engine.has_unfinished():
        seen.update(s.request_id for s in outputs.process(llm.engine.step()))
    assert seen == {mine.request_id} and theirs.is_finished and mine.finished
    assert not outputs.abort(mine.request_id)  # already ended
    assert_idle(llm)


def test_stop_string_in_a_penalty_batch_under_overlap(tiny_checkpoints: dict[str, Path]) -> None:
    """Overlap schedule: a request whose stop-string token is on the way when a request with
    penalties joins. A penalised batch runs under the overlap schedule too: the step launches
    (the stop request's row among them), then reads the pending token, which completes the stop
    string; that launched row is never read. The output ends on the token that completed the
    stop string, as with the plain schedule."""
    path = str(tiny_checkpoints["llama"])
    prompt = _prompts(1, seed=23)[0]
    plain = LLM(path, dtype="float32", device="cpu", max_model_len=128, overlap_schedule=False)
    text = plain.generate([prompt], SamplingParams(temperature=0, max_tokens=30))[0].text
    params = SamplingParams(temperature=0, max_tokens=30, stop=[text[9:11]])
    want = plain.generate([prompt], params)[0]
    assert want.stop_reason == text[9:11]

    llm = LLM(path, dtype="float32", device="cpu", max_model_len=128, overlap_schedule=True)
    outputs = OutputProcessor(llm.engine)
    state = outputs.add_request(prompt, params)
    while len(state.req.output_ids) < len(want.token_ids) - 1:
        outputs.process(llm.engine.step())
    assert state.req.num_pending == 1 and not state.finished  # the stop token is on the way
    penalised = SamplingParams(temperature=0, max_tokens=4, repetition_penalty=1.2)
    outputs.add_request([7, 8, 9], penalised)
    outputs.process(llm.engine.step())
    assert state.finished
    assert len(state.req.output_ids) == len(want.token_ids)  # the row launched after: unread
    assert (state.token_ids, state.text.text, state.stop_reason) == (
        want.token_ids,
        want.text,
        want.stop_reason,
    )
    while llm.engine.has_unfinished():
        outputs.process(llm.engine.step())
    assert_idle(llm)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_stop_token_text_is_never_output(llm: LLM, skip_special_tokens: bool) -> None:
    """The eos or stop token id that ends a request is in token_ids, its text never in the
    output, special tokens kept or not (vLLM's detokenizer); streamed the same."""
    prompt = _prompts(1, seed=23)[0]
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    stop_id = full[0].token_ids[5]
    params = SamplingParams(
        temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_id],
        skip_special_tokens=skip_special_tokens,
    )  # fmt: skip
    (out,) = llm.generate([prompt], params)
    cut = full[0].token_ids.index(stop_id) + 1
    assert out.token_ids == full[0].token_ids[:cut] and out.stop_reason == stop_id
    assert out.text == llm.tokenizer.decode(out.token_ids[:-1], skip_special_tokens)
    assert "".join(llm.stream(prompt, params)) == out.text
