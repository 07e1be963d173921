"""The compiled CPU elementwise decode ops (kernels/csrc/cpu_ops.cpp) against plain-torch
references: RMSNorm (+ residual), SiLU-and-mul, NeoX rotary in place on q/k views of a fused qkv
buffer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeflow.kernels import cpu_ext
from moeflow.kernels.rmsnorm import rms_norm_ref

ops = cpu_ext.ops()
pytestmark = pytest.mark.skipif(ops is None, reason=f"CPU kernels: {cpu_ext.unavailable_reason()}")


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
