"""Gated activations over a fused [.., 2I] (gate | up) projection: reference and dispatch."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moeflow.kernels import cpu_ext
from moeflow.kernels.triton_utils import use_triton


def gated_act_ref(x: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)  # [.., 2I] -> 2 x [.., I]
    return act(gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    if use_triton(x):
        from moeflow.kernels.triton.elementwise import silu_and_mul_triton

        return silu_and_mul_triton(x)
    if x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous():
        ops = cpu_ext.ops()
        if ops is not None:
            return ops.silu_mul(x)
    return gated_act_ref(x, F.silu)


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """gelu(gate) * up, gelu as F.gelu(.., approximate) ("none": erf, or "tanh")."""
    if use_triton(x):
        from moeflow.kernels.triton.elementwise import act_and_mul_triton

        return act_and_mul_triton(x, "gelu_pytorch_tanh" if approximate == "tanh" else "gelu")
    return gated_act_ref(x, lambda g: F.gelu(g, approximate=approximate))
