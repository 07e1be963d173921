"""ggml's IQ types (IQ1_S/M, IQ2_XXS/XS/S, IQ3_XXS/S, IQ4_NL/XS), the ternary TQ1_0 / TQ2_0 and
MXFP4: torch dequantisers mapping blocks [nb, TS] uint8 -> [nb, QK] float32, registered in
weights/ggml_quants.py's codec table. Layouts read from ggml-common.h and ggml-quants.c (MIT); the
code is our own."""

from __future__ import annotations

import functools

import torch

from moeflow.weights.ggml_bits import (
    arange64,
    byte_shifts,
    f16_field,
    lookup,
    nibbles32,
    nibbles_interleaved,
    two_bit_planes,
    u16,
    u32,
)
from moeflow.weights.iq_grids import GRIDS

# IQ4_NL / IQ4_XS's 16-value codebook (ggml-common.h `kvalues_iq4nl`): a non-linear 4-bit grid,
# denser near zero where most weights are.
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# MXFP4's FP4 (E2M1) values doubled, as ggml stores them (`kvalues_mxfp4`), sign in bit 3.
_MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
# IQ1_S / IQ1_M: every grid value is shifted by +-1/8 (ggml `IQ1S_DELTA`).
_IQ1_DELTA = 0.125


# ---- The IQ types: each group of 8 (or 4) weights is an entry of a fixed grid (weights/
# iq_grids.py) chosen by an index, with signs from a bit field and a scale per 16 or 32 weights.
# Signs of 8 values in 7 bits (IQ2_XXS, IQ2_XS, IQ3_XXS): the 8th sign makes their count even.


# ---- IQ2_XXS: d (fp16), per 32 weights 8 bytes: 4 grid indices (8 bits), then a uint32 of
# four 7-bit signs and a 4-bit scale in its top bits
def dequantize_iq2_xxs(b: torch.Tensor) -> torch.Tensor:
    d = f16_field(b, 0)
    qs = b[:, 2:66].reshape(-1, 8, 8)  # [nb, 8 sub-blocks, 8 bytes]
    grid = iq_grid("IQ2XXS", b.device)[qs[:, :, :4].long()]  # [nb, 8, 4, 8]
    aux = u32(qs[:, :, 4:8])  # [nb, 8]
    db = d * (0.5 + (aux >> 28).float()) * 0.25  # [nb, 8]
    signs = _even_signs((aux.unsqueeze(-1) >> arange64(0, 28, 7, b.device)) & 127)  # [nb, 8, 4, 8]
    return (db[..., None, None] * grid * signs).reshape(-1, 256)


# ---- IQ2_XS: d (fp16), 32 uint16 (9-bit grid index, 7-bit signs), 8 bytes of two 4-bit scales
def dequantize_iq2_xs(b: torch.Tensor) -> torch.Tensor:
    d = f16_field(b, 0)
    qs = u16(b[:, 2:66]).reshape(-1, 8, 4)  # [nb, 8, 4]
    grid = iq_grid("IQ2XS", b.device)[qs & 511]  # [nb, 8, 4, 8]
    signs = _even_signs(qs >> 9)
    return (_iq2_scales(d, b[:, 66:74]) * grid * signs).reshape(-1, 256)


# ---- IQ2_S: d (fp16), 32 low bytes of 10-bit grid indices, 32 bytes of signs, 8 bytes of the
# indices' top 2 bits, 8 bytes of two 4-bit scales
def dequantize_iq2_s(b: torch.Tensor) -> torch.Tensor:
    d = f16_field(b, 0)
    high = (b[:, 66:74].unsqueeze(-1) >> arange64(0, 8, 2, b.device)) & 3  # [nb, 8, 4]
    idx = b[:, 2:34].reshape(-1, 8, 4).long() | (high.long() << 8)
    grid = iq_grid("IQ2S", b.device)[idx]  # [nb, 8, 4, 8]
    signs = _sign_bits(b[:, 34:66].reshape(-1, 8, 4))
    return (_iq2_scales(d, b[:, 74:82]) * grid * signs).reshape(-1, 256)


# ---- IQ3_XXS: d (fp16), 64 bytes of grid indices (4 weights each), then per 32 weights a
# uint32 of four 7-bit signs and a 4-bit scale in its top bits
def dequantize_iq3_xxs(b: torch.Tensor) -> torch.Tensor:
    d = f16_field(b, 0)
    grid = iq_grid("IQ3XXS", b.device)[b[:, 2:66].long()]  # [nb, 64, 4]
    aux = u32(b[:, 66:98].reshape(-1, 8, 4))  # [nb, 8]
    db = d * (0.5 + (aux >> 28).float()) * 0.5
    signs = _even_signs((aux.unsqueeze(-1) >> arange64(0, 28, 7, b.device)) & 127)  # [nb, 8, 4, 8]
    return (db[..., None, None] * grid.reshape(-1, 8, 4, 8) * signs).reshape(-1, 256)


