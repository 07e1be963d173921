"""The compiled CPU quantised kernels (kernels/csrc/cpu_ops.cpp, kernels/quant_gemm.py) against
plain-torch references: GEMV/GEMM and dequantisation for every kept GGUF type on random blocks of
real shapes (SmolLM2, Qwen3-30B-A3B projections), the int8-activation GEMV, int8 linears whose rows
do not depend on the batch, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeflow import env
from moeflow.kernels import cpu_ext
from moeflow.kernels.quant_gemm import (
    KEPT_TYPES,
    REFINE_TOP,
    dequantize_ref,
    qlinear,
    qlinear_logits,
    qlinear_ref,
)
from moeflow.weights.ggml_quants import GGML_QUANT_SIZES, GGMLType
from tests.helpers.gguf import random_blocks

ops = cpu_ext.ops()
pytestmark = pytest.mark.skipif(ops is None, reason=f"CPU kernels: {cpu_ext.unavailable_reason()}")


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
    """The llama.cpp-style path (MOEFLOW_CPU_INT8, the default outside tests): int8
    activations, ~1% error."""
    w = random_blocks(GGMLType(qtype), 192, 512, seed=3)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(4))
    ref = qlinear_ref(x, w, qtype)
    out = ops.qgemm_i8(x, w, qtype)
    assert ((out - ref).abs().max() / ref.abs().max()) < 3e-2


@pytest.mark.parametrize(
    "qtype", [GGMLType.Q8_0, GGMLType.Q4_1, GGMLType.Q6_K], ids=lambda t: t.name
)
def test_int8_logits_refine_the_best_exactly(
    qtype: GGMLType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LM head under int8 activations: every row's REFINE_TOP best logits are the exact
    path's (fp32 activations), bit for bit; the others are the int8 GEMV's."""
    w = random_blocks(qtype, 700, 256, seed=7)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(8))
    exact, int8 = ops.qgemm(x, w, int(qtype)), ops.qgemm_i8(x, w, int(qtype))
    monkeypatch.setattr(env, "MOEFLOW_CPU_INT8", True)
    out = qlinear_logits(x, w, int(qtype))
    for s in range(3):
        top = int8[s].topk(REFINE_TOP).indices
        rest = torch.ones(700, dtype=torch.bool)
        rest[top] = False
        assert torch.equal(out[s, top], exact[s, top])
        assert torch.equal(out[s, rest], int8[s, rest])
    assert not torch.equal(exact, int8)  # the refinement changed something
    monkeypatch.setattr(env, "MOEFLOW_CPU_INT8", False)
    assert torch.equal(qlinear_logits(x, w, int(qtype)), exact)


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


@pytest.mark.parametrize(
    "qtype",
    [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1]
    + [GGMLType.Q8_0, GGMLType.IQ4_NL],
    ids=lambda t: t.name,
)
def test_int8_qlinear_rows_do_not_depend_on_the_batch(
    qtype: GGMLType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With int8 activations a prefill's rows are the decode GEMV's, bit for bit, at any batch
    size (prefill chunking or a prefix-cache hit cannot change a row). 104 weight rows: whole
    tiles of 16 and 8 left over; 1-3 rows take the GEMVs (3: one 3-row tile with AVX-512), 40 the
    GEMMs; 4 rows the K-quants' GEMM (Q6_K's GEMV); 7 rows its tiles of 4, 2 and 1 (Q4_K, Q6_K: 16
    weight rows a vector with AVX-512)."""
    monkeypatch.setattr(env, "MOEFLOW_CPU_INT8", True)
    w = random_blocks(qtype, 104, 512, seed=8)
    bias = torch.randn(104)
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(9))
    out = qlinear(x, w, int(qtype), bias)
    solo = torch.cat([qlinear(x[i : i + 1], w, int(qtype), bias) for i in range(40)])
    assert torch.equal(out, solo)
    for m in (2, 3, 4, 7):
        assert torch.equal(qlinear(x[:m], w, int(qtype), bias), out[:m])
    assert torch.equal(qlinear(x.view(2, 20, 512), w, int(qtype), bias), out.view(2, 20, 104))
    ref = qlinear_ref(x, w, int(qtype), bias)
    assert ((out - ref).abs().max() / ref.abs().max()) < 3e-2


def test_kernels_reject_bad_input() -> None:
    w = random_blocks(GGMLType.Q4_0, 8, 64)
    with pytest.raises(RuntimeError, match="bytes"):
        ops.qgemm(torch.randn(1, 96), w, int(GGMLType.Q4_0))  # wrong in_features
    with pytest.raises(RuntimeError, match="unsupported ggml type"):
        ops.qgemm(torch.randn(1, 64), w, int(GGMLType.Q8_1))  # an activation type only
    with pytest.raises(RuntimeError, match="out of range"):
        ops.dequantize(w, int(GGMLType.Q4_0), 64, torch.tensor([8]))
