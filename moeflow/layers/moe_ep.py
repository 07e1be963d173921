"""Expert parallelism's dispatch: which (token, expert) pairs this rank runs, and running only
those. With expert parallelism (distributed/parallel_state.py `use_ep`) each rank holds a run of
physical expert slots (E / ep of them, or an EPLB placement's, distributed/eplb.py); a hot expert
may have copies on several ranks. Every rank routes every token (tensor-parallel attention gives
each rank every token, so dispatch needs no communication: a rank takes its pairs from the
routing it computed itself), gathers the rows of the pairs whose copy it holds, runs its experts
on those rows only and scatters the weighted results back into a [T, H] partial sum; the
ranks' partial sums are joined by the MoE layer's one all-reduce. A rank's expert work is thus
its share of the T*K pairs (~1/ep of them when the load is even), not all of them.

A pair goes to exactly one copy of its expert: copy (token + k) mod copies, so placements with
redundant copies spread an expert's tokens over its copies and every placement gives the same
sums.

NOTE: the gather needs the number of local pairs on the host (one sync per MoE layer on a
GPU); decode under parallelism runs eagerly (no CUDA graphs), so nothing static is lost.

Shape legend: T tokens, H hidden, K experts per token, P this rank's pairs, S physical slots,
R most copies of one expert."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.kernels.fused_moe import QuantizedExperts, fused_moe, fused_moe_quantized


@dataclass(frozen=True)
class ReplicaTables:
    """The physical slots holding each checkpoint expert: `replica_ids` [E, R] (rows padded with
    the first copy) and `num_replicas` [E]."""

    replica_ids: torch.Tensor
    num_replicas: torch.Tensor


def replica_tables(
    placement: list[int], num_experts: int, ep_size: int, device: torch.device
) -> ReplicaTables:
    """Tables of a placement (slot p holds checkpoint expert placement[p]); every expert must
    have a slot, and the slots must split evenly over the ranks."""
    if sorted(set(placement)) != list(range(num_experts)) or len(placement) % ep_size:
        raise ValueError(
            f"an expert placement must give each of the {num_experts} experts a slot, in a "
            f"multiple of {ep_size} slots; got {len(placement)} slots holding "
            f"{len(set(placement))} distinct experts"
        )
    copies: list[list[int]] = [[] for _ in range(num_experts)]
    for p, x in enumerate(placement):
        copies[x].append(p)
    width = max(len(c) for c in copies)
    ids = torch.tensor(
        [c + [c[0]] * (width - len(c)) for c in copies], dtype=torch.int64, device=device
    )
    return ReplicaTables(ids, torch.tensor([len(c) for c in copies], device=device))


@dataclass(frozen=True)
class LocalPairs:
    """This rank's pairs: `tokens` [P] (row of x), `slots` [P, 1] (local slot) and `weights`
    [P, 1] (routing weight), in token order."""

    tokens: torch.Tensor
    slots: torch.Tensor
    weights: torch.Tensor


def local_pairs(
    weights: torch.Tensor,  # [T, K]
    ids: torch.Tensor,  # [T, K] checkpoint expert ids
    tables: ReplicaTables,
    first_slot: int,
    num_local: int,
) -> LocalPairs:
    """The pairs whose chosen copy lies in this rank's slots [first_slot, first_slot +
    num_local)."""
    t, k = ids.shape
    turn = torch.arange(t, device=ids.device)[:, None] + torch.arange(k, device=ids.device)
    copy = turn % tables.num_replicas[ids]  # [T, K]
    local = tables.replica_ids[ids, copy] - first_slot  # [T, K]
    mine = (local >= 0) & (local < num_local)
    tokens, which = mine.nonzero(as_tuple=True)  # [P] each; NOTE: a host sync on a GPU
    return LocalPairs(tokens, local[tokens, which, None], weights[tokens, which, None])


def run_local_experts(
    x: torch.Tensor,  # [T, H]
    pairs: LocalPairs,
    w13: torch.Tensor | None,  # [S_local, 2I, H] (float experts)
    w2: torch.Tensor | None,  # [S_local, H, I]
    quantized: QuantizedExperts | None,
    act: str,
) -> torch.Tensor:  # [T, H]: this rank's partial sum (zero rows for tokens it ran nothing for)
    """Each local pair once: the pairs' rows of x [P, H] through their experts (one expert per
    row, K = 1), weighted, added back into their tokens' rows."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if pairs.tokens.numel() == 0:
        return out.to(x.dtype)
    rows = x.index_select(0, pairs.tokens)  # [P, H]
    if quantized is not None:
        y = fused_moe_quantized(rows, quantized, pairs.weights, pairs.slots, act)
    else:
        assert w13 is not None and w2 is not None
        y = fused_moe(rows, w13, w2, pairs.weights, pairs.slots, act)  # [P, H]
    return out.index_add_(0, pairs.tokens, y.float()).to(x.dtype)
