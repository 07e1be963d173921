"""Rotary position embedding of q and k: the reference (every layout, plain torch), the Triton
kernel (every layout) on the GPU and the CPU kernel (NeoX layout), behind `rotary`.

Layouts of the R rotated dims of a head (the tables' fp32 rows are [R] for neox, [R/2] else):
  neox         halves pair up: (x[i], x[i + R/2])
  interleaved  neighbours pair up, result stays interleaved
  deinterleave neighbours pair up, result as [rotated evens, odds]

NOTE: the fast paths rotate q and k in place (typically views of the fused qkv buffer) and return
them; the reference returns new tensors and leaves q and k untouched. Use the returned pair."""

from __future__ import annotations

import torch

from moeflow.kernels import cpu_ext
from moeflow.kernels.triton_utils import use_triton


def rotary_ref(
    positions: torch.Tensor,  # [T] int64
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D]
    cos: torch.Tensor,  # [P, R] (neox) or [P, R/2]
    sin: torch.Tensor,
    layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k with the first R dims of each head rotated, as new tensors."""
    rotary_dim = cos.shape[-1] if layout == "neox" else 2 * cos.shape[-1]
    c = cos[positions].unsqueeze(1).to(q.dtype)  # [T, 1, R] or [T, 1, R/2]
    s = sin[positions].unsqueeze(1).to(q.dtype)
    return _rotate(q, c, s, layout, rotary_dim), _rotate(k, c, s, layout, rotary_dim)


def rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As rotary_ref; in place where a kernel applies (see the module docstring)."""
    if use_triton(q):
        from moeflow.kernels.triton.elementwise import rotary_triton_

        rotary_triton_(positions, q, k, cos, sin, layout)
        return q, k
    if layout == "neox" and _cpu_neox_fits(positions, q, k, cos):
        ops = cpu_ext.ops()
        assert ops is not None
        ops.rotary_neox_(q, k, positions.contiguous(), cos, sin)
        return q, k
    return rotary_ref(positions, q, k, cos, sin, layout)


def _cpu_neox_fits(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor
) -> bool:
    """The CPU kernel takes float32 q, k and tables, int64 positions, and heads that are
    contiguous rows (views of a fused qkv buffer are)."""
    if q.dtype != torch.float32 or q.device.type != "cpu" or k.dtype != torch.float32:
        return False
    if cpu_ext.ops() is None or cos.dtype != torch.float32 or positions.dtype != torch.int64:
        return False
    return all(t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == t.shape[2] for t in (q, k))


def _rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, rotary_dim: int
) -> torch.Tensor:
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if layout == "neox":
        x1, x2 = rot.chunk(2, dim=-1)
        out = rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    else:
        even, odd = rot[..., 0::2], rot[..., 1::2]
        r_even, r_odd = even * cos - odd * sin, odd * cos + even * sin
        if layout == "interleaved":
            out = torch.stack((r_even, r_odd), dim=-1).flatten(-2)
        else:
            out = torch.cat((r_even, r_odd), dim=-1)
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)
