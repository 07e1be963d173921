"""The int8 activation path and the CPU MoE layer (kernels/csrc/moe.h) against plain-torch
references: products over the kernel's own int8 activations equal a float64 matmul of the
dequantised weights and activations up to fp32 rounding, and so do products over llama.cpp's
activation quantisation emulated in plain torch, on blocks quantised from gaussian weights; the
grouped expert kernel equals `fused_moe_ref` on the dequantised experts (exactly up to rounding
on the fp32 path, within the activation quantisation's error on the int8 path), including
experts with no tokens, one expert taking every token and tied routing, and each token's output
does not depend on its batch; the compiled router chooses `select_experts`' experts with its
weights, for every family's routing. Every test runs on each instruction set the machine has
(kernels/cpu_ext.py ISAS), AVX2 always among them, and the builds agree bit for bit."""

from __future__ import annotations

from typing import Any

import gguf
import pytest
import torch

from moeflow.kernels import cpu_ext
from moeflow.kernels.fused_moe import fused_moe_ref, select_experts
from moeflow.kernels.quant_gemm import KEPT_TYPES, dequantize_ref
from moeflow.weights.ggml_quants import GGML_QUANT_SIZES, GGMLType, quantize
from tests.helpers.gguf import random_blocks

pytestmark = pytest.mark.skipif(
    not cpu_ext.available(), reason=f"CPU kernels: {cpu_ext.unavailable_reason()}"
)


@pytest.fixture
def ops(isa_ops: Any) -> Any:
    """The kernels built for each instruction set the machine has (conftest.py isa_ops)."""
    return isa_ops


_K_QUANTS = sorted(t for t in KEPT_TYPES if GGML_QUANT_SIZES[GGMLType(t)][0] == 256)


