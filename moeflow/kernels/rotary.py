"""Rotary embedding of q and k in place: the Triton kernel (every layout) on the GPU, the CPU
kernel (NeoX layout) on CPU. The reference (all layouts and scalings) lives in layers/rotary.py,
which calls `rotary_` first and falls back to it when that did nothing."""

from __future__ import annotations

import torch

from moeflow.kernels import cpu_ext
from moeflow.kernels.triton_utils import use_triton


def rotary_(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layout: str,
) -> bool:
    """Rotate q [T, H, D] and k [T, Hkv, D] in place (the first R dims of each head) with the
    fp32 tables cos, sin ([P, R] for neox, [P, R/2] for interleaved / deinterleave) when a
    kernel applies; returns False (nothing done) otherwise."""
    if use_triton(q):
        from moeflow.kernels.triton.elementwise import rotary_triton_

        rotary_triton_(positions, q, k, cos, sin, layout)
        return True
    return layout == "neox" and rotary_neox_(positions, q, k, cos, sin)


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
