"""The Triton RMSNorm (+ residual), rotary and gated-activation kernels against their torch
references: fp32, fp16 and bf16 at small shapes (interpreted on CPU), strided views of fused
buffers, every rotary layout; the layers' dispatch; real model shapes in bf16 on the GPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from moeflow.kernels.activation import gated_act_ref
from moeflow.kernels.rmsnorm import rms_norm_ref
from moeflow.kernels.rotary import rotary_ref
from moeflow.layers.activation import GatedAct
from moeflow.layers.norm import RMSNorm
from moeflow.layers.rotary import RotaryEmbedding
from tests.helpers.devices import TRITON_DEVICE, needs_triton

pytestmark = needs_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol). bf16 is loose: the interpreter rounds float -> bf16 toward zero, the GPU to
# nearest even, so results may sit one bf16 ulp from torch's.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)}
# Rotary is checked against the reference on the same inputs upcast to fp32 (the kernel
# computes in fp32 and rounds once): one rounding of the output.
ROTARY_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}
ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda g: F.gelu(g, approximate="tanh"),
}


def _randn(*shape: int, dtype: torch.dtype, seed: int, device: str = TRITON_DEVICE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)


def _close(out: torch.Tensor, ref: torch.Tensor, tol: dict[torch.dtype, Any]) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    rtol, atol = tol[ref.dtype]
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)


# ---- RMSNorm ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [96, 200])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_matches_reference(dtype: torch.dtype, hidden: int, with_residual: bool) -> None:
    from moeflow.kernels.triton.elementwise import rms_norm_triton

    x, w = _randn(7, hidden, dtype=dtype, seed=0), _randn(hidden, dtype=dtype, seed=1)
    res = _randn(7, hidden, dtype=dtype, seed=2) if with_residual else None
    ref_out, ref_res = rms_norm_ref(x, res, w, 1e-6)
    x_before = x.clone()
    res_buf = res.clone() if res is not None else None
    out, new_res = rms_norm_triton(x, res_buf, w, 1e-6)
    _close(out, ref_out, TOL)
    _close(new_res, ref_res, TOL)
    assert torch.equal(x, x_before)
    if res_buf is not None:
        assert new_res is res_buf  # x + residual written into the residual buffer in place
    else:
        assert new_res is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_wide_rows_take_chunks(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, with_residual: bool
) -> None:
    """Rows wider than one block (here 200 > 64) are normalised in two passes over chunks."""
    from moeflow.kernels.triton import elementwise

    monkeypatch.setattr(elementwise, "_MAX_NORM_BLOCK", 64)
    x, w = _randn(5, 200, dtype=dtype, seed=3), _randn(200, dtype=dtype, seed=4)
    res = _randn(5, 200, dtype=dtype, seed=5) if with_residual else None
    ref_out, ref_res = rms_norm_ref(x, res, w, 1e-5)
    out, new_res = elementwise.rms_norm_triton(x, res.clone() if res is not None else None, w, 1e-5)
    _close(out, ref_out, TOL)
    _close(new_res, ref_res, TOL)


def test_rms_norm_on_strided_views() -> None:
    """qk-norm over the heads of a fused qkv buffer ([T, H, D] view, 3-D strides), MLA's latent
    slice ([T, L] with a wider row stride), an fp32 weight on fp16 activations (fp32 out)."""
    from moeflow.kernels.triton.elementwise import rms_norm_triton

    t, h, hkv, d = 5, 6, 2, 24
    qkv = _randn(t, (h + 2 * hkv) * d, dtype=torch.float16, seed=6)
    q = qkv[:, : h * d].view(t, h, d)
    w = _randn(d, dtype=torch.float16, seed=7)
    before = qkv.clone()
    out, _ = rms_norm_triton(q, None, w, 1e-6)
    _close(out, rms_norm_ref(q, None, w, 1e-6)[0], TOL)
    assert torch.equal(qkv, before)

    ckv = _randn(t, 40 + 8, dtype=torch.float16, seed=8)
    c = ckv[:, :40]  # [T, L], row stride L + R
    w32 = _randn(40, dtype=torch.float32, seed=9)
    out, _ = rms_norm_triton(c, None, w32, 1e-6)
    _close(out, rms_norm_ref(c, None, w32, 1e-6)[0], TOL)  # fp32, as torch promotes

    x4 = _randn(2, 3, 4, 32, dtype=torch.float32, seed=10)  # leading dims merged
    out, _ = rms_norm_triton(x4, None, w32[:32].contiguous(), 1e-6)
    _close(out, rms_norm_ref(x4, None, w32[:32], 1e-6)[0], TOL)


# ---- Rotary -------------------------------------------------------------------------------


def _qkv_views(
    t: int, h: int, hkv: int, d: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qkv [T, (H + 2 Hkv) D], q [T, H, D] view, k [T, Hkv, D] view)."""
    qkv = _randn(t, (h + 2 * hkv) * d, dtype=dtype, seed=seed)
    q = qkv[:, : h * d].view(t, h, d)
    k = qkv[:, h * d : (h + hkv) * d].view(t, hkv, d)
    return qkv, q, k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["neox", "interleaved", "deinterleave"])
