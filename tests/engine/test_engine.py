"""Engine invariants on a tiny random model: batching, chunked prefill and preemption change
nothing in the output; blocks are all free afterwards; a shared prefix is computed once."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from moeflow import LLM, SamplingParams
from moeflow.errors import RequestError
from tests.helpers.engine import assert_idle


@pytest.fixture(scope="module")
def model_path(tiny_checkpoints: dict[str, Path]) -> str:
    return str(tiny_checkpoints["llama"])


@pytest.fixture(scope="module")
def solo_llm(model_path: str) -> LLM:
    return LLM(model_path, dtype="float32", device="cpu", max_model_len=256)


def _random_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(3, 90))] for _ in range(n)]


def test_preemption_gives_solo_outputs(model_path: str, solo_llm: LLM) -> None:
    prompts = _random_prompts(64, seed=1)
    rng = random.Random(2)
    params = [
        SamplingParams(temperature=0, max_tokens=rng.randint(4, 24), ignore_eos=True)
        for _ in prompts
    ]
    # 24 blocks of 16 tokens for 64 sequences of up to 114 tokens: preemption is certain.
    llm = LLM(
        model_path,
        dtype="float32",
        device="cpu",
        max_model_len=128,
        kv_cache_tokens=384,
        max_num_batched_tokens=64,
    )
    outs = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_idle(llm)
    for ids, p, out in zip(prompts, params, outs, strict=True):
        solo = solo_llm.generate([ids], p)[0]
        assert out.token_ids == solo.token_ids
        assert len(out.token_ids) == p.max_tokens and out.finish_reason == "length"
    assert_idle(solo_llm)


def test_shared_prefix_is_computed_once(model_path: str) -> None:
    llm = LLM(model_path, dtype="float32", device="cpu", max_model_len=256)
    rng = random.Random(3)
    prefix = [rng.randrange(256) for _ in range(64)]  # 4 full blocks
    a, b = prefix + [1, 2, 3], prefix + [7, 8, 9, 10]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = llm.generate([a], params)[0]
    computed_before = llm.engine.stats.num_computed_tokens
    second = llm.generate([b], params)[0]
    computed = llm.engine.stats.num_computed_tokens - computed_before
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 64
    # Only the 4 new prompt tokens are prefilled, then 7 decode steps.
    assert computed == len(b) - 64 + 7
    cold = LLM(model_path, dtype="float32", device="cpu", enable_prefix_caching=False)
    assert cold.generate([b], params)[0].token_ids == second.token_ids
    assert_idle(llm)
    assert_idle(cold)


def test_seeded_sampling_is_batch_invariant(solo_llm: LLM) -> None:
    prompts = _random_prompts(6, seed=4)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=20)
    alone = solo_llm.generate([prompts[0]], seeded)[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=15, seed=i) for i in range(5)]
    batch = solo_llm.generate(list(reversed(prompts)), others + [seeded])
    assert batch[-1].token_ids == alone
    again = solo_llm.generate([prompts[0]], seeded)[0].token_ids
    assert again == alone
    different = SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=20)
    assert solo_llm.generate([prompts[0]], different)[0].token_ids != alone
    assert_idle(solo_llm)


def test_stop_strings_stop_ids_and_max_tokens(solo_llm: LLM) -> None:
    ids = _random_prompts(1, seed=5)[0]
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = solo_llm.generate([ids], greedy)[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 30

    # Stop token id: the output ends at the first occurrence of the 6th token.
    stop_id = full.token_ids[5]
    p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop_id])
    out = solo_llm.generate([ids], p)[0]
    cut = full.token_ids.index(stop_id) + 1
    assert out.token_ids == full.token_ids[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id

    # Stop string: the text ends right before it.
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop
    p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])
    out = solo_llm.generate([ids], p)[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert full.token_ids[: len(out.token_ids)] == out.token_ids
    assert_idle(solo_llm)


def test_logprobs(solo_llm: LLM) -> None:
    ids = _random_prompts(1, seed=6)[0]
    out = solo_llm.generate([ids], SamplingParams(temperature=0, max_tokens=5, logprobs=3))[0]
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == tok
        assert len(lp.top) == 3
        assert max(lp.top.values()) == pytest.approx(lp.logprob)  # greedy: the top token
    assert_idle(solo_llm)


def test_eos_finishes_with_stop(solo_llm: LLM) -> None:
    """Whatever token greedy picks first is made an EOS id; it then ends the request."""
    ids = _random_prompts(1, seed=7)[0]
    first = solo_llm.generate([ids], SamplingParams(temperature=0, max_tokens=1))[0].token_ids[0]
    engine = solo_llm.engine
    saved = engine.eos_ids
    engine.eos_ids = frozenset({first})
    try:
        out = solo_llm.generate([ids], SamplingParams(temperature=0, max_tokens=10))[0]
        ignored = solo_llm.generate(
            [ids], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        )[0]
    finally:
        engine.eos_ids = saved
    assert out.token_ids == [first] and out.finish_reason == "stop"
    assert len(ignored.token_ids) == 10


def test_bad_requests_are_refused_and_lose_nothing(solo_llm: LLM) -> None:
    engine = solo_llm.engine
    with pytest.raises(RequestError) as e:
        engine.add_request(list(range(10)) * 26, SamplingParams())
    assert e.value.code == "context_length_exceeded" and "256" in str(e.value)
    with pytest.raises(RequestError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(RequestError, match="token ids"):
        engine.add_request([1, 2, 10_000], SamplingParams())
    with pytest.raises(RequestError, match="max_tokens"):
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=300))
    with pytest.raises(RequestError, match="temperature"):
        SamplingParams(temperature=float("nan"))
    assert_idle(solo_llm)
    ok = solo_llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3))[0]
    assert len(ok.token_ids) == 3


def test_abort_frees_blocks(solo_llm: LLM) -> None:
    engine = solo_llm.engine
    reqs = [engine.add_request(p, SamplingParams(max_tokens=50)) for p in _random_prompts(4, 8)]
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    for r in reqs:
        assert engine.abort(r.request_id)
        assert r.finish_reason is not None and r.finish_reason.value == "abort"
    assert not engine.abort(reqs[0].request_id)
    assert_idle(solo_llm)
