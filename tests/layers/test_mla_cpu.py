"""MLAAttention's compiled CPU decode (csrc/mla.h MlaAttention, taken when q / q_a / q_b and kv_a
are kept quantised): its output and the latent rows it writes are the torch path's (the same
quantised GEMVs, then torch's norms, rope, einsums and softmax), for q with and without LoRA,
every rope layout, YaRN's scale and the biases, over a scattered paged cache; each row of a batch
decodes as it does alone. With kv_b from a GGUF file's quantised halves (k_b, v_b) the compiled
decode reads those; the torch path reads the float weight they fill."""

from __future__ import annotations

import pytest
import torch

from moeflow import env
from moeflow.context import ForwardBatch, forward_context
from moeflow.errors import ModelFormatError
from moeflow.kernels import cpu_ext
from moeflow.layers.mla import MLAAttention
from moeflow.layers.norm import RMSNorm
from moeflow.weights.ggml_quants import QuantizedTensor, quantize

pytestmark = pytest.mark.skipif(
    not cpu_ext.available(), reason=f"CPU kernels: {cpu_ext.unavailable_reason()}"
)

HIDDEN, HEADS, ROPE, BLOCK = 64, 4, 8, 4
DIMS = (32, 16, 16)  # kv_lora_rank, nope, v_dim
# whole blocks for the quantised halves: k_b's rows are `nope` long, v_b's kv_lora_rank (Q4_K:
# 256)
HALVES_DIMS = (256, 32, 16)
YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}


def _layer(
    q_lora: int | None, layout: str, bias: bool, seed: int, dims: tuple[int, int, int] = DIMS
) -> MLAAttention:
    """dims: (kv_lora_rank, nope, v_dim)."""
    torch.manual_seed(seed)
    scaling = YARN if layout != "deinterleave" else None
    lora, nope, v_dim = dims
    layer = MLAAttention(
        HIDDEN, HEADS, q_lora, lora, nope, ROPE, v_dim, 1e-6, 128, 1e4, scaling, layout, bias
    )
    with torch.no_grad():
        for module in layer.modules():
            for p in module.parameters(recurse=False):
                if isinstance(module, RMSNorm):
                    p.uniform_(0.5, 1.5)
                else:
                    p.normal_(0, 0.2)
    projections = (layer.q_proj, layer.q_a_proj, layer.q_b_proj, layer.kv_a_proj_with_mqa)
    for proj in (*projections, layer.o_proj):
        if proj is not None:
            proj.set_quantized(quantize(proj.weight.data, "q8_0"))
    layer.allocate_cache(16, BLOCK, torch.float32, torch.device("cpu"))
    return layer


