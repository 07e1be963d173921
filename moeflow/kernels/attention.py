"""Paged attention over a block-structured KV cache: the plain-torch reference (defines
correctness, runs on CPU and GPU), the `paged_attention` dispatch point, which takes the Triton
kernels (kernels/triton/attention.py) where use_triton says so, and `store_kv_and_attend`, the
one entry point layers call (cache write + attention; the CPU decode kernel does both at once).

Shape legend: T new tokens in the batch, B sequences, H query heads, Hkv KV heads, D head dim,
N cache blocks of S tokens each. Cache layout: [N, S, Hkv, D]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflow.kernels import cpu_ext
from moeflow.kernels.triton_utils import use_triton
from moeflow.utils import cdiv


def store_kv(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [N, S, Hkv, D]
    v_cache: torch.Tensor,  # [N, S, Hkv, D]
    slot_mapping: torch.Tensor,  # [T]
) -> None:
    """Write the new tokens' keys and values into their cache slots."""
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention_ref(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [N, S, Hkv, D]
    v_cache: torch.Tensor,  # [N, S, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks]
    query_lens: list[int],
    context_lens: list[int],
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [T, H, D]
    """Causal attention of each sequence's new tokens over its whole cached context (which
    already holds the new tokens). New token i of a sequence with q new tokens and context c sits
    at position c - q + i and sees keys 0..c - q + i (the last `sliding_window` of them if set)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    start = 0
    for i, (q_len, ctx_len) in enumerate(zip(query_lens, context_lens, strict=True)):
        num_blocks = cdiv(ctx_len, block_size)
        blocks = block_tables[i, :num_blocks]
        # [num_blocks, S, Hkv, D] -> [ctx, Hkv, D] -> [Hkv, ctx, D]
        k = k_cache[blocks].flatten(0, 1)[:ctx_len].transpose(0, 1)
        v = v_cache[blocks].flatten(0, 1)[:ctx_len].transpose(0, 1)
        qs = q[start : start + q_len].transpose(0, 1)  # [H, q, D]
        mask = None
        if q_len > 1 or (sliding_window is not None and ctx_len > sliding_window):
            q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)[:, None]
            k_pos = torch.arange(ctx_len, device=q.device)[None, :]
            mask = k_pos <= q_pos  # [q, ctx]
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
        work = _work_dtype(q)
        o = sdpa(qs.to(work), k.to(work), v.to(work), mask, scale, gqa=group > 1)
        out[start : start + q_len] = (
            o.transpose(0, 1).reshape(q_len, num_heads, head_dim).to(q.dtype)
        )
        start += q_len
    return out


def sdpa(
    q: torch.Tensor,  # [H, q, Dk]
    k: torch.Tensor,  # [Hkv, ctx, Dk]
    v: torch.Tensor,  # [Hkv, ctx, Dv]
    mask: torch.Tensor | None,  # [q, ctx] bool, True where a key is seen
    scale: float,
    gqa: bool = False,
) -> torch.Tensor:  # [H, q, Dv]
    """torch's scaled_dot_product_attention for one sequence, given 4-D (a batch of one) and
    same-width values, which is what its fused CPU kernel (flash attention for the CPU) takes:
    3-D inputs, or values narrower than the keys (MLA: Dv < Dn + R), fall back to the math path,
    which materialises the [H, q, ctx] scores and runs ~10x slower on a 128-token prompt.
    Narrower values are zero-padded to the key width (the padding's outputs are zeros, dropped);
    `gqa`: Hkv divides H and each KV head serves H / Hkv query heads (no copy of K and V)."""
    v_dim = v.shape[-1]
    if v_dim < k.shape[-1]:
        v = F.pad(v, (0, k.shape[-1] - v_dim))
    o = F.scaled_dot_product_attention(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, scale=scale, enable_gqa=gqa
    )
    return o[0, ..., :v_dim]


def paged_decode_attention_ref(
    q: torch.Tensor,  # [B, H, D], one new token per sequence
    k_cache: torch.Tensor,  # [N, S, Hkv, D]
    v_cache: torch.Tensor,  # [N, S, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks], -1 padded
    context_lens: torch.Tensor,  # [B]
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [B, H, D]
    """Decode attention for a whole batch in one shot: every sequence's context is gathered into
    a padded [B, L, Hkv, D] tensor (L = max_blocks * S) and positions past its length are masked.
    GQA is a reshape of q ([B, Hkv, G, D]), never a copy of K/V."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    blocks = block_tables.clamp(min=0)
    work = _work_dtype(q)
    k = k_cache[blocks].flatten(1, 2).permute(0, 2, 3, 1).to(work)  # [B, Hkv, D, L]
    v = v_cache[blocks].flatten(1, 2).transpose(1, 2).to(work)  # [B, Hkv, L, D]
    qg = q.view(batch, num_kv_heads, group, head_dim).to(work)  # [B, Hkv, G, D]
    scores = torch.matmul(qg, k).float() * scale  # [B, Hkv, G, L]
    pos = torch.arange(scores.shape[-1], device=q.device)
    invalid = pos[None, :] >= context_lens[:, None]  # [B, L]
    if sliding_window is not None:
        invalid |= pos[None, :] <= (context_lens[:, None] - 1 - sliding_window)
    scores.masked_fill_(invalid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v).reshape(batch, num_heads, head_dim)  # [B, H, D]
    return out.to(q.dtype)


def _work_dtype(q: torch.Tensor) -> torch.dtype:
    """CPU matmuls in bf16/fp16 are several times slower than fp32 without native half units
    (a 3x64x200 bmm: 87 us in bf16, 25 us converting to fp32 first), so the CPU attends in fp32."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return q.dtype


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    scale: float,
    sliding_window: int | None = None,
    context_lens_gpu: torch.Tensor | None = None,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dispatch point. With Triton (use_triton(q)) and the device-side lengths given: split-K
    decode when every sequence has one new token, else the extend kernel (needs cu_seqlens_q).
    Otherwise the batched decode reference for all-decode batches, the per-sequence reference
    for the rest."""
    is_decode = all(n == 1 for n in query_lens)
    if context_lens_gpu is not None and use_triton(q) and (is_decode or cu_seqlens_q is not None):
        from moeflow.kernels.triton import attention as triton_attention

        if is_decode:
            return triton_attention.decode_attention_triton(
                q, k_cache, v_cache, block_tables, context_lens_gpu, scale, sliding_window
            )
        assert cu_seqlens_q is not None
        return triton_attention.extend_attention_triton(
            q,
            k_cache,
            v_cache,
            block_tables,
            cu_seqlens_q,
            context_lens_gpu,
            max(query_lens),
            scale,
            sliding_window,
        )
    if context_lens_gpu is not None and is_decode:
        return paged_decode_attention_ref(
            q, k_cache, v_cache, block_tables, context_lens_gpu, scale, sliding_window
        )
    return paged_attention_ref(
        q, k_cache, v_cache, block_tables, query_lens, context_lens, scale, sliding_window
    )


def store_kv_and_attend(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [N, S, Hkv, D]
    v_cache: torch.Tensor,  # [N, S, Hkv, D]
    slot_mapping: torch.Tensor,  # [T]
    block_tables: torch.Tensor,  # [B, max_blocks]
    query_lens: list[int],
    context_lens: list[int],
    context_lens_gpu: torch.Tensor,  # [B], the device twin of context_lens
    cu_seqlens_q: torch.Tensor,  # [B + 1]
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [T, H, D]
    """One attention layer's step, the entry point layers call: write the new tokens' K/V into
    their cache slots, then attend. A CPU decode step over float32 caches does both in one
    kernel call (paged_decode_attention_cpu); otherwise store_kv, then paged_attention."""
    if all(n == 1 for n in query_lens) and _cpu_decode_fits(q, k, v, k_cache):
        return paged_decode_attention_cpu(
            q,
            k,
            v,
            k_cache,
            v_cache,
            slot_mapping,
            block_tables,
            context_lens_gpu,
            scale,
            sliding_window,
        )
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return paged_attention(
        q,
        k_cache,
        v_cache,
        block_tables,
        query_lens,
        context_lens,
        scale,
        sliding_window,
        context_lens_gpu,
        cu_seqlens_q=cu_seqlens_q,
    )


def paged_decode_attention_cpu(
    q: torch.Tensor,  # [B, H, D]
    k: torch.Tensor,  # [B, Hkv, D]
    v: torch.Tensor,  # [B, Hkv, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [B]
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,  # [B]
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:  # [B, H, D]
    """store_kv + decode attention in one CPU kernel call, where _cpu_decode_fits."""
    ops = cpu_ext.ops()
    assert ops is not None
    return ops.decode_attention(
        q,
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        block_tables,
        context_lens,
        scale,
        sliding_window or 0,
    )


def _cpu_decode_fits(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor
) -> bool:
    """The CPU decode kernel takes float32 q and caches, head dims a multiple of 8, and heads
    that are contiguous rows (views of a fused qkv buffer are)."""
    if q.device.type != "cpu" or q.dtype != torch.float32 or k_cache.dtype != torch.float32:
        return False
    if cpu_ext.ops() is None or q.shape[-1] % 8 != 0:
        return False
    return all(t.stride(2) == 1 and t.stride(1) == t.shape[2] for t in (q, k, v))
