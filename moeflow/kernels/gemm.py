"""Dense GEMM/GEMV, y = x W^T (+ b): the reference and a CPU policy for low-precision weights.

On CPUs without native bf16/fp16 matrix units (AVX2), torch's half-precision GEMM is 3-8x slower
than fp32 once several rows are multiplied (prefill), while its GEMV reads half the bytes and is
faster (decode). So with 16+ rows the weight is upcast to fp32 on the fly; below, it is used as
stored."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_UPCAST_MIN_ROWS = 16


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K], weight: [N, K], bias: [N] -> [M, N] in x's dtype."""
    if (
        x.device.type == "cpu"
        and weight.dtype in (torch.bfloat16, torch.float16)
        and x.dim() == 2
        and x.shape[0] >= _UPCAST_MIN_ROWS
    ):
        b = bias.float() if bias is not None else None
        return F.linear(x.float(), weight.float(), b).to(x.dtype)
    return linear_ref(x, weight, bias)