# ---- IQ3_S: d (fp16), 64 low bytes of 9-bit grid indices (4 weights each), 8 bytes of their
# top bits, 32 bytes of signs, 4 bytes of two 4-bit scales (odd multipliers 1..31)
def dequantize_iq3_s(b: torch.Tensor) -> torch.Tensor:
    d = f16_field(b, 0)
    high = (b[:, 66:74].unsqueeze(-1) >> arange64(0, 8, 1, b.device)) & 1  # [nb, 8, 8]
    idx = b[:, 2:66].reshape(-1, 8, 8).long() | (high.long() << 8)
    grid = iq_grid("IQ3S", b.device)[idx].reshape(-1, 8, 32)  # [nb, 8, 32]
    signs = _sign_bits(b[:, 74:106].reshape(-1, 8, 4)).reshape(-1, 8, 32)
    sc = nibbles_interleaved(b[:, 106:110])  # [nb, 8]
    db = d * (1 + 2 * sc).float()
    return (db.unsqueeze(-1) * grid * signs).reshape(-1, 256)


# ---- IQ1_S: d (fp16), 32 low bytes of 11-bit grid indices (8 weights of -1, 0, 1 each), 8
# uint16: 4 x 3 top index bits, a 3-bit scale, the sign of the shift +-1/8
def dequantize_iq1_s(b: torch.Tensor) -> torch.Tensor:
    d = f16_field(b, 0)
    qh = u16(b[:, 34:50])  # [nb, 8]
    high = (qh.unsqueeze(-1) >> arange64(0, 12, 3, b.device)) & 7  # [nb, 8, 4]
    grid = iq_grid("IQ1S", b.device)[b[:, 2:34].reshape(-1, 8, 4).long() | (high << 8)]
    dl = d * (2 * ((qh >> 12) & 7) + 1).float()  # [nb, 8]
    delta = torch.where((qh & 0x8000) != 0, -_IQ1_DELTA, _IQ1_DELTA)
    return (dl[..., None, None] * (grid + delta[..., None, None])).reshape(-1, 256)


# ---- IQ1_M: 32 low bytes of 11-bit grid indices, 16 bytes (per 8 weights a nibble: 3 top index
# bits and the shift's sign), 8 bytes of 3-bit scales per 16 weights whose four top nibbles
# together are d (fp16)
def dequantize_iq1_m(b: torch.Tensor) -> torch.Tensor:
    sc = u16(b[:, 48:56])  # [nb, 4]
    d_bits = (sc[:, 0:1] >> 12) | ((sc[:, 1:2] >> 8) & 0xF0)  # [nb, 1]
    d_bits |= ((sc[:, 2:3] >> 4) & 0xF00) | (sc[:, 3:4] & 0xF000)
    d = torch.cat([d_bits & 255, d_bits >> 8], 1).to(torch.uint8).view(torch.float16).float()
    qh = b[:, 32:48].reshape(-1, 8, 2).repeat_interleave(2, -1)  # [nb, 8, 4]: a byte per 2 groups
    qh = qh >> byte_shifts((0, 4, 0, 4), b.device)
    idx = b[:, 0:32].reshape(-1, 8, 4).long() | ((qh & 7).long() << 8)
    grid = iq_grid("IQ1S", b.device)[idx]  # [nb, 8, 4, 8]
    delta = torch.where((qh & 8) != 0, -_IQ1_DELTA, _IQ1_DELTA)  # [nb, 8, 4]
    # the scale of groups 0-1 and of 2-3 of sub-block s: bits 6 (s % 2) and + 3 of sc[s // 2]
    shifts = torch.tensor([[0, 0, 3, 3], [6, 6, 9, 9]], device=b.device).repeat(4, 1)  # [8, 4]
    scale = (sc.repeat_interleave(2, -1).unsqueeze(-1) >> shifts) & 7  # [nb, 8, 4]
    dl = d.unsqueeze(-1) * (2 * scale + 1).float()
    return (dl.unsqueeze(-1) * (grid + delta.unsqueeze(-1))).reshape(-1, 256)


# ---- IQ4_NL: d (fp16), 16 bytes of nibbles indexing a 16-value non-linear codebook
def dequantize_iq4_nl(b: torch.Tensor) -> torch.Tensor:
    return f16_field(b, 0) * lookup(IQ4_VALUES, nibbles32(b[:, 2:18]))


