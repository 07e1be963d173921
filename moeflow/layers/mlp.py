"""The gated MLP (SwiGLU and kin): down(act(gate(x)) * up(x)), gate and up fused in one matmul."""

from __future__ import annotations

import torch
from torch import nn

from moeflow.layers.activation import GatedAct
from moeflow.layers.linear import Linear, MergedLinear


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu") -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(
            hidden_size, {"gate": intermediate_size, "up": intermediate_size}
        )
        self.down_proj = Linear(intermediate_size, hidden_size)
        self.act_fn = GatedAct(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))  # [T, 2I] -> [T, I] -> [T, E]
