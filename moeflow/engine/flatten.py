"""The one flattener of a scheduled batch: token ids, positions, cache slots, context lengths and
block tables written into int64 host arrays (`flatten_into`). The eager path lays them out in a
fresh buffer per step (`flatten_batch`); the CUDA-graph runner in its static pinned host twins.

Shape legend: T new tokens in the batch, B sequences, W block-table width, S sampling rows."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from moeflow.context import ForwardBatch
from moeflow.engine.scheduler import ScheduledBatch


@dataclass(slots=True)
class HostBatch:
    """Where a batch is written: numpy views of one int64 host buffer, so that one copy moves
    them all to the device."""

    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T], block_tables[i][p // block_size] * block_size + p % block_size
    context_lens: np.ndarray  # [B], tokens in the cache after this step
    block_tables: np.ndarray  # [B, W], -1 past each sequence's table


@dataclass(slots=True)
class PendingTokens:
    """Input tokens sampled by the previous step and still on the device (overlap schedule):
    their flat indices in input_ids (left 0 on the host), and the ids of their requests."""

    at: list[int] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)


def flatten_into(buf: HostBatch, batch: ScheduledBatch, block_size: int) -> PendingTokens:
    """Write `batch`'s rows into `buf` (its first sum(num_new_tokens) tokens and len(batch)
    rows; anything after them is left as it was). Returns the pending input tokens."""
    bs = block_size
    ids, positions, slots, tables = buf.input_ids, buf.positions, buf.slot_mapping, buf.block_tables
    width = tables.shape[1]
    pending = PendingTokens()
    t = 0  # flat index of the row's first token
    for i, (req, n) in enumerate(zip(batch.reqs, batch.num_new_tokens, strict=True)):
        start, end = req.num_computed_tokens, req.num_computed_tokens + n
        table = req.block_table
        assert len(table) <= width, "a block table wider than the buffer"
        tables[i, : len(table)] = table
        tables[i, len(table) :] = -1
        known = end - 1 if req.num_pending and end == req.num_tokens else end
        ids[t : t + known - start] = req.tokens_slice(start, known)
        if known < end:  # the last token is still on the device
            ids[t + n - 1] = 0
            pending.at.append(t + n - 1)
            pending.request_ids.append(req.request_id)
        if n == 1:  # a decode row: plain ints, several times cheaper than numpy ranges of one
            positions[t] = start
            slots[t] = table[start // bs] * bs + start % bs
        else:
            pos = np.arange(start, end)
            positions[t : t + n] = pos
            slots[t : t + n] = tables[i][pos // bs] * bs + pos % bs
        buf.context_lens[i] = end
        t += n
    return pending


def flatten_batch(
    batch: ScheduledBatch, block_size: int, device: torch.device
) -> tuple[ForwardBatch, PendingTokens]:
    """The eager path: `batch` flattened into one host buffer (pinned on a GPU) with its query
    offsets and the rows that sample, moved in one copy; the ForwardBatch views that copy."""
    lens = batch.num_new_tokens
    t, b = batch.num_tokens, len(batch.reqs)
    w = max(len(r.block_table) for r in batch.reqs)
    sampling = [
        i
        for i, (r, n) in enumerate(zip(batch.reqs, lens, strict=True))
        if r.num_computed_tokens + n == r.num_tokens
    ]
    # One buffer: [ids | positions | slots] x T, context lens [B], cu_seqlens_q [B + 1],
    # logits rows [S], block tables [B * W].
    ends = list(itertools.accumulate((t, t, t, b, b + 1, len(sampling), b * w)))
    spans = list(zip([0, *ends[:-1]], ends, strict=True))
    host = torch.empty(ends[-1], dtype=torch.int64, pin_memory=device.type == "cuda")
    h = host.numpy()
    ids, positions, slots, ctx, cu_seqlens, logits_rows, tables = (h[a:z] for a, z in spans)
    pending = flatten_into(
        HostBatch(ids, positions, slots, ctx, tables.reshape(b, w)), batch, block_size
    )
    cu_seqlens[0] = 0
    np.cumsum(lens, out=cu_seqlens[1:])
    logits_rows[:] = cu_seqlens[1:][sampling] - 1  # each sampling row's last token
    # NOTE: non_blocking from pinned memory; the caching host allocator keeps the buffer until
    # the copy has run. On the CPU `dev` is `host` itself.
    dev = host.to(device, non_blocking=True)
    ids_d, positions_d, slots_d, ctx_d, cu_seqlens_d, logits_rows_d, tables_d = (
        dev[a:z] for a, z in spans
    )
    fb = ForwardBatch(
        input_ids=ids_d,
        positions=positions_d,
        slot_mapping=slots_d,
        block_tables=tables_d.view(b, w),
        context_lens=ctx_d,
        cu_seqlens_q=cu_seqlens_d,
        logits_indices=logits_rows_d,
        query_lens_cpu=list(lens),
        context_lens_cpu=ctx.tolist(),
        is_decode=all(n == 1 for n in lens),
    )
    return fb, pending
