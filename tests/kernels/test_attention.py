"""Paged attention references against a dense causal attention written out here: mixed query and
context lengths, GQA, sliding window, scattered block tables; and batched decode vs per-sequence."""

from __future__ import annotations

import math
import random

import pytest
import torch

from moeflow.kernels.attention import (
    paged_attention_ref,
    paged_decode_attention_ref,
    store_kv,
)


def _dense_attention(q, k, v, q_start, scale, window):  # noqa: ANN001, ANN202
    """q: [q, H, D] at positions q_start.., k/v: [ctx, Hkv, D] -> [q, H, D] (float64)."""
    h, hkv = q.shape[1], k.shape[1]
    k = k.double().repeat_interleave(h // hkv, dim=1)
    v = v.double().repeat_interleave(h // hkv, dim=1)
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(q.shape[0]):
        pos = q_start + i
        lo = 0 if window is None else max(0, pos - window + 1)
        s = torch.einsum("hd,chd->hc", q[i].double(), k[lo : pos + 1]) * scale
        out[i] = torch.einsum("hc,chd->hd", torch.softmax(s, -1), v[lo : pos + 1])
    return out


def _setup(seed: int, query_lens: list[int], context_lens: list[int], h: int = 4, hkv: int = 2):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    d, bs, num_blocks = 8, 4, 64
    k_cache = torch.zeros(num_blocks, bs, hkv, d)
    v_cache = torch.zeros(num_blocks, bs, hkv, d)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, ks, vs = [], [], []
    for ctx in context_lens:
        blocks = [free.pop() for _ in range(math.ceil(ctx / bs))]
        tables.append(blocks)
        k = torch.randn(ctx, hkv, d, generator=g)
        v = torch.randn(ctx, hkv, d, generator=g)
        slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(ctx)])
        store_kv(k, v, k_cache, v_cache, slots)
        ks.append(k)
        vs.append(v)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables])
    q = torch.randn(sum(query_lens), h, d, generator=g)
    return q, k_cache, v_cache, block_tables, ks, vs


@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_mixed_lengths(window: int | None) -> None:
    query_lens, context_lens = [1, 7, 3, 12], [9, 7, 20, 30]
    q, kc, vc, bt, ks, vs = _setup(0, query_lens, context_lens)
    out = paged_attention_ref(q, kc, vc, bt, query_lens, context_lens, 0.3, window)
    start = 0
    for n, ctx, k, v in zip(query_lens, context_lens, ks, vs, strict=True):
        ref = _dense_attention(q[start : start + n], k, v, ctx - n, 0.3, window)
        torch.testing.assert_close(out[start : start + n].double(), ref, rtol=1e-5, atol=1e-5)
        start += n


@pytest.mark.parametrize("window", [None, 6])
def test_batched_decode_equals_per_sequence(window: int | None) -> None:
    context_lens = [1, 5, 17, 33, 8]
    query_lens = [1] * len(context_lens)
    q, kc, vc, bt, _, _ = _setup(1, query_lens, context_lens, h=6, hkv=3)
    ref = paged_attention_ref(q, kc, vc, bt, query_lens, context_lens, 0.25, window)
    out = paged_decode_attention_ref(q, kc, vc, bt, torch.tensor(context_lens), 0.25, window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cache_on_cpu(dtype: torch.dtype) -> None:
    """A bf16/fp16 cache (attended in fp32 on the CPU) stays within half-precision rounding of
    the fp32 result, and the output keeps the input's dtype."""
    context_lens = [3, 9, 30]
    query_lens = [1] * 3
    q, kc, vc, bt, _, _ = _setup(2, query_lens, context_lens)
    ref = paged_decode_attention_ref(q, kc, vc, bt, torch.tensor(context_lens), 0.3)
    out = paged_decode_attention_ref(
        q.to(dtype), kc.to(dtype), vc.to(dtype), bt, torch.tensor(context_lens), 0.3
    )
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    per_seq = paged_attention_ref(
        q.to(dtype), kc.to(dtype), vc.to(dtype), bt, query_lens, context_lens, 0.3
    )
    assert per_seq.dtype == dtype
    torch.testing.assert_close(per_seq.float(), ref, rtol=3e-2, atol=3e-2)
