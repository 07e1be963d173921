"""The compiled CPU kernels (kernels/csrc/cpu_ops.cpp) against plain-torch references: quantised
GEMV/GEMM and dequantisation for every kept GGUF type on random blocks of real shapes (SmolLM2,
Qwen3-30B-A3B projections), and the fused decode ops (RMSNorm + residual, SiLU-and-mul, NeoX
rotary, paged decode attention with the K/V store)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeflow.kernels import cpu_ext
from moeflow.kernels.attention import paged_decode_attention_ref, store_kv
from moeflow.kernels.quant_gemm import KEPT_TYPES, dequantize_ref, qlinear, qlinear_ref
from moeflow.kernels.rmsnorm import rms_norm_ref
from moeflow.weights.ggml_quants import GGML_QUANT_SIZES, GGMLType
from tests.helpers.gguf import GGUF_F16_FIELDS

ops = cpu_ext.ops()
pytestmark = pytest.mark.skipif(ops is None, reason=f"CPU kernels: {cpu_ext.unavailable_reason()}")


_F16_FIELDS = {t: GGUF_F16_FIELDS[GGMLType(t)] for t in KEPT_TYPES}


def random_blocks(qtype: GGMLType, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """[n, row_bytes] of random quant bytes whose fp16 scales are finite and small."""
    g = torch.Generator().manual_seed(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    b = torch.randint(0, 256, (n, k // block, size), dtype=torch.uint8, generator=g)
    for off in _F16_FIELDS[qtype]:
        scale = (torch.rand(n, k // block, generator=g) * 0.02 + 1e-3).half()
        b[:, :, off : off + 2] = scale.view(torch.uint8).view(n, k // block, 2)
    return b.reshape(n, -1).contiguous()


@pytest.mark.parametrize("qtype", sorted(KEPT_TYPES), ids=lambda t: GGMLType(t).name)
@pytest.mark.parametrize(
    ("n", "k"),
    # SmolLM2 qkv and down; a Qwen3-30B-A3B q slice; rows that are not whole tiles of 4
    [(960, 576), (576, 1536), (256, 2048), (130, 512)],
    ids=["smollm2-qkv", "smollm2-down", "qwen3-q", "odd-rows"],
)
@pytest.mark.parametrize("m", [1, 3, 9, 16])
def test_qgemm_matches_dequantise_then_matmul(qtype: int, n: int, k: int, m: int) -> None:
    if k % GGML_QUANT_SIZES[GGMLType(qtype)][0]:
        pytest.skip("K-quant rows are whole 256-weight super-blocks (llama.cpp picks another type)")
    w = random_blocks(GGMLType(qtype), n, k, seed=n + k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    ref = F.linear(x.double(), dequantize_ref(w, qtype, k).double())
    out = ops.qgemm(x, w, qtype)
    # fp32 products summed in another order: errors of a few ulps of the row's magnitude
    scale = x.abs().double() @ dequantize_ref(w, qtype, k).abs().double().T
    assert ((out.double() - ref).abs() / scale).max() < 1e-5
    # each row's result does not depend on the other rows of the batch (batched == solo), though
    # 8 rows and more take weight rows 4 at a time
    solo = torch.cat([ops.qgemm(x[i : i + 1].contiguous(), w, qtype) for i in range(m)])
    assert torch.equal(solo, out)


@pytest.mark.parametrize("qtype", sorted(KEPT_TYPES), ids=lambda t: GGMLType(t).name)
def test_int8_activation_gemv_is_close(qtype: int) -> None:
    """The opt-in llama.cpp-style path (MOEFLOW_CPU_INT8): int8 activations, ~1% error."""
    w = random_blocks(GGMLType(qtype), 192, 512, seed=3)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(4))
    ref = qlinear_ref(x, w, qtype)
    out = ops.qgemm_i8(x, w, qtype)
    assert ((out - ref).abs().max() / ref.abs().max()) < 3e-2


@pytest.mark.parametrize("qtype", sorted(KEPT_TYPES), ids=lambda t: GGMLType(t).name)
def test_dequantize_and_row_gather_are_exact(qtype: int) -> None:
    w = random_blocks(GGMLType(qtype), 64, 512, seed=5)
    ref = dequantize_ref(w, qtype, 512)
    assert torch.equal(ops.dequantize(w, qtype, 512), ref)
    rows = torch.tensor([3, 0, 63, 3])
    assert torch.equal(ops.dequantize(w, qtype, 512, rows), ref[rows])


def test_qlinear_prefill_path_and_bias() -> None:
    qtype = int(GGMLType.Q4_1)
    w = random_blocks(GGMLType.Q4_1, 96, 256, seed=6)
    bias = torch.randn(96)
    for m in (1, 40):  # GEMV path, dequantise + GEMM path
        x = torch.randn(2, m, 256)  # leading dims are kept
        out = qlinear(x, w, qtype, bias)
        assert out.shape == (2, m, 96)
        torch.testing.assert_close(out, qlinear_ref(x, w, qtype, bias), rtol=1e-5, atol=1e-5)


def test_kernels_reject_bad_input() -> None:
    w = random_blocks(GGMLType.Q4_0, 8, 64)
    with pytest.raises(RuntimeError, match="bytes"):
        ops.qgemm(torch.randn(1, 96), w, int(GGMLType.Q4_0))  # wrong in_features
    with pytest.raises(RuntimeError, match="unsupported ggml type"):
        ops.qgemm(torch.randn(1, 64), w, int(GGMLType.Q2_K))
    with pytest.raises(RuntimeError, match="out of range"):
        ops.dequantize(w, int(GGMLType.Q4_0), 64, torch.tensor([8]))


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(with_residual: bool) -> None:
    x, res, w = torch.randn(5, 576), torch.randn(5, 576), torch.randn(576)
    ref_out, ref_res = rms_norm_ref(x, res if with_residual else None, w, 1e-5)
    out, new_res = ops.rms_norm(x, res.clone() if with_residual else None, w, 1e-5)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_res, ref_res)


def test_silu_mul() -> None:
    x = torch.randn(3, 2 * 1536) * 6  # wide range: exp's tails
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_mul(x), F.silu(gate) * up, rtol=1e-6, atol=1e-6)


def test_rotary_neox_in_place_on_qkv_views() -> None:
    t, h, hkv, d, rot = 4, 9, 3, 64, 32  # partial rotary: the last 32 dims stay
    qkv = torch.randn(t, (h + 2 * hkv) * d)
    q = qkv[:, : h * d].view(t, h, d)
    k = qkv[:, h * d : (h + hkv) * d].view(t, hkv, d)
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    freqs = torch.arange(64).float()[:, None] * inv[None, :]
    table = torch.cat((freqs, freqs), -1)
    cos, sin = table.cos(), table.sin()
    pos = torch.tensor([0, 5, 17, 63])

    def ref(x: torch.Tensor) -> torch.Tensor:
        c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
        r, rest = x[..., :rot], x[..., rot:]
        x1, x2 = r.chunk(2, -1)
        return torch.cat((r * c + torch.cat((-x2, x1), -1) * s, rest), -1)

    want_q, want_k, v_before = ref(q.clone()), ref(k.clone()), qkv[:, (h + hkv) * d :].clone()
    ops.rotary_neox_(q, k, pos, cos, sin)
    torch.testing.assert_close(q, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, want_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv[:, (h + hkv) * d :], v_before)  # v untouched


# Contexts over 128 keys are split into several tasks and merged: window 200 starts mid-block
# and mid-split.
@pytest.mark.parametrize("window", [0, 20, 200])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_attention_matches_reference(window: int, head_dim: int) -> None:
    torch.manual_seed(0)
    b, h, hkv, s, n = 3, 8, 2, 16, 40
    lens = torch.tensor([1, 37, 300 // 16 * 16 + 5])
    tables = torch.full((b, 20), -1, dtype=torch.int64)
    perm = torch.randperm(n)
    used = 0
    for i, ln in enumerate(lens.tolist()):
        nb = -(-ln // s)
        tables[i, :nb] = perm[used : used + nb]
        used += nb
    kc, vc = torch.randn(n, s, hkv, head_dim), torch.randn(n, s, hkv, head_dim)
    q = torch.randn(b, h, head_dim)
    k, v = torch.randn(b, hkv, head_dim), torch.randn(b, hkv, head_dim)
    last = lens - 1
    slots = tables.gather(1, (last // s)[:, None])[:, 0] * s + last % s
    ref_k, ref_v = kc.clone(), vc.clone()
    store_kv(k, v, ref_k, ref_v, slots)
    win = window or None
    ref = paged_decode_attention_ref(q, ref_k, ref_v, tables, lens, 0.125, win)
    out = ops.decode_attention(q, k, v, kc, vc, slots, tables, lens, 0.125, window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)  # the step's K/V were stored