@pytest.mark.parametrize(
    ("head_dim", "rotary_dim"), [(48, 32), (80, 80)], ids=["partial", "full-npow2"]
)
def test_rotary_matches_reference(
    dtype: torch.dtype, layout: str, head_dim: int, rotary_dim: int
) -> None:
    """GQA heads as views of a fused qkv buffer, positions out of order: rotated in place, the
    dims past rotary_dim and v untouched."""
    from moeflow.kernels.triton.elementwise import rotary_triton_

    t, h, hkv = 5, 6, 2
    rope = RotaryEmbedding(head_dim, 64, 10000.0, rotary_dim=rotary_dim, layout=layout)
    rope = rope.to(TRITON_DEVICE)
    qkv, q, k = _qkv_views(t, h, hkv, head_dim, dtype, seed=11)
    positions = torch.tensor([9, 3, 0, 63, 7], device=TRITON_DEVICE)
    want_q, want_k = rotary_ref(
        positions, q.float(), k.float(), rope.cos_cache, rope.sin_cache, rope.layout
    )
    before = qkv.clone()
    rotary_triton_(positions, q, k, rope.cos_cache, rope.sin_cache, layout)
    _close(q, want_q.to(dtype), ROTARY_TOL)
    _close(k, want_k.to(dtype), ROTARY_TOL)
    assert torch.equal(
        q[..., rotary_dim:], before[:, : h * head_dim].view(t, h, -1)[..., rotary_dim:]
    )
    assert torch.equal(qkv[:, (h + hkv) * head_dim :], before[:, (h + hkv) * head_dim :])


@pytest.mark.parametrize("layout", ["interleaved", "deinterleave"])
def test_rotary_on_mla_views(layout: str) -> None:
    """DeepSeek's MLA: q_rope is the tail of each q head, k_rope the tail of the latent row
    ([T, 1, R] view); int32 positions."""
    from moeflow.kernels.triton.elementwise import rotary_triton_

    t, h, nope, r, lora = 4, 3, 16, 8, 32
    rope = RotaryEmbedding(r, 128, 10000.0, layout=layout).to(TRITON_DEVICE)
    q = _randn(t, h, nope + r, dtype=torch.float32, seed=12)
    ckv = _randn(t, lora + r, dtype=torch.float32, seed=13)
    q_rope, k_rope = q[..., nope:], ckv[:, lora:].unsqueeze(1)
    positions = torch.tensor([100, 2, 57, 2], dtype=torch.int32, device=TRITON_DEVICE)
    want_q, want_k = rotary_ref(
        positions.long(), q_rope, k_rope, rope.cos_cache, rope.sin_cache, rope.layout
    )
    q_before, ckv_before = q.clone(), ckv.clone()
    rotary_triton_(positions, q_rope, k_rope, rope.cos_cache, rope.sin_cache, layout)
    _close(q_rope, want_q, ROTARY_TOL)
    _close(k_rope, want_k, ROTARY_TOL)
    assert torch.equal(q[..., :nope], q_before[..., :nope])
    assert torch.equal(ckv[:, :lora], ckv_before[:, :lora])


# ---- Gated activations --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inter", [96, 200])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # exp(-x) = inf
def test_act_and_mul_matches_reference(dtype: torch.dtype, inter: int, act: str) -> None:
    from moeflow.kernels.triton.elementwise import act_and_mul_triton

    x = _randn(2, 3, 2 * inter, dtype=dtype, seed=14) * 4  # wide range: the tails
    _close(act_and_mul_triton(x, act), gated_act_ref(x, ACTS[act]), TOL)


def test_silu_and_mul_on_strided_rows() -> None:
    from moeflow.kernels.triton.elementwise import silu_and_mul_triton

    buf = _randn(5, 2 * 96 + 16, dtype=torch.float16, seed=15)
    x = buf[:, : 2 * 96]  # rows of a wider buffer
    out = silu_and_mul_triton(x)
    assert out.is_contiguous()
    _close(out, gated_act_ref(x, F.silu), TOL)