# ---- IQ4_XS: d (fp16), uint16 of the 8 scales' top 2 bits, 4 bytes of their low nibbles, 128
# bytes of codebook nibbles (IQ4_NL's); scale per 32 weights d * (6-bit scale - 32)
def dequantize_iq4_xs(b: torch.Tensor) -> torch.Tensor:
    d = f16_field(b, 0)
    high = (u16(b[:, 2:4]) >> arange64(0, 16, 2, b.device)) & 3  # [nb, 8]
    ls = nibbles_interleaved(b[:, 4:8]).long() | (high << 4)
    q = lookup(IQ4_VALUES, nibbles32(b[:, 8:136].reshape(-1, 16)))  # [nb * 8, 32]
    return ((d * (ls - 32).float()).unsqueeze(-1) * q.reshape(-1, 8, 32)).reshape(-1, 256)


# ---- TQ1_0: 48 + 4 bytes of base-3 digits (5 ternary weights a byte, 4 in the last 4 bytes
# of the block), d (fp16); x = d * (t - 1), t in 0..2
def dequantize_tq1_0(b: torch.Tensor) -> torch.Tensor:
    d = f16_field(b, 52)
    pow3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32, device=b.device).view(1, 5, 1)

    def trits(x: torch.Tensor, n: int) -> torch.Tensor:  # [nb, m] -> [nb, n * m], digit-major
        t = (((x.int().unsqueeze(1) * pow3[:, :n]) & 255) * 3) >> 8  # [nb, n, m]
        return t.reshape(x.shape[0], -1)

    t = torch.cat([trits(b[:, 0:32], 5), trits(b[:, 32:48], 5), trits(b[:, 48:52], 4)], dim=1)
    return d * (t.float() - 1)


# ---- TQ2_0: 64 bytes of 2-bit q (Q2_K's plane order), d (fp16); x = d * (q - 1)
def dequantize_tq2_0(b: torch.Tensor) -> torch.Tensor:
    return f16_field(b, 64) * (two_bit_planes(b[:, 0:64]).reshape(-1, 256).float() - 1)


# ---- MXFP4 (OCP microscaling): a shared power-of-two scale (E8M0), 16 bytes of FP4 (E2M1)
# nibbles, low nibbles elements 0..15; ggml stores the E2M1 values doubled and halves the scale
def dequantize_mxfp4(b: torch.Tensor) -> torch.Tensor:
    e = b[:, 0:1].int()
    # 2**(e - 128) as float32 bits: subnormal for e < 2
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    d = bits.view(torch.float32)
    return d * lookup(_MXFP4_VALUES, nibbles32(b[:, 1:17]))


# ----------------------------------------------------------------------------------------------
# Private helpers of the IQ types


def _sign_bits(b: torch.Tensor) -> torch.Tensor:
    """[..] bytes -> [.., 8] +1.0 / -1.0 for bits 0..7 (a set bit negates)."""
    bits = (b.long().unsqueeze(-1) >> arange64(0, 8, 1, b.device)) & 1
    return 1.0 - 2.0 * bits.float()


def _even_signs(s7: torch.Tensor) -> torch.Tensor:
    """7 stored sign bits -> [.., 8] signs, the 8th making the count of minus signs even (ggml's
    `ksigns_iq2xs`)."""
    parity = s7.clone()
    for shift in (4, 2, 1):
        parity ^= parity >> shift
    return _sign_bits(s7 | ((parity & 1) << 7))


def _iq2_scales(d: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """IQ2_XS / IQ2_S: [nb, 8] bytes of two 4-bit scales (groups 0-1, 2-3 of a sub-block) ->
    [nb, 8, 4, 1] d * (0.5 + s) / 4 per group of 8 weights."""
    s = nibbles_interleaved(scales).reshape(-1, 8, 2).repeat_interleave(2, -1)  # [nb, 8, 4]
    return (d.unsqueeze(-1) * (0.5 + s.float()) * 0.25).unsqueeze(-1)


@functools.cache
def iq_grid(name: str, device: torch.device) -> torch.Tensor:
    """The float grid [entries, values per entry] of iq_grids.GRIDS[name] on `device`."""
    values, per_entry, bits, codes = GRIDS[name]
    c = torch.frombuffer(bytearray(codes), dtype=torch.uint8)
    c = u16(c).unsqueeze(-1)  # [entries, 1]
    idx = (c >> arange64(0, bits * per_entry, bits, c.device)) & ((1 << bits) - 1)
    return torch.tensor(values, dtype=torch.float32)[idx].to(device)
