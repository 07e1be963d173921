"""The on-load quantisation policy: which GGUF types stay in their blocks on this device
(keep_quantized_types) and `--quantize`, which turns float linear layers and MoE experts into
blocks for the CPU kernels (quantize_experts before the weights load, quantize_linears after)."""

from __future__ import annotations

import torch

from moeflow.kernels import cpu_ext
from moeflow.kernels.quant_gemm import KEPT_TYPES
from moeflow.layers.linear import Linear
from moeflow.layers.moe import FusedExperts
from moeflow.weights.ggml_quants import QUANTIZE_TYPES, quantize, quantize_kind_for


def keep_quantized_types(device: str) -> frozenset[int]:
    """GGUF types kept as blocks in memory: those the CPU kernels multiply directly, on a CPU
    where they run; elsewhere every tensor is dequantised to the compute dtype on load."""
    if torch.device(device).type != "cpu" or not cpu_ext.available():
        return frozenset()
    return frozenset(int(t) for t in KEPT_TYPES)


def quantize_experts(net: torch.nn.Module, kind: str, device: str) -> int:
    """Before the weights load: every MoE layer's experts that the grouped CPU kernel runs are
    quantised to `kind` as each expert's float tensors load, so their float weights are never
    held whole (layers/moe.py FusedExperts.quantize); returns how many layers. Experts that load
    whole in floats (stacked checkpoint tensors) are converted by quantize_linears after."""
    _check(kind, device)
    return sum(m.quantize(kind) for m in net.modules() if isinstance(m, FusedExperts))


def quantize_linears(net: torch.nn.Module, kind: str, device: str) -> int:
    """After the weights load: quantise every float Linear that takes quantised weights
    (`quantize_on_load`) and every float MoE layer's experts the grouped kernel runs to `kind`
    (q8_0 | q4_0 | q4_k; q4_k rows that are not whole 256-weight super-blocks as q4_0), in
    place; returns how many layers. Routers stay float. Needs the CPU kernels."""
    _check(kind, device)
    count = 0
    for layer in net.modules():
        if isinstance(layer, FusedExperts):
            count += layer.quantize(kind)
            continue
        if not isinstance(layer, Linear) or not layer.quantize_on_load:
            continue
        if layer.weight is None or layer.qtype is not None:
            continue  # already quantised (whole, or as `parts` of several types)
        layer_kind = quantize_kind_for(kind, layer.in_features)
        if layer_kind is None or not layer.keep_quantized:
            continue  # not whole blocks, or read as floats (MLA kv_b)
        layer.set_quantized(quantize(layer.weight.data, layer_kind))
        count += 1
    return count


def _check(kind: str, device: str) -> None:
    if kind not in QUANTIZE_TYPES:
        raise ValueError(f"unknown quantisation {kind!r}; choose one of {sorted(QUANTIZE_TYPES)}")
    if not keep_quantized_types(device):
        raise ValueError(
            f"--quantize {kind} runs on the CPU kernels, which are unavailable here "
            f"({cpu_ext.unavailable_reason() or 'device ' + device})"
        )
