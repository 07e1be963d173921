"""Where the Triton kernel tests run: the GPU, or the CPU through Triton's interpreter (chosen by
tests/conftest.py before triton is first imported)."""

from __future__ import annotations

import pytest
import torch

from moeflow.kernels.triton_utils import triton_installed

# Device the Triton kernel tests run on: the GPU, or the CPU through the interpreter.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_installed(), reason="triton is not installed")
