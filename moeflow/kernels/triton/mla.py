"""Triton MLA: split-K flash decoding over the paged latent cache (absorbed path, graph-safe) and
the decompressed prefill (latent context expanded through W_kv_b, then extend attention).

Shape legend: T new tokens, B sequences, H heads, L kv_lora_rank, R rope dim, Dn nope dim,
Dv value dim, N blocks of S tokens, P splits of a context. Cache: [N, S, L + R]."""

from __future__ import annotations

from itertools import accumulate

import torch
import triton
import triton.language as tl

from moeflow.kernels.triton.attention import extend_attention_triton
from moeflow.kernels.triton_utils import dot_precision, next_power_of_2, num_sms
from moeflow.utils import cdiv
from moeflow.utils.device import to_device

_LOG2E = 1.4426950408889634


@triton.jit
def _mla_decode_split_kernel(
    q_latent_ptr,  # [B, H, L]
    q_rope_ptr,  # [B, H, R]
    cache_ptr,  # [N, S, L + R]
    block_tables_ptr,  # [B, max_blocks]
    context_lens_ptr,  # [B]
    part_out_ptr,  # [B, H, P, L] fp32: each split's normalised output
    part_lse_ptr,  # [B, H, P] fp32: each split's log2-sum-exp2 of its scaled scores
    scale_log2,  # softmax scale * log2(e)
    num_heads,
    num_splits,
    stride_qb,
    stride_qh,
    stride_rb,
    stride_rh,
    stride_cn,
    stride_cs,
    stride_bt,
    KV_LORA_RANK: tl.constexpr,
    ROPE_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_H heads of sequence b over one slice of its context, so each latent
    row of the slice is read once for all those heads and serves as key (with its rope part)
    and as value."""
    head_block = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    ctx_len = tl.load(context_lens_ptr + b).to(tl.int32)
    # NOTE: the slice length comes from the context length on the device, not from the launch:
    # a replayed CUDA graph keeps P and sees new lengths; splits past the context do nothing.
    split_len = tl.cdiv(tl.cdiv(ctx_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, ctx_len)
    if start < end:
        heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        head_mask = heads < num_heads
        offs_l = tl.arange(0, BLOCK_L)
        offs_r = tl.arange(0, BLOCK_R)
        l_mask = offs_l < KV_LORA_RANK
        r_mask = offs_r < ROPE_DIM
        q = tl.load(
            q_latent_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_l[None, :],
            mask=head_mask[:, None] & l_mask[None, :],
            other=0.0,
        )  # [BLOCK_H, BLOCK_L]
        q_r = tl.load(
            q_rope_ptr + b * stride_rb + heads[:, None] * stride_rh + offs_r[None, :],
            mask=head_mask[:, None] & r_mask[None, :],
            other=0.0,
        )  # [BLOCK_H, BLOCK_R]
        m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        denom = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_L], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] token positions
            pos_mask = pos < end
            blocks = tl.load(
                block_tables_ptr + b * stride_bt + pos // PAGE_SIZE, mask=pos_mask, other=0
            )
            rows = blocks.to(tl.int64) * stride_cn + (pos % PAGE_SIZE) * stride_cs  # [BLOCK_N]
            c = tl.load(
                cache_ptr + rows[:, None] + offs_l[None, :],
                mask=pos_mask[:, None] & l_mask[None, :],
                other=0.0,
            )  # [BLOCK_N, BLOCK_L]
            k_r = tl.load(
                cache_ptr + rows[:, None] + KV_LORA_RANK + offs_r[None, :],
                mask=pos_mask[:, None] & r_mask[None, :],
                other=0.0,
            )  # [BLOCK_N, BLOCK_R]
            scores = tl.dot(q, tl.trans(c), input_precision=DOT_PRECISION)
            scores += tl.dot(q_r, tl.trans(k_r), input_precision=DOT_PRECISION)
            scores = tl.where(pos_mask[None, :], scores * scale_log2, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))  # [BLOCK_H]
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(scores - m_new[:, None])  # [BLOCK_H, BLOCK_N]
            denom = denom * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(
                p.to(c.dtype), c, input_precision=DOT_PRECISION
            )  # [BLOCK_H, BLOCK_L]
            m = m_new
        part = (b * num_heads + heads) * num_splits + split  # [BLOCK_H] row of [B * H * P]
        tl.store(
            part_out_ptr + part[:, None].to(tl.int64) * KV_LORA_RANK + offs_l[None, :],
            acc / denom[:, None],
            mask=head_mask[:, None] & l_mask[None, :],
        )
        tl.store(part_lse_ptr + part, m + tl.log2(denom), mask=head_mask)


@triton.jit
def _mla_decode_merge_kernel(
    part_out_ptr,  # [B, H, P, L] fp32
    part_lse_ptr,  # [B, H, P] fp32
    context_lens_ptr,  # [B]
    out_ptr,  # [B, H, L]
    num_heads,
    num_splits,
    stride_ob,
    stride_oh,
    KV_LORA_RANK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """One program per (head, sequence): the splits that held tokens, merged by their
    log-sum-exp."""
    h = tl.program_id(0)
    b = tl.program_id(1)
    ctx_len = tl.load(context_lens_ptr + b).to(tl.int32)
    split_len = tl.maximum(tl.cdiv(tl.cdiv(ctx_len, num_splits), BLOCK_N) * BLOCK_N, BLOCK_N)
    num_used = tl.cdiv(ctx_len, split_len)  # the same slicing as the split kernel
    offs_l = tl.arange(0, BLOCK_L)
    l_mask = offs_l < KV_LORA_RANK
    row = (b * num_heads + h) * num_splits
    m = tl.full([], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    for split in range(0, num_used):
        lse = tl.load(part_lse_ptr + row + split)
        part = tl.load(
            part_out_ptr + (row + split).to(tl.int64) * KV_LORA_RANK + offs_l, mask=l_mask
        )  # [BLOCK_L]
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        beta = tl.exp2(lse - m_new)
        acc = acc * alpha + part * beta
        denom = denom * alpha + beta
        m = m_new
    out = tl.where(denom > 0.0, acc / denom, 0.0)  # an empty context gives zeros, not NaN
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + offs_l,
        out.to(out_ptr.dtype.element_ty),
        mask=l_mask,
    )


def mla_decode_triton(
    q_latent: torch.Tensor,  # [B, H, L]
    q_rope: torch.Tensor,  # [B, H, R]
    cache: torch.Tensor,  # [N, S, L + R]
    block_tables: torch.Tensor,  # [B, max_blocks], -1 padded
    context_lens: torch.Tensor,  # [B]
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:  # [B, H, L]
    """Same contract as mla_decode_ref. No host sync: the launch depends only on shapes (P from
    B, H and the block table's width unless given), so it can be captured in a CUDA graph and
    replayed with new lengths and tables."""
    batch, num_heads, kv_lora_rank = q_latent.shape
    rope_dim = q_rope.shape[-1]
    _, page_size, width = cache.shape
    assert width == kv_lora_rank + rope_dim, "cache rows must be [L + R]"
    assert q_rope.shape[:2] == (batch, num_heads)
    assert q_latent.dtype == q_rope.dtype == cache.dtype, "one dtype for queries and cache"
    assert q_latent.stride(-1) == 1 and q_rope.stride(-1) == 1 and cache.stride(-1) == 1
    assert block_tables.shape[0] == batch and context_lens.shape == (batch,)
    assert block_tables.dtype in (torch.int32, torch.int64) and block_tables.stride(-1) == 1
    assert context_lens.is_contiguous()
    assert block_tables.device == context_lens.device == cache.device == q_latent.device
    out = torch.empty_like(q_latent, memory_format=torch.contiguous_format)  # [B, H, L]
    if batch == 0:
        return out
    block_h, block_n = 16, 32  # tl.dot needs >= 16 rows; 16 x 32 x 512 tiles fit in registers
    block_l = max(16, next_power_of_2(kv_lora_rank))
    block_r = max(16, next_power_of_2(rope_dim))
    num_head_blocks = cdiv(num_heads, block_h)
    max_tokens = block_tables.shape[1] * page_size
    if num_splits is None:
        # About two programs per SM over the batch, no split shorter than one tile.
        target = 2 * num_sms(q_latent.device)
        num_splits = min(cdiv(target, batch * num_head_blocks), cdiv(max_tokens, block_n))
    num_splits = max(1, num_splits)
    part_out = torch.empty(
        batch, num_heads, num_splits, kv_lora_rank, dtype=torch.float32, device=q_latent.device
    )  # [B, H, P, L]
    part_lse = torch.empty(
        batch, num_heads, num_splits, dtype=torch.float32, device=q_latent.device
    )  # [B, H, P]
    precision = dot_precision(q_latent)
    _mla_decode_split_kernel[(num_head_blocks, num_splits, batch)](
        q_latent,
        q_rope,
        cache,
        block_tables,
        context_lens,
        part_out,
        part_lse,
        scale * _LOG2E,
        num_heads,
        num_splits,
        q_latent.stride(0),
        q_latent.stride(1),
        q_rope.stride(0),
        q_rope.stride(1),
        cache.stride(0),
        cache.stride(1),
        block_tables.stride(0),
        KV_LORA_RANK=kv_lora_rank,
        ROPE_DIM=rope_dim,
        PAGE_SIZE=page_size,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_L=block_l,
        BLOCK_R=block_r,
        DOT_PRECISION=precision,
        num_warps=4,  # pyright: ignore[reportCallIssue] (a launch option)
        num_stages=2,  # pyright: ignore[reportCallIssue]
    )
    _mla_decode_merge_kernel[(num_heads, batch)](
        part_out,
        part_lse,
        context_lens,
        out,
        num_heads,
        num_splits,
        out.stride(0),
        out.stride(1),
        KV_LORA_RANK=kv_lora_rank,
        BLOCK_N=block_n,
        BLOCK_L=block_l,
        num_warps=4 if block_l >= 512 else 2,  # pyright: ignore[reportCallIssue]
    )
    return out


def mla_prefill_triton(
    q_nope: torch.Tensor,  # [T, H, Dn]
    q_rope: torch.Tensor,  # [T, H, R]
    cache: torch.Tensor,  # [N, S, L + R]
    block_tables: torch.Tensor,  # [B, max_blocks], -1 padded
    query_lens: list[int],
    context_lens: list[int],
    w_kv_b: torch.Tensor,  # [H, Dn + Dv, L]
    scale: float,
    cu_seqlens_q: torch.Tensor | None = None,  # [B + 1], device twin of query_lens
    context_lens_gpu: torch.Tensor | None = None,  # [B], device twin of context_lens
) -> torch.Tensor:  # [T, H, Dv]
    """Same contract as mla_prefill_ref. Every sequence's context blocks are gathered into one
    [C, L + R] latent slab (C: the whole blocks they span), decompressed by one GEMM through
    W_kv_b into per-head K [C, H, Dn + R] and V [C, H, Dv], which extend attention reads as a
    temporary paged cache with a synthetic block table."""
    num_heads, nope_v, kv_lora_rank = w_kv_b.shape
    num_tokens, nope = q_nope.shape[0], q_nope.shape[-1]
    rope_dim, v_dim = q_rope.shape[-1], nope_v - nope
    page_size = cache.shape[1]
    batch = len(query_lens)
    device = q_nope.device
    assert cache.shape[2] == kv_lora_rank + rope_dim and len(context_lens) == batch
    assert q_nope.shape[1] == num_heads and q_rope.shape[:2] == (num_tokens, num_heads)
    assert sum(query_lens) == num_tokens and block_tables.shape[0] >= batch
    assert q_nope.dtype == q_rope.dtype == cache.dtype == w_kv_b.dtype
    assert w_kv_b.is_contiguous() and cache.is_contiguous()
    blocks_per_seq = [cdiv(c, page_size) for c in context_lens]
    total_blocks, max_blocks = sum(blocks_per_seq), max(blocks_per_seq, default=0)
    if num_tokens == 0 or total_blocks == 0:
        return q_nope.new_zeros(num_tokens, num_heads, v_dim)
    if cu_seqlens_q is None:
        cu_seqlens_q = to_device([0, *accumulate(query_lens)], torch.int64, device)
    if context_lens_gpu is None:
        context_lens_gpu = to_device(context_lens, torch.int64, device)
    # Which (sequence, table column) each gathered block comes from, built on the device from
    # the device lengths (no host sync; the host lists give only the sizes).
    num_blocks_t = (context_lens_gpu + page_size - 1) // page_size  # [B]
    first_block = torch.cumsum(num_blocks_t, 0) - num_blocks_t  # [B]
    seq_of_block = torch.repeat_interleave(
        torch.arange(batch, device=device), num_blocks_t, output_size=total_blocks
    )  # [C / S]
    col = torch.arange(total_blocks, device=device) - first_block[seq_of_block]  # [C / S]
    latent = cache[block_tables[seq_of_block, col]].flatten(0, 1)  # [C, L + R]
    kv = torch.matmul(latent[:, :kv_lora_rank], w_kv_b.view(-1, kv_lora_rank).t())
    kv = kv.view(-1, num_heads, nope_v)  # [C, H, Dn + Dv]
    k_rope = latent[:, None, kv_lora_rank:].expand(-1, num_heads, -1)  # [C, H, R]
    k = torch.cat((kv[..., :nope], k_rope), dim=-1)  # [C, H, Dn + R]
    v = kv[..., nope:].contiguous()  # [C, H, Dv]
    # Sequence i owns temporary blocks first_block[i] .. first_block[i] + num_blocks[i] - 1.
    cols = torch.arange(max_blocks, device=device)  # [max_blocks']
    tables = torch.where(
        cols[None, :] < num_blocks_t[:, None], first_block[:, None] + cols[None, :], -1
    )  # [B, max_blocks']
    q = torch.cat((q_nope, q_rope), dim=-1)  # [T, H, Dn + R]
    return extend_attention_triton(
        q,
        k.view(total_blocks, page_size, num_heads, nope + rope_dim),
        v.view(total_blocks, page_size, num_heads, v_dim),
        tables,
        cu_seqlens_q,
        context_lens_gpu,
        max(query_lens),
        scale,
    )  # [T, H, Dv]
