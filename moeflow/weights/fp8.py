"""FP8 block-scaled checkpoints (DeepSeek-V3/R1, Kimi K2): each quantised `*.weight` is
float8_e4m3fn [out, in] beside a float32 `*.weight_scale_inv` [ceil(out/Bo), ceil(in/Bi)]
(Bo = Bi = 128): w = w_fp8 * scale_inv of its block. Dequantised to the compute dtype on load.
Leaf module."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from moeflow.errors import ModelFormatError
from moeflow.utils import cdiv

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_SCALE_SUFFIX = "_scale_inv"  # "x.weight" + "_scale_inv"


def dequantize_fp8_block(
    weight: torch.Tensor,  # [out, in] fp8
    scale_inv: torch.Tensor,  # [ceil(out / Bo), ceil(in / Bi)] fp32
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:  # [out, in] in `dtype`
    """w * scale_inv broadcast over Bo x Bi blocks; the last row / column of blocks may be ragged.
    Works one row of blocks at a time so the fp32 temporary stays Bo x in."""
    if weight.dim() != 2 or scale_inv.dim() != 2:
        raise ModelFormatError(
            f"fp8 weight {tuple(weight.shape)} / scale {tuple(scale_inv.shape)} must be 2-D"
        )
    rows, cols = weight.shape
    block_rows, block_cols = block
    expected = (cdiv(rows, block_rows), cdiv(cols, block_cols))
    if tuple(scale_inv.shape) != expected:
        raise ModelFormatError(
            f"fp8 weight {tuple(weight.shape)} needs weight_scale_inv of shape {expected} "
            f"for {block_rows}x{block_cols} blocks, got {tuple(scale_inv.shape)}"
        )
    out = torch.empty(rows, cols, dtype=dtype, device=weight.device)
    for r in range(expected[0]):
        lo, hi = r * block_rows, min((r + 1) * block_rows, rows)
        scale = scale_inv[r].float().repeat_interleave(block_cols)[:cols]  # [in]
        out[lo:hi] = (weight[lo:hi].float() * scale).to(dtype)
    return out


def dequantize_fp8_weights(
    weights: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    block: tuple[int, int] = (128, 128),
) -> Iterator[tuple[str, torch.Tensor]]:
    """Fold every fp8 `*.weight` with its `*.weight_scale_inv` (in either order: the first of
    the pair waits in a buffer) and yield the dequantised weight; other tensors pass through."""
    waiting_weights: dict[str, torch.Tensor] = {}
    waiting_scales: dict[str, torch.Tensor] = {}
    for name, tensor in weights:
        if name.endswith(".weight" + _SCALE_SUFFIX):
            base = name.removesuffix(_SCALE_SUFFIX)
            weight = waiting_weights.pop(base, None)
            if weight is None:
                waiting_scales[base] = tensor
                continue
            yield base, dequantize_fp8_block(weight, tensor, block, dtype)
        elif tensor.dtype in FP8_DTYPES:
            scale = waiting_scales.pop(name, None)
            if scale is None:
                waiting_weights[name] = tensor
                continue
            yield name, dequantize_fp8_block(tensor, scale, block, dtype)
        else:
            yield name, tensor
    if waiting_weights or waiting_scales:
        lonely = sorted(waiting_weights) + [n + _SCALE_SUFFIX for n in sorted(waiting_scales)]
        raise ModelFormatError(
            f"{len(lonely)} fp8 tensors lack their weight / weight_scale_inv pair, "
            f"e.g. {lonely[:3]}"
        )
