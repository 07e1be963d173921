"""The pieces of parallelism that need no second process: the collectives' single-process paths,
each rank's shard of the parallel linears (built in one process, summed or concatenated by hand
against the whole layer), the step messages' schema, EPLB placements, and the Ray placement
setting."""

from __future__ import annotations

import pytest
import torch

from moeflow import env
from moeflow.config import EngineArgs
from moeflow.distributed import comm, messages
from moeflow.distributed.eplb import rank_loads, rebalance_experts
from moeflow.distributed.parallel_state import ParallelState, set_state_for_tests
from moeflow.engine.executor import current_executor, start_executor
from moeflow.layers.linear import (
    ColumnParallelLinear,
    Linear,
    MergedColumnParallelLinear,
    RowParallelLinear,
)


def test_collectives_single_process_return_their_input() -> None:
    x = torch.randn(4, 6)
    assert comm.all_reduce(x) is x
    assert comm.all_gather(x) is x
    assert comm.reduce_scatter(x) is x
    assert comm.all_to_all(x, [4], [4]) is x


def _rank(rank: int, size: int) -> ParallelState:
    return ParallelState(rank, size, rank, size, 0, 1, False, None, None)


@pytest.mark.parametrize("size", [2, 4])
def test_parallel_linears_split_the_whole_layer(size: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    whole = torch.randn(16, 8)  # [out, in]
    q, k = torch.randn(8, 8), torch.randn(4, 8)
    cols, merged, rows = [], [], []
    try:
        for r in range(size):
            set_state_for_tests(_rank(r, size))
            col = ColumnParallelLinear(8, 16)
            col.load("weight", whole)
            cols.append(col(x))
            mcl = MergedColumnParallelLinear(8, {"q": 8, "k": 4})
            mcl.load("weight", q, "q")
            mcl.load("weight", k, "k")
            merged.append(mcl(x).split([8 // size, 4 // size], dim=-1))
            row = RowParallelLinear(16, 8, reduce_results=False)
            row.load("weight", whole.T.contiguous())
            rows.append(row(_slice(x @ whole.T, r, size)))
    finally:
        set_state_for_tests(None)
    ref = Linear(8, 16)
    ref.load("weight", whole)
    torch.testing.assert_close(torch.cat(cols, dim=-1), ref(x))
    torch.testing.assert_close(torch.cat([m[0] for m in merged], -1), x @ q.T)
    torch.testing.assert_close(torch.cat([m[1] for m in merged], -1), x @ k.T)
    h = x @ whole.T  # [3, 16], the row-parallel layer's input
    torch.testing.assert_close(sum(rows), h @ whole, rtol=1e-5, atol=1e-4)


def _slice(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    n = t.shape[-1] // size
    return t[:, rank * n : (rank + 1) * n]


def test_a_split_that_does_not_divide_is_a_clear_error() -> None:
    set_state_for_tests(_rank(0, 3))
    try:
        with pytest.raises(Exception, match="cannot be split over 3"):
            ColumnParallelLinear(8, 16)
    finally:
        set_state_for_tests(None)


def test_step_messages_are_checked_against_their_schema() -> None:
    with pytest.raises(ValueError, match="not a step message"):
        messages._check({"kind": "exec", "code": "..."})
    with pytest.raises(ValueError, match="num_cache_blocks"):
        messages._check({"kind": "init", "num_cache_blocks": "9", "block_size": 16, "dtype": "x"})
    messages._check({"kind": "stop"})


def test_rebalance_copies_hot_experts_and_evens_the_ranks() -> None:
    counts = [100, 1, 1, 1, 70, 1, 1, 1]
    (placement,) = rebalance_experts([counts], ep_size=2, num_redundant=2)
    assert len(placement) == 10 and sorted(set(placement)) == list(range(8))
    assert placement.count(0) == 2 and placement.count(4) == 2  # the two hot experts copied
    assert 0 in placement[:5] and 0 in placement[5:]  # on both ranks
    loads = rank_loads(placement, counts, 2)
    identity = rank_loads(list(range(8)), counts, 2)
    assert max(loads) - min(loads) < max(identity) - min(identity)
    with pytest.raises(ValueError, match="evenly"):
        rebalance_experts([counts], ep_size=3, num_redundant=0)


def test_an_unknown_ray_placement_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked before any store, process or Ray cluster starts (Ray need not be installed)."""
    monkeypatch.setattr(env, "MOEFLOW_RAY_PLACEMENT", "spread_thin")
    args = EngineArgs(tensor_parallel_size=2, distributed_executor_backend="ray", device="cpu")
    with pytest.raises(ValueError, match="MOEFLOW_RAY_PLACEMENT must be one of PACK, SPREAD"):
        start_executor(args)
    assert current_executor() is None
