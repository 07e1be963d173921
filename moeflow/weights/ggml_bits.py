"""Bit fields shared by ggml's block codecs (weights/ggml_quants.py, weights/ggml_iq.py): fp16
fields, packed nibbles and bit planes, little-endian integers, small codebook lookups. Every
function maps uint8 block bytes [nb, ..] to int or float tensors on the blocks' device."""

from __future__ import annotations

import torch


def f16_field(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 field at byte `start` of every block, as float32 [nb, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def f16_bytes(d: torch.Tensor) -> torch.Tensor:
    """[.., 1] float -> [.., 2] the little-endian bytes of its fp16 value."""
    return d.half().contiguous().view(torch.uint8)


def byte_shifts(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def nibbles32(qs: torch.Tensor) -> torch.Tensor:
    """[nb, 16] packed bytes -> [nb, 32]: low nibbles are elements 0..15, high are 16..31."""
    return torch.cat([qs & 0xF, qs >> 4], dim=1)


def bits32(qh: torch.Tensor) -> torch.Tensor:
    """[nb, 4] little-endian uint32 -> [nb, 32] with bit j of the word at position j."""
    bits = (qh.unsqueeze(-1) >> byte_shifts(tuple(range(8)), qh.device)) & 1  # [nb, 4, 8]
    return bits.reshape(-1, 32)


def two_bit_planes(qs: torch.Tensor) -> torch.Tensor:
    """[nb, 64] -> [nb, 2, 4, 32]: half h, shift j (2 bits at 2j) of the half's 32 bytes."""
    shifts = byte_shifts((0, 2, 4, 6), qs.device).view(1, 1, 4, 1)
    return (qs.reshape(-1, 2, 1, 32) >> shifts) & 3


def u16(b: torch.Tensor) -> torch.Tensor:
    """[.., 2n] bytes -> [.., n] little-endian uint16 values, int64."""
    return b[..., 0::2].long() | (b[..., 1::2].long() << 8)


def u32(b: torch.Tensor) -> torch.Tensor:
    """[.., 4] bytes -> [..] the little-endian uint32, int64."""
    b = b.long()
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def arange64(start: int, end: int, step: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, end, step, dtype=torch.int64, device=device)


def nibbles_interleaved(b: torch.Tensor) -> torch.Tensor:
    """[nb, n] bytes -> [nb, 2n]: low then high nibble of each byte in turn."""
    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(b.shape[0], -1)


def lookup(values: tuple[int, ...], idx: torch.Tensor) -> torch.Tensor:
    """Float values[idx] (a small codebook)."""
    return torch.tensor(values, dtype=torch.float32, device=idx.device)[idx.long()]
