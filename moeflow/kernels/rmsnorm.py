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
    if residual is None and x.device.type == "cpu" and not x.is_contiguous():
        x = x.contiguous()  # qk-norm's heads, a view of the fused qkv: one copy, then the kernel
    if x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous():
        ops = cpu_ext.ops()
        if (
            ops is not None
            and weight.dtype == torch.float32
            and (residual is None or residual.is_contiguous())
        ):
            out, res = ops.rms_norm(x, residual, weight, eps)
            return out, res
    return rms_norm_ref(x, residual, weight, eps)
