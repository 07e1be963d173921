"""Triton paged attention against the torch references: extend (mixed query lengths, cached
prefixes, GQA/MHA, odd head dims, Dqk != Dv, sliding window) and split-K decode (several splits,
short rows, a wider block table as in a replayed CUDA graph), and the paged_attention dispatch.
Cache slots no sequence owns hold NaN, so any read outside a context poisons the output."""

from __future__ import annotations

import math
import random

import pytest
import torch

from moeflow.kernels.attention import (
    paged_attention,
    paged_attention_ref,
    paged_decode_attention_ref,
)
from tests.helpers.devices import TRITON_DEVICE, needs_triton

pytest.importorskip("triton")
from moeflow.kernels.triton.attention import (  # noqa: E402
    decode_attention_triton,
    extend_attention_triton,
)

pytestmark = needs_triton

TOL = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 1e-2, "atol": 1e-2},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}


def _paged_cache(
    seed: int,
    context_lens: list[int],
    num_kv_heads: int,
    head_dim_qk: int,
    head_dim_v: int,
    block_size: int,
    dtype: torch.dtype,
    extra_width: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """K/V caches filled through shuffled block tables; returns (k, v) with NaN in every slot no
    context owns, their NaN-free twins for the references, and the -1 padded block table."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(math.ceil(c / block_size) for c in context_lens) + 5
    free = list(range(num_blocks))
    rng.shuffle(free)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim_qk), float("nan"))
    v_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim_v), float("nan"))
    tables = []
    for ctx in context_lens:
        blocks = [free.pop() for _ in range(math.ceil(ctx / block_size))]
        tables.append(blocks)
        slots = torch.tensor(
            [blocks[p // block_size] * block_size + p % block_size for p in range(ctx)]
        )
        k = torch.randn(ctx, num_kv_heads, head_dim_qk, generator=g)
        v = torch.randn(ctx, num_kv_heads, head_dim_v, generator=g)
        k_cache.view(-1, num_kv_heads, head_dim_qk).index_copy_(0, slots, k)
        v_cache.view(-1, num_kv_heads, head_dim_v).index_copy_(0, slots, v)
    width = max(len(t) for t in tables) + extra_width
    block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables])
    k_cache, v_cache = k_cache.to(TRITON_DEVICE, dtype), v_cache.to(TRITON_DEVICE, dtype)
    return (
        k_cache,
        v_cache,
        k_cache.nan_to_num(0.0),
        v_cache.nan_to_num(0.0),
        block_tables.to(TRITON_DEVICE),
    )


def _extend_inputs(
    seed: int,
    query_lens: list[int],
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim_qk: int,
    head_dim_v: int,
    block_size: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, ...]:
    """q [T, H, Dqk], caches, clean caches, block tables, cu_seqlens_q, context_lens."""
    caches = _paged_cache(
        seed, context_lens, num_kv_heads, head_dim_qk, head_dim_v, block_size, dtype
    )
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(sum(query_lens), num_heads, head_dim_qk, generator=g).to(TRITON_DEVICE, dtype)
    cu = torch.tensor([0, *query_lens], device=TRITON_DEVICE).cumsum(0)
    return q, *caches, cu, torch.tensor(context_lens, device=TRITON_DEVICE)


def _dense_ref(
    q: torch.Tensor,  # [T, H, Dqk]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    scale: float,
    window: int | None,
) -> torch.Tensor:  # [T, H, Dv] float64
    """Causal attention written out in float64; Dqk and Dv may differ."""
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    outs, start = [], 0
    for i, (n, ctx) in enumerate(zip(query_lens, context_lens, strict=True)):
        blocks = block_tables[i, : math.ceil(ctx / block_size)]
        k = k_cache[blocks].flatten(0, 1)[:ctx].double().repeat_interleave(group, 1)
        v = v_cache[blocks].flatten(0, 1)[:ctx].double().repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", q[start : start + n].double(), k) * scale
        q_pos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        visible = k_pos <= q_pos
        if window is not None:
            visible &= k_pos > q_pos - window
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)
        outs.append(torch.einsum("hqk,khd->qhd", p, v))
        start += n
    return torch.cat(outs)


# Sequence 0 decodes one token over a cached prefix, 1 is a fresh prefill, 2 a short chunk and
# 3 a long chunk (several query and KV tiles) after cached prefixes.
QUERY_LENS = [1, 37, 5, 70]
CONTEXT_LENS = [45, 37, 130, 200]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(8, 2, 64), (4, 4, 48)])
@pytest.mark.parametrize("window", [None, 24])
def test_extend_matches_reference(
    dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, window: int | None
) -> None:
    q, kc, vc, kc_ref, vc_ref, bt, cu, ctx = _extend_inputs(
        0, QUERY_LENS, CONTEXT_LENS, num_heads, num_kv_heads, head_dim, head_dim, 16, dtype
    )
    scale = head_dim**-0.5
    out = extend_attention_triton(q, kc, vc, bt, cu, ctx, max(QUERY_LENS), scale, window)
    assert out.shape == q.shape and out.dtype == dtype
    ref = paged_attention_ref(q, kc_ref, vc_ref, bt, QUERY_LENS, CONTEXT_LENS, scale, window)
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize(("head_dim_qk", "head_dim_v"), [(48, 32), (192, 128)])
def test_extend_qk_and_v_head_dims_differ(head_dim_qk: int, head_dim_v: int) -> None:
    """MLA prefill's shape (H == Hkv, Dqk != Dv), 192 padded to 256 with masks."""
    dtype = torch.float16
    q, kc, vc, kc_ref, vc_ref, bt, cu, ctx = _extend_inputs(
        1, QUERY_LENS, CONTEXT_LENS, 2, 2, head_dim_qk, head_dim_v, 16, dtype
    )
    scale = head_dim_qk**-0.5
    out = extend_attention_triton(q, kc, vc, bt, cu, ctx, max(QUERY_LENS), scale)
    assert out.shape == (q.shape[0], 2, head_dim_v)
    ref = _dense_ref(q, kc_ref, vc_ref, bt, QUERY_LENS, CONTEXT_LENS, scale, None)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("block_size", [8, 32])
def test_extend_other_block_sizes_and_int32_tables(block_size: int) -> None:
    dtype = torch.float32
    q, kc, vc, kc_ref, vc_ref, bt, cu, ctx = _extend_inputs(
        2, QUERY_LENS, CONTEXT_LENS, 6, 2, 40, 40, block_size, dtype
    )
    out = extend_attention_triton(q, kc, vc, bt.int(), cu, ctx, max(QUERY_LENS), 0.2, 50)
    ref = paged_attention_ref(q, kc_ref, vc_ref, bt, QUERY_LENS, CONTEXT_LENS, 0.2, 50)
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_extend_non_contiguous_q() -> None:
    """q as the layer gets it: a view into a fused [T, (H + 2 Hkv) * D] projection."""
    dtype = torch.float16
    q, kc, vc, kc_ref, vc_ref, bt, cu, ctx = _extend_inputs(
        3, QUERY_LENS, CONTEXT_LENS, 4, 2, 32, 32, 16, dtype
    )
    qkv = torch.randn(q.shape[0], 8 * 32, device=TRITON_DEVICE, dtype=dtype)
    qkv[:, : 4 * 32] = q.flatten(1)
    q_view = qkv[:, : 4 * 32].view(-1, 4, 32)  # [T, H, D], row stride 256
    out = extend_attention_triton(q_view, kc, vc, bt, cu, ctx, max(QUERY_LENS), 0.3)
    ref = paged_attention_ref(q, kc_ref, vc_ref, bt, QUERY_LENS, CONTEXT_LENS, 0.3)
    torch.testing.assert_close(out, ref, **TOL[dtype])


# Long rows span several splits; 17 and 1 are shorter than one split (padding rows hold 1).
DECODE_CONTEXT_LENS = [1, 300, 17, 700]


def _decode_inputs(
    seed: int,
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    extra_width: int = 0,
) -> tuple[torch.Tensor, ...]:
    """q [B, H, D], caches, clean caches, block tables, context_lens."""
    caches = _paged_cache(
        seed, context_lens, num_kv_heads, head_dim, head_dim, block_size, dtype, extra_width
    )
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=g).to(TRITON_DEVICE, dtype)
    return q, *caches, torch.tensor(context_lens, device=TRITON_DEVICE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(8, 2, 64), (3, 3, 96)])
