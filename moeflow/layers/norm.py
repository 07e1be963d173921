"""RMSNorm, optionally fused with the residual add (x + residual, then normalise)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 as HF does, then back to the input dtype before the weight.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed, new residual); the new residual is x (+ residual when given)."""
        if residual is not None:
            x = x + residual
        return self._norm(x), x

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """Plain normalisation with no residual (qk-norm, final norm)."""
        return self._norm(x)
