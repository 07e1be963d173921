"""NeoX-layout rotary embedding in place through the CPU kernel. The reference (all layouts and
scalings) lives in layers/rotary.py, which calls this first."""

from __future__ import annotations

import torch

from moeflow.kernels import cpu_ext


def rotary_neox_(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> bool:
    """Rotate q [T, H, D] and k [T, Hkv, D] in place (the first R dims of each head, R the
    tables' width) when the CPU kernel applies; returns False (nothing done) otherwise."""
    if q.dtype != torch.float32 or q.device.type != "cpu" or k.dtype != torch.float32:
        return False
    ops = cpu_ext.ops()
    if ops is None or cos.dtype != torch.float32 or positions.dtype != torch.int64:
        return False
    for t in (q, k):
        if t.dim() != 3 or t.stride(2) != 1 or t.stride(1) != t.shape[2]:
            return False
    ops.rotary_neox_(q, k, positions.contiguous(), cos, sin)
    return True
