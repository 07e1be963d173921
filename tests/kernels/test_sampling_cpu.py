"""The CPU sampling kernel (`sample_rows` in kernels/csrc/cpu_ops.cpp) against the float64
inverse-CDF reference of kernels/sampling.py: the same token for every uniform except where the
target lies within rounding of a CDF step; zero-probability tokens never drawn; bad input
refused."""

from __future__ import annotations

import pytest
import torch

from moeflow.kernels import cpu_ext
from moeflow.kernels.sampling import sample_softmax, sample_softmax_ref

ops = cpu_ext.ops()
pytestmark = pytest.mark.skipif(ops is None, reason=f"CPU kernels: {cpu_ext.unavailable_reason()}")


@pytest.mark.parametrize("vocab_size", [1, 7, 1024, 3001, 49152])
def test_same_token_as_the_reference(vocab_size: int) -> None:
    g = torch.Generator().manual_seed(vocab_size)
    rows = 64
    logits = torch.randn(rows, vocab_size, generator=g) * 4
    temperature = torch.rand(rows, generator=g) * 1.5 + 0.1
    u = torch.rand(rows, dtype=torch.float64, generator=g)
    got = sample_softmax(logits, temperature, u)
    ref = sample_softmax_ref(logits, temperature, u)
    # where they differ, the target must sit within rounding of the CDF step between them
    cdf = (logits.double() / temperature.double()[:, None]).softmax(-1).cumsum(-1)
    for i in torch.nonzero(got != ref).flatten().tolist():
        step = cdf[i, min(int(got[i]), int(ref[i]))]
        assert abs(float(step) - float(u[i])) < 1e-5, (i, int(got[i]), int(ref[i]))
    assert (got == ref).float().mean() > 0.95


def test_draws_follow_the_distribution() -> None:
    vocab_size, draws = 300, 40000
    logits = torch.randn(1, vocab_size, generator=torch.Generator().manual_seed(1)) * 2
    u = torch.rand(draws, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ids = sample_softmax(logits.expand(draws, -1).contiguous(), torch.full((draws,), 0.7), u)
    freq = torch.bincount(ids, minlength=vocab_size).double() / draws
    probs = (logits[0].double() / 0.7).softmax(-1)
    assert 0.5 * (freq - probs).abs().sum() < 0.03  # total variation


def test_masked_tokens_are_never_drawn() -> None:
    logits = torch.full((3, 2000), float("-inf"))
    logits[:, 1500] = 0.0
    logits[1, 3] = 1.0
    u = torch.tensor([0.0, 0.999999, 0.5], dtype=torch.float64)
    ids = sample_softmax(logits, torch.ones(3), u)
    assert ids[0] == 1500 and ids[2] == 1500
    assert ids[1] == 1500  # the last mass sits at 1500, after token 3


def test_bad_input_is_refused() -> None:
    assert ops is not None
    with pytest.raises(RuntimeError, match="finite"):
        ops.sample_rows(
            torch.full((1, 9), float("-inf")), torch.ones(1), torch.zeros(1, dtype=torch.float64)
        )
    with pytest.raises(RuntimeError, match="float64"):
        ops.sample_rows(torch.zeros(2, 9), torch.ones(2), torch.zeros(2))
    with pytest.raises(RuntimeError, match="inverse temperature"):
        ops.sample_rows(torch.zeros(2, 9), torch.ones(3), torch.zeros(2, dtype=torch.float64))
