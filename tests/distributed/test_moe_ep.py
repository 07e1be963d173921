"""Expert parallelism does only its own work: each rank's shard of an MoE layer, built in one
process, runs its expert kernel on exactly the pairs routed to its slots (counted by wrapping
the kernel), fewer than all T*K, and the ranks' partial sums add up to the whole layer."""

from __future__ import annotations

import pytest
import torch

from moeflow.distributed.parallel_state import ParallelState, set_state_for_tests
from moeflow.kernels.fused_moe import select_experts
from moeflow.layers import moe_ep
from moeflow.layers.moe import MoE

E, H, INTER, K, T = 4, 16, 8, 2, 24


def _moe() -> MoE:
    return MoE(H, INTER, E, K, layer_idx=0)


def _fill(m: MoE, router: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> None:
    m.gate.weight.data.copy_(router)
    m.experts.load("w13", w13)
    m.experts.load("w2", w2)


def _routing(m: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return select_experts(m.gate(x), K, m.scoring_func, m.norm_topk_prob)


@pytest.mark.parametrize("placement", [None, [0, 1, 2, 3, 0, 1]])
def test_each_rank_runs_only_its_pairs_and_the_partials_sum_to_the_layer(
    placement: list[int] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    x = torch.randn(T, H)
    router = torch.randn(E, H)
    w13, w2 = torch.randn(E, 2 * INTER, H) / 4, torch.randn(E, H, INTER) / 4
    whole = _moe()
    _fill(whole, router, w13, w2)
    ref = whole(x)  # one process: every pair on the one rank
    weights, ids = _routing(whole, x)

    rows_seen: list[int] = []
    kernel = moe_ep.fused_moe

    def counting(rows: torch.Tensor, *args: object) -> torch.Tensor:
        rows_seen.append(rows.shape[0])
        return kernel(rows, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(moe_ep, "fused_moe", counting)
    partials, expected_rows = [], []
    try:
        for rank in range(2):
            set_state_for_tests(ParallelState(rank, 2, rank, 2, 0, 1, True, None, None))
            m = _moe()
            if placement is not None:
                m.set_placement(placement)
            _fill(m, router, w13, w2)
            partials.append(m.local_experts(x, weights, ids))
            # the pairs this rank should run, counted independently of moe_ep
            slots = m.placement
            assert slots is not None
            held = slots[m.first_slot : m.first_slot + len(slots) // 2]
            n = 0
            for t in range(T):
                for k in range(K):
                    e = int(ids[t, k])
                    copies = [p for p, x_ in enumerate(slots) if x_ == e]
                    chosen = copies[(t + k) % len(copies)]
                    n += m.first_slot <= chosen < m.first_slot + len(held)
            expected_rows.append(n)
    finally:
        set_state_for_tests(None)
    assert rows_seen == expected_rows
    assert sum(rows_seen) == T * K and all(0 < n < T * K for n in rows_seen)
    torch.testing.assert_close(partials[0] + partials[1], ref, rtol=1e-5, atol=1e-5)


def test_a_rank_with_no_pairs_adds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(moe_ep, "fused_moe", lambda rows, *a: calls.append(1))
    tables = moe_ep.replica_tables([0, 1, 2, 3], E, 2, torch.device("cpu"))
    ids = torch.tensor([[0, 1], [1, 0]])  # only rank 0's experts
    pairs = moe_ep.local_pairs(torch.ones(2, K), ids, tables, first_slot=2, num_local=2)
    out = moe_ep.run_local_experts(torch.randn(2, H), pairs, None, None, None, "silu")
    assert not calls and torch.equal(out, torch.zeros(2, H))


def test_a_placement_missing_an_expert_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="each of the 4 experts a slot"):
        moe_ep.replica_tables([0, 1, 2, 2], E, 2, torch.device("cpu"))