def _decode_batch(tables: list[list[int]], context_lens: list[int]) -> ForwardBatch:
    """One new token per sequence, at position context_len - 1."""
    width = max(len(t) for t in tables)
    slots = [
        t[(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK
        for t, n in zip(tables, context_lens, strict=True)
    ]
    b = len(tables)
    return ForwardBatch(
        input_ids=torch.zeros(b, dtype=torch.int64),
        positions=torch.tensor([n - 1 for n in context_lens]),
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor([t + [-1] * (width - len(t)) for t in tables]),
        context_lens=torch.tensor(context_lens),
        cu_seqlens_q=torch.arange(b + 1),
        logits_indices=torch.arange(b),
        query_lens_cpu=[1] * b,
        context_lens_cpu=list(context_lens),
        is_decode=True,
    )


@pytest.mark.parametrize(
    ("q_lora", "layout", "bias"),
    [
        (None, "interleaved", False),  # DeepSeek-V2(-Lite): q_proj, YaRN
        (32, "deinterleave", True),  # V3: q LoRA (attention_bias on q_a / kv_a)
        (64, "neox", False),  # V3 without rope_interleave, YaRN
    ],
)
def test_compiled_decode_matches_torch_path(
    q_lora: int | None, layout: str, bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(env, "MOEFLOW_CPU_INT8", False)
    layer = _layer(q_lora, layout, bias, seed=5)
    assert layer.cpu_layer(cpu_ext.ops()) is not None
    g = torch.Generator().manual_seed(1)
    layer.latent_cache.normal_(generator=g)  # earlier tokens' latents (and stale slots)
    tables = [[9], [3, 12, 0], [7, 1]]
    context_lens = [2, 11, 8]
    fb = _decode_batch(tables, context_lens)
    hidden = torch.randn(3, HIDDEN, generator=g)
    start = layer.latent_cache.clone()

    def run(compiled: bool, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        layer.latent_cache.copy_(start)
        one = _decode_batch([tables[r] for r in rows], [context_lens[r] for r in rows])
        with monkeypatch.context() as patch, forward_context(one):
            if not compiled:
                patch.setattr(layer, "_cpu_decode", lambda *a: None)
            out = layer(one.positions, hidden[rows])  # [B, E]
        return out, layer.latent_cache.clone()

    assert layer._cpu_decode(fb.is_decode, hidden) is layer.cpu_layer(cpu_ext.ops())
    ref_out, ref_cache = run(False, [0, 1, 2])
    out, cache = run(True, [0, 1, 2])
    torch.testing.assert_close(cache, ref_cache, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    for r in range(3):  # batched rows == solo rows, bit for bit
        solo, _ = run(True, [r])
        assert torch.equal(solo[0], out[r])


def _set_halves(layer: MLAAttention, k_kind: str, v_kind: str) -> None:
    """kv_b_proj filled from quantised halves, as a GGUF file's attn_k_b / attn_v_b load."""
    kv_b = layer.kv_b_proj
    w = kv_b.weight.data.view(HEADS, kv_b.nope + kv_b.v_dim, -1)  # [H, Dn + Dv, L]
    k_b = w[:, : kv_b.nope].transpose(1, 2).reshape(-1, kv_b.nope)  # [H L, Dn]
    v_b = w[:, kv_b.nope :].reshape(-1, w.shape[-1])  # [H Dv, L]
    for shard, rows, kind in (("k_b", k_b, k_kind), ("v_b", v_b, v_kind)):
        q = quantize(rows.contiguous(), kind)
        shape = (HEADS, rows.shape[0] // HEADS, rows.shape[1])
        data = q.data.view(HEADS, shape[1], -1)
        kv_b.load("weight", QuantizedTensor(data, q.qtype, shape), shard)


@pytest.mark.parametrize(("k_kind", "v_kind"), [("q4_0", "q4_k"), ("q8_0", "q8_0")])
@pytest.mark.parametrize("int8", [False, True], ids=["exact", "int8"])
def test_compiled_decode_reads_the_quantised_halves(
    k_kind: str, v_kind: str, int8: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(env, "MOEFLOW_CPU_INT8", int8)
    layer = _layer(None, "interleaved", False, seed=7, dims=HALVES_DIMS)
    _set_halves(layer, k_kind, v_kind)
    halves = layer.kv_b_proj.quantized_halves()
    assert halves is not None and [h.qtype for h in halves] == [
        int(quantize(torch.zeros(1, 256), k).qtype) for k in (k_kind, v_kind)
    ]
    g = torch.Generator().manual_seed(2)
    layer.latent_cache.normal_(generator=g)
    tables, context_lens = [[9], [3, 12, 0], [7, 1], [5, 6]], [2, 11, 8, 5]
    hidden = torch.randn(4, HIDDEN, generator=g)
    start = layer.latent_cache.clone()

    def run(compiled: bool, rows: list[int]) -> torch.Tensor:
        layer.latent_cache.copy_(start)
        one = _decode_batch([tables[r] for r in rows], [context_lens[r] for r in rows])
        with monkeypatch.context() as patch, forward_context(one):
            if not compiled:
                patch.setattr(layer, "_cpu_decode", lambda *a: None)
            return layer(one.positions, hidden[rows])  # [B, E]

    ref = run(False, [0, 1, 2, 3])  # torch: the float weight the halves filled
    out = run(True, [0, 1, 2, 3])
    if int8:  # the GEMVs' activations rounded to int8 (q_nope, o_lat: llama.cpp's Q8)
        err = (out - ref).norm() / ref.norm()
        assert err < 0.02, err
    else:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for r in range(4):  # batched rows == solo rows, bit for bit (4 rows: the GEMM; 1: the GEMV)
        assert torch.equal(run(True, [r])[0], out[r])


def test_kv_b_from_float_halves_keeps_no_blocks() -> None:
    """Float halves (or kv_b whole after quantised halves) leave the float weight to read."""
    layer = _layer(None, "interleaved", False, seed=3, dims=HALVES_DIMS)
    _set_halves(layer, "q8_0", "q4_k")
    assert layer.kv_b_proj.quantized_halves() is not None
    kv_b = layer.kv_b_proj
    whole = kv_b.weight.data.clone()
    kv_b.load("weight", whole.view(HEADS, -1, whole.shape[-1])[:, kv_b.nope :].clone(), "v_b")
    assert kv_b.quantized_halves() is None
    assert torch.equal(kv_b.weight.data, whole)
    cpu = layer.cpu_layer(cpu_ext.ops())
    assert cpu is not None  # on the float weight


def test_kv_b_halves_of_the_wrong_shape_are_refused() -> None:
    layer = _layer(None, "interleaved", False, seed=3, dims=HALVES_DIMS)
    lora, nope, _ = HALVES_DIMS
    with pytest.raises(ModelFormatError, match=r"attn_k_b has shape \(4, 32, 256\)"):
        layer.kv_b_proj.load("weight", torch.zeros(HEADS, nope, lora), "k_b")  # not transposed
    with pytest.raises(ModelFormatError, match="no shard"):
        layer.kv_b_proj.load("weight", torch.zeros(HEADS, lora, nope), "q_b")
