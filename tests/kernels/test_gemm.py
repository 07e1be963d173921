"""The GEMM dispatch against F.linear: exact in fp32, and within half-precision rounding when the
CPU path upcasts a bf16/fp16 weight for many rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeflow.kernels.gemm import linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 16, 100])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_reference(dtype: torch.dtype, rows: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=g).to(dtype)
    w = torch.randn(200, 96, generator=g).to(dtype)
    b = torch.randn(200, generator=g).to(dtype) if with_bias else None
    out = linear(x, w, b)
    assert out.dtype == dtype and out.shape == (rows, 200)
    ref = F.linear(x.double(), w.double(), b.double() if b is not None else None)
    tol = {torch.float32: 1e-4, torch.bfloat16: 8e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * 10)
