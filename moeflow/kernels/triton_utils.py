"""When the Triton fast paths run. On CUDA tensors whenever Triton is installed (and not turned
off); on CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1) with
MOEFLOW_TRITON_ON_CPU=1, which is how the tests run the kernels without a GPU. Triton itself is
imported only by moeflow/kernels/triton, so a CPU-only install imports cleanly."""

from __future__ import annotations

import functools
import importlib.util

import torch

from moeflow import env


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(x: torch.Tensor) -> bool:
    """Whether the dispatch point for an op on `x` takes its Triton path."""
    if not env.MOEFLOW_TRITON or not triton_installed():
        return False
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and env.TRITON_INTERPRET and env.MOEFLOW_TRITON_ON_CPU


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill with split-K programs; an H100's 132 where there is no
    GPU (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def dot_precision(x: torch.Tensor) -> str:
    """tl.dot's input_precision for inputs of x's dtype: fp32 keeps fp32 products (the tests'
    tight tolerance); half inputs use the MMA (where the setting is ignored)."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (>= 1): Triton block shapes must be powers of two."""
    return 1 << max(n - 1, 0).bit_length()
