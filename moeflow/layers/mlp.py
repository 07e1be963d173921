"""The gated MLP (SwiGLU and kin): down(act(gate(x)) * up(x)), gate and up fused in one matmul.
Under tensor parallelism gate/up are split by column and down by row (layers/linear.py)."""

from __future__ import annotations

import torch
from torch import nn

from moeflow.layers.activation import GatedAct
from moeflow.layers.linear import MergedColumnParallelLinear, RowParallelLinear


class GatedMLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        act: str = "silu",
        reduce_results: bool = True,
    ) -> None:
        """`reduce_results` False leaves the ranks' partial sums for the caller to reduce (an
        MoE layer's shared experts, summed with the routed experts' partial output)."""
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, {"gate": intermediate_size, "up": intermediate_size}
        )
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, reduce_results=reduce_results
        )
        self.act_fn = GatedAct(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))  # [T, 2I] -> [T, I] -> [T, E]