@pytest.mark.parametrize("window", [None, 300])
def test_decode_matches_reference(
    dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, window: int | None
) -> None:
    q, kc, vc, kc_ref, vc_ref, bt, ctx = _decode_inputs(
        4, DECODE_CONTEXT_LENS, num_heads, num_kv_heads, head_dim, 16, dtype
    )
    scale = head_dim**-0.5
    out = decode_attention_triton(q, kc, vc, bt, ctx, scale, window)
    assert out.shape == q.shape and out.dtype == dtype
    ref = paged_decode_attention_ref(q, kc_ref, vc_ref, bt, ctx, scale, window)
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_decode_wider_block_table_same_result() -> None:
    """The CUDA-graph case: the static block table is wider than any live context (more -1
    columns, so more splits); the lengths alone decide what is read."""
    dtype = torch.float32
    q, kc, vc, kc_ref, vc_ref, bt, ctx = _decode_inputs(5, DECODE_CONTEXT_LENS, 8, 2, 64, 16, dtype)
    wide = torch.cat([bt, torch.full((bt.shape[0], 150), -1, device=TRITON_DEVICE)], 1)
    out = decode_attention_triton(q, kc, vc, bt, ctx, 0.125)
    out_wide = decode_attention_triton(q, kc, vc, wide, ctx, 0.125)
    torch.testing.assert_close(out_wide, out, rtol=1e-5, atol=1e-5)
    ref = paged_decode_attention_ref(q, kc_ref, vc_ref, wide, ctx, 0.125)
    torch.testing.assert_close(out_wide, ref, **TOL[dtype])


