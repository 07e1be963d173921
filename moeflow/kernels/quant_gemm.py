"""GEMM over GGUF-quantised weights kept in their block layout: the plain-torch reference
(dequantise, then multiply) and the dispatch point quantised linear layers call.

A quantised weight is a uint8 tensor [N, row_bytes]: row n holds the blocks of output feature n
exactly as the GGUF file stores them (ggml's block layouts), so loading is a copy and rows can be
merged (q/k/v, gate/up) by concatenation.

On x86-64 CPUs with AVX2 the compiled kernels (kernels/cpu_ext.py) multiply straight from the
blocks. On the exact fp32 path they do so for up to `_GEMV_MAX_ROWS` activation rows (decode: each
weight byte is read once per step for the whole batch); larger batches (prefill) dequantise the
weight to fp32 in the kernel and multiply with torch's GEMM. The int8 path (MOEFLOW_CPU_INT8, the
default) multiplies from the blocks at every batch size (many rows: the kernels' int8 GEMMs, whose
rows are the GEMV's bit for bit), so a row's result never depends on the batch it came in: prefill
chunking or a prefix-cache hit cannot change it. Elsewhere the reference runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflow import env
from moeflow.kernels import cpu_ext
from moeflow.weights.ggml_quants import GGML_QUANT_SIZES, Q4_K_R16, GGMLType, dequantize
from moeflow.weights.gguf import release_mapped

# Types kept quantised in memory (the compiled kernels read each of them).
KEPT_TYPES = frozenset(
    {
        GGMLType.Q4_0,
        GGMLType.Q4_1,
        GGMLType.Q5_0,
        GGMLType.Q5_1,
        GGMLType.Q8_0,
        GGMLType.Q2_K,
        GGMLType.Q3_K,
        GGMLType.Q4_K,
        GGMLType.Q5_K,
        GGMLType.Q6_K,
        GGMLType.IQ4_NL,
        GGMLType.IQ4_XS,
    }
)

# Up to this many rows the exact path's GEMV reads the blocks directly; above, dequantise + GEMM
# (the int8 path reads the blocks at any size).
_GEMV_MAX_ROWS = 16
REFINE_TOP = 16  # logits recomputed with fp32 activations per row (qlinear_logits)


def repacks_q4k() -> bool:
    """Whether weights in Q4_K are repacked on load here (repacked_for_cpu)."""
    return env.MOEFLOW_CPU_REPACK and env.MOEFLOW_CPU_INT8 and cpu_ext.isa() == "avx512"


def repacked_for_cpu(blocks: torch.Tensor, qtype: int) -> tuple[torch.Tensor, int]:
    """(blocks, qtype) of a weight's rows [..., N, row_bytes] (a linear layer's, or every
    expert's of one projection) as the CPU kernels hold them here: Q4_K repacked 16 rows at a
    time (Q4_K_R16, kernels/csrc/q4k_r16.h) where its kernels use AVX-512 VNNI, activations are
    int8 and MOEFLOW_CPU_REPACK is on (repacks_q4k); else as they are. The repacked copy is
    memory of the process's own; pages of a mapped file the copy read are released (they stay
    in the page cache). Meta tensors (the memory plan's dry run) give a meta tensor of the
    copy."""
    if not (
        qtype == GGMLType.Q4_K
        and blocks.dim() >= 2
        and blocks.shape[-2] % 16 == 0
        and blocks.device.type in ("cpu", "meta")
        and repacks_q4k()
    ):
        return blocks, qtype
    if blocks.is_meta:
        return torch.empty(blocks.shape, dtype=torch.uint8, device="meta"), Q4_K_R16
    ops = cpu_ext.ops()
    if ops is None:
        return blocks, qtype
    packed = ops.repack_q4k_r16(blocks)
    release_mapped(blocks)
    return packed, Q4_K_R16


def row_bytes(qtype: int, in_features: int) -> int:
    block, size = GGML_QUANT_SIZES[GGMLType(qtype)]
    if in_features % block:
        raise ValueError(f"in_features {in_features} is not a multiple of {block}")
    return in_features // block * size


def dequantize_ref(qweight: torch.Tensor, qtype: int, in_features: int) -> torch.Tensor:
    """[N, row_bytes] uint8 -> [N, in_features] float32, with the GGUF reader's torch decoder."""
    n = qweight.shape[0]
    return dequantize(qweight.reshape(-1), qtype, (n, in_features), torch.float32)


def qlinear_ref(
    x: torch.Tensor, qweight: torch.Tensor, qtype: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype, through the dequantised fp32 weight."""
    w = dequantize_ref(qweight, qtype, x.shape[-1])
    b = bias.float() if bias is not None else None
    return F.linear(x.float(), w, b).to(x.dtype)


def qlinear(
    x: torch.Tensor, qweight: torch.Tensor, qtype: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The dispatch point: x [..., K] -> [..., N] in x's dtype.

    By default (MOEFLOW_CPU_INT8) the activations are quantised to int8 per 32 values (per 256
    for the K-quants; llama.cpp's scheme): faster GEMVs and GEMMs, the model's divergence from
    the fp32 reference no larger than llama.cpp's on the same file, and a row's result
    independent of the batch (any size). The exact path (MOEFLOW_CPU_INT8=0) multiplies fp32
    activations by the exact weight values, as the reference does up to summation order, so
    greedy output is the reference's."""
    ops = cpu_ext.ops() if x.device.type == "cpu" else None
    if ops is None:
        return qlinear_ref(x, qweight, qtype, bias)
    int8 = env.MOEFLOW_CPU_INT8
    gemv = ops.qgemm_i8 if int8 else ops.qgemm
    if x.dim() == 2 and x.dtype == torch.float32 and (int8 or x.shape[0] <= _GEMV_MAX_ROWS):
        # the decode hot path: no reshapes or casts
        y = gemv(x.contiguous(), qweight, qtype)
        return y if bias is None else y.add_(bias)
    lead = x.shape[:-1]
    xf = x.reshape(-1, x.shape[-1]).float().contiguous()
    if int8 or xf.shape[0] <= _GEMV_MAX_ROWS:
        y = gemv(xf, qweight, qtype)
        if bias is not None:
            y += bias
    else:
        w = ops.dequantize(qweight, qtype, xf.shape[1])
        y = F.linear(xf, w, bias.float() if bias is not None else None)
    return y.to(x.dtype).reshape(*lead, y.shape[-1])


def qlinear_logits(x: torch.Tensor, qweight: torch.Tensor, qtype: int) -> torch.Tensor:
    """Logits x [S, K] -> [S, V] in x's dtype over a quantised table (the LM head).

    With int8 activations (MOEFLOW_CPU_INT8) the whole vocabulary is scored through the int8
    GEMV, then each row's REFINE_TOP best logits are recomputed with fp32 activations (REFINE_TOP
    weight rows: a few thousandths of the head's cost). The logits sampling reads most, the
    best ones, are the exact path's, so a greedy pick is the exact path's whenever that token is
    among the int8 pass's best REFINE_TOP (its error is ~0.1-0.3 here): on the embedded SmolLM2
    the int8 head alone turned the first token of "What is the capital of France?" from "The"
    (-1.88) into "L" (-1.96 exact; llama.cpp, whose head is int8 too, writes "L'Etoile, ...")."""
    logits = qlinear(x, qweight, qtype)
    ops = cpu_ext.ops() if x.device.type == "cpu" else None
    if ops is None or not env.MOEFLOW_CPU_INT8:
        return logits
    xf = x.float().contiguous()
    top = logits.topk(min(REFINE_TOP, logits.shape[-1]), dim=-1).indices  # [S, k]
    for s in range(xf.shape[0]):
        rows = qweight.index_select(0, top[s])  # [k, row_bytes]
        logits[s, top[s]] = ops.qgemm(xf[s : s + 1], rows, qtype)[0]
    return logits


def qembedding(ids: torch.Tensor, qweight: torch.Tensor, qtype: int, dim: int) -> torch.Tensor:
    """Rows `ids` of a quantised embedding table, float32 [T, dim]."""
    ops = cpu_ext.ops() if qweight.device.type == "cpu" else None
    if ops is None:
        return dequantize_ref(qweight[ids], qtype, dim)
    return ops.dequantize(qweight, qtype, dim, ids.contiguous())
