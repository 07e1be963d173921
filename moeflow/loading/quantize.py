"""The on-load quantisation policy: which GGUF types stay in their blocks on this device
(keep_quantized_types) and `--quantize`, which turns float linear layers into blocks for the CPU
kernels (quantize_linears)."""

from __future__ import annotations

import torch

from moeflow.kernels import cpu_ext
from moeflow.kernels.quant_gemm import KEPT_TYPES
from moeflow.layers.linear import Linear
from moeflow.weights.ggml_quants import QUANTIZE_TYPES, quantize


def keep_quantized_types(device: str) -> frozenset[int]:
    """GGUF types kept as blocks in memory: those the CPU kernels multiply directly, on a CPU
    where they run; elsewhere every tensor is dequantised to the compute dtype on load."""
    if torch.device(device).type != "cpu" or not cpu_ext.available():
        return frozenset()
    return frozenset(int(t) for t in KEPT_TYPES)


def quantize_linears(net: torch.nn.Module, kind: str, device: str) -> int:
    """Quantise every float Linear that takes quantised weights (`quantize_on_load`) to `kind`
    (q8_0 | q4_0), in place; returns how many. Needs the CPU kernels."""
    if kind not in QUANTIZE_TYPES:
        raise ValueError(f"unknown quantisation {kind!r}; choose one of {sorted(QUANTIZE_TYPES)}")
    if not keep_quantized_types(device):
        raise ValueError(
            f"--quantize {kind} runs on the CPU kernels, which are unavailable here "
            f"({cpu_ext.unavailable_reason() or 'device ' + device})"
        )
    count = 0
    for layer in net.modules():
        if not isinstance(layer, Linear) or not layer.quantize_on_load:
            continue
        if layer.weight is None or layer.qtype is not None:
            continue  # already quantised (whole, or as `parts` of several types)
        if layer.in_features % 32 or not layer.keep_quantized:
            continue  # not whole blocks, or read as floats (MLA kv_b)
        layer.set_quantized(quantize(layer.weight.data, kind))
        count += 1
    return count
