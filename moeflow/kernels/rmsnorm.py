"""RMSNorm, optionally fused with the residual add: the reference (HF's order of operations:
statistics in fp32, back to the input dtype before the weight) and the dispatch point."""

from __future__ import annotations

import torch

from moeflow.kernels import cpu_ext
from moeflow.kernels.triton_utils import use_triton


def rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * normalised(x + residual), x + residual); without a residual, (.., x)."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), x


def rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """As rms_norm_ref. NOTE: the Triton and CPU kernels add x into `residual` in place and
    return it."""
    if use_triton(x):
        from moeflow.kernels.triton.elementwise import rms_norm_triton

        return rms_norm_triton(x, residual, weight, eps)
    if x.dtype == torch.float32 and x.device.type == "cpu":
        ops = cpu_ext.ops()
        # without a residual a view (qk-norm's heads of the fused qkv) is copied once
        fits = residual is None or (x.is_contiguous() and residual.is_contiguous())
        if ops is not None and weight.dtype == torch.float32 and fits:
            out, res = ops.rms_norm(x.contiguous(), residual, weight, eps)
            return out, res
    return rms_norm_ref(x, residual, weight, eps)
