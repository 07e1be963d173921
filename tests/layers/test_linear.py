"""Linear and MergedLinear with quantised weights: shards of one ggml type stay quantised (the
forward runs the CPU kernel), mixed types stay as one part per shard, float shards beside quantised
ones are dequantised on load, a wrong shape is an error."""

from __future__ import annotations

import pytest
import torch

from moeflow.kernels import cpu_ext
from moeflow.layers.linear import Linear, MergedLinear
from moeflow.weights.ggml_quants import GGMLType, QuantizedTensor, quantize

pytestmark = pytest.mark.skipif(
    not cpu_ext.available(), reason=f"CPU kernels: {cpu_ext.unavailable_reason()}"
)


def _q(rows: int, cols: int, kind: str = "q8_0", seed: int = 0) -> QuantizedTensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return quantize(w, kind)


def test_merged_linear_keeps_shards_of_one_type() -> None:
    layer = MergedLinear(64, {"q": 32, "k": 16, "v": 16})
    shards = {"q": _q(32, 64, seed=1), "k": _q(16, 64, seed=2), "v": _q(16, 64, seed=3)}
    for name in ("v", "q", "k"):  # any order
        layer.load("weight", shards[name], name)
    assert layer.qtype == int(GGMLType.Q8_0)
    whole = torch.cat([shards[s].dequantize(torch.float32) for s in ("q", "k", "v")])
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), x @ whole.T, rtol=1e-5, atol=1e-5)


def test_merged_linear_keeps_mixed_types_as_parts() -> None:
    """Q4_K_M mixes types inside one merged projection: each shard stays in its own blocks."""
    layer = MergedLinear(64, {"gate": 32, "up": 16}, bias=True)
    gate, up = _q(32, 64, "q8_0", seed=4), _q(16, 64, "q4_0", seed=5)
    layer.load("weight", up, "up")
    layer.load("weight", gate, "gate")
    bias = torch.randn(48)
    layer.load("bias", bias)
    assert layer.qtype is None and layer.weight is None and layer.parts is not None
    assert [p.qtype for p in layer.parts] == [int(GGMLType.Q8_0), int(GGMLType.Q4_0)]
    want = torch.cat([gate.dequantize(torch.float32), up.dequantize(torch.float32)])
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ want.T + bias, rtol=1e-5, atol=1e-5)


def test_merged_linear_dequantises_float_beside_quantised() -> None:
    layer = MergedLinear(64, {"gate": 32, "up": 32})
    gate, up = _q(32, 64, "q8_0", seed=4), torch.randn(32, 64)
    layer.load("weight", gate, "gate")
    layer.load("weight", up, "up")
    assert layer.qtype is None and layer.weight.dtype == torch.float32
    assert torch.equal(layer.weight.data, torch.cat([gate.dequantize(torch.float32), up]))


def test_linear_rejects_quantised_weight_of_wrong_shape() -> None:
    from moeflow.errors import ModelFormatError

    with pytest.raises(ModelFormatError, match="shape"):
        Linear(64, 32).load("weight", _q(16, 64))
