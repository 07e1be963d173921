"""On-load quantisation of float weights into GGUF block formats (ggml's reference rounding), so
safetensors checkpoints run on the same quantised kernels as GGUF files (`--quantize`)."""

from __future__ import annotations

import torch

from moeflow.weights.gguf import GGMLType, QuantizedTensor

QUANTIZE_TYPES = {"q8_0": GGMLType.Q8_0, "q4_0": GGMLType.Q4_0}


def quantize(weight: torch.Tensor, kind: str) -> QuantizedTensor:
    """[N, K] float weight (K a multiple of 32) -> QuantizedTensor of `kind` (q8_0 | q4_0)."""
    if kind not in QUANTIZE_TYPES:
        raise ValueError(f"unknown quantisation {kind!r}; choose one of {sorted(QUANTIZE_TYPES)}")
    n, k = weight.shape
    if k % 32:
        raise ValueError(f"in_features {k} is not a multiple of 32")
    x = weight.detach().float().reshape(n, k // 32, 32)
    if kind == "q8_0":
        d = x.abs().amax(-1, keepdim=True) / 127  # [n, nb, 1]
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        q = torch.round(x * inv).to(torch.int8)
        blocks = torch.cat([_f16_bytes(d), q.view(torch.uint8)], dim=-1)  # [n, nb, 34]
    else:
        # the element of largest magnitude, with its sign, maps to -8
        idx = x.abs().argmax(-1, keepdim=True)
        d = torch.gather(x, -1, idx) / -8
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        q = torch.clamp(torch.trunc(x * inv + 8.5), max=15).to(torch.uint8)  # [n, nb, 32]
        packed = q[..., :16] | (q[..., 16:] << 4)
        blocks = torch.cat([_f16_bytes(d), packed], dim=-1)  # [n, nb, 18]
    return QuantizedTensor(blocks.reshape(n, -1).contiguous(), int(QUANTIZE_TYPES[kind]), (n, k))


def _f16_bytes(d: torch.Tensor) -> torch.Tensor:
    """[.., 1] float -> [.., 2] the little-endian bytes of its fp16 value."""
    return d.half().contiguous().view(torch.uint8)
