"""Gated activations: act(gate) * up over a fused [.., 2 * I] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeflow.kernels.activation import gated_act_ref, silu_and_mul

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
        self.is_silu = act == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_silu:
            return silu_and_mul(x)
        return gated_act_ref(x, self.act)