# ---- Dispatch through the layers -----------------------------------------------------------


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count the calls of elementwise.<name> (the dispatch points import it at call time)."""
    from moeflow.kernels.triton import elementwise

    calls: list[int] = []
    fn = getattr(elementwise, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return fn(*args, **kwargs)

    monkeypatch.setattr(elementwise, name, spy)
    return calls


@pytest.mark.usefixtures("triton_on_cpu")
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_layers_dispatch_to_triton(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    norm_calls = _spy(monkeypatch, "rms_norm_triton")
    rotary_calls = _spy(monkeypatch, "rotary_triton_")
    act_calls = _spy(monkeypatch, "act_and_mul_triton")

    norm = RMSNorm(72, 1e-6).to(device=TRITON_DEVICE, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(_randn(72, dtype=dtype, seed=16))
    x, res = _randn(4, 72, dtype=dtype, seed=17), _randn(4, 72, dtype=dtype, seed=18)
    ref_out, ref_res = rms_norm_ref(x, res, norm.weight, norm.eps)
    out, new_res = norm(x, res)
    _close(out, ref_out, TOL)
    _close(new_res, ref_res, TOL)
    _close(norm.norm(x), rms_norm_ref(x, None, norm.weight, norm.eps)[0], TOL)

    rope = RotaryEmbedding(16, 32, 10000.0, rotary_dim=8).to(TRITON_DEVICE)  # GLM-style partial
    _, q, k = _qkv_views(3, 4, 2, 16, dtype, seed=19)
    positions = torch.tensor([5, 0, 31], device=TRITON_DEVICE)
    want_q, want_k = rotary_ref(
        positions, q.float(), k.float(), rope.cos_cache, rope.sin_cache, rope.layout
    )
    got_q, got_k = rope(positions, q, k)
    assert got_q is q and got_k is k  # in place
    _close(got_q, want_q.to(dtype), ROTARY_TOL)
    _close(got_k, want_k.to(dtype), ROTARY_TOL)

    h = _randn(3, 2 * 40, dtype=dtype, seed=20)
    _close(GatedAct("silu")(h), gated_act_ref(h, F.silu), TOL)
    _close(GatedAct("gelu_pytorch_tanh")(h), gated_act_ref(h, ACTS["gelu_pytorch_tanh"]), TOL)
    _close(GatedAct("gelu")(h), gated_act_ref(h, F.gelu), TOL)

    assert len(norm_calls) == 2 and len(rotary_calls) == 1 and len(act_calls) == 3


def test_cpu_paths_do_not_take_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without MOEFLOW_TRITON_ON_CPU the layers on CPU tensors keep their torch / C++ paths."""
    if TRITON_DEVICE == "cuda":
        pytest.skip("checks the CPU dispatch")
    calls = _spy(monkeypatch, "rms_norm_triton")
    norm = RMSNorm(16)
    norm(torch.randn(2, 16), torch.randn(2, 16))
    assert not calls


# ---- Real shapes, bf16, on the GPU --------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [2048, 7168])
def test_rms_norm_real_shapes_bf16(hidden: int) -> None:
    from moeflow.kernels.triton.elementwise import rms_norm_triton

    dtype = torch.bfloat16
    for t in (1, 37, 4096):
        x = _randn(t, hidden, dtype=dtype, seed=21, device="cuda")
        res = _randn(t, hidden, dtype=dtype, seed=22, device="cuda")
        w = _randn(hidden, dtype=dtype, seed=23, device="cuda")
        ref_out, ref_res = rms_norm_ref(x, res, w, 1e-6)
        out, new_res = rms_norm_triton(x, res, w, 1e-6)
        _close(out, ref_out, TOL)
        torch.testing.assert_close(new_res, ref_res, rtol=0, atol=0)  # one RTNE add each
        _close(rms_norm_triton(x, None, w, 1e-6)[0], rms_norm_ref(x, None, w, 1e-6)[0], TOL)


