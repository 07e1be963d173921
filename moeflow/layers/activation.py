"""Gated activations: act(gate) * up over a fused [.., 2 * I] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class GatedAct(nn.Module):
    def __init__(self, act: str = "silu") -> None:
        super().__init__()
        if act not in _ACTS:
            raise ValueError(f"unsupported hidden_act {act!r}; supported: {sorted(_ACTS)}")
        self.act = _ACTS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)  # [.., 2I] -> 2 x [.., I]
        return self.act(gate) * up
