"""ggml's tensor types and their block codecs: GGMLType, GGML_QUANT_SIZES, QuantizedTensor (a weight
kept in its blocks), and per type the torch dequantiser (the legacy and K-quants; the IQ types,
TQ1_0 / TQ2_0 and MXFP4 in weights/ggml_iq.py) and, for Q8_0 / Q4_0 / Q4_K,
the quantiser. Layouts read from ggml-common.h, ggml-quants.c and gguf-py `quants.py` (MIT); the
code is our own."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeflow.errors import ModelFormatError
from moeflow.weights import ggml_iq
from moeflow.weights.ggml_bits import (
    bits32,
    byte_shifts,
    f16_bytes,
    f16_field,
    nibbles32,
    two_bit_planes,
)

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
QUANTIZE_TYPES = {"q8_0": GGMLType.Q8_0, "q4_0": GGMLType.Q4_0, "q4_k": GGMLType.Q4_K}

# moeflow's own layout of Q4_K, not a ggml type (no file holds it): every 16 rows' blocks
# repacked side by side on load for the AVX-512 kernel (kernels/csrc/q4k_r16.h; per
# super-block, the 16 rows' 36 four-byte words interleaved word by word). The same bytes per
# row, so the same shapes; dequantize() reads it by undoing the repack.
Q4_K_R16 = 1012


def repack_q4k_r16(data: torch.Tensor) -> torch.Tensor:
    """Q4_K blocks uint8 [..., N, row_bytes] (N a multiple of 16) -> the Q4_K_R16 layout, a new
    tensor of the same shape (the plain-torch form of the kernels' repack_q4k_r16)."""
    nb = _r16_blocks(data)
    x = data.reshape(-1, 16, nb, 36, 4)  # [groups, row, super-block, word, byte]
    return x.permute(0, 2, 3, 1, 4).contiguous().reshape(data.shape)


def unpack_q4k_r16(data: torch.Tensor) -> torch.Tensor:
    """repack_q4k_r16 undone: Q4_K_R16 [..., N, row_bytes] -> the file's Q4_K rows."""
    nb = _r16_blocks(data)
    x = data.reshape(-1, nb, 36, 16, 4)  # [groups, super-block, word, row, byte]
    return x.permute(0, 3, 1, 2, 4).contiguous().reshape(data.shape)


def _r16_blocks(data: torch.Tensor) -> int:
    _, type_size = GGML_QUANT_SIZES[GGMLType.Q4_K]
    if data.dim() < 2 or data.shape[-1] % type_size or data.shape[-2] % 16:
        raise ValueError(
            f"Q4_K_R16 needs [..., N, row_bytes] with N a multiple of 16 and rows of whole "
            f"{type_size}-byte blocks, got {tuple(data.shape)}"
        )
    return data.shape[-1] // type_size


# dequantize() decodes this many weights at a time.
_DEQUANTIZE_CHUNK = 1 << 20
# quantize() works through this many weights at a time, bounding its float temporaries
# (Q4_K's scale search holds a few copies of its chunk) whatever the tensor's size.
_QUANTIZE_CHUNK = 1 << 20


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
    if ggml_type == Q4_K_R16 and raw.dim() == 1 and shape and shape[-1] % 256 == 0:
        row_bytes = shape[-1] // 256 * GGML_QUANT_SIZES[GGMLType.Q4_K][1]
        if raw.numel() % (16 * row_bytes) == 0:
            raw = unpack_q4k_r16(raw.reshape(-1, row_bytes)).reshape(-1)
            ggml_type = GGMLType.Q4_K
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
    # A chunk of blocks at a time: the codecs' temporaries (grid gathers, sign planes) take
    # several times the float result's bytes, bounded by the chunk whatever the tensor's size.
    out = torch.empty(blocks.shape[0], block_size, dtype=dtype, device=raw.device)  # [nb, QK]
    step = max(1, _DEQUANTIZE_CHUNK // block_size)
    for start in range(0, blocks.shape[0], step):
        out[start : start + step] = codec.dequantize(blocks[start : start + step])
    return out.reshape(shape)


def quantize(weight: torch.Tensor, kind: str) -> QuantizedTensor:
    """[N, K] float weight (K a multiple of the block size: 32, or 256 for q4_k) ->
    QuantizedTensor of `kind` (q8_0 | q4_0 | q4_k): Q8_0 / Q4_0 with ggml's reference rounding
    (`quantize_row_*_ref`), Q4_K with a weighted least-squares search of each sub-block's scale
    and min (`_quantize_q4_k`). Rows are quantised a chunk at a time, so the float temporaries
    stay small beside the blocks written."""
    if kind not in QUANTIZE_TYPES:
        raise ValueError(f"unknown quantisation {kind!r}; choose one of {sorted(QUANTIZE_TYPES)}")
    qtype = QUANTIZE_TYPES[kind]
    encode = _CODECS[qtype].quantize
    assert encode is not None  # every QUANTIZE_TYPES entry has a quantiser
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n, k = weight.shape
    if k % block_size:
        raise ValueError(f"in_features {k} is not a multiple of {block_size}")
    nb = k // block_size
    out = torch.empty(n, nb, type_size, dtype=torch.uint8, device=weight.device)  # [n, nb, TS]
    rows = max(1, _QUANTIZE_CHUNK // k)
    for r in range(0, n, rows):
        x = weight[r : r + rows].detach().float().reshape(-1, nb, block_size)  # [rows, nb, QK]
        out[r : r + rows] = encode(x)
    return QuantizedTensor(out.reshape(n, -1), int(qtype), (n, k))


def quantize_kind_for(kind: str, in_features: int) -> str | None:
    """The `--quantize` type written for rows of `in_features` weights: `kind` when they are
    whole blocks of it; for q4_k rows that are not whole 256-weight super-blocks, q4_0 (the same
    4.5 bits a weight; llama.cpp also falls back from K-quants there); None when not even 32-weight
    blocks fit (the layer stays float)."""
    block_size, _ = GGML_QUANT_SIZES[QUANTIZE_TYPES[kind]]
    if in_features % block_size == 0:
        return kind
    if kind == "q4_k" and in_features % 32 == 0:
        return "q4_0"
    return None


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
    d = f16_field(b, 0)
    q = nibbles32(b[:, 2:18]).float() - 8
    return d * q


def _quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    # the element of largest magnitude, with its sign, maps to -8
    idx = x.abs().argmax(-1, keepdim=True)
    d = torch.gather(x, -1, idx) / -8
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.clamp(torch.trunc(x * inv + 8.5), max=15).to(torch.uint8)  # [.., 32]
    packed = q[..., :16] | (q[..., 16:] << 4)
    return torch.cat([f16_bytes(d), packed], dim=-1)  # [.., 18]


# ---- Q4_1: d, m (fp16), 16 bytes of nibbles; x = d * q + m
def _dequantize_q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = f16_field(b, 0), f16_field(b, 2)
    q = nibbles32(b[:, 4:20]).float()
    return d * q + m


# ---- Q5_0: d (fp16), 32 high bits, 16 bytes of nibbles; x = d * (q - 16)
def _dequantize_q5_0(b: torch.Tensor) -> torch.Tensor:
    d = f16_field(b, 0)
    q = (nibbles32(b[:, 6:22]) | (bits32(b[:, 2:6]) << 4)).float() - 16
    return d * q


# ---- Q5_1: d, m (fp16), 32 high bits, 16 bytes of nibbles; x = d * q + m
def _dequantize_q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = f16_field(b, 0), f16_field(b, 2)
    q = (nibbles32(b[:, 8:24]) | (bits32(b[:, 4:8]) << 4)).float()
    return d * q + m


# ---- Q8_0: d (fp16), 32 int8; x = d * q
def _dequantize_q8_0(b: torch.Tensor) -> torch.Tensor:
    return f16_field(b, 0) * b[:, 2:34].view(torch.int8).float()


def _quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().amax(-1, keepdim=True) / 127  # [.., 1]
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(x * inv).to(torch.int8)
    return torch.cat([f16_bytes(d), q.view(torch.uint8)], dim=-1)  # [.., 34]


# ---- Q2_K: 16 scale/min nibbles, 64 bytes of 2-bit q, d, dmin (fp16); 16 sub-blocks of 16
def _dequantize_q2_k(b: torch.Tensor) -> torch.Tensor:
    scales = b[:, 0:16]
    d, dmin = f16_field(b, 80), f16_field(b, 82)
    q = two_bit_planes(b[:, 16:80]).reshape(-1, 16, 16).float()  # 16 sub-blocks of 16
    dl = (d * (scales & 0xF).float()).unsqueeze(-1)
    ml = (dmin * (scales >> 4).float()).unsqueeze(-1)
    return (dl * q - ml).reshape(-1, 256)


# ---- Q3_K: 32 bytes of high bits, 64 bytes of 2-bit q, 12 bytes of 6-bit scales, d (fp16)
def _dequantize_q3_k(b: torch.Tensor) -> torch.Tensor:
    hmask, s = b[:, 0:32], b[:, 96:108]
    d = f16_field(b, 108)
    # 16 six-bit scales: low 4 bits from bytes 0..7 (low nibbles first), high 2 from bytes 8..11
    low = torch.cat([s[:, 0:8] & 0xF, s[:, 0:8] >> 4], dim=1)  # [nb, 16]
    shifts = byte_shifts((0, 2, 4, 6), b.device).view(1, 4, 1)
    high = ((s[:, 8:12].unsqueeze(1) >> shifts) & 3).reshape(-1, 16)  # [nb, 4, 4] -> [nb, 16]
    sc = (low | (high << 4)).float() - 32
    hbit = (hmask.unsqueeze(1) >> byte_shifts(tuple(range(8)), b.device).view(1, 8, 1)) & 1
    q = two_bit_planes(b[:, 32:96]).float() - 4 * (1 - hbit.reshape(-1, 2, 4, 32).float())
    return ((d * sc).unsqueeze(-1) * q.reshape(-1, 16, 16)).reshape(-1, 256)


# ---- Q4_K: d, dmin (fp16), 12 bytes of 6-bit (scale, min), 128 bytes of nibbles; 8 x 32
def _dequantize_q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = f16_field(b, 0), f16_field(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    q = _k_low_nibbles(b[:, 16:144]).float()  # [nb, 8, 32]
    out = (d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)
    return out.reshape(-1, 256)


def _quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    # Each sub-block of 32 is fitted as x ~ scale * q - min (q in 0..15, min >= 0); the 8 scales
    # and 8 mins are then quantised to 6 bits against the super-block's d = max scale / 63 and
    # dmin = max min / 63, and q re-rounded against the scale and min as stored.
    lead = x.shape[:-1]
    x = x.reshape(-1, 8, 32)  # [nb, 8, 32]
    scale, neg_min = _fit_scale_min(x, 15)  # [nb, 8] each
    max_scale = scale.amax(-1, keepdim=True)  # [nb, 1]
    max_min = neg_min.amax(-1, keepdim=True)
    inv_scale = torch.where(max_scale > 0, 63 / max_scale, torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63 / max_min, torch.zeros_like(max_min))
    ls = torch.round(inv_scale * scale).clamp(max=63).to(torch.uint8)  # [nb, 8] 6-bit
    lm = torch.round(inv_min * neg_min).clamp(max=63).to(torch.uint8)
    d, dmin = (max_scale / 63).half(), (max_min / 63).half()  # [nb, 1] as stored
    sc = (d.float() * ls.float()).unsqueeze(-1)  # [nb, 8, 1]: the scale and min as read back
    mn = (dmin.float() * lm.float()).unsqueeze(-1)
    q = torch.round((x + mn) / torch.where(sc > 0, sc, torch.ones_like(sc))).clamp(0, 15)
    q = torch.where(sc > 0, q, torch.zeros_like(q)).to(torch.uint8)  # [nb, 8, 32]
    # 12 bytes (the inverse of _k_scale_min): sub-blocks 0..3 in the low 6 bits of bytes 0..3
    # (scale) and 4..7 (min); 4..7 split into low nibbles in bytes 8..11 (scale | min << 4)
    # and their top 2 bits above the 6 of bytes 0..3 (scale) and 4..7 (min).
    packed = torch.cat(
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4),
        ],
        dim=1,
    )  # [nb, 12]
    q = q.reshape(-1, 4, 2, 32)  # [nb, chunk, 2, 32]: the inverse of _k_low_nibbles
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    blocks = torch.cat([f16_bytes(d), f16_bytes(dmin), packed, qs], dim=1)  # [nb, 144]
    return blocks.reshape(*lead, 144)


# ---- Q5_K: Q4_K's fields plus 32 bytes of fifth bits before the nibbles
def _dequantize_q5_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = f16_field(b, 0), f16_field(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    # bit s of qh[l] is the 5th bit of element l of sub-block s
    high = (b[:, 16:48].unsqueeze(1) >> byte_shifts(tuple(range(8)), b.device).view(1, 8, 1)) & 1
    q = (_k_low_nibbles(b[:, 48:176]) | (high << 4)).float()  # [nb, 8, 32]
    out = (d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)
    return out.reshape(-1, 256)


# ---- Q6_K: 128 bytes of low nibbles, 64 bytes of high 2 bits, 16 int8 scales, d (fp16)
def _dequantize_q6_k(b: torch.Tensor) -> torch.Tensor:
    ql, qh = b[:, 0:128], b[:, 128:192]
    sc = b[:, 192:208].view(torch.int8).float()  # [nb, 16]
    d = f16_field(b, 208)
    ql = ql.reshape(-1, 2, 1, 2, 32)  # [nb, half, 1, a, 32]
    low = torch.cat([ql & 0xF, ql >> 4], dim=2).reshape(-1, 2, 4, 32)  # group g = 2*nibble + a
    high = (qh.reshape(-1, 2, 1, 32) >> byte_shifts((0, 2, 4, 6), b.device).view(1, 1, 4, 1)) & 3
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
    GGMLType.Q4_K: _Codec(_dequantize_q4_k, _quantize_q4_k),
    GGMLType.Q5_K: _Codec(_dequantize_q5_k),
    GGMLType.Q6_K: _Codec(_dequantize_q6_k),
    GGMLType.IQ2_XXS: _Codec(ggml_iq.dequantize_iq2_xxs),
    GGMLType.IQ2_XS: _Codec(ggml_iq.dequantize_iq2_xs),
    GGMLType.IQ2_S: _Codec(ggml_iq.dequantize_iq2_s),
    GGMLType.IQ3_XXS: _Codec(ggml_iq.dequantize_iq3_xxs),
    GGMLType.IQ3_S: _Codec(ggml_iq.dequantize_iq3_s),
    GGMLType.IQ1_S: _Codec(ggml_iq.dequantize_iq1_s),
    GGMLType.IQ1_M: _Codec(ggml_iq.dequantize_iq1_m),
    GGMLType.IQ4_NL: _Codec(ggml_iq.dequantize_iq4_nl),
    GGMLType.IQ4_XS: _Codec(ggml_iq.dequantize_iq4_xs),
    GGMLType.TQ1_0: _Codec(ggml_iq.dequantize_tq1_0),
    GGMLType.TQ2_0: _Codec(ggml_iq.dequantize_tq2_0),
    GGMLType.MXFP4: _Codec(ggml_iq.dequantize_mxfp4),
}


# ----------------------------------------------------------------------------------------------
# Private helpers: bit fields shared by several types


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12-byte field -> 6-bit (scale, min) per 32-element sub-block, float [nb, 8]."""
    a, b, c = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([a & 63, (c & 0xF) | ((a >> 6) << 4)], dim=1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return sc.float(), mn.float()


def _fit_scale_min(
    x: torch.Tensor, nmax: int, steps: int = 21
) -> tuple[torch.Tensor, torch.Tensor]:
    """[.., n] -> (scale, min) [..] with x ~ scale * q - min, q = round((x + min) / scale) in
    0..nmax, min >= 0, chosen to lower the error weighted by rms(x) + |x| (larger weights count
    more): from the min/max fit, each of `steps` candidate step counts (nmax - 1 .. nmax + 1)
    across the range from the best min so far to the max rounds q, solves the weighted
    least-squares (scale, min) for it in closed form (min held at 0 if it came out negative)
    and is kept where it lowers the error. This is the search of llama.cpp's make_qkx2_quants
    (ggml-quants.c, MIT; Q4_K's reference quantiser runs it with 21 steps), read for the idea
    and written for every sub-block at once: the error comes from the same weighted sums as the
    fit, so a candidate costs 7 elementwise passes and 3 row sums, in place."""
    w = x.square().mean(-1, keepdim=True).sqrt() + x.abs()  # [.., n] weights
    lo = x.amin(-1).clamp(max=0)  # [..]: the min is never above 0
    hi = x.amax(-1)
    flat = hi == lo  # every value equal (and <= 0): scale 0, q all 0
    hi = torch.where(flat, lo + 1, hi)
    wx = w * x  # [.., n]
    sum_w, sum_x, sum_x2 = w.sum(-1), wx.sum(-1), (wx * x).sum(-1)  # [..]
    q, t = torch.empty_like(x), torch.empty_like(x)

    def sums(levels: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q for `levels` steps from lo to hi, and its weighted sums of q, q^2 and x q [..]."""
        iscale = (levels / (hi - lo)).unsqueeze(-1)
        torch.sub(x, lo.unsqueeze(-1), out=q).mul_(iscale).round_().clamp_(0, nmax)
        sum_q = torch.mul(w, q, out=t).sum(-1)
        sum_q2 = t.mul_(q).sum(-1)
        return sum_q, sum_q2, torch.mul(wx, q, out=t).sum(-1)

    def error(
        scale: torch.Tensor,
        offset: torch.Tensor,
        sum_q: torch.Tensor,
        sum_q2: torch.Tensor,
        sum_xq: torch.Tensor,
    ) -> torch.Tensor:  # sum of w (scale * q + offset - x)^2, expanded
        return (
            scale * (scale * sum_q2 + 2 * offset * sum_q - 2 * sum_xq)
            + offset * (offset * sum_w - 2 * sum_x)
            + sum_x2
        )

    best_scale = (hi - lo) / nmax  # x ~ scale * q + lo
    best_err = error(best_scale, lo, *sums(float(nmax)))
    for step in range(steps):
        sum_q, sum_q2, sum_xq = sums(nmax - 1 + 2 * step / (steps - 1))
        det = sum_w * sum_q2 - sum_q * sum_q
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        scale = (sum_w * sum_xq - sum_x * sum_q) / det
        offset = (sum_q2 * sum_x - sum_q * sum_xq) / det
        positive = offset > 0  # x ~ scale * q through the origin instead
        through_origin = sum_xq / torch.where(ok, sum_q2, torch.ones_like(det))
        scale = torch.where(positive, through_origin, scale)
        offset = torch.where(positive, torch.zeros_like(offset), offset)
        err = error(scale, offset, sum_q, sum_q2, sum_xq)
        better = ok & (err < best_err)
        best_scale = torch.where(better, scale, best_scale)
        lo = torch.where(better, offset, lo)  # the next candidates span from the new min
        best_err = torch.where(better, err, best_err)
    best_scale = torch.where(flat, torch.zeros_like(best_scale), best_scale)
    return best_scale.clamp(min=0), -lo


def _k_low_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[nb, 128] -> [nb, 8, 32]: each 32-byte chunk gives sub-block 2c (low) and 2c+1 (high)."""
    qs = qs.reshape(-1, 4, 1, 32)  # [nb, chunk, 1, 32]
    return torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(-1, 8, 32)
