"""Rotary position embedding: the cos/sin tables of HF's rope_scaling variants (default, linear,
llama3 or a GGUF's per-frequency divisors of it, yarn with its attention factor), computed once
in fp32 as HF computes them, applied by kernels/rotary.py in one of three layouts of the rotated
dims: neox (Llama, Qwen, GLM), interleaved (DeepSeek-V2) or deinterleave (DeepSeek-V3
rope_interleave)."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import torch
from torch import nn

from moeflow.kernels.rotary import rotary


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        rope_scaling: dict[str, Any] | None = None,
        rotary_dim: int | None = None,
        layout: str = "neox",
    ) -> None:
        super().__init__()
        if layout not in ("neox", "interleaved", "deinterleave"):
            raise ValueError(f"unknown rotary layout {layout!r}")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        self.layout = layout
        key = (
            self.rotary_dim,
            max_position,
            float(base),
            json.dumps(rope_scaling, sort_keys=True, default=str),
            layout,
            str(torch.get_default_device()),
            # the memory plan's dry run answers the real device above but makes meta tensors:
            # its tables must never be the real load's
            torch.empty(0).is_meta,
        )
        cos, sin = _tables(*key)  # shared by every layer of the same shape
        self.cos_cache: torch.Tensor
        self.sin_cache: torch.Tensor
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, H, D], k: [T, Hkv, D]; rotates the first rotary_dim dims of each head.
        NOTE: may rotate q and k in place (kernels/rotary.py): use the returned pair."""
        return rotary(positions, q, k, self.cos_cache, self.sin_cache, self.layout)


@functools.lru_cache(maxsize=16)
def _tables(
    dim: int,
    max_position: int,
    base: float,
    scaling_json: str,
    layout: str,
    device: str,
    meta: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, [P, R] (neox) or [P, R/2], computed in fp32 as HF does."""
    del device  # part of the cache key: tensors are made on the current default device
    if meta:  # the memory plan's dry run: shapes only (a division of a meta tensor imports
        width = dim if layout == "neox" else dim // 2  # torch._dynamo: seconds)
        shape = (max_position, width)
        return torch.empty(shape, dtype=torch.float32), torch.empty(shape, dtype=torch.float32)
    scaling = json.loads(scaling_json)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    inv_freq, attention_factor = _scale_inv_freq(inv_freq, scaling, dim, base)
    positions = torch.arange(max_position, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # [P, R/2]
    table = torch.cat((freqs, freqs), dim=-1) if layout == "neox" else freqs
    return table.cos() * attention_factor, table.sin() * attention_factor


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _scale_inv_freq(
    inv_freq: torch.Tensor, scaling: dict[str, Any] | None, dim: int, base: float
) -> tuple[torch.Tensor, float]:
    """(scaled inverse frequencies, factor on cos/sin)."""
    if not scaling:
        return inv_freq, 1.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if kind == "llama3" and "freq_factors" in scaling:  # a GGUF's rope_freqs.weight, [R/2]
        factors = torch.tensor(scaling["freq_factors"], dtype=torch.float32)
        if factors.shape != inv_freq.shape:
            raise ValueError(f"{factors.numel()} rope freq_factors for {inv_freq.numel()} freqs")
        return inv_freq / factors, 1.0
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    if kind in ("yarn", "deepseek_yarn"):
        return _yarn(inv_freq, scaling, dim, base)
    raise NotImplementedError(f"rope_scaling type {kind!r} is not supported yet")


def _yarn(
    inv_freq: torch.Tensor, s: dict[str, Any], dim: int, base: float
) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071) as HF computes it: interpolate the low frequencies, keep the high
    ones, blend linearly between the beta_fast / beta_slow rotation counts."""
    del inv_freq  # recomputed below exactly as HF does
    factor = float(s["factor"])
    orig = float(s["original_max_position_embeddings"])
    mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = float(s.get("beta_fast") or 32)
    beta_slow = float(s.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)  # as HF, to the last bit
    blended = 1.0 / (factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation
    return blended, float(attention_factor)
