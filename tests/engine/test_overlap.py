"""The overlap schedule (step N+1 launched before the host reads step N's tokens) gives what the
plain schedule gives: same tokens, texts, finish reasons and log-probs, through preemption,
chunked prefill, stop strings, penalties, aborts and the padded graph batches; the device, not
the host, supplies the pending input tokens; and no row is computed for a request whose last
token is already on the way."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from moeflow import LLM, SamplingParams
from moeflow.engine.async_engine import AsyncEngine
from moeflow.engine.model_runner import TokenCarry
from tests.helpers.engine import assert_idle


def _llm(path: Path, overlap: bool, **kwargs: object) -> LLM:
    return LLM(
        str(path),
        dtype="float32",
        device="cpu",
        max_model_len=128,
        overlap_schedule=overlap,
        **kwargs,  # type: ignore[arg-type]
    )


def _workload(n: int, seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts of 3-90 tokens, and every kind of request the engine treats differently."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(3, 90))] for _ in range(n)]
    params: list[SamplingParams] = []
    for i in range(n):
        max_tokens = rng.randint(1, 24)
        kind = i % 6
        if kind == 0:
            p = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        elif kind == 1:
            p = SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=max_tokens)
        elif kind == 2:
            p = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=2)
        elif kind == 3:  # a common tiny-vocabulary token stops many of these early
            stop_id = rng.randrange(64)
            p = SamplingParams(temperature=0, max_tokens=max_tokens, stop_token_ids=[stop_id])
        elif kind == 4:
            p = SamplingParams(temperature=0, max_tokens=max_tokens, stop=["e", "a "])
        else:  # penalties read every earlier token: such batches read pending tokens first
            p = SamplingParams(temperature=0, max_tokens=max_tokens, repetition_penalty=1.3)
        params.append(p)
    return prompts, params


def _summary(outs: list) -> list[tuple]:
    """What must be equal (log-probs apart: batches differ, so their float sums may too)."""
    return [
        (
            o.token_ids,
            o.text,
            o.finish_reason,
            o.stop_reason,
            [(lp.token_id, sorted(lp.top)) for lp in o.logprobs or []],
        )
        for o in outs
    ]


def _logprobs(outs: list) -> list[float]:
    return [lp.logprob for o in outs for lp in o.logprobs or []]


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_overlap_gives_the_plain_schedules_outputs(
    family: str, tiny_checkpoints: dict[str, Path]
) -> None:
    path = tiny_checkpoints[family]
    prompts, params = _workload(48, seed=11)
    # 24 blocks of 16 tokens and 64-token steps: preemption and chunked prefill are certain.
    small = {"kv_cache_tokens": 384, "max_num_batched_tokens": 64}
    plain = _llm(path, False, **small)
    want_outs = plain.generate(prompts, params)
    want = _summary(want_outs)
    assert plain.engine.scheduler.num_preemptions > 0

    llm = _llm(path, True, **small)
    carried: list[int] = []
    run = llm.engine.runner.run

    def spy(batch, carry: TokenCarry | None = None, profile=None):  # noqa: ANN001, ANN202
        carried.append(0 if carry is None else sum(r.num_pending for r in batch.reqs))
        return run(batch, carry, profile)

    llm.engine.runner.run = spy  # type: ignore[method-assign]
    got_outs = llm.generate(prompts, params)
    assert _summary(got_outs) == want
    assert _logprobs(got_outs) == pytest.approx(_logprobs(want_outs), abs=1e-4)
    assert llm.engine.scheduler.num_preemptions > 0
    assert sum(carried) > 0  # decode rows took their input token from the device
    assert_idle(llm)


def test_a_step_returns_the_previous_launch(tiny_checkpoints: dict[str, Path]) -> None:
    """The first step launches and returns nothing; each later one returns the launch before."""
    llm = _llm(tiny_checkpoints["llama"], True)
    engine = llm.engine
    req = engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=3))
    assert engine.step() == [] and req.num_pending == 1 and req.output_ids == []
    assert engine.step() == [req] and len(req.output_ids) == 1 and req.num_pending == 1
    assert engine.step() == [req] and len(req.output_ids) == 2 and req.num_pending == 1
    # The third token is on the way and is the last: nothing is computed, it is only read.
    computed = engine.stats.num_computed_tokens
    assert engine.step() == [req] and req.is_finished and len(req.output_ids) == 3
    assert engine.stats.num_computed_tokens == computed
    assert not engine.has_unfinished()
    assert_idle(llm)


def test_length_limited_requests_compute_no_extra_row(tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints["llama"]
    prompts, _ = _workload(8, seed=12)
    params = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in range(1, 9)]
    counts = []
    for overlap in (False, True):
        llm = _llm(path, overlap)
        llm.generate(prompts, params)
        counts.append(llm.engine.stats.num_computed_tokens)
    assert counts[0] == counts[1]


def test_abort_while_a_token_is_on_the_way(tiny_checkpoints: dict[str, Path]) -> None:
    llm = _llm(tiny_checkpoints["llama"], True)
    engine = llm.engine
    prompts, _ = _workload(4, seed=13)
    reqs = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=40)) for p in prompts]
    engine.step()
    engine.step()
    assert all(r.num_pending == 1 for r in reqs)
    assert engine.abort(reqs[0].request_id) and engine.abort(reqs[2].request_id)
    returned = [r.request_id for r in engine.step()]
    assert reqs[0].request_id not in returned and reqs[2].request_id not in returned
    assert len(reqs[0].output_ids) == 1  # the token read before the abort, nothing after
    engine.run_to_completion()
    assert reqs[1].finish_reason is not None and reqs[3].finish_reason is not None
    assert_idle(llm)


def test_overlap_through_padded_graph_batches(tiny_checkpoints: dict[str, Path]) -> None:
    """The static graph buffers (run eagerly here) take the pending tokens too, from either of
    their two host twins."""
    path = tiny_checkpoints["qwen3_moe"]
    prompts, _ = _workload(3, seed=14)
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, logprobs=0)
    want = _summary(_llm(path, False).generate(prompts, params))
    llm = _llm(path, True, max_num_seqs=4)
    c = llm.config
    graphs = llm.engine.runner.make_graph_runner(4, c.max_model_len, c.sink_block)
    calls: list[int] = []
    replay = graphs.replay
    graphs.replay = lambda n: (calls.append(n), replay(n))[1]  # type: ignore[method-assign]
    assert _summary(llm.generate(prompts, params)) == want
    assert len(calls) >= 8  # every decode step replayed the static batch


def test_async_engine_with_overlap(tiny_checkpoints: dict[str, Path]) -> None:
    llm = _llm(tiny_checkpoints["llama"], True)
    prompts, params = _workload(6, seed=15)
    want = [o.token_ids for o in _llm(tiny_checkpoints["llama"], False).generate(prompts, params)]

    async def one(engine: AsyncEngine, i: int) -> list[int]:
        return [
            t
            async for u in await engine.generate(prompts[i], params[i], f"r{i}")
            for t in u.new_token_ids
        ]

    async def main() -> list[list[int]]:
        engine = AsyncEngine(llm.engine)
        engine.start()
        try:
            return list(await asyncio.gather(*(one(engine, i) for i in range(len(prompts)))))
        finally:
            await engine.drain(5)

    assert asyncio.run(main()) == want
    assert_idle(llm)


def test_stream_with_overlap(tiny_checkpoints: dict[str, Path]) -> None:
    """LLM.stream (what `moeflow chat` prints) yields the plain schedule's text, and the engine
    reads the wasted launch after a stop token on its next step."""
    path = tiny_checkpoints["llama"]
    prompt = _workload(1, seed=16)[0][0]
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    full = _llm(path, False).generate([prompt], greedy)[0]
    stop = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[full.token_ids[4]])
    want = _llm(path, False).generate([prompt], stop)[0].text
    llm = _llm(path, True)
    assert "".join(llm.stream(prompt, greedy)) == full.text
    assert "".join(llm.stream(prompt, stop)) == want
    assert llm.engine.has_unfinished()  # the launch after the stop token, not read yet
    assert llm.engine.step() == []
    assert_idle(llm)
