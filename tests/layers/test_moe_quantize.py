"""FusedExperts.quantize (`--quantize` for routed experts) on one layer: the blocks are each
expert's projection quantised alone, whether the float tensors come per expert (quantised as
they load), whole (converted after) or both; bad shapes are a ModelFormatError."""

from __future__ import annotations

import pytest
import torch

from moeflow.errors import ModelFormatError
from moeflow.kernels import cpu_ext
from moeflow.kernels.fused_moe import fused_moe_quantized, fused_moe_ref
from moeflow.layers.fused_experts import FusedExperts
from moeflow.weights.ggml_quants import GGMLType, quantize

pytestmark = pytest.mark.skipif(
    not cpu_ext.available(), reason=f"CPU kernels: {cpu_ext.unavailable_reason()}"
)

E, H, INTER = 4, 256, 64  # experts, hidden, intermediate: gate/up rows Q4_K, down rows Q4_0


def _weights(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [E, 2 INTER, H], w2 [E, H, INTER]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * INTER, H, generator=g), torch.randn(E, H, INTER, generator=g)


def _experts() -> FusedExperts:
    with torch.device("cpu"):
        return FusedExperts(E, H, INTER)


def _expected_blocks(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """gate, up [E, INTER, row_bytes(H)] in Q4_K and down [E, H, row_bytes(INTER)] in Q4_0."""
    gate = torch.stack([quantize(w13[e, :INTER], "q4_k").data for e in range(E)])
    up = torch.stack([quantize(w13[e, INTER:], "q4_k").data for e in range(E)])
    down = torch.stack([quantize(w2[e], "q4_0").data for e in range(E)])
    return gate, up, down


def _assert_blocks(m: FusedExperts, w13: torch.Tensor, w2: torch.Tensor) -> None:
    q = m.quantized
    assert q is not None
    assert (q.gate_type, q.up_type, q.down_type) == (
        int(GGMLType.Q4_K),
        int(GGMLType.Q4_K),
        int(GGMLType.Q4_0),
    )
    for ours, want in zip((q.gate, q.up, q.down), _expected_blocks(w13, w2), strict=True):
        assert torch.equal(ours, want)
    assert {n for n, _ in m.named_parameters()} == {"gate_proj", "up_proj", "down_proj"}


def test_per_expert_tensors_quantised_as_they_load() -> None:
    w13, w2 = _weights()
    m = _experts()
    assert m.quantize("q4_k")  # before loading: nothing float is allocated
    for e in range(E):
        m.load("w13", w13[e, :INTER], f"gate:{e}")
        m.load("w13", w13[e, INTER:], f"up:{e}")
        assert m.quantized is None and m.w13.is_meta
        m.load("w2", w2[e], f"down:{e}")
    _assert_blocks(m, w13, w2)
    # and the grouped kernel over them is the float reference over the blocks dequantised
    x = torch.randn(5, H)
    ids = torch.tensor([[0, 1], [2, 3], [1, 1], [3, 0], [2, 2]])
    weights = torch.rand(5, 2)
    assert m.quantized is not None
    dq13, dq2 = m.quantized.dequantize(torch.arange(E), torch.float32)
    ref = fused_moe_ref(x, dq13, dq2, weights, ids)  # [5, H], values in the thousands
    ours = fused_moe_quantized(x, m.quantized, weights, ids)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6 * ref.abs().max().item())


def test_loaded_float_experts_convert() -> None:
    w13, w2 = _weights(1)
    m = _experts()
    m.load("w13", w13)
    m.load("w2", w2)
    assert m.quantize("q4_k")
    _assert_blocks(m, w13, w2)
    assert not m.quantize("q4_k")  # already blocks: nothing to do


def test_whole_tensor_after_per_expert_ones() -> None:
    """A whole tensor after some experts were quantised on load: those come back as floats
    (dequantised) and every expert is converted once all are loaded."""
    w13, w2 = _weights(2)
    m = _experts()
    m.quantize("q4_k")
    m.load("w13", w13[0, :INTER], "gate:0")
    m.load("w2", w2)  # whole: the blocks written so far go back to floats
    assert m.quantized is None and not m.w13.is_meta
    back = quantize(w13[0, :INTER], "q4_k").dequantize(torch.float32)
    assert torch.equal(m.w13.data[0, :INTER], back)
    m.load("w13", w13[0, INTER:], "up:0")
    for e in range(1, E):
        m.load("w13", w13[e, :INTER], f"gate:{e}")
        m.load("w13", w13[e, INTER:], f"up:{e}")
    assert m.quantized is None  # float now: converted after the load
    assert m.quantize("q4_k")
    w13_seen = w13.clone()
    w13_seen[0, :INTER] = back  # expert 0's gate went through its blocks once already
    _assert_blocks(m, w13_seen, w2)


def test_bad_shapes_raise() -> None:
    m = _experts()
    m.quantize("q8_0")
    with pytest.raises(ModelFormatError, match=r"experts\[gate:0\] has shape \(64, 128\)"):
        m.load("w13", torch.randn(INTER, 128), "gate:0")
    with pytest.raises(ModelFormatError, match="expert 9 out of range"):
        m.load("w2", torch.randn(H, INTER), "down:9")


def test_experts_the_kernel_does_not_run_stay_float() -> None:
    with torch.device("cpu"):
        m = FusedExperts(E, H, 48)  # rows of 48: not whole blocks
    assert not m.quantize("q8_0")
    m.load("w13", torch.randn(E, 96, H))
    assert m.quantized is None and m.w13.dtype == torch.float32
