"""RMSNorm, optionally fused with the residual add (x + residual, then normalise)."""

from __future__ import annotations

import torch
from torch import nn

from moeflow.kernels.rmsnorm import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed, new residual); the new residual is x (+ residual when given).
        NOTE: `residual` may be updated in place and returned as the new residual."""
        return rms_norm(x, residual, self.weight, self.eps)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """Plain normalisation with no residual (qk-norm, final norm)."""
        return rms_norm(x, None, self.weight, self.eps)[0]
