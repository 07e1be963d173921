"""Triton MLA against the references: split-K latent decode (several splits, heads not a multiple
of the head block, a wider block table as a replayed CUDA graph sees it) and the decompressed
prefill over earlier context; the dispatch points route to them; real DeepSeek shapes on a GPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from moeflow.kernels import mla as mla_ops
from moeflow.kernels.mla import mla_decode_ref, mla_prefill_ref, store_latent
from tests.helpers.devices import TRITON_DEVICE, needs_triton

pytestmark = needs_triton

# Small interpreted shapes: L kv_lora_rank, R rope dim, Dn nope dim, Dv value dim, S block size.
LORA, ROPE, NOPE, V_DIM, BLOCK = 64, 16, 32, 32, 16
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.float16: {"rtol": 1e-2, "atol": 1e-2}}


def _latent_cache(
    seed: int,
    context_lens: list[int],
    dtype: torch.dtype,
    lora: int = LORA,
    rope: int = ROPE,
    block: int = BLOCK,
    pad_blocks: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random latent cache [N, S, L + R] holding each context in shuffled blocks, and the
    block table [B, max_blocks + pad_blocks], -1 padded."""
    g = torch.Generator().manual_seed(seed)
    needed = [-(-c // block) for c in context_lens]
    num_blocks = sum(needed) + 7
    cache = torch.randn(num_blocks, block, lora + rope, generator=g)  # stale rows: random too
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for ctx, n in zip(context_lens, needed, strict=True):
        blocks = [perm.pop() for _ in range(n)]
        tables.append(blocks)
        slots = torch.tensor([blocks[p // block] * block + p % block for p in range(ctx)])
        store_latent(torch.randn(ctx, lora + rope, generator=g), cache, slots)
    width = max(needed) + pad_blocks
    block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables])
    return cache.to(dtype).to(TRITON_DEVICE), block_tables.to(TRITON_DEVICE)


def _randn(seed: int, *shape: int, dtype: torch.dtype, std: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * std).to(dtype).to(TRITON_DEVICE)


def _decode_ref(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The reference in fp32 on the same (rounded) inputs."""
    return mla_decode_ref(
        q_latent.float(), q_rope.float(), cache.float(), block_tables, context_lens, scale
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_heads", [4, 20])
def test_mla_decode_triton_matches_ref(dtype: torch.dtype, num_heads: int) -> None:
    from moeflow.kernels.triton.mla import mla_decode_triton

    context_lens = [1, 37, 100, 250]  # 250 tokens: 8 splits of 32 with the default count
    cache, block_tables = _latent_cache(0, context_lens, dtype)
    batch = len(context_lens)
    q_latent = _randn(1, batch, num_heads, LORA, dtype=dtype)
    q_rope = _randn(2, batch, num_heads, ROPE, dtype=dtype)
    lens = torch.tensor(context_lens, device=TRITON_DEVICE)
    scale = (NOPE + ROPE) ** -0.5

    out = mla_decode_triton(q_latent, q_rope, cache, block_tables, lens, scale)
    assert out.shape == (batch, num_heads, LORA) and out.dtype == dtype
    ref = _decode_ref(q_latent, q_rope, cache, block_tables, lens, scale)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    # One split (no merge to speak of) and an odd count that cuts contexts unevenly.
    for num_splits in (1, 3):
        out = mla_decode_triton(
            q_latent, q_rope, cache, block_tables, lens, scale, num_splits=num_splits
        )
        torch.testing.assert_close(out.float(), ref, **TOL[dtype])


def test_mla_decode_triton_graph_replay() -> None:
    """A captured graph sees a block table wider than needed and, on replay, new lengths in the
    same buffers: the split count comes from the shape, the slices from the lengths."""
    from moeflow.kernels.triton.mla import mla_decode_triton

    dtype, num_heads = torch.float16, 4
    context_lens = [70, 5, 130]
    cache, narrow = _latent_cache(3, context_lens, dtype)
    _, wide = _latent_cache(3, context_lens, dtype, pad_blocks=12)
    q_latent = _randn(4, 3, num_heads, LORA, dtype=dtype)
    q_rope = _randn(5, 3, num_heads, ROPE, dtype=dtype)
    lens = torch.tensor(context_lens, device=TRITON_DEVICE)
    scale = 0.2
    ref = _decode_ref(q_latent, q_rope, cache, narrow, lens, scale)
    out_narrow = mla_decode_triton(q_latent, q_rope, cache, narrow, lens, scale)
    out_wide = mla_decode_triton(q_latent, q_rope, cache, wide, lens, scale)
    torch.testing.assert_close(out_narrow.float(), ref, **TOL[dtype])
    torch.testing.assert_close(out_wide.float(), ref, **TOL[dtype])
    # "Replay": shorter contexts in the same tensors (blocks past them are simply not read).
    lens.copy_(torch.tensor([64, 1, 17]))
    ref = _decode_ref(q_latent, q_rope, cache, wide, lens, scale)
    out = mla_decode_triton(q_latent, q_rope, cache, wide, lens, scale)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


def _prefill_inputs(
    seed: int,
    query_lens: list[int],
    context_lens: list[int],
    num_heads: int,
    dtype: torch.dtype,
    lora: int = LORA,
    rope: int = ROPE,
    nope: int = NOPE,
    v_dim: int = V_DIM,
) -> dict[str, Any]:
    cache, block_tables = _latent_cache(seed, context_lens, dtype, lora, rope)
    num_tokens = sum(query_lens)
    return {
        "q_nope": _randn(seed + 1, num_tokens, num_heads, nope, dtype=dtype),
        "q_rope": _randn(seed + 2, num_tokens, num_heads, rope, dtype=dtype),
        "cache": cache,
        "block_tables": block_tables,
        "query_lens": query_lens,
        "context_lens": context_lens,
        "w_kv_b": _randn(seed + 3, num_heads, nope + v_dim, lora, dtype=dtype, std=lora**-0.5),
        "scale": (nope + rope) ** -0.5,
    }


def _prefill_ref(inputs: dict[str, Any]) -> torch.Tensor:
    """The reference in fp32 on the same (rounded) inputs."""
    floats = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in inputs.items()}  # fmt: skip
    return mla_prefill_ref(**floats)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_heads", [4, 20])
def test_mla_prefill_triton_matches_ref(dtype: torch.dtype, num_heads: int) -> None:
    from moeflow.kernels.triton.mla import mla_prefill_triton

    # A fresh prompt, chunks over earlier context, and a single new token.
    query_lens, context_lens = [9, 5, 20, 1], [9, 40, 53, 23]
    inputs = _prefill_inputs(10, query_lens, context_lens, num_heads, dtype)
    out = mla_prefill_triton(**inputs)
    assert out.shape == (sum(query_lens), num_heads, V_DIM) and out.dtype == dtype
    torch.testing.assert_close(out.float(), _prefill_ref(inputs), **TOL[dtype])


def test_mla_prefill_triton_device_lengths() -> None:
    """The ForwardBatch's device twins of the host lists give the same result."""
    from moeflow.kernels.triton.mla import mla_prefill_triton

    query_lens, context_lens = [3, 1, 16], [19, 1, 16]
    inputs = _prefill_inputs(20, query_lens, context_lens, 4, torch.float32)
    cu_seqlens_q = torch.tensor([0, 3, 4, 20], device=TRITON_DEVICE)
    lens = torch.tensor(context_lens, device=TRITON_DEVICE)
    out = mla_prefill_triton(**inputs, cu_seqlens_q=cu_seqlens_q, context_lens_gpu=lens)
    torch.testing.assert_close(out, _prefill_ref(inputs), **TOL[torch.float32])


@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="the CPU dispatch rule")
def test_mla_dispatch_routes_to_triton(
    triton_on_cpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moeflow.kernels.triton.mla as triton_mla

    calls: list[str] = []

    def counted(name: str) -> Callable[..., torch.Tensor]:
        fn = getattr(triton_mla, name)

        def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapper

    for name in ("mla_decode_triton", "mla_prefill_triton"):
        monkeypatch.setattr(triton_mla, name, counted(name))
    dtype = torch.float32
    inputs = _prefill_inputs(30, [4, 1], [4, 30], 4, dtype)
    out = mla_ops.mla_prefill(**inputs)
    torch.testing.assert_close(out, _prefill_ref(inputs), **TOL[dtype])

    context_lens = [3, 45]
    cache, block_tables = _latent_cache(31, context_lens, dtype)
    q_latent = _randn(32, 2, 4, LORA, dtype=dtype)
    q_rope = _randn(33, 2, 4, ROPE, dtype=dtype)
    lens = torch.tensor(context_lens)
    out = mla_ops.mla_decode(q_latent, q_rope, cache, block_tables, lens, 0.1)
    ref = mla_decode_ref(q_latent, q_rope, cache, block_tables, lens, 0.1)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    assert calls == ["mla_prefill_triton", "mla_decode_triton"]


def test_mla_layer_prefill_then_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLAAttention through the Triton MLA paths (and only those: the other ops keep their
    references) matches its reference run, over a prefill and the decode step after it."""
    from moeflow.context import ForwardBatch, forward_context
    from moeflow.layers.mla import MLAAttention

    torch.manual_seed(60)
    layer = MLAAttention(64, 4, None, LORA, NOPE, ROPE, V_DIM, 1e-6, 256, 1e4, None, "neox")
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.fill_(1.0)
    layer.allocate_cache(8, BLOCK, torch.float32, torch.device(TRITON_DEVICE))
    tables = [[5], [2, 7]]
    block_tables = torch.tensor([[5, -1], [2, 7]], device=TRITON_DEVICE)

    def batch(positions: list[list[int]], is_decode: bool) -> ForwardBatch:
        flat = [p for seq in positions for p in seq]
        slots = [
            t[p // BLOCK] * BLOCK + p % BLOCK
            for t, seq in zip(tables, positions, strict=True)
            for p in seq
        ]
        query_lens = [len(seq) for seq in positions]
        context_lens = [seq[-1] + 1 for seq in positions]
        cu = [0, query_lens[0], sum(query_lens)]
        dev = TRITON_DEVICE
        return ForwardBatch(
            input_ids=torch.zeros(len(flat), dtype=torch.int64, device=dev),
            positions=torch.tensor(flat, device=dev),
            slot_mapping=torch.tensor(slots, device=dev),
            block_tables=block_tables,
            context_lens=torch.tensor(context_lens, device=dev),
            cu_seqlens_q=torch.tensor(cu, device=dev),
            logits_indices=torch.tensor([cu[1] - 1, cu[2] - 1], device=dev),
            query_lens_cpu=query_lens,
            context_lens_cpu=context_lens,
            is_decode=is_decode,
        )

    steps = [
        batch([list(range(6)), list(range(20))], is_decode=False),
        batch([[6], [20]], is_decode=True),
    ]
    for fb in steps:
        positions = fb.positions
        hidden = _randn(61, positions.shape[0], 64, dtype=torch.float32)
        with forward_context(fb):
            ref = layer(positions, hidden)
            with monkeypatch.context() as patch:
                patch.setattr(mla_ops, "use_triton", lambda x: True)
                out = layer(positions, hidden)  # stores the same latents again
        torch.testing.assert_close(out, ref, **TOL[torch.float32])


# DeepSeek-V2-Lite: 16 heads, L 512, R 64, Dn 128, Dv 128, blocks of 16 tokens.
@pytest.mark.gpu
@pytest.mark.parametrize(
    "context_lens", [[4096], [1 + 64 * i for i in range(64)]], ids=["b1", "b64"]
)
def test_mla_decode_triton_deepseek_shapes(context_lens: list[int]) -> None:
    from moeflow.kernels.triton.mla import mla_decode_triton

    dtype, num_heads, lora, rope = torch.bfloat16, 16, 512, 64
    cache, block_tables = _latent_cache(40, context_lens, dtype, lora, rope, pad_blocks=3)
    batch = len(context_lens)
    q_latent = _randn(41, batch, num_heads, lora, dtype=dtype, std=0.5)
    q_rope = _randn(42, batch, num_heads, rope, dtype=dtype)
    lens = torch.tensor(context_lens, device=TRITON_DEVICE)
    scale = 192**-0.5
    out = mla_decode_triton(q_latent, q_rope, cache, block_tables, lens, scale)
    ref = _decode_ref(q_latent, q_rope, cache, block_tables, lens, scale)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("query_lens", "context_lens"), [([1024, 1024], [1024, 1024]), ([1024, 1], [2048, 700])]
)
def test_mla_prefill_triton_deepseek_shapes(query_lens: list[int], context_lens: list[int]) -> None:
    from moeflow.kernels.triton.mla import mla_prefill_triton

    inputs = _prefill_inputs(
        50, query_lens, context_lens, 16, torch.bfloat16, lora=512, rope=64, nope=128, v_dim=128
    )
    out = mla_prefill_triton(**inputs)
    torch.testing.assert_close(out.float(), _prefill_ref(inputs), rtol=2e-2, atol=2e-2)