def dequantized_acts(ops: Any, x: torch.Tensor, block: int) -> torch.Tensor:
    """The activations the int8 path multiplies, as float64 (q * d per block)."""
    q, d, _ = ops.quantize_acts(x, block)
    m, k = x.shape
    return (q.double().view(m, k // block, block) * d.double()[..., None]).view(m, k)


@pytest.mark.parametrize("block", [32, 256])
def test_activation_quantisation(ops: Any, block: int) -> None:
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(1)) * 4
    q, d, bsums = ops.quantize_acts(x, block)
    blocks = x.view(3, -1, block)
    assert torch.allclose(d, blocks.abs().amax(-1) / 127)
    assert q.abs().max() <= 127
    # each value is its nearest multiple of d (ties either way)
    assert (
        (dequantized_acts(ops, x, block) - x.double()).abs()
        <= d.double().repeat_interleave(block, 1) / 2 + 1e-6
    ).all()
    if block == 256:
        assert torch.equal(bsums, q.view(3, -1, 16).sum(-1).to(torch.int16))


@pytest.mark.parametrize("qtype", sorted(KEPT_TYPES), ids=lambda t: GGMLType(t).name)
@pytest.mark.parametrize("m", [1, 3, 6, 17])
def test_int8_gemv_is_exact_over_its_int8_activations(ops: Any, qtype: int, m: int) -> None:
    """The K-quants read Q8_K activations (one scale per 256), the other types int8 activations
    per 32; a min term too takes the quantised activations (llama.cpp's Q8_1 sum), so the
    result is the dequantised weights times the dequantised activations."""
    n, k = 96, 1024
    w = random_blocks(GGMLType(qtype), n, k, seed=qtype + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    block = 256 if qtype in _K_QUANTS else 32
    xa = dequantized_acts(ops, x, block)
    wd = dequantize_ref(w, qtype, k).double()
    ref = xa @ wd.T
    out = ops.qgemm_i8(x, w, qtype)
    scale = xa.abs() @ wd.abs().T
    assert ((out.double() - ref).abs() / scale).max() < 1e-5
    solo = torch.cat([ops.qgemm_i8(x[i : i + 1].contiguous(), w, qtype) for i in range(m)])
    assert torch.equal(solo, out)


@pytest.mark.parametrize("qtype", sorted(KEPT_TYPES), ids=lambda t: GGMLType(t).name)
@pytest.mark.parametrize("m", [1, 3, 17, 40, 130, 300])
def test_int8_gemm_rows_are_the_gemv_rows(ops: Any, qtype: int, m: int) -> None:
    """Many activation rows take the int8 GEMM (weight rows decoded once, 4 at a time for the
    256-weight types, 8 or 16 for the 32-weight ones; activation rows 256 at a time) and still
    give each row the one-row GEMV's result bit for bit: 70 weight rows leave a remainder, 300
    activation rows two passes."""
    n, k = 70, 512
    w = random_blocks(GGMLType(qtype), n, k, seed=qtype + 7 * m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
    out = ops.qgemm_i8(x, w, qtype)
    solo = torch.cat([ops.qgemm_i8(x[i : i + 1].contiguous(), w, qtype) for i in range(m)])
    assert torch.equal(solo, out)
    # nor on its neighbours: rows 5..61 start mid-tile and leave a tail (other kernels for a row)
    assert torch.equal(ops.qgemm_i8(x, w[5:62].contiguous(), qtype), out[:, 5:62])


def llama_cpp_q8(x: torch.Tensor, block: int) -> torch.Tensor:
    """Plain-torch emulation of llama.cpp's activation quantisation (ggml quantize_row_q8_0 /
    q8_1 per 32 values, q8_K per 256): d = max|x| / 127, q = round(x / d), as float64 q * d.
    (ggml stores Q8_0/Q8_1's d in fp16; moeflow keeps it in fp32, the one deliberate
    difference.)"""
    m, k = x.shape
    blocks = x.double().view(m, k // block, block)
    d = (blocks.abs().amax(-1, keepdim=True) / 127).float().double()  # fp32, as the kernel
    q = torch.where(d > 0, torch.round(blocks / d), torch.zeros_like(blocks))
    return (q * d).view(m, k)


def real_blocks(qtype: GGMLType, n: int, k: int, seed: int) -> torch.Tensor:
    """Blocks quantised from gaussian weights (as a real file's: a block's min ~ -8 d, not the
    positive random fp16 of random_blocks), by the gguf package's quantisers (moeflow's own for
    Q4_K); random blocks for Q6_K, whose -32 offset is already centred."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if qtype == GGMLType.Q6_K:
        return random_blocks(qtype, n, k, seed=seed)
    if qtype == GGMLType.Q4_K:
        return quantize(w, "q4_k").data
    raw = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType(int(qtype)))
    return torch.from_numpy(raw.copy())


@pytest.mark.parametrize(
    "qtype",
    [
        GGMLType.Q4_0,
        GGMLType.Q4_1,
        GGMLType.Q5_0,
        GGMLType.Q5_1,
        GGMLType.Q8_0,
        GGMLType.Q4_K,
        GGMLType.Q6_K,
    ],
    ids=lambda t: t.name,
)
@pytest.mark.parametrize(("n", "k"), [(960, 576), (576, 1536), (64, 2048)])
def test_int8_gemv_is_llama_cpp_scheme(ops: Any, qtype: GGMLType, n: int, k: int) -> None:
    """The int8 GEMV on blocks of real statistics equals llama.cpp's scheme emulated in plain
    torch (the dequantised weights times the activations quantised as ggml does) up to fp32
    rounding, activation outliers included. (Taking the exact float sum(x) for a min term, as
    this path once did, misses it by ~1e-3 of the row's magnitude on Q4_1 and Q4_0.)"""
    block = 256 if qtype in _K_QUANTS else 32
    if k % block:
        pytest.skip("K-quant rows are whole 256-weight super-blocks")
    w = real_blocks(qtype, n, k, seed=n + k)
    wd = dequantize_ref(w, int(qtype), k).double()
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(k)) * 2
    x[:, 7] = 60.0  # an outlier channel, as LLM activations have
    xa = llama_cpp_q8(x, block)
    ref = xa @ wd.T
    out = ops.qgemm_i8(x, w, int(qtype)).double()
    scale = xa.abs() @ wd.abs().T
    assert ((out - ref).abs() / scale).max() < 1e-5


def _experts(qtype: GGMLType, e: int, n: int, k: int, seed: int) -> torch.Tensor:
    return torch.stack([random_blocks(qtype, n, k, seed=seed + i) for i in range(e)])


def _dequantized(w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    return torch.stack([dequantize_ref(w[i], qtype, k) for i in range(w.shape[0])])


# (gate/up type, down type): Q4_K_M's pairs, 32-weight block types, the IQ4 codebook types
_TYPE_PAIRS = [
    (GGMLType.Q4_K, GGMLType.Q6_K),
    (GGMLType.Q5_K, GGMLType.Q4_K),
    (GGMLType.Q8_0, GGMLType.Q8_0),
    (GGMLType.Q4_0, GGMLType.Q5_1),
    (GGMLType.IQ4_XS, GGMLType.IQ4_NL),
]


def _routing(case: str, t: int, e: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(t + k)
    if case == "random":
        return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    if case == "one-expert-all-tokens":  # expert 3 in every token's first slot
        rest = torch.stack([torch.randperm(e - 1, generator=g)[: k - 1] for _ in range(t)])
        return torch.cat([torch.full((t, 1), 3), rest + (rest >= 3).long()], 1)
    assert case == "few-experts"  # most experts get no token
    return torch.stack([torch.randperm(k, generator=g) for _ in range(t)])


@pytest.mark.parametrize(("up_type", "down_type"), _TYPE_PAIRS, ids=lambda t: t.name)
@pytest.mark.parametrize("case", ["random", "one-expert-all-tokens", "few-experts"])
@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_moe_experts_matches_reference(
    ops: Any, up_type: GGMLType, down_type: GGMLType, case: str, int8: bool
) -> None:
    e, h, i, k, t = 8, 512, 256, 3, 20
    gate = _experts(up_type, e, i, h, 0)
    up = _experts(up_type, e, i, h, 100)
    down = _experts(down_type, e, h, i, 200)
    w13 = torch.cat([_dequantized(gate, up_type, h), _dequantized(up, up_type, h)], 1)
    w2 = _dequantized(down, down_type, i)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(7))
    ids = _routing(case, t, e, k)
    weights = torch.rand(t, k, generator=torch.Generator().manual_seed(8))
    if int8:  # the int8 GEMVs (tested above) pair by pair, the C++ SiLU-and-mul between
        ref = _int8_pairs_ref(ops, x, gate, up, down, up_type, down_type, ids, weights)
    else:
        ref = fused_moe_ref(x, w13, w2, weights, ids).double()
    out = ops.moe_experts(x, gate, up_type, up, up_type, down, down_type, ids, weights, int8)
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
    # batched rows == solo rows, bit for bit. Up to 16 tokens per touched expert each thread
    # takes one share of the rows (moe.h static_shares), beyond it tasks one by one: the 20
    # tokens of "few-experts" (3 experts) run by tasks, their parts by shares.
    for rows in (slice(0, 1), slice(t - 1, t), slice(3, 8)):
        part = ops.moe_experts(
            x[rows].contiguous(),
            gate,
            up_type,
            up,
            up_type,
            down,
            down_type,
            ids[rows].contiguous(),
            weights[rows].contiguous(),
            int8,
        )
        assert torch.equal(part, out[rows])


def _int8_pairs_ref(
    ops: Any,
    x: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    up_type: int,
    down_type: int,
    ids: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = x[t : t + 1].contiguous()
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            g = ops.qgemm_i8(xt, gate[e], up_type)
            u = ops.qgemm_i8(xt, up[e], up_type)
            y = ops.qgemm_i8(ops.silu_mul(torch.cat([g, u], 1)), down[e], down_type)
            out[t] += weights[t, k].double() * y[0].double()
    return out


def test_moe_experts_tied_scores_and_gate_up_views(ops: Any) -> None:
    """Gate and up as two views of one stacked [E, 2I, ..] tensor; equal router weights."""
    qt = GGMLType.Q4_K
    e, h, i, k, t = 4, 256, 256, 2, 5
    w13 = _experts(qt, e, 2 * i, h, 0)
    down = _experts(qt, e, h, i, 50)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(1))
    ids = _routing("random", t, e, k)
    weights = torch.full((t, k), 0.5)
    ref = fused_moe_ref(
        x, _dequantized(w13, qt, h), _dequantized(down, qt, i), weights, ids
    ).double()
    out = ops.moe_experts(x, w13[:, :i], qt, w13[:, i:], qt, down, qt, ids, weights, False)
    assert ((out.double() - ref).abs().max() / ref.abs().max()) < 1e-5


def test_moe_experts_rejects_bad_ids_and_shapes(ops: Any) -> None:
    qt = GGMLType.Q8_0
    gate = _experts(qt, 2, 64, 64, 0)
    down = _experts(qt, 2, 64, 64, 9)
    x = torch.randn(1, 64)
    w = torch.ones(1, 1)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.moe_experts(x, gate, qt, gate, qt, down, qt, torch.tensor([[2]]), w, False)
    with pytest.raises(RuntimeError, match="down"):
        ops.moe_experts(x, gate, qt, gate, qt, gate[:, :32], qt, torch.tensor([[0]]), w, False)


def test_isa_builds_agree_bit_for_bit() -> None:
    """Every build this CPU runs gives the AVX2 build's results, bit for bit."""
    builds = [m for m in (cpu_ext.ops_for(isa) for isa in cpu_ext.ISAS) if m is not None]
    if len(builds) < 2:
        pytest.skip("this CPU runs one build only")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 512, generator=g)
    results = []
    for module in builds:
        out = [
            module.qgemm_i8(x, random_blocks(GGMLType(t), 64, 512, seed=t), t) for t in KEPT_TYPES
        ]
        # the GEMVs (1-3 activation rows) over 61 weight rows: whole tiles of 16, then 8, then 5
        out += [
            module.qgemm_i8(x[:m].contiguous(), random_blocks(GGMLType(t), 61, 512, seed=t), t)
            for t in KEPT_TYPES
            for m in (1, 2, 3)
        ]
        out += [module.qgemm(x, random_blocks(GGMLType(t), 64, 512, seed=t), t) for t in KEPT_TYPES]
        gate = _experts(GGMLType.Q4_K, 4, 256, 512, 0)
        down = _experts(GGMLType.Q6_K, 4, 512, 256, 9)
        ids = _routing("random", 5, 4, 2)
        for int8 in (False, True):
            out.append(
                module.moe_experts(x, gate, 12, gate, 12, down, 14, ids, torch.ones(5, 2), int8)
            )
        results.append(out)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


# Every family's routing: (scoring, renormalise, groups, topk_group, group score, scale, mask,
# correction bias)
_ROUTERS = {
    "qwen3_moe": ("softmax", True, 1, 1, "max", 1.0, 0.0, False),
    "qwen2_moe": ("softmax", False, 1, 1, "max", 1.0, 0.0, False),
    "deepseek_v2": ("softmax", False, 4, 2, "max", 1.5, 0.0, False),
    "deepseek_v3": ("sigmoid", True, 4, 2, "top2_sum", 2.5, float("-inf"), True),
    "glm4_moe": ("sigmoid", True, 1, 1, "max", 2.5, 0.0, True),
}


def _moe_layer(ops: Any, family: str, e: int, h: int, i: int, k: int) -> tuple[Any, dict]:
    scoring, renorm, groups, topk_group, group_score, scale, mask, use_bias = _ROUTERS[family]
    g = torch.Generator().manual_seed(3)
    router = torch.randn(e, h, generator=g) / h**0.5
    bias = torch.randn(e, generator=g) * 0.1 if use_bias else None
    qt = GGMLType.Q8_0
    gate, up, down = _experts(qt, e, i, h, 0), _experts(qt, e, i, h, 40), _experts(qt, e, h, i, 80)
    layer = ops.MoeLayer(
        router, bias, k, scoring, renorm, groups, topk_group, group_score, scale, mask,
        gate, qt, up, qt, down, qt,
    )  # fmt: skip
    select = {
        "router": router,
        "args": (k, scoring, renorm, groups, topk_group, bias, group_score, scale, mask),
        "experts": (gate, up, down, qt),
    }
    return layer, select


@pytest.mark.parametrize("family", sorted(_ROUTERS))
def test_moe_layer_routes_as_select_experts(ops: Any, family: str) -> None:
    """The compiled router picks select_experts' experts (as a set: torch's topk does not order
    ties) with its weights up to float32 rounding, and its forward is the grouped kernel's over
    that routing."""
    e, h, i, k, t = 16, 64, 32, 4, 9
    layer, ref = _moe_layer(ops, family, e, h, i, k)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(5))
    weights, ids = layer.select(x)
    ref_w, ref_ids = select_experts(x @ ref["router"].T, *ref["args"])
    assert ids.dtype == torch.int64 and ids.shape == (t, k)
    order, ref_order = ids.argsort(1), ref_ids.argsort(1)
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
    torch.testing.assert_close(
        weights.gather(1, order), ref_w.gather(1, ref_order), rtol=1e-5, atol=1e-6
    )
    out, out_ids = layer.forward(x, False)
    assert torch.equal(out_ids, ids)
    gate, up, down, qt = ref["experts"]
    expected = ops.moe_experts(x, gate, qt, up, qt, down, qt, ids, weights, False)
    assert torch.equal(out, expected)


def test_moe_layer_ties_go_to_the_lower_expert(ops: Any) -> None:
    """Equal router scores: the lower expert ids win (a fixed rule, so the fused decode step and
    the layer-by-layer path agree)."""
    layer, _ = _moe_layer(ops, "qwen3_moe", 8, 64, 32, 3)
    weights, ids = layer.select(torch.zeros(2, 64))  # every logit 0
    assert ids.tolist() == [[0, 1, 2], [0, 1, 2]]
    torch.testing.assert_close(weights, torch.full((2, 3), 1 / 3))


def test_moe_layer_rejects_bad_arguments(ops: Any) -> None:
    qt = GGMLType.Q8_0
    gate, down = _experts(qt, 4, 32, 64, 0), _experts(qt, 4, 64, 32, 9)
    router = torch.randn(4, 64)
    args = (gate, qt, gate, qt, down, qt)
    with pytest.raises(RuntimeError, match="unknown scoring"):
        ops.MoeLayer(router, None, 2, "relu", True, 1, 1, "max", 1.0, 0.0, *args)
    with pytest.raises(RuntimeError, match="bad expert groups"):
        ops.MoeLayer(router, None, 2, "softmax", True, 3, 1, "max", 1.0, 0.0, *args)
    with pytest.raises(RuntimeError, match="router scores 5 experts"):
        ops.MoeLayer(torch.randn(5, 64), None, 2, "softmax", True, 1, 1, "max", 1.0, 0.0, *args)
    layer = ops.MoeLayer(router, None, 2, "softmax", True, 1, 1, "max", 1.0, 0.0, *args)
    with pytest.raises(RuntimeError, match="x must be"):
        layer.select(torch.randn(2, 32))
