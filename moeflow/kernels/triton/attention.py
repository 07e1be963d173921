"""Triton paged attention: causal extend/prefill over new tokens plus their paged context, and
split-K ("flash decoding") decode for one new token per sequence, graph-capturable.

Shape legend: T new tokens, B sequences, H query heads, Hkv KV heads, G = H // Hkv, Dqk / Dv head
dims of keys and values, N cache blocks of S tokens each (cache [N, S, Hkv, D]), P decode splits."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moeflow.kernels.triton_utils import dot_precision, next_power_of_2, num_sms
from moeflow.utils import cdiv

_LOG2E = math.log2(math.e)
# Decode: the shortest slice of context one split program takes (two 64-token tiles), and the
# most splits; short contexts leave the surplus split programs idle.
_MIN_SPLIT_LEN = 128
_MAX_SPLITS = 64


def extend_attention_triton(
    q: torch.Tensor,  # [T, H, Dqk]
    k_cache: torch.Tensor,  # [N, S, Hkv, Dqk]
    v_cache: torch.Tensor,  # [N, S, Hkv, Dv]
    block_tables: torch.Tensor,  # [B, max_blocks], int32 or int64, -1 padded
    cu_seqlens_q: torch.Tensor,  # [B + 1] on q's device
    context_lens: torch.Tensor,  # [B] on q's device: tokens in the cache, new ones included
    max_query_len: int,  # host int
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [T, H, Dv] in q's dtype
    """Causal attention of each sequence's new tokens (already stored in the cache) over its
    whole paged context. One program takes BLOCK_Q new tokens of one sequence times the G query
    heads of one KV head (BLOCK_M = BLOCK_Q * G rows, padded), so each K/V tile is read once per
    group; KV tiles wholly outside the causal/sliding window are never visited."""
    num_tokens, num_heads, head_dim_qk = q.shape
    _, block_size, num_kv_heads, head_dim_v = v_cache.shape
    batch = block_tables.shape[0]
    _check_cache(q, k_cache, v_cache, block_tables, context_lens)
    assert cu_seqlens_q.shape == (batch + 1,) and cu_seqlens_q.device == q.device
    assert k_cache.shape[3] == head_dim_qk
    group = num_heads // num_kv_heads
    out = torch.empty(num_tokens, num_heads, head_dim_v, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or max_query_len == 0:
        return out

    block_dqk = max(16, next_power_of_2(head_dim_qk))
    block_dv = max(16, next_power_of_2(head_dim_v))
    if max(block_dqk, block_dv) <= 128:
        block_m, block_n, num_warps, num_stages = 128, 64, 8, 3
    else:  # 192 -> 256 (MLA prefill): half the rows, so two K/V stages fit in shared memory
        block_m, block_n, num_warps, num_stages = 64, 64, 8, 2
    # Few new tokens per sequence (chunked decode-ish batches): fewer idle rows; at least one
    # token's whole group per tile.
    block_m = max(16, next_power_of_2(group), min(block_m, next_power_of_2(max_query_len * group)))
    block_q = block_m // group
    grid = (triton.cdiv(max_query_len, block_q), batch, num_kv_heads)
    _extend_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_seqlens_q,
        context_lens,
        out,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        BLOCK_SIZE=block_size,
        HEAD_DIM_QK=head_dim_qk,
        HEAD_DIM_V=head_dim_v,
        BLOCK_DQK=block_dqk,
        BLOCK_DV=block_dv,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        SLIDING_WINDOW=sliding_window or 0,
        DOT_PRECISION=dot_precision(q),
        num_warps=num_warps,  # pyright: ignore[reportCallIssue] (a launch option)
        num_stages=num_stages,  # pyright: ignore[reportCallIssue]
    )
    return out


@triton.jit
def _extend_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    cu_seqlens_q_ptr,
    context_lens_ptr,
    out_ptr,
    qk_scale,  # scale * log2(e): softmax in base 2
    stride_qt,
    stride_qh,
    stride_kn,
    stride_ks,
    stride_kh,
    stride_vn,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM_QK: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,  # 0: none
    DOT_PRECISION: tl.constexpr,
):
    # Causal work grows with the query block: launch the heaviest blocks first.
    q_block = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= q_len:
        return
    ctx_len = tl.load(context_lens_ptr + seq)
    prefix_len = ctx_len - q_len  # position of new token 0

    # Row m of the tile: new token q_block * BLOCK_Q + m // G, query head kv_head * G + m % G.
    rows = tl.arange(0, BLOCK_M)
    q_idx = q_block * BLOCK_Q + rows // GROUP  # [M]
    heads = kv_head * GROUP + rows % GROUP  # [M]
    row_mask = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_pos = prefix_len + q_idx  # [M]
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = (
        q_ptr
        + (q_start + q_idx)[:, None] * stride_qt
        + heads[:, None] * stride_qh
        + offs_dqk[None, :]
    )
    q = tl.load(q_ptrs, mask=row_mask[:, None] & (offs_dqk[None, :] < HEAD_DIM_QK), other=0.0)

    # Keys this tile's rows see: [kv_lo, kv_hi). Tiles in [full_lo, full_hi) are visible to
    # every row (no causal or window edge inside) and skip the mask.
    pos_first = prefix_len + q_block * BLOCK_Q
    pos_last = prefix_len + tl.minimum(q_len, (q_block + 1) * BLOCK_Q) - 1
    kv_hi = pos_last + 1
    full_hi = (pos_first + 1) // BLOCK_N * BLOCK_N
    if SLIDING_WINDOW > 0:
        kv_lo = tl.maximum(pos_first - SLIDING_WINDOW + 1, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(pos_last - SLIDING_WINDOW + 1, 0), BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(tl.maximum(full_lo, kv_lo), full_hi)
    else:
        kv_lo = 0
        full_lo = 0

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    bt_ptr = block_tables_ptr + seq * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    acc, l_i, m_i = _extend_tiles(
        acc, l_i, m_i, q, q_pos, kv_lo, full_lo, ctx_len, bt_ptr, k_base, v_base, qk_scale,
        stride_kn, stride_ks, stride_vn, stride_vs, offs_dqk, offs_dv,
        BLOCK_SIZE, HEAD_DIM_QK, HEAD_DIM_V, BLOCK_N, SLIDING_WINDOW, DOT_PRECISION, True,
    )  # fmt: skip
    acc, l_i, m_i = _extend_tiles(
        acc, l_i, m_i, q, q_pos, full_lo, full_hi, ctx_len, bt_ptr, k_base, v_base, qk_scale,
        stride_kn, stride_ks, stride_vn, stride_vs, offs_dqk, offs_dv,
        BLOCK_SIZE, HEAD_DIM_QK, HEAD_DIM_V, BLOCK_N, SLIDING_WINDOW, DOT_PRECISION, False,
    )  # fmt: skip
    acc, l_i, m_i = _extend_tiles(
        acc, l_i, m_i, q, q_pos, full_hi, kv_hi, ctx_len, bt_ptr, k_base, v_base, qk_scale,
        stride_kn, stride_ks, stride_vn, stride_vs, offs_dqk, offs_dv,
        BLOCK_SIZE, HEAD_DIM_QK, HEAD_DIM_V, BLOCK_N, SLIDING_WINDOW, DOT_PRECISION, True,
    )  # fmt: skip

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padding rows only: every real row sees itself
    out = acc / l_i[:, None]
    out_ptrs = (
        out_ptr
        + (q_start + q_idx)[:, None] * stride_ot
        + heads[:, None] * stride_oh
        + offs_dv[None, :]
    )
    out_mask = row_mask[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)


def decode_attention_triton(
    q: torch.Tensor,  # [B, H, D], one new token per sequence (already stored in the cache)
    k_cache: torch.Tensor,  # [N, S, Hkv, D]
    v_cache: torch.Tensor,  # [N, S, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks], -1 padded
    context_lens: torch.Tensor,  # [B]
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [B, H, D]
    """Flash decoding in two launches, no host sync: stage 1 (grid B x Hkv x P) attends all G
    query heads of one KV head over 1/P of the context, reading each K/V row once, and writes a
    partial output and its log-sum-exp; stage 2 (grid B x H) merges the P partials. P depends
    only on shapes (B, Hkv, the block table's width), so a captured graph replays for any
    lengths; each split's slice is cut from the live length in the kernel."""
    batch, num_heads, head_dim_qk = q.shape
    _, block_size, num_kv_heads, head_dim_v = v_cache.shape
    _check_cache(q, k_cache, v_cache, block_tables, context_lens)
    assert block_tables.shape[0] == batch and k_cache.shape[3] == head_dim_qk
    group = num_heads // num_kv_heads
    out = torch.empty(batch, num_heads, head_dim_v, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out

    block_dqk = max(16, next_power_of_2(head_dim_qk))
    block_dv = max(16, next_power_of_2(head_dim_v))
    block_n = 64 if max(block_dqk, block_dv) <= 128 else 32
    capacity = block_tables.shape[1] * block_size
    num_splits = min(
        _MAX_SPLITS,
        cdiv(2 * num_sms(q.device), batch * num_kv_heads),
        cdiv(capacity, _MIN_SPLIT_LEN),
    )
    num_splits = max(num_splits, 1)
    min_split_len = max(_MIN_SPLIT_LEN, block_n)
    # Stage-1 partials, fp32: [B, H, P, Dv] outputs (normalised) and [B, H, P] log2-sum-exp.
    mid_out = torch.empty(
        batch, num_heads, num_splits, head_dim_v, dtype=torch.float32, device=q.device
    )
    mid_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _decode_attention_split_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        mid_out,
        mid_lse,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        mid_out.stride(0),
        mid_out.stride(1),
        mid_out.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        num_splits,
        GROUP=group,
        BLOCK_H=max(16, next_power_of_2(group)),
        BLOCK_SIZE=block_size,
        HEAD_DIM_QK=head_dim_qk,
        HEAD_DIM_V=head_dim_v,
        BLOCK_DQK=block_dqk,
        BLOCK_DV=block_dv,
        BLOCK_N=block_n,
        MIN_SPLIT_LEN=min_split_len,
        SLIDING_WINDOW=sliding_window or 0,
        DOT_PRECISION=dot_precision(q),
        num_warps=4,  # pyright: ignore[reportCallIssue] (a launch option)
        num_stages=2,  # pyright: ignore[reportCallIssue]
    )
    _decode_attention_merge_kernel[(batch, num_heads)](
        mid_out,
        mid_lse,
        context_lens,
        out,
        mid_out.stride(0),
        mid_out.stride(1),
        mid_out.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        out.stride(0),
        out.stride(1),
        num_splits,
        HEAD_DIM_V=head_dim_v,
        BLOCK_DV=block_dv,
        BLOCK_N=block_n,
        BLOCK_SPLITS=next_power_of_2(num_splits),
        MIN_SPLIT_LEN=min_split_len,
        SLIDING_WINDOW=sliding_window or 0,
        num_warps=4,  # pyright: ignore[reportCallIssue]
    )
    return out


@triton.jit
def _decode_attention_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    mid_out_ptr,
    mid_lse_ptr,
    qk_scale,  # scale * log2(e)
    stride_qb,
    stride_qh,
    stride_kn,
    stride_ks,
    stride_kh,
    stride_vn,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mlb,
    stride_mlh,
    num_splits,  # P: from shapes only, so one compile serves every graph batch size
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM_QK: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MIN_SPLIT_LEN: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,  # 0: none
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx_len = tl.load(context_lens_ptr + seq)
    kv_lo, split_len = _decode_split(  # pyright: ignore[reportGeneralTypeIssues]
        ctx_len, num_splits, BLOCK_N, MIN_SPLIT_LEN, SLIDING_WINDOW
    )
    start = kv_lo + split * split_len
    end = tl.minimum(start + split_len, ctx_len)
    if start >= end:  # past this sequence's context: the merge reads no partial from here
        return

    rows = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + rows  # [BLOCK_H]
    row_mask = rows < GROUP
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dqk_mask = offs_dqk < HEAD_DIM_QK
    dv_mask = offs_dv < HEAD_DIM_V
    q_ptrs = q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_dqk[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None] & dqk_mask[None, :], other=0.0)  # [BLOCK_H, Dqk]

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    bt_ptr = block_tables_ptr + seq * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    for n0 in range(start, end, BLOCK_N):
        k_pos = n0 + tl.arange(0, BLOCK_N)
        k_mask = k_pos < end
        block_idx = tl.load(bt_ptr + k_pos // BLOCK_SIZE, mask=k_mask, other=0).to(tl.int64)
        k_off = block_idx * stride_kn + (k_pos % BLOCK_SIZE) * stride_ks  # [N]
        v_off = block_idx * stride_vn + (k_pos % BLOCK_SIZE) * stride_vs
        k = tl.load(
            k_base + k_off[None, :] + offs_dqk[:, None],
            mask=k_mask[None, :] & dqk_mask[:, None],
            other=0.0,
        )  # [Dqk, N]
        v = tl.load(
            v_base + v_off[:, None] + offs_dv[None, :],
            mask=k_mask[:, None] & dv_mask[None, :],
            other=0.0,
        )  # [N, Dv]
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_H, N]
        s = tl.where(k_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has a key in the split
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    mid_out_ptrs = (
        mid_out_ptr
        + seq * stride_mob
        + heads[:, None] * stride_moh
        + split * stride_mos
        + offs_dv[None, :]
    )
    tl.store(mid_out_ptrs, acc / l_i[:, None], mask=row_mask[:, None] & dv_mask[None, :])
    mid_lse_ptrs = mid_lse_ptr + seq * stride_mlb + heads * stride_mlh + split
    tl.store(mid_lse_ptrs, m_i + tl.log2(l_i), mask=row_mask)


@triton.jit
def _decode_attention_merge_kernel(
    mid_out_ptr,
    mid_lse_ptr,
    context_lens_ptr,
    out_ptr,
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mlb,
    stride_mlh,
    stride_ob,
    stride_oh,
    num_splits,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    MIN_SPLIT_LEN: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    ctx_len = tl.load(context_lens_ptr + seq)
    kv_lo, split_len = _decode_split(  # pyright: ignore[reportGeneralTypeIssues]
        ctx_len, num_splits, BLOCK_N, MIN_SPLIT_LEN, SLIDING_WINDOW
    )
    num_live = tl.cdiv(ctx_len - kv_lo, split_len)  # splits stage 1 wrote (0 when ctx is empty)
    splits = tl.arange(0, BLOCK_SPLITS)
    split_mask = splits < num_live
    offs_dv = tl.arange(0, BLOCK_DV)
    lse = tl.load(
        mid_lse_ptr + seq * stride_mlb + head * stride_mlh + splits,
        mask=split_mask,
        other=float("-inf"),
    )  # [P]
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp2(lse - lse_max)  # [P], 0 for dead splits
    partial = tl.load(
        mid_out_ptr
        + seq * stride_mob
        + head * stride_moh
        + splits[:, None] * stride_mos
        + offs_dv[None, :],
        mask=split_mask[:, None] & (offs_dv[None, :] < HEAD_DIM_V),
        other=0.0,
    )  # [P, Dv]
    total = tl.sum(weights, 0)
    total = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(partial * weights[:, None], 0) / total  # [Dv]
    tl.store(
        out_ptr + seq * stride_ob + head * stride_oh + offs_dv,
        out.to(out_ptr.dtype.element_ty),
        mask=offs_dv < HEAD_DIM_V,
    )


@triton.jit
def _decode_split(
    ctx_len,
    num_splits,
    BLOCK_N: tl.constexpr,
    MIN_SPLIT_LEN: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
):
    """The keys decode sees start at kv_lo; split p takes [kv_lo + p * len, kv_lo + (p+1) * len):
    len a multiple of BLOCK_N, at least MIN_SPLIT_LEN, so short contexts use fewer splits."""
    kv_lo = tl.maximum(ctx_len - SLIDING_WINDOW, 0) if SLIDING_WINDOW > 0 else ctx_len * 0
    split_len = tl.cdiv(tl.cdiv(ctx_len - kv_lo, num_splits), BLOCK_N) * BLOCK_N
    split_len = tl.maximum(split_len, MIN_SPLIT_LEN)
    return kv_lo, split_len


@triton.jit
def _extend_tiles(
    acc,
    l_i,
    m_i,
    q,  # [M, Dqk]
    q_pos,  # [M]
    lo,
    hi,
    ctx_len,
    bt_ptr,
    k_base,
    v_base,
    qk_scale,
    stride_kn,
    stride_ks,
    stride_vn,
    stride_vs,
    offs_dqk,
    offs_dv,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM_QK: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Online softmax over keys [lo, hi) in BLOCK_N tiles; MASKED applies the causal, window
    and length masks (unmasked tiles are visible to every row)."""
    dqk_mask = offs_dqk < HEAD_DIM_QK
    dv_mask = offs_dv < HEAD_DIM_V
    for n0 in range(lo, hi, BLOCK_N):
        k_pos = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            k_mask = k_pos < ctx_len
            block_idx = tl.load(bt_ptr + k_pos // BLOCK_SIZE, mask=k_mask, other=0)
            k_ld_mask = k_mask[None, :] & dqk_mask[:, None]
            v_ld_mask = k_mask[:, None] & dv_mask[None, :]
        else:
            block_idx = tl.load(bt_ptr + k_pos // BLOCK_SIZE)
            k_ld_mask = dqk_mask[:, None]
            v_ld_mask = dv_mask[None, :]
        block_idx = block_idx.to(tl.int64)
        k_off = block_idx * stride_kn + (k_pos % BLOCK_SIZE) * stride_ks  # [N]
        v_off = block_idx * stride_vn + (k_pos % BLOCK_SIZE) * stride_vs
        k = tl.load(k_base + k_off[None, :] + offs_dqk[:, None], mask=k_ld_mask, other=0.0)
        v = tl.load(v_base + v_off[:, None] + offs_dv[None, :], mask=v_ld_mask, other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [M, N]
        if MASKED:
            visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < ctx_len)
            if SLIDING_WINDOW > 0:
                visible = visible & (k_pos[None, :] > q_pos[:, None] - SLIDING_WINDOW)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet (window tiles) keeps -inf: shift by 0, not by -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


def _check_cache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    """Layout contracts both launchers share."""
    assert q.dim() == 3 and q.stride(2) == 1, "q: [tokens, H, D], head dim contiguous"
    assert k_cache.dim() == v_cache.dim() == 4 and k_cache.stride(3) == v_cache.stride(3) == 1
    assert k_cache.shape[:3] == v_cache.shape[:3], "K and V caches: same [N, S, Hkv]"
    assert q.dtype == k_cache.dtype == v_cache.dtype, "q and the caches share one dtype"
    assert q.shape[1] % k_cache.shape[2] == 0, "H must be a multiple of Hkv"
    assert block_tables.dtype in (torch.int32, torch.int64) and block_tables.stride(1) == 1
    assert context_lens.shape == (block_tables.shape[0],)
    assert block_tables.device == context_lens.device == k_cache.device == q.device
