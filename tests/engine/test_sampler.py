"""Sampler against small plain-torch references: greedy, penalties, filters, distribution, seeds,
logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from moeflow.engine.sampler import (
    Sampler,
    SamplingRow,
    TokenLogprobs,
    apply_penalties,
    make_generator,
)
from moeflow.sampling_params import SamplingParams

CPU = torch.device("cpu")


def _row(
    seed: int | None = 0,
    prompt_ids: list[int] | None = None,
    output_ids: list[int] | None = None,
    generator: torch.Generator | None = None,
    **params: float | int | None,
) -> SamplingRow:
    sp = SamplingParams(seed=seed, **params)  # type: ignore[arg-type]
    if generator is None and not sp.is_greedy:
        generator = make_generator(seed, CPU)
    return SamplingRow(sp, prompt_ids or [], output_ids or [], generator)


def _draws(logits: torch.Tensor, num_draws: int, **params: float | int) -> torch.Tensor:
    """num_draws samples [num_draws] of a 1-row logits [V], rows sharing one seeded generator."""
    gen = make_generator(7, CPU)
    rows = [_row(generator=gen, **params) for _ in range(num_draws)]
    ids, _ = Sampler().sample(logits[None, :].expand(num_draws, -1), rows).to_host()
    return torch.tensor(ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_equals_argmax(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 97).to(dtype)
    before = logits.clone()
    ids, lps = Sampler().sample(logits, [_row(temperature=0.0) for _ in range(6)]).to_host()
    assert ids == logits.float().argmax(dim=-1).tolist()
    assert lps == [None] * 6
    assert torch.equal(logits, before)


def test_penalties_hand_computed() -> None:
    raw = torch.tensor([2.0, -1.0, 0.5, -2.0, 1.0, 3.0])
    logits = raw.repeat(4, 1)
    rows = [
        _row(repetition_penalty=2.0, prompt_ids=[0, 1], output_ids=[1, 3]),
        _row(presence_penalty=0.5, frequency_penalty=0.25, prompt_ids=[5], output_ids=[2, 2, 4]),
        # repetition first, then frequency and presence
        _row(
            repetition_penalty=2.0,
            presence_penalty=1.0,
            frequency_penalty=0.5,
            prompt_ids=[5],
            output_ids=[0, 0],
        ),
        _row(prompt_ids=[0, 1, 2], output_ids=[3, 4]),  # no penalties: unchanged
    ]
    expected = torch.tensor(
        [
            [1.0, -2.0, 0.5, -4.0, 1.0, 3.0],
            [2.0, -1.0, -0.5, -2.0, 0.25, 3.0],
            [-1.0, -1.0, 0.5, -2.0, 1.0, 1.5],
            [2.0, -1.0, 0.5, -2.0, 1.0, 3.0],
        ]
    )
    before = logits.clone()
    assert torch.equal(apply_penalties(logits, rows), expected)
    assert torch.equal(logits, before)
    assert apply_penalties(logits, [rows[3]] * 4) is logits


def test_greedy_after_penalties() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -2.0, 1.0, 3.0]] * 3)
    rows = [
        _row(temperature=0.0, repetition_penalty=4.0, prompt_ids=[5]),  # 3/4 < 2
        _row(temperature=0.0, frequency_penalty=2.0, output_ids=[5, 0]),  # -1, 0, ... 1 wins
        _row(temperature=0.0),
    ]
    ids, _ = Sampler().sample(logits, rows).to_host()
    assert ids == [0, 4, 5]


@pytest.mark.parametrize(
    "params",
    [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}, {"top_k": 1, "top_p": 0.5, "min_p": 0.3}],
)
def test_filters_that_keep_one_token_equal_greedy(params: dict[str, float]) -> None:
    torch.manual_seed(1)
    logits = torch.randn(16, 200) * 3
    rows = [_row(seed=i, temperature=0.8, **params) for i in range(16)]
    ids, _ = Sampler().sample(logits, rows).to_host()
    assert ids == logits.argmax(dim=-1).tolist()


def test_filtered_tokens_never_sampled() -> None:
    probs = torch.tensor([0.05, 0.3, 0.02, 0.2, 0.25, 0.08, 0.1])
    logits = probs.log()
    cases: list[tuple[dict[str, float], set[int]]] = [
        ({"top_k": 3}, {1, 4, 3}),
        ({"top_p": 0.5}, {1, 4}),  # 0.3 < 0.5 <= 0.3 + 0.25
        ({"top_p": 0.74}, {1, 4, 3}),
        ({"top_p": 0.76}, {1, 4, 3, 6}),
        ({"min_p": 0.5}, {1, 4, 3}),  # keep >= 0.15
        ({"min_p": 0.25}, {1, 4, 3, 6, 5}),  # keep >= 0.075
        # top-k 5 renormalises to mass 0.93, so top-p 0.9 stops at 0.85 / 0.93; min-p drops 0.1
        ({"top_k": 5, "top_p": 0.9, "min_p": 0.5}, {1, 4, 3}),
        ({"top_k": 5, "top_p": 0.9}, {1, 4, 3, 6}),
    ]
    for params, allowed in cases:
        seen = set(_draws(logits, 3000, **params).tolist())
        assert seen == allowed, params


def _chi_square(ids: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs / probs.sum() * ids.numel()
    observed = torch.bincount(ids, minlength=probs.numel()).double()
    return float(((observed - expected) ** 2 / expected).sum())


# P(chi2 with 4 degrees of freedom > x) = exp(-x/2) (1 + x/2) = 8e-7 at x = 34
_CHI2_4DOF_BOUND = 34.0


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_distribution(temperature: float) -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25], dtype=torch.float64)
    assert math.exp(-_CHI2_4DOF_BOUND / 2) * (1 + _CHI2_4DOF_BOUND / 2) < 1e-6
    ids = _draws(probs.log().float(), 20_000, temperature=temperature)
    target = probs ** (1 / temperature)  # softmax(log p / t) is proportional to p ** (1 / t)
    assert _chi_square(ids, target) < _CHI2_4DOF_BOUND


def test_unseeded_rows_use_global_rng() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25], dtype=torch.float64)
    torch.manual_seed(3)
    rows = [SamplingRow(SamplingParams(), [], [], None) for _ in range(20_000)]
    ids, _ = Sampler().sample(probs.log().float()[None, :].expand(20_000, -1), rows).to_host()
    assert _chi_square(torch.tensor(ids), probs) < _CHI2_4DOF_BOUND


def _seeded_run(seed: int, batch_size: int, position: int, num_steps: int = 20) -> list[int]:
    """The draws over num_steps of the seeded row at `position` in a batch of other rows."""
    g = torch.Generator().manual_seed(100 + batch_size * 10 + position)
    target = _row(seed=seed, temperature=0.9, top_k=50, top_p=0.95)
    out = []
    for step in range(num_steps):
        logits = torch.randn(batch_size, 300, generator=g)
        logits[position] = torch.randn(300, generator=torch.Generator().manual_seed(step)) * 2
        rows = []
        for i in range(batch_size):
            if i == position:
                rows.append(target)
            elif i % 3 == 0:
                rows.append(_row(temperature=0.0, repetition_penalty=1.3, prompt_ids=[1, 2]))
            elif i % 3 == 1:
                rows.append(_row(seed=i, temperature=1.5, min_p=0.1, logprobs=2))
            else:
                rows.append(_row(seed=None, presence_penalty=0.5, output_ids=[3]))
        ids, _ = Sampler().sample(logits, rows).to_host()
        out.append(ids[position])
        target.output_ids.append(ids[position])
    return out


def test_seed_reproducible_across_batches() -> None:
    alone = _seeded_run(1234, 1, 0)
    assert alone == _seeded_run(1234, 1, 0)
    assert alone == _seeded_run(1234, 2, 0)
    assert alone == _seeded_run(1234, 5, 3)
    assert alone == _seeded_run(1234, 9, 8)
    assert alone != _seeded_run(4321, 1, 0)
    assert len(set(alone)) > 5  # really sampling


def test_make_generator() -> None:
    a, b = make_generator(5, CPU), make_generator(5, CPU)
    assert torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))
    torch.manual_seed(9)
    c = make_generator(None, CPU)
    torch.manual_seed(9)
    d = make_generator(None, CPU)
    assert torch.equal(torch.rand(8, generator=c), torch.rand(8, generator=d))
    assert not torch.equal(
        torch.rand(8, generator=make_generator(6, CPU)),
        torch.rand(8, generator=make_generator(5, CPU)),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_from_raw_logits(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    logits = (torch.randn(5, 64) * 2).to(dtype)
    rows = [
        _row(logprobs=3, temperature=0.7, repetition_penalty=1.5, prompt_ids=[1, 2, 3]),
        _row(logprobs=0),
        _row(),
        _row(logprobs=5, temperature=0.0, frequency_penalty=1.0, output_ids=[4, 4]),
        _row(logprobs=20, top_k=2),
    ]
    ids, lps = Sampler().sample(logits, rows).to_host()
    ref = torch.log_softmax(logits.float(), dim=-1)
    assert lps[2] is None
    for i, (token_id, lp) in enumerate(zip(ids, lps, strict=True)):
        if lp is None:
            continue
        assert isinstance(lp, TokenLogprobs)
        assert lp.token_id == token_id
        assert lp.logprob == ref[i, token_id].item()
        n = rows[i].params.logprobs
        assert len(lp.top) == n
        values = list(lp.top.values())
        assert values == sorted(values, reverse=True)
        assert values == ref[i].topk(n or 0).values.tolist()
        assert all(ref[i, t].item() == v for t, v in lp.top.items())
    assert lps[1] is not None and lps[1].top == {}
    # the greedy row took its penalised argmax, its logprob is still the raw one
    penalised = logits[3].float().clone()
    penalised[4] -= 2.0
    assert ids[3] == int(penalised.argmax())


def test_logit_bias_forces_and_bans_tokens() -> None:
    logits = torch.zeros(2, 10)
    logits[:, 3] = 5.0
    force = SamplingRow(SamplingParams(temperature=0, logit_bias={7: 100.0}), [1], [], None)
    ban = SamplingRow(SamplingParams(temperature=0, logit_bias={3: -100.0}), [1], [], None)
    ids, _ = Sampler().sample(logits, [force, ban]).to_host()
    assert ids[0] == 7
    assert ids[1] != 3
    penalised = apply_penalties(logits, [force, ban])
    assert penalised[0, 7] == 100.0 and penalised[1, 3] == -95.0
    assert logits[0, 7] == 0.0  # the input is never written
