"""MLAAttention's compiled CPU decode (csrc/mla.h MlaAttention, taken when q / q_a / q_b and kv_a
are kept quantised): its output and the latent rows it writes are the torch path's (the same
quantised GEMVs, then torch's norms, rope, einsums and softmax), for q with and without LoRA,
every rope layout, YaRN's scale and the biases, over a scattered paged cache; each row of a batch
decodes as it does alone."""

from __future__ import annotations

import pytest
import torch

from moeflow import env
from moeflow.context import ForwardBatch, forward_context
from moeflow.kernels import cpu_ext
from moeflow.layers.mla import MLAAttention
from moeflow.layers.norm import RMSNorm
from moeflow.weights.ggml_quants import quantize

pytestmark = pytest.mark.skipif(
    not cpu_ext.available(), reason=f"CPU kernels: {cpu_ext.unavailable_reason()}"
)

HIDDEN, HEADS, LORA, NOPE, ROPE, V_DIM, BLOCK = 64, 4, 32, 16, 8, 16, 4
YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}


def _layer(q_lora: int | None, layout: str, bias: bool, seed: int) -> MLAAttention:
    torch.manual_seed(seed)
    scaling = YARN if layout != "deinterleave" else None
    layer = MLAAttention(
        HIDDEN, HEADS, q_lora, LORA, NOPE, ROPE, V_DIM, 1e-6, 128, 1e4, scaling, layout, bias
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
