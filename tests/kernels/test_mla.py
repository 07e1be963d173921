"""MLA references: the absorbed latent decode equals the decompressed attention (keys and values
expanded through W_kv_b) on random inputs over a scattered paged latent cache."""

from __future__ import annotations

import torch

from moeflow.kernels.mla import mla_decode_ref, mla_prefill_ref, store_latent


def test_absorbed_decode_equals_decompressed() -> None:
    g = torch.Generator().manual_seed(0)
    heads, lora, rope, nope, v_dim, bs = 4, 32, 8, 16, 12, 4
    context_lens = [1, 6, 13, 21]
    cache = torch.zeros(32, bs, lora + rope)
    perm = torch.randperm(32, generator=g).tolist()
    tables = []
    for ctx in context_lens:
        blocks = [perm.pop() for _ in range(-(-ctx // bs))]
        tables.append(blocks)
        latent = torch.randn(ctx, lora + rope, generator=g)
        slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(ctx)])
        store_latent(latent, cache, slots)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables])
    w_kv_b = torch.randn(heads, nope + v_dim, lora, generator=g) * 0.3
    q_nope = torch.randn(len(context_lens), heads, nope, generator=g)
    q_rope = torch.randn(len(context_lens), heads, rope, generator=g)
    scale = 0.17

    ref = mla_prefill_ref(
        q_nope, q_rope, cache, block_tables, [1] * 4, context_lens, w_kv_b, scale
    )  # [B, H, Dv]
    q_latent = torch.einsum("bhn,hnl->bhl", q_nope, w_kv_b[:, :nope])
    o_latent = mla_decode_ref(
        q_latent, q_rope, cache, block_tables, torch.tensor(context_lens), scale
    )
    out = torch.einsum("bhl,hvl->bhv", o_latent, w_kv_b[:, nope:])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
