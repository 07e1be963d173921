"""The on-load quantisation policy: which GGUF types stay in their blocks on this device
(keep_quantized_types; dequantized_types_note says which load as floats, and why) and
`--quantize`, which turns float linear layers and MoE experts into blocks for the CPU kernels
(quantize_experts before the weights load, quantize_linears after)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch

from moeflow.kernels import cpu_ext
from moeflow.kernels.quant_gemm import KEPT_TYPES, repacked_for_cpu
from moeflow.layers.fused_experts import FusedExperts
from moeflow.layers.linear import Linear
from moeflow.weights.ggml_quants import (
    GGML_QUANT_SIZES,
    QUANTIZE_TYPES,
    GGMLType,
    quantize,
    quantize_kind_for,
)


def keep_quantized_types(device: str) -> frozenset[int]:
    """GGUF types kept as blocks in memory: those the CPU kernels multiply directly, on a CPU
    where they run; elsewhere every tensor is dequantised to the compute dtype on load."""
    if torch.device(device).type != "cpu" or not cpu_ext.available():
        return frozenset()
    return frozenset(int(t) for t in KEPT_TYPES)


def dequantized_types_note(
    tensor_types: Iterable[int], device: str, dtype: torch.dtype
) -> str | None:
    """The line a GGUF load logs about its quantised types that load as `dtype` floats, and
    why; None when every quantised type stays in its blocks. `tensor_types`: each tensor's ggml
    type."""
    # block types only: F32 / F16 / BF16 are floats already
    counts = Counter(GGMLType(t) for t in tensor_types if GGML_QUANT_SIZES[GGMLType(t)][0] > 1)
    keep = keep_quantized_types(device)
    dequantized = sorted((t for t in counts if int(t) not in keep), key=int)
    if not dequantized:
        return None
    if torch.device(device).type != "cpu":
        why = f"quantised weights stay in their blocks only on a CPU (this load is on {device})"
    elif not keep:
        why = f"the CPU kernels are unavailable ({cpu_ext.unavailable_reason()})"
    else:
        kept = "/".join(t.name for t in sorted(KEPT_TYPES, key=int))
        why = f"the CPU kernels read {kept} only"
    listed = ", ".join(
        f"{t.name} ({counts[t]} tensor{'s' if counts[t] > 1 else ''})" for t in dequantized
    )
    dtype_name = str(dtype).removeprefix("torch.")
    return f"dequantising {listed} to {dtype_name} at load: {why}"


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


def repack_linears(net: torch.nn.Module) -> int:
    """After the weights load: every linear layer's Q4_K blocks (a merged layer's parts too;
    rows in sixteens) repacked for the CPU kernels where they run that layout
    (quant_gemm.repacked_for_cpu); returns how many. The LM head keeps the file's rows (its
    best logits are recomputed row by row). MoE experts are repacked as they load
    (layers/fused_experts.py)."""
    count = 0
    for layer in net.modules():
        if not isinstance(layer, Linear) or layer.qtype is None:
            continue
        data, qtype = repacked_for_cpu(layer.weight.data, layer.qtype)
        if qtype == layer.qtype:
            continue
        shape = getattr(layer.weight, "logical_shape", None)
        layer.weight = torch.nn.Parameter(data, requires_grad=False)
        if shape is not None:
            layer.weight.logical_shape = shape  # type: ignore[attr-defined]
        layer.qtype = qtype
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
