"""ggml's tensor types and their block codecs: GGMLType, GGML_QUANT_SIZES, QuantizedTensor (a weight
kept in its blocks), and per type the torch dequantiser and, for Q8_0 / Q4_0, the quantiser.
Layouts read from ggml-quants.c and gguf-py `quants.py` (MIT); the code is our own."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeflow.errors import ModelFormatError

# Shape legend: nb = blocks in a tensor; QK = elements per block (32, or 256 for K-quants);
# TS = bytes per block (type_size); sub-blocks are 16 or 32 elements with their own scale.


class GGMLType(enum.IntEnum):
    """ggml tensor type ids as stored in GGUF tensor infos (ggml.h `enum ggml_type`)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


# (block_size, type_size): elements per block and bytes per block.
GGML_QUANT_SIZES: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q4_0: (32, 2 + 16),
    GGMLType.Q4_1: (32, 2 + 2 + 16),
    GGMLType.Q5_0: (32, 2 + 4 + 16),
    GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),
    GGMLType.Q8_0: (32, 2 + 32),
    GGMLType.Q8_1: (32, 4 + 4 + 32),
    GGMLType.Q2_K: (256, 2 + 2 + 16 + 64),
    GGMLType.Q3_K: (256, 2 + 64 + 32 + 12),
    GGMLType.Q4_K: (256, 2 + 2 + 12 + 128),
    GGMLType.Q5_K: (256, 2 + 2 + 12 + 32 + 128),
    GGMLType.Q6_K: (256, 2 + 128 + 64 + 16),
    GGMLType.Q8_K: (256, 4 + 256 + 32),
    GGMLType.IQ2_XXS: (256, 2 + 64),
    GGMLType.IQ2_XS: (256, 2 + 64 + 8),
    GGMLType.IQ3_XXS: (256, 2 + 96),
    GGMLType.IQ1_S: (256, 2 + 32 + 16),
    GGMLType.IQ4_NL: (32, 2 + 16),
    GGMLType.IQ3_S: (256, 2 + 64 + 32 + 8 + 4),
    GGMLType.IQ2_S: (256, 2 + 64 + 16),
    GGMLType.IQ4_XS: (256, 2 + 2 + 4 + 128),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.F64: (1, 8),
    GGMLType.IQ1_M: (256, 32 + 16 + 8),
    GGMLType.BF16: (1, 2),
    GGMLType.TQ1_0: (256, 2 + 4 * 13),
    GGMLType.TQ2_0: (256, 2 + 64),
    GGMLType.MXFP4: (32, 1 + 16),
}

# `--quantize` names -> the types quantize() writes.
QUANTIZE_TYPES = {"q8_0": GGMLType.Q8_0, "q4_0": GGMLType.Q4_0}


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight kept in its block layout: `data` is uint8 [..., rows, row_bytes], row r the
    blocks of output feature r; `shape` is the logical (..., rows, in_features): 2-D for a
    linear layer, 3-D [E, N, K] for every expert's projection stacked (GGUF's `*_exps`).
    `data` may be a read-only view of a memory-mapped file: never write to it."""

    data: torch.Tensor
    qtype: int
    shape: tuple[int, ...]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.data.reshape(-1), self.qtype, self.shape, dtype)


def dequantize(
    raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Decode a tensor's bytes (1-D uint8) of `ggml_type` into `shape` (torch order) and `dtype`.

    Block maths run in float32 on raw's device; F32/F16/BF16 (and the integer types) are
    reinterpreted and cast directly (the result is a view of `raw` when the dtype already
    matches). Raises ModelFormatError for a size mismatch or an unsupported type.
    """
    try:
        qtype = GGMLType(ggml_type)
    except ValueError:
        raise ModelFormatError(f"unknown ggml type id {ggml_type}") from None
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    numel = math.prod(shape)
    if raw.dtype != torch.uint8 or raw.dim() != 1:
        raise ModelFormatError(f"raw data must be 1-D uint8, got {raw.dtype} {tuple(raw.shape)}")
    if numel % block_size != 0 or raw.numel() != numel // block_size * type_size:
        raise ModelFormatError(
            f"{qtype.name} tensor of shape {tuple(shape)} needs "
            f"{numel // block_size * type_size} bytes in blocks of {block_size}, got {raw.numel()}"
        )
    plain = _PLAIN_DTYPES.get(qtype)
    if plain is not None:
        if raw.storage_offset() % type_size != 0 or not raw.is_contiguous():
            raw = raw.clone()  # view(dtype) needs an element-aligned start
        return raw.view(plain).reshape(shape).to(dtype)
    codec = _CODECS.get(qtype)
    if codec is None:
        raise ModelFormatError(f"unsupported tensor type {qtype.name}")
    blocks = raw.reshape(-1, type_size)  # [nb, TS]
    return codec.dequantize(blocks).reshape(shape).to(dtype)  # [nb, QK] -> shape


