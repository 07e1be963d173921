"""Gated activations over a fused [.., 2I] (gate | up) projection: reference and dispatch."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moeflow.kernels import cpu_ext


def gated_act_ref(x: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)  # [.., 2I] -> 2 x [.., I]
    return act(gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous():
        ops = cpu_ext.ops()
        if ops is not None:
            return ops.silu_mul(x)
    return gated_act_ref(x, F.silu)
