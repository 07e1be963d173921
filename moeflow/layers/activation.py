"""Gated activations: act(gate) * up over a fused [.., 2 * I] projection."""

from __future__ import annotations

import torch
from torch import nn

from moeflow.kernels.activation import gelu_and_mul, silu_and_mul

# hidden_act -> the `approximate` of F.gelu (unused for silu)
_ACTS = {"silu": "none", "gelu": "none", "gelu_pytorch_tanh": "tanh"}


class GatedAct(nn.Module):
    def __init__(self, act: str = "silu") -> None:
        super().__init__()
        if act not in _ACTS:
            raise ValueError(f"unsupported hidden_act {act!r}; supported: {sorted(_ACTS)}")
        self.is_silu = act == "silu"
        self.approximate = _ACTS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_silu:
            return silu_and_mul(x)
        return gelu_and_mul(x, self.approximate)
