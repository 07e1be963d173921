"""The offline API in vLLM's shapes: RequestOutput.outputs[i] (CompletionOutput), SamplingParams.n,
prompt dicts; each checked against the same request run alone through the engine."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from moeflow import LLM, SamplingParams
from moeflow.api import CompletionOutput, RequestOutput
from moeflow.errors import RequestError
from tests.helpers.engine import assert_idle


@pytest.fixture(scope="module")
def llm(tiny_checkpoints: dict[str, Path]) -> LLM:
    return LLM(str(tiny_checkpoints["llama"]), dtype="float32", device="cpu", max_model_len=256)


def test_outputs_hold_n_generations_with_seed_plus_i(llm: LLM) -> None:
    """n = 3 seeded: three CompletionOutputs, generation i equal to a lone request with seed + i;
    the shortcuts read outputs[0]."""
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=11, n=3, ignore_eos=True)
    (out,) = llm.generate("hello world", params)
    assert isinstance(out, RequestOutput) and out.prompt == "hello world"
    assert out.prompt_token_ids == llm.tokenizer.encode("hello world", add_special_tokens=True)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for i, c in enumerate(out.outputs):
        assert isinstance(c, CompletionOutput) and c.finish_reason == "length"
        alone = SamplingParams(temperature=1.0, max_tokens=8, seed=11 + i, ignore_eos=True)
        want = llm.generate([out.prompt_token_ids], alone)[0]
        assert c.token_ids == want.token_ids and c.text == want.text
        assert c.cumulative_logprob is None and c.logprobs is None  # logprobs not asked for
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert (out.text, out.token_ids, out.finish_reason) == (
        out.outputs[0].text,
        out.outputs[0].token_ids,
        out.outputs[0].finish_reason,
    )
    assert_idle(llm)


def test_cumulative_logprob_is_the_sum(llm: LLM) -> None:
    (out,) = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=6, logprobs=2))
    c = out.outputs[0]
    assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids) == 6
    assert c.cumulative_logprob is not None
    assert math.isclose(c.cumulative_logprob, sum(lp.logprob for lp in c.logprobs))
    assert c.cumulative_logprob < 0


def test_prompt_dicts(llm: LLM) -> None:
    """{"prompt": text} is the text; {"prompt_token_ids": ids} is the ids (prompt None)."""
    greedy = SamplingParams(temperature=0, max_tokens=5)
    ids = llm.tokenizer.encode("The sky is", add_special_tokens=True)
    by_text, by_ids, plain = llm.generate(
        [{"prompt": "The sky is"}, {"prompt_token_ids": ids}, "The sky is"], greedy
    )
    assert by_text.prompt == "The sky is" and by_ids.prompt is None
    assert by_text.prompt_token_ids == by_ids.prompt_token_ids == ids
    assert by_text.token_ids == by_ids.token_ids == plain.token_ids
    (single,) = llm.generate({"prompt_token_ids": ids}, greedy)
    assert single.token_ids == plain.token_ids


@pytest.mark.parametrize(
    "prompt, match",
    [
        ({"prompt": "a", "prompt_token_ids": [1]}, "exactly one"),
        ({}, "exactly one"),
        ({"prompt": "a", "multi_modal_data": {}}, "not supported"),
        ({"prompt_token_ids": "1 2"}, "list of ints"),
        ({"prompt": [1, 2]}, "must be a string"),
    ],
)
def test_bad_prompt_dicts_are_refused(llm: LLM, prompt: dict, match: str) -> None:
    with pytest.raises(RequestError, match=match):
        llm.generate(prompt, SamplingParams(max_tokens=2))
    assert_idle(llm)


def test_chat_prompt_is_the_rendered_template(llm: LLM) -> None:
    messages = [{"role": "user", "content": "hi"}]
    (out,) = llm.chat(messages, SamplingParams(temperature=0, max_tokens=3, n=2))
    assert out.prompt is not None and out.prompt_token_ids == llm.encode_chat(messages)
    assert out.outputs[0].token_ids == out.outputs[1].token_ids  # greedy twice


def test_n_is_validated_and_one_engine_request_is_one_generation(llm: LLM) -> None:
    with pytest.raises(RequestError, match="n must be >= 1"):
        SamplingParams(n=0)
    with pytest.raises(RequestError, match="run n > 1 as n requests"):
        llm.engine.add_request([1, 2], SamplingParams(n=2))
    assert_idle(llm)


def test_chat_template_replaces_the_checkpoints(tiny_checkpoints: dict[str, Path]) -> None:
    template = "{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}"
    llm = LLM(
        str(tiny_checkpoints["llama"]),
        dtype="float32",
        device="cpu",
        max_model_len=64,
        chat_template=template,
    )
    ids = llm.encode_chat([{"role": "user", "content": "hi"}])
    assert ids == llm.tokenizer.encode("[user:hi]", add_special_tokens=False)


def test_sampling_defaults_of_a_generation_config() -> None:
    from moeflow.sampling_params import sampling_defaults

    got = sampling_defaults({"temperature": 0.6, "top_k": 20, "do_sample": True, "eos_token_id": 2})
    assert got == {"temperature": 0.6, "top_k": 20}
    with pytest.raises(RequestError, match="top_p"):
        sampling_defaults({"top_p": 0})