def quantize(weight: torch.Tensor, kind: str) -> QuantizedTensor:
    """[N, K] float weight (K a multiple of 32) -> QuantizedTensor of `kind` (q8_0 | q4_0), with
    ggml's reference rounding (`quantize_row_*_ref`)."""
    if kind not in QUANTIZE_TYPES:
        raise ValueError(f"unknown quantisation {kind!r}; choose one of {sorted(QUANTIZE_TYPES)}")
    qtype = QUANTIZE_TYPES[kind]
    encode = _CODECS[qtype].quantize
    assert encode is not None  # every QUANTIZE_TYPES entry has a quantiser
    block_size, _ = GGML_QUANT_SIZES[qtype]
    n, k = weight.shape
    if k % block_size:
        raise ValueError(f"in_features {k} is not a multiple of {block_size}")
    x = weight.detach().float().reshape(n, k // block_size, block_size)  # [n, nb, QK]
    blocks = encode(x)  # [n, nb, TS]
    return QuantizedTensor(blocks.reshape(n, -1).contiguous(), int(qtype), (n, k))


# ----------------------------------------------------------------------------------------------
# The codecs, one section per type (ggml-quants.c `dequantize_row_*` / `quantize_row_*_ref`).
# Dequantisers map blocks [nb, TS] uint8 -> [nb, QK] float32; quantisers [.., QK] float32 ->
# [.., TS] uint8.


@dataclass(frozen=True)
class _Codec:
    dequantize: Callable[[torch.Tensor], torch.Tensor]
    quantize: Callable[[torch.Tensor], torch.Tensor] | None = None


_PLAIN_DTYPES: dict[GGMLType, torch.dtype] = {
    GGMLType.F32: torch.float32,
    GGMLType.F16: torch.float16,
    GGMLType.BF16: torch.bfloat16,
    GGMLType.F64: torch.float64,
    GGMLType.I8: torch.int8,
    GGMLType.I16: torch.int16,
    GGMLType.I32: torch.int32,
    GGMLType.I64: torch.int64,
}


# ---- Q4_0: d (fp16), 16 bytes of nibbles; x = d * (q - 8)
def _dequantize_q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = _nibbles32(b[:, 2:18]).float() - 8
    return d * q


def _quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    # the element of largest magnitude, with its sign, maps to -8
    idx = x.abs().argmax(-1, keepdim=True)
    d = torch.gather(x, -1, idx) / -8
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.clamp(torch.trunc(x * inv + 8.5), max=15).to(torch.uint8)  # [.., 32]
    packed = q[..., :16] | (q[..., 16:] << 4)
    return torch.cat([_f16_bytes(d), packed], dim=-1)  # [.., 18]


# ---- Q4_1: d, m (fp16), 16 bytes of nibbles; x = d * q + m
def _dequantize_q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles32(b[:, 4:20]).float()
    return d * q + m


# ---- Q5_0: d (fp16), 32 high bits, 16 bytes of nibbles; x = d * (q - 16)
def _dequantize_q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = (_nibbles32(b[:, 6:22]) | (_bits32(b[:, 2:6]) << 4)).float() - 16
    return d * q


# ---- Q5_1: d, m (fp16), 32 high bits, 16 bytes of nibbles; x = d * q + m
def _dequantize_q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    q = (_nibbles32(b[:, 8:24]) | (_bits32(b[:, 4:8]) << 4)).float()
    return d * q + m


# ---- Q8_0: d (fp16), 32 int8; x = d * q
def _dequantize_q8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * b[:, 2:34].view(torch.int8).float()


def _quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().amax(-1, keepdim=True) / 127  # [.., 1]
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(x * inv).to(torch.int8)
    return torch.cat([_f16_bytes(d), q.view(torch.uint8)], dim=-1)  # [.., 34]


# ---- Q2_K: 16 scale/min nibbles, 64 bytes of 2-bit q, d, dmin (fp16); 16 sub-blocks of 16
def _dequantize_q2_k(b: torch.Tensor) -> torch.Tensor:
    scales = b[:, 0:16]
    d, dmin = _f16(b, 80), _f16(b, 82)
    q = _two_bit_planes(b[:, 16:80]).reshape(-1, 16, 16).float()  # 16 sub-blocks of 16
    dl = (d * (scales & 0xF).float()).unsqueeze(-1)
    ml = (dmin * (scales >> 4).float()).unsqueeze(-1)
    return (dl * q - ml).reshape(-1, 256)


# ---- Q3_K: 32 bytes of high bits, 64 bytes of 2-bit q, 12 bytes of 6-bit scales, d (fp16)
def _dequantize_q3_k(b: torch.Tensor) -> torch.Tensor:
    hmask, s = b[:, 0:32], b[:, 96:108]
    d = _f16(b, 108)
    # 16 six-bit scales: low 4 bits from bytes 0..7 (low nibbles first), high 2 from bytes 8..11
    low = torch.cat([s[:, 0:8] & 0xF, s[:, 0:8] >> 4], dim=1)  # [nb, 16]
    shifts = _shifts((0, 2, 4, 6), b.device).view(1, 4, 1)
    high = ((s[:, 8:12].unsqueeze(1) >> shifts) & 3).reshape(-1, 16)  # [nb, 4, 4] -> [nb, 16]
    sc = (low | (high << 4)).float() - 32
    hbit = (hmask.unsqueeze(1) >> _shifts(tuple(range(8)), b.device).view(1, 8, 1)) & 1
    q = _two_bit_planes(b[:, 32:96]).float() - 4 * (1 - hbit.reshape(-1, 2, 4, 32).float())
    return ((d * sc).unsqueeze(-1) * q.reshape(-1, 16, 16)).reshape(-1, 256)


# ---- Q4_K: d, dmin (fp16), 12 bytes of 6-bit (scale, min), 128 bytes of nibbles; 8 x 32
def _dequantize_q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    q = _k_low_nibbles(b[:, 16:144]).float()  # [nb, 8, 32]
    out = (d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)
    return out.reshape(-1, 256)


# ---- Q5_K: Q4_K's fields plus 32 bytes of fifth bits before the nibbles
def _dequantize_q5_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    # bit s of qh[l] is the 5th bit of element l of sub-block s
    high = (b[:, 16:48].unsqueeze(1) >> _shifts(tuple(range(8)), b.device).view(1, 8, 1)) & 1
    q = (_k_low_nibbles(b[:, 48:176]) | (high << 4)).float()  # [nb, 8, 32]
    out = (d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)
    return out.reshape(-1, 256)


# ---- Q6_K: 128 bytes of low nibbles, 64 bytes of high 2 bits, 16 int8 scales, d (fp16)
def _dequantize_q6_k(b: torch.Tensor) -> torch.Tensor:
    ql, qh = b[:, 0:128], b[:, 128:192]
    sc = b[:, 192:208].view(torch.int8).float()  # [nb, 16]
    d = _f16(b, 208)
    ql = ql.reshape(-1, 2, 1, 2, 32)  # [nb, half, 1, a, 32]
    low = torch.cat([ql & 0xF, ql >> 4], dim=2).reshape(-1, 2, 4, 32)  # group g = 2*nibble + a
    high = (qh.reshape(-1, 2, 1, 32) >> _shifts((0, 2, 4, 6), b.device).view(1, 1, 4, 1)) & 3
    q = (low | (high << 4)).float() - 32  # [nb, half, g, 32]
    scale = (d * sc).reshape(-1, 2, 4, 2, 1)  # scale index 8*half + 2*g + l//16
    return (scale * q.reshape(-1, 2, 4, 2, 16)).reshape(-1, 256)


_CODECS: dict[GGMLType, _Codec] = {
    GGMLType.Q4_0: _Codec(_dequantize_q4_0, _quantize_q4_0),
    GGMLType.Q4_1: _Codec(_dequantize_q4_1),
    GGMLType.Q5_0: _Codec(_dequantize_q5_0),
    GGMLType.Q5_1: _Codec(_dequantize_q5_1),
    GGMLType.Q8_0: _Codec(_dequantize_q8_0, _quantize_q8_0),
    GGMLType.Q2_K: _Codec(_dequantize_q2_k),
    GGMLType.Q3_K: _Codec(_dequantize_q3_k),
    GGMLType.Q4_K: _Codec(_dequantize_q4_k),
    GGMLType.Q5_K: _Codec(_dequantize_q5_k),
    GGMLType.Q6_K: _Codec(_dequantize_q6_k),
}


# ----------------------------------------------------------------------------------------------
# Private helpers: bit fields shared by several types


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 field at byte `start` of every block, as float32 [nb, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _f16_bytes(d: torch.Tensor) -> torch.Tensor:
    """[.., 1] float -> [.., 2] the little-endian bytes of its fp16 value."""
    return d.half().contiguous().view(torch.uint8)


def _shifts(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _nibbles32(qs: torch.Tensor) -> torch.Tensor:
    """[nb, 16] packed bytes -> [nb, 32]: low nibbles are elements 0..15, high are 16..31."""
    return torch.cat([qs & 0xF, qs >> 4], dim=1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """[nb, 4] little-endian uint32 -> [nb, 32] with bit j of the word at position j."""
    bits = (qh.unsqueeze(-1) >> _shifts(tuple(range(8)), qh.device)) & 1  # [nb, 4, 8]
    return bits.reshape(-1, 32)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12-byte field -> 6-bit (scale, min) per 32-element sub-block, float [nb, 8]."""
    a, b, c = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([a & 63, (c & 0xF) | ((a >> 6) << 4)], dim=1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return sc.float(), mn.float()


def _k_low_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[nb, 128] -> [nb, 8, 32]: each 32-byte chunk gives sub-block 2c (low) and 2c+1 (high)."""
    qs = qs.reshape(-1, 4, 1, 32)  # [nb, chunk, 1, 32]
    return torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(-1, 8, 32)


def _two_bit_planes(qs: torch.Tensor) -> torch.Tensor:
    """[nb, 64] -> [nb, 2, 4, 32]: half h, shift j (2 bits at 2j) of the half's 32 bytes."""
    shifts = _shifts((0, 2, 4, 6), qs.device).view(1, 1, 4, 1)
    return (qs.reshape(-1, 2, 1, 32) >> shifts) & 3