def test_decode_other_block_size_int32_tables_and_empty_row() -> None:
    """Block size 8 with int32 tables; a row with an empty context gives zeros, not NaN."""
    dtype = torch.float16
    q, kc, vc, kc_ref, vc_ref, bt, ctx = _decode_inputs(6, DECODE_CONTEXT_LENS, 4, 1, 80, 8, dtype)
    out = decode_attention_triton(q, kc, vc, bt.int(), ctx, 0.1, None)
    ref = paged_decode_attention_ref(q, kc_ref, vc_ref, bt, ctx, 0.1)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    ctx_empty = ctx.clone()
    ctx_empty[0] = 0
    out = decode_attention_triton(q, kc, vc, bt, ctx_empty, 0.1, None)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out[1:], ref[1:], **TOL[dtype])


@pytest.fixture
def triton_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the Triton launchers the dispatch point called."""
    from moeflow.kernels.triton import attention as triton_attention

    calls: list[str] = []
    for name in ("decode_attention_triton", "extend_attention_triton"):
        fn = getattr(triton_attention, name)

        def spy(*args, _fn=fn, _name=name, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls.append(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setattr(triton_attention, name, spy)
    return calls


@pytest.mark.usefixtures("triton_on_cpu")
def test_dispatch_routes_to_triton(triton_calls: list[str]) -> None:
    dtype = torch.float16
    q, kc, vc, kc_ref, vc_ref, bt, cu, ctx = _extend_inputs(
        7, QUERY_LENS, CONTEXT_LENS, 8, 2, 64, 64, 16, dtype
    )
    out = paged_attention(q, kc, vc, bt, QUERY_LENS, CONTEXT_LENS, 0.125, 24, ctx, cu_seqlens_q=cu)
    ref = paged_attention_ref(q, kc_ref, vc_ref, bt, QUERY_LENS, CONTEXT_LENS, 0.125, 24)
    torch.testing.assert_close(out, ref, **TOL[dtype])

    q, kc, vc, kc_ref, vc_ref, bt, ctx = _decode_inputs(8, DECODE_CONTEXT_LENS, 8, 2, 64, 16, dtype)
    ones = [1] * len(DECODE_CONTEXT_LENS)
    cu = torch.arange(len(ones) + 1, device=TRITON_DEVICE)
    out = paged_attention(
        q, kc, vc, bt, ones, DECODE_CONTEXT_LENS, 0.125, None, ctx, cu_seqlens_q=cu
    )
    ref = paged_decode_attention_ref(q, kc_ref, vc_ref, bt, ctx, 0.125)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    assert triton_calls == ["extend_attention_triton", "decode_attention_triton"]


def test_dispatch_keeps_reference_without_triton(triton_calls: list[str]) -> None:
    """CPU tensors without MOEFLOW_TRITON_ON_CPU take the references, as before."""
    if TRITON_DEVICE != "cpu":
        pytest.skip("CUDA tensors always take the Triton path")
    q, _, _, kc, vc, bt, cu, ctx = _extend_inputs(
        9, QUERY_LENS, CONTEXT_LENS, 4, 2, 16, 16, 4, torch.float32
    )
    out = paged_attention(q, kc, vc, bt, QUERY_LENS, CONTEXT_LENS, 0.25, None, ctx, cu_seqlens_q=cu)
    ref = paged_attention_ref(q, kc, vc, bt, QUERY_LENS, CONTEXT_LENS, 0.25)
    assert torch.equal(out, ref) and triton_calls == []


# qwen3-30b-a3b: 32 query heads, 4 KV heads, head dim 128; block size 16.
QWEN3_MOE = {"num_heads": 32, "num_kv_heads": 4, "head_dim": 128, "block_size": 16}


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 1000])
def test_real_shapes_bf16(window: int | None) -> None:
    """Prefill of 2 x 1024 new tokens (one after a 1024-token cached prefix) and a decode
    batch with contexts up to 4096, bf16, against the fp32 references."""
    h, hkv, d, bs = QWEN3_MOE.values()
    dtype = torch.bfloat16
    query_lens, context_lens = [1024, 1024], [1024, 2048]
    q, kc, vc, kc_ref, vc_ref, bt, cu, ctx = _extend_inputs(
        10, query_lens, context_lens, h, hkv, d, d, bs, dtype
    )
    out = extend_attention_triton(q, kc, vc, bt, cu, ctx, 1024, d**-0.5, window)
    ref = paged_attention_ref(
        q.float(), kc_ref.float(), vc_ref.float(), bt, query_lens, context_lens, d**-0.5, window
    )
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])

    decode_lens = [4096, 1, 17, 300, 1024, 2500, 4000, 129]
    q, kc, vc, kc_ref, vc_ref, bt, ctx = _decode_inputs(11, decode_lens, h, hkv, d, bs, dtype)
    out = decode_attention_triton(q, kc, vc, bt, ctx, d**-0.5, window)
    ref = paged_decode_attention_ref(
        q.float(), kc_ref.float(), vc_ref.float(), bt, ctx, d**-0.5, window
    )
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


@pytest.mark.gpu
def test_decode_cuda_graph_replay_bf16() -> None:
    """Captured once over a wide static block table, replayed with other lengths: each replay
    matches an eager reference (no host sync inside the launcher, splits cut from the lengths)."""
    h, hkv, d, bs = QWEN3_MOE.values()
    dtype = torch.bfloat16
    lens = [4096, 3000, 700, 1]
    q, kc, vc, kc_ref, vc_ref, bt, ctx = _decode_inputs(12, lens, h, hkv, d, bs, dtype, 64)
    kc_ref, vc_ref = kc_ref.float(), vc_ref.float()
    static_lens = torch.ones_like(ctx)
    decode_attention_triton(q, kc, vc, bt, static_lens, d**-0.5)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention_triton(q, kc, vc, bt, static_lens, d**-0.5)
    for new_lens in ([4096, 3000, 700, 1], [5, 4096, 1, 2048]):
        lens_t = torch.tensor(new_lens, device=TRITON_DEVICE)
        lens_t = torch.minimum(lens_t, ctx)  # stay inside the filled part of each table row
        static_lens.copy_(lens_t)
        graph.replay()
        ref = paged_decode_attention_ref(
            q.float(), kc_ref.float(), vc_ref.float(), bt, lens_t, d**-0.5
        )
        torch.testing.assert_close(out.float(), ref, **TOL[dtype])