@pytest.mark.gpu
def test_rotary_real_shapes_bf16() -> None:
    from moeflow.kernels.triton.elementwise import rotary_triton_

    dtype, t = torch.bfloat16, 300
    positions = torch.randint(0, 4096, (t,), device="cuda")
    # Qwen3-30B-A3B: 32 query / 4 KV heads of 128, neox
    rope = RotaryEmbedding(128, 4096, 1e6).to("cuda")
    qkv, q, k = _qkv_views(t, 32, 4, 128, dtype, seed=24)
    want_q, want_k = rotary_ref(
        positions, q.float(), k.float(), rope.cos_cache, rope.sin_cache, rope.layout
    )
    v_before = qkv[:, 36 * 128 :].clone()
    rotary_triton_(positions, q, k, rope.cos_cache, rope.sin_cache, "neox")
    _close(q, want_q.to(dtype), ROTARY_TOL)
    _close(k, want_k.to(dtype), ROTARY_TOL)
    assert torch.equal(qkv[:, 36 * 128 :], v_before)
    # DeepSeek-V3: 128 heads of 128 nope + 64 rope; the latent row 512 + 64
    for layout in ("interleaved", "deinterleave"):
        rope = RotaryEmbedding(64, 4096, 10000.0, layout=layout).to("cuda")
        q = _randn(t, 128, 192, dtype=dtype, seed=25, device="cuda")
        ckv = _randn(t, 576, dtype=dtype, seed=26, device="cuda")
        q_rope, k_rope = q[..., 128:], ckv[:, 512:].unsqueeze(1)
        want_q, want_k = rotary_ref(
            positions, q_rope.float(), k_rope.float(), rope.cos_cache, rope.sin_cache, rope.layout
        )
        rotary_triton_(positions, q_rope, k_rope, rope.cos_cache, rope.sin_cache, layout)
        _close(q_rope, want_q.to(dtype), ROTARY_TOL)
        _close(k_rope, want_k.to(dtype), ROTARY_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("inter", [768, 2048, 18432])
def test_silu_and_mul_real_shapes_bf16(inter: int) -> None:
    from moeflow.kernels.triton.elementwise import silu_and_mul_triton

    for t in (1, 64, 1000):
        x = _randn(t, 2 * inter, dtype=torch.bfloat16, seed=27, device="cuda")
        _close(silu_and_mul_triton(x), gated_act_ref(x, F.silu), TOL)


@pytest.mark.gpu
def test_decode_ops_capture_in_a_cuda_graph() -> None:
    """No host sync in the launchers: captured once, replayed on new inputs."""
    from moeflow.kernels.triton.elementwise import (
        rms_norm_triton,
        rotary_triton_,
        silu_and_mul_triton,
    )

    dtype, t = torch.bfloat16, 8
    rope = RotaryEmbedding(128, 4096, 1e6).to("cuda")
    x = torch.zeros(t, 2048, dtype=dtype, device="cuda")
    res = torch.zeros_like(x)
    w = _randn(2048, dtype=dtype, seed=28, device="cuda")
    qkv = torch.zeros(t, 40 * 128, dtype=dtype, device="cuda")
    q, k = qkv[:, : 32 * 128].view(t, 32, 128), qkv[:, 32 * 128 : 36 * 128].view(t, 4, 128)
    positions = torch.zeros(t, dtype=torch.int64, device="cuda")
    gate_up = torch.zeros(t, 2 * 768, dtype=dtype, device="cuda")

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        out, _ = rms_norm_triton(x, res, w, 1e-6)
        rotary_triton_(positions, q, k, rope.cos_cache, rope.sin_cache, "neox")
        return out, silu_and_mul_triton(gate_up)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, act = step()
    new = {
        "x": _randn(t, 2048, dtype=dtype, seed=29, device="cuda"),
        "res": _randn(t, 2048, dtype=dtype, seed=30, device="cuda"),
        "qkv": _randn(t, 40 * 128, dtype=dtype, seed=31, device="cuda"),
        "gate_up": _randn(t, 2 * 768, dtype=dtype, seed=32, device="cuda"),
    }
    x.copy_(new["x"])
    res.copy_(new["res"])
    qkv.copy_(new["qkv"])
    gate_up.copy_(new["gate_up"])
    positions.copy_(torch.randint(0, 4096, (t,), device="cuda"))
    want_out, want_res = rms_norm_ref(new["x"], new["res"], w, 1e-6)
    q0 = new["qkv"][:, : 32 * 128].view(t, 32, 128)
    k0 = new["qkv"][:, 32 * 128 : 36 * 128].view(t, 4, 128)
    want_q, want_k = rotary_ref(
        positions, q0.float(), k0.float(), rope.cos_cache, rope.sin_cache, rope.layout
    )
    graph.replay()
    torch.cuda.synchronize()
    _close(out, want_out, TOL)
    _close(res, want_res, TOL)
    _close(q, want_q.to(dtype), ROTARY_TOL)
    _close(k, want_k.to(dtype), ROTARY_TOL)
    _close(act, gated_act_ref(new["gate_up"], F.silu), TOL)
