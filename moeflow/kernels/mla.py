"""Multi-head latent attention (DeepSeek-V2/V3) over a paged LATENT cache: per token only the
normalised compressed KV c (kv_lora_rank L) and the roped shared key k_r (rope dim R) are stored.

Shape legend: T new tokens, B sequences, H heads, L kv_lora_rank, R rope dim, Dn nope dim,
Dv value dim, N blocks of S tokens. Cache: [N, S, L + R]. W_kv_b: [H, Dn + Dv, L]."""

from __future__ import annotations

import torch

from moeflow.kernels.attention import sdpa
from moeflow.kernels.triton_utils import use_triton
from moeflow.utils import cdiv


def store_latent(
    latent: torch.Tensor,  # [T, L + R]
    cache: torch.Tensor,  # [N, S, L + R]
    slot_mapping: torch.Tensor,  # [T]
) -> None:
    cache.view(-1, cache.shape[-1]).index_copy_(0, slot_mapping, latent.to(cache.dtype))


def _gather(cache: torch.Tensor, block_table: torch.Tensor, ctx_len: int) -> torch.Tensor:
    num_blocks = cdiv(ctx_len, cache.shape[1])
    return cache[block_table[:num_blocks]].flatten(0, 1)[:ctx_len]  # [ctx, L + R]


def mla_prefill_ref(
    q_nope: torch.Tensor,  # [T, H, Dn]
    q_rope: torch.Tensor,  # [T, H, R]
    cache: torch.Tensor,  # [N, S, L + R]
    block_tables: torch.Tensor,  # [B, max_blocks]
    query_lens: list[int],
    context_lens: list[int],
    w_kv_b: torch.Tensor,  # [H, Dn + Dv, L]
    scale: float,
) -> torch.Tensor:  # [T, H, Dv]
    """The decompressed path: each sequence's latent context is expanded through W_kv_b into
    per-head keys and values, then causal attention (new token i of a sequence with q new tokens
    and context c sits at position c - q + i)."""
    num_heads, nope_v, kv_lora_rank = w_kv_b.shape
    nope = q_nope.shape[-1]
    v_dim = nope_v - nope
    out = q_nope.new_empty(q_nope.shape[0], num_heads, v_dim)
    start = 0
    for i, (q_len, ctx_len) in enumerate(zip(query_lens, context_lens, strict=True)):
        latent = _gather(cache, block_tables[i], ctx_len)  # [ctx, L + R]
        c, k_rope = latent[:, :kv_lora_rank], latent[:, kv_lora_rank:]
        kv = torch.einsum("cl,hdl->hcd", c, w_kv_b)  # [H, ctx, Dn + Dv]
        k_nope, v = kv[..., :nope], kv[..., nope:]
        k = torch.cat((k_nope, k_rope.unsqueeze(0).expand(num_heads, -1, -1)), dim=-1)
        q = torch.cat((q_nope[start : start + q_len], q_rope[start : start + q_len]), dim=-1)
        q = q.transpose(0, 1)  # [H, q, Dn + R]
        mask = None
        if q_len > 1:
            q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)[:, None]
            mask = torch.arange(ctx_len, device=q.device)[None, :] <= q_pos  # [q, ctx]
        o = sdpa(q, k, v, mask, scale)  # [H, q, Dv]
        out[start : start + q_len] = o.transpose(0, 1)
        start += q_len
    return out


def mla_decode_ref(
    q_latent: torch.Tensor,  # [B, H, L]: q_nope absorbed through W_UK
    q_rope: torch.Tensor,  # [B, H, R]
    cache: torch.Tensor,  # [N, S, L + R]
    block_tables: torch.Tensor,  # [B, max_blocks], -1 padded
    context_lens: torch.Tensor,  # [B]
    scale: float,
) -> torch.Tensor:  # [B, H, L]: attention output in latent space (W_UV applied by the caller)
    """The absorbed path, batched: score = q_latent . c + q_rope . k_r; out = softmax . c.
    Keys and values never leave the latent space."""
    kv_lora_rank = q_latent.shape[-1]
    blocks = block_tables.clamp(min=0)
    latent = cache[blocks].flatten(1, 2)  # [B, Lctx, L + R]
    c, k_rope = latent[..., :kv_lora_rank], latent[..., kv_lora_rank:]
    scores = torch.matmul(q_latent, c.transpose(1, 2)) + torch.matmul(
        q_rope, k_rope.transpose(1, 2)
    )  # [B, H, Lctx]
    scores = scores.float() * scale
    pos = torch.arange(scores.shape[-1], device=scores.device)
    scores.masked_fill_((pos[None, :] >= context_lens[:, None])[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(c.dtype)
    return torch.matmul(probs, c)  # [B, H, L]


def mla_prefill(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    w_kv_b: torch.Tensor,
    scale: float,
    cu_seqlens_q: torch.Tensor | None = None,
    context_lens_gpu: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatch point: Triton where `use_triton` says so, else the reference. The device twins
    of the length lists (ForwardBatch.cu_seqlens_q / context_lens) spare the Triton path a copy;
    without them it builds its own."""
    if use_triton(q_nope):
        from moeflow.kernels.triton.mla import mla_prefill_triton

        return mla_prefill_triton(
            q_nope,
            q_rope,
            cache,
            block_tables,
            query_lens,
            context_lens,
            w_kv_b,
            scale,
            cu_seqlens_q=cu_seqlens_q,
            context_lens_gpu=context_lens_gpu,
        )
    return mla_prefill_ref(
        q_nope, q_rope, cache, block_tables, query_lens, context_lens, w_kv_b, scale
    )


def mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Dispatch point: Triton (split-K, CUDA-graph safe) where `use_triton` says so, else the
    reference."""
    if use_triton(q_latent):
        from moeflow.kernels.triton.mla import mla_decode_triton

        return mla_decode_triton(q_latent, q_rope, cache, block_tables, context_lens, scale)
    return mla_decode_ref(q_latent, q_rope, cache, block_tables, context_lens, scale)
