"""Triton fused MoE: the (token, expert) pairs aligned into per-expert blocks, two grouped GEMMs
(gate/up with the activation fused in, down with the router weight fused in), a matrix-vector path
for small decode batches, and the per-device tuning table that picks their block shapes.

Shape legend: T tokens, H hidden, E experts, I expert intermediate size, K experts per token,
N = T*K (token, expert) pairs (pair t*K + k), P padded pair slots, B blocks of BLOCK_SIZE_M."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

from moeflow.kernels.triton.elementwise import ACTS, activation
from moeflow.kernels.triton_utils import dot_precision
from moeflow.utils import cdiv

# Token-count buckets of the tuning table (the tuning command's default list).
TOKEN_BUCKETS: tuple[int, ...] = tuple(2**i for i in range(13))  # 1 .. 4096
# Where the tuning tables live: one JSON per device, <device name with '_' for ' '>.json.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "fused_moe"
# The fields of one config (the launch shape of both paths; SMALL_BATCH_MAX_PAIRS chooses one).
CONFIG_KEYS: tuple[str, ...] = (
    "BLOCK_SIZE_M",
    "BLOCK_SIZE_N",
    "BLOCK_SIZE_K",
    "GROUP_SIZE_M",
    "num_warps",
    "num_stages",
    "SMALL_BATCH_MAX_PAIRS",
)
# T*K up to which the default config takes the small-batch path.
_SMALL_BATCH_MAX_PAIRS = 32


def moe_align_block_size(
    topk_ids: torch.Tensor,  # [T, K]
    num_experts: int,
    block_m: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs grouped by expert, each expert's run padded to a multiple of `block_m`:
    (sorted_pair_ids [P] int32, expert_block_ids [B] int32, num_pairs_post_padded [1] int32).
    Padding slots hold the sentinel N; block b (b * block_m < num_pairs_post_padded) belongs to
    expert expert_block_ids[b], later blocks hold -1. Within an expert, pairs keep their order.
    NOTE: no host sync; P = B * block_m and B come from the shapes only (at most min(N, E)
    experts are used, each wasting < block_m slots), so the GEMM grids are graph-static."""
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()  # [N]
    num_pairs = flat.numel()
    max_padded = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    num_blocks = cdiv(max_padded, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.index_add_(0, flat, torch.ones_like(flat))  # [E]; NOTE: bincount would sync
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    padded_end = padded.cumsum(0)  # [E]
    order = flat.argsort(stable=True)  # [N] pair ids grouped by expert
    sorted_experts = flat[order]  # [N]
    first = counts.cumsum(0) - counts  # [E] first sorted position of each expert
    rank = torch.arange(num_pairs, device=device) - first[sorted_experts]  # [N]
    dest = (padded_end - padded)[sorted_experts] + rank  # [N] slot of each sorted pair
    sorted_pair_ids = torch.full(
        (num_blocks * block_m,), num_pairs, dtype=torch.int32, device=device
    )
    sorted_pair_ids.scatter_(0, dest, order.to(torch.int32))  # [P]
    blocks = torch.arange(num_blocks, device=device)  # [B]
    expert_block_ids = torch.searchsorted(padded_end // block_m, blocks, right=True)  # [B]
    expert_block_ids = torch.where(expert_block_ids < num_experts, expert_block_ids, -1)
    return sorted_pair_ids, expert_block_ids.to(torch.int32), padded_end[-1:].to(torch.int32)


@triton.jit
def _moe_gate_up_kernel(
    x_ptr,  # [T, H]
    w13_ptr,  # [E, 2I, H]
    out_ptr,  # [N, I]
    sorted_pair_ids_ptr,  # [P]
    expert_block_ids_ptr,  # [B]
    num_pairs_post_padded_ptr,  # [1]
    num_pairs,
    stride_xt,
    stride_we,
    stride_wn,
    stride_on,
    num_blocks_m,
    HIDDEN: tl.constexpr,
    INTER: tl.constexpr,
    TOP_K: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One [BLOCK_SIZE_M pairs, BLOCK_SIZE_N] tile of act(x W_gate^T) * (x W_up^T): the gate and up
    tiles share the gathered x rows and never leave registers."""
    pid_m, pid_n = _swizzle(  # pyright: ignore[reportGeneralTypeIssues] (a jit call)
        tl.program_id(0), num_blocks_m, tl.cdiv(INTER, BLOCK_SIZE_N), GROUP_SIZE_M
    )
    if pid_m * BLOCK_SIZE_M >= tl.load(num_pairs_post_padded_ptr):
        return
    pair, row_mask, expert, offs_n, offs_wn, offs_k = _block_rows(
        pid_m,
        pid_n,
        sorted_pair_ids_ptr,
        expert_block_ids_ptr,
        num_pairs,
        INTER,
        BLOCK_SIZE_M,
        BLOCK_SIZE_N,
        BLOCK_SIZE_K,
    )
    a_ptrs = x_ptr + (pair // TOP_K)[:, None] * stride_xt + offs_k[None, :]  # [BM, BK]
    g_ptrs = w13_ptr + expert * stride_we + offs_wn[None, :] * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + INTER * stride_wn  # [BK, BN] each
    acc_g = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(HIDDEN, BLOCK_SIZE_K)):
        if HIDDEN % BLOCK_SIZE_K == 0:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            k_mask = offs_k < HIDDEN - k * BLOCK_SIZE_K
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_mask[:, None], other=0.0)
            u = tl.load(u_ptrs, mask=k_mask[:, None], other=0.0)
        acc_g = tl.dot(a, g, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_SIZE_K
        g_ptrs += BLOCK_SIZE_K
        u_ptrs += BLOCK_SIZE_K
    h = activation(acc_g, ACT) * acc_u
    out_ptrs = out_ptr + pair[:, None] * stride_on + offs_n[None, :]
    tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & (offs_n < INTER))


@triton.jit
def _moe_down_kernel(
    h_ptr,  # [N, I]
    w2_ptr,  # [E, H, I]
    topk_weights_ptr,  # [N]
    out_ptr,  # [N, H]
    sorted_pair_ids_ptr,  # [P]
    expert_block_ids_ptr,  # [B]
    num_pairs_post_padded_ptr,  # [1]
    num_pairs,
    stride_hn,
    stride_we,
    stride_wn,
    stride_on,
    num_blocks_m,
    HIDDEN: tl.constexpr,
    INTER: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One [BLOCK_SIZE_M pairs, BLOCK_SIZE_N] tile of weight * (h W2^T), rows written per pair."""
    pid_m, pid_n = _swizzle(  # pyright: ignore[reportGeneralTypeIssues] (a jit call)
        tl.program_id(0), num_blocks_m, tl.cdiv(HIDDEN, BLOCK_SIZE_N), GROUP_SIZE_M
    )
    if pid_m * BLOCK_SIZE_M >= tl.load(num_pairs_post_padded_ptr):
        return
    pair, row_mask, expert, offs_n, offs_wn, offs_k = _block_rows(
        pid_m,
        pid_n,
        sorted_pair_ids_ptr,
        expert_block_ids_ptr,
        num_pairs,
        HIDDEN,
        BLOCK_SIZE_M,
        BLOCK_SIZE_N,
        BLOCK_SIZE_K,
    )
    a_ptrs = h_ptr + pair[:, None] * stride_hn + offs_k[None, :]  # [BM, BK]
    b_ptrs = w2_ptr + expert * stride_we + offs_wn[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(INTER, BLOCK_SIZE_K)):
        if INTER % BLOCK_SIZE_K == 0:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            b = tl.load(b_ptrs)
        else:
            k_mask = offs_k < INTER - k * BLOCK_SIZE_K
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_SIZE_K
        b_ptrs += BLOCK_SIZE_K
    weight = tl.load(topk_weights_ptr + pair, mask=row_mask, other=0.0)  # [BM] float32
    acc = acc * weight[:, None]
    out_ptrs = out_ptr + pair[:, None] * stride_on + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & (offs_n < HIDDEN))


@triton.jit
def _moe_gate_up_gemv_kernel(
    x_ptr,  # [T, H]
    w13_ptr,  # [E, 2I, H]
    topk_ids_ptr,  # [N]
    out_ptr,  # [N, I]
    stride_xt,
    stride_we,
    stride_wn,
    stride_on,
    HIDDEN: tl.constexpr,
    INTER: tl.constexpr,
    TOP_K: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
):
    """Program (pair, n): act(gate) * up for BLOCK_SIZE_N intermediate columns of one pair, read
    from the chosen expert's rows only. Products accumulate per lane; one reduction at the end."""
    pair = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    expert = tl.load(topk_ids_ptr + pair).to(tl.int64)
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    offs_wn = offs_n % INTER
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    x_ptrs = x_ptr + (pair // TOP_K) * stride_xt + offs_k  # [BK]
    g_ptrs = w13_ptr + expert * stride_we + offs_wn[:, None] * stride_wn + offs_k[None, :]
    u_ptrs = g_ptrs + INTER * stride_wn  # [BN, BK] each
    acc_g = tl.zeros((BLOCK_SIZE_N, BLOCK_SIZE_K), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_SIZE_N, BLOCK_SIZE_K), dtype=tl.float32)
    for k in range(0, tl.cdiv(HIDDEN, BLOCK_SIZE_K)):
        if HIDDEN % BLOCK_SIZE_K == 0:
            xk = tl.load(x_ptrs)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            k_mask = offs_k < HIDDEN - k * BLOCK_SIZE_K
            xk = tl.load(x_ptrs, mask=k_mask, other=0.0)
            g = tl.load(g_ptrs, mask=k_mask[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=k_mask[None, :], other=0.0)
        xk = xk.to(tl.float32)[None, :]
        acc_g += g.to(tl.float32) * xk
        acc_u += u.to(tl.float32) * xk
        x_ptrs += BLOCK_SIZE_K
        g_ptrs += BLOCK_SIZE_K
        u_ptrs += BLOCK_SIZE_K
    h = activation(tl.sum(acc_g, axis=1), ACT) * tl.sum(acc_u, axis=1)  # [BN]
    tl.store(
        out_ptr + pair * stride_on + offs_n, h.to(out_ptr.dtype.element_ty), mask=offs_n < INTER
    )


@triton.jit
def _moe_down_gemv_kernel(
    h_ptr,  # [N, I]
    w2_ptr,  # [E, H, I]
    topk_ids_ptr,  # [N]
    topk_weights_ptr,  # [N]
    out_ptr,  # [N, H]
    stride_hn,
    stride_we,
    stride_wn,
    stride_on,
    HIDDEN: tl.constexpr,
    INTER: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
):
    """Program (pair, n): weight * (h W2^T) for BLOCK_SIZE_N hidden columns of one pair."""
    pair = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    expert = tl.load(topk_ids_ptr + pair).to(tl.int64)
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    offs_wn = offs_n % HIDDEN
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    h_ptrs = h_ptr + pair * stride_hn + offs_k  # [BK]
    w_ptrs = w2_ptr + expert * stride_we + offs_wn[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_SIZE_N, BLOCK_SIZE_K), dtype=tl.float32)
    for k in range(0, tl.cdiv(INTER, BLOCK_SIZE_K)):
        if INTER % BLOCK_SIZE_K == 0:
            hk = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_mask = offs_k < INTER - k * BLOCK_SIZE_K
            hk = tl.load(h_ptrs, mask=k_mask, other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * hk.to(tl.float32)[None, :]
        h_ptrs += BLOCK_SIZE_K
        w_ptrs += BLOCK_SIZE_K
    y = tl.sum(acc, axis=1) * tl.load(topk_weights_ptr + pair)  # [BN]
    tl.store(
        out_ptr + pair * stride_on + offs_n, y.to(out_ptr.dtype.element_ty), mask=offs_n < HIDDEN
    )


def fused_moe_triton(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]: gate rows, then up rows
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, K] float32
    topk_ids: torch.Tensor,  # [T, K]
    act: str = "silu",
    config: dict[str, int] | None = None,
) -> torch.Tensor:  # [T, H]
    """As fused_moe_ref, through the grouped GEMMs over expert-aligned blocks of BLOCK_SIZE_M
    pairs (`config`: the tuning table's choice for these shapes when None). The weighted sum over
    K reads the per-pair rows in a fixed order (no atomics), so a token's row does not depend on
    the rest of the batch. Graph-capturable: every grid comes from the shapes."""
    num_tokens, hidden, num_experts, inter, top_k = _check_inputs(
        x, w13, w2, topk_weights, topk_ids, act
    )
    if config is None:
        config = get_moe_config(num_experts, inter, hidden, x.dtype, num_tokens, top_k, x.device)
    if num_tokens == 0:
        return x.new_empty(0, hidden)
    block_m, block_n, block_k = (
        config[k] for k in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K")
    )
    precision = dot_precision(x)
    sorted_pair_ids, expert_block_ids, num_post = moe_align_block_size(
        topk_ids, num_experts, block_m
    )
    num_pairs, num_blocks_m = num_tokens * top_k, expert_block_ids.shape[0]
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)  # [N, I]
    _moe_gate_up_kernel[(num_blocks_m * triton.cdiv(inter, block_n),)](
        x,
        w13,
        h,
        sorted_pair_ids,
        expert_block_ids,
        num_post,
        num_pairs,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        h.stride(0),
        num_blocks_m,
        HIDDEN=hidden,
        INTER=inter,
        TOP_K=top_k,
        ACT=ACTS[act],
        BLOCK_SIZE_M=block_m,
        BLOCK_SIZE_N=block_n,
        BLOCK_SIZE_K=block_k,
        GROUP_SIZE_M=config["GROUP_SIZE_M"],
        DOT_PRECISION=precision,
        num_warps=config["num_warps"],  # pyright: ignore[reportCallIssue] (a launch option)
        num_stages=config["num_stages"],  # pyright: ignore[reportCallIssue]
    )
    out = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)  # [N, H]
    _moe_down_kernel[(num_blocks_m * triton.cdiv(hidden, block_n),)](
        h,
        w2,
        topk_weights.reshape(-1),
        out,
        sorted_pair_ids,
        expert_block_ids,
        num_post,
        num_pairs,
        h.stride(0),
        w2.stride(0),
        w2.stride(1),
        out.stride(0),
        num_blocks_m,
        HIDDEN=hidden,
        INTER=inter,
        BLOCK_SIZE_M=block_m,
        BLOCK_SIZE_N=block_n,
        BLOCK_SIZE_K=block_k,
        GROUP_SIZE_M=config["GROUP_SIZE_M"],
        DOT_PRECISION=precision,
        num_warps=config["num_warps"],  # pyright: ignore[reportCallIssue] (a launch option)
        num_stages=config["num_stages"],  # pyright: ignore[reportCallIssue]
    )
    return out.view(num_tokens, top_k, hidden).sum(dim=1)  # [T, H], fp32 accumulation


def fused_moe_small_batch_triton(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, K] float32
    topk_ids: torch.Tensor,  # [T, K]
    act: str = "silu",
    config: dict[str, int] | None = None,
) -> torch.Tensor:  # [T, H]
    """As fused_moe_ref for decode batches of a few tokens: one program per (pair, BLOCK_SIZE_N
    output columns) doing matrix-vector work over the chosen expert's rows, no alignment and no
    padding of M to a tile. Same epilogues and combine as fused_moe_triton; graph-capturable."""
    num_tokens, hidden, num_experts, inter, top_k = _check_inputs(
        x, w13, w2, topk_weights, topk_ids, act
    )
    if config is None:
        config = get_moe_config(num_experts, inter, hidden, x.dtype, num_tokens, top_k, x.device)
    if num_tokens == 0:
        return x.new_empty(0, hidden)
    block_n, block_k = config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    num_pairs = num_tokens * top_k
    ids = topk_ids.reshape(-1)  # [N]
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)  # [N, I]
    _moe_gate_up_gemv_kernel[(num_pairs, triton.cdiv(inter, block_n))](
        x,
        w13,
        ids,
        h,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        h.stride(0),
        HIDDEN=hidden,
        INTER=inter,
        TOP_K=top_k,
        ACT=ACTS[act],
        BLOCK_SIZE_N=block_n,
        BLOCK_SIZE_K=block_k,
        num_warps=config["num_warps"],  # pyright: ignore[reportCallIssue] (a launch option)
        num_stages=config["num_stages"],  # pyright: ignore[reportCallIssue]
    )
    out = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)  # [N, H]
    _moe_down_gemv_kernel[(num_pairs, triton.cdiv(hidden, block_n))](
        h,
        w2,
        ids,
        topk_weights.reshape(-1),
        out,
        h.stride(0),
        w2.stride(0),
        w2.stride(1),
        out.stride(0),
        HIDDEN=hidden,
        INTER=inter,
        BLOCK_SIZE_N=block_n,
        BLOCK_SIZE_K=block_k,
        num_warps=config["num_warps"],  # pyright: ignore[reportCallIssue] (a launch option)
        num_stages=config["num_stages"],  # pyright: ignore[reportCallIssue]
    )
    return out.view(num_tokens, top_k, hidden).sum(dim=1)  # [T, H]


def get_moe_config(
    num_experts: int,
    inter: int,
    hidden: int,
    dtype: torch.dtype,
    num_tokens: int,
    top_k: int,
    device: torch.device,
) -> dict[str, int]:
    """The launch config for these shapes: on CUDA, the nearest token bucket of this device's
    tuning table (CONFIG_DIR/<device>.json) when it has the shape, else default_moe_config; on
    CPU (the interpreter) small blocks. The returned dict is shared: do not modify it."""
    if device.type != "cuda":
        return default_moe_config(num_experts, num_tokens, top_k, interpreted=True)
    index = device.index if device.index is not None else torch.cuda.current_device()
    path = _table_path(index)
    return moe_config_from_table(path, num_experts, inter, hidden, dtype, num_tokens, top_k)


@functools.lru_cache(maxsize=4096)
def moe_config_from_table(
    path: str,
    num_experts: int,
    inter: int,
    hidden: int,
    dtype: torch.dtype,
    num_tokens: int,
    top_k: int,
) -> dict[str, int]:
    """The config of the table at `path` for these shapes: T*K <= the shape's
    SMALL_BATCH_MAX_PAIRS takes the small-batch path, and the nearest token bucket of that path
    (ties: the smaller) gives the blocks; default_moe_config when the table lacks the shape."""
    buckets = load_moe_table(path).get(shape_key(num_experts, inter, hidden, dtype))
    if not buckets:
        return default_moe_config(num_experts, num_tokens, top_k)
    max_small = max(cfg["SMALL_BATCH_MAX_PAIRS"] for cfg in buckets.values())
    is_small = num_tokens * top_k <= max_small
    same_path = [b for b in buckets if (b * top_k <= max_small) == is_small] or list(buckets)
    best = min(same_path, key=lambda b: (abs(b - num_tokens), b))
    return {**buckets[best], "SMALL_BATCH_MAX_PAIRS": max_small}


@functools.cache
def load_moe_table(path: str) -> dict[str, dict[int, dict[str, int]]]:
    """A tuning table: {shape_key: {token bucket: config}}, {} when there is no file. The JSON
    holds those entries (token buckets as strings) beside metadata keys ("command", "device",
    ...); a malformed entry raises ValueError naming the file."""
    file = Path(path)
    if not file.is_file():
        return {}
    raw = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a fused-MoE tuning table is a JSON object")
    table: dict[str, dict[int, dict[str, int]]] = {}
    for key, buckets in raw.items():
        if not key.startswith("E="):
            continue  # metadata: "command", "device", versions
        if not isinstance(buckets, dict) or not buckets:
            raise ValueError(f"{path}: {key!r} must map token buckets to configs")
        table[key] = {
            int(t): _checked_config(cfg, f"{path}: {key} [{t}]") for t, cfg in buckets.items()
        }
    return table


def shape_key(num_experts: int, inter: int, hidden: int, dtype: torch.dtype) -> str:
    """The table's key for one expert shape, e.g. "E=128,I=768,H=2048,dtype=bfloat16"."""
    return f"E={num_experts},I={inter},H={hidden},dtype={str(dtype).removeprefix('torch.')}"


def device_config_name(device_name: str) -> str:
    """The table's file stem for a device: torch.cuda.get_device_name with '_' for ' '."""
    return device_name.replace(" ", "_")


def default_moe_config(
    num_experts: int, num_tokens: int, top_k: int, interpreted: bool = False
) -> dict[str, int]:
    """The config without a tuned entry. Interpreted: the smallest blocks tl.dot takes (fast
    tests). On a GPU: up to 32 pairs the small-batch path (16 output columns per program, 256-wide
    K steps); beyond, BLOCK_SIZE_M grows with the mean pairs per expert (16 for decode-sized
    batches, where blocks are mostly padding, to 128 for prefill), with the wide K steps and
    GROUP_SIZE_M 8 reuse of weight tiles in L2 once each expert has several blocks."""
    if interpreted:
        return _config(16, 32, 32, 1, 4, 1)
    pairs_per_expert = num_tokens * top_k / num_experts
    if num_tokens * top_k <= _SMALL_BATCH_MAX_PAIRS:
        return _config(16, 16, 256, 1, 4, 2)
    if pairs_per_expert <= 16:
        return _config(16, 64, 128, 1, 4, 4)
    if pairs_per_expert <= 64:
        return _config(32, 64, 128, 8, 4, 3)
    if pairs_per_expert <= 256:
        return _config(64, 64, 64, 8, 4, 4)
    return _config(128, 64, 64, 8, 8, 4)


def _config(
    block_m: int, block_n: int, block_k: int, group_m: int, num_warps: int, num_stages: int
) -> dict[str, int]:
    values = (block_m, block_n, block_k, group_m, num_warps, num_stages, _SMALL_BATCH_MAX_PAIRS)
    return dict(zip(CONFIG_KEYS, values, strict=True))


@functools.cache
def _table_path(device_index: int) -> str:
    name = device_config_name(torch.cuda.get_device_name(device_index))
    return str(CONFIG_DIR / f"{name}.json")


def _checked_config(cfg: Any, where: str) -> dict[str, int]:
    if not isinstance(cfg, dict) or set(cfg) != set(CONFIG_KEYS):
        raise ValueError(f"{where}: a config has exactly the keys {', '.join(CONFIG_KEYS)}")
    if not all(isinstance(v, int) and v >= 0 for v in cfg.values()):
        raise ValueError(f"{where}: config values are non-negative integers")
    blocks = (cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"])
    if any(b < 1 or b & (b - 1) for b in blocks) or cfg["GROUP_SIZE_M"] < 1:
        raise ValueError(f"{where}: block sizes are powers of two, GROUP_SIZE_M >= 1")
    return {k: cfg[k] for k in CONFIG_KEYS}


def _check_inputs(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    act: str,
) -> tuple[int, int, int, int, int]:
    """The launchers' layout contract -> (T, H, E, I, K)."""
    if act not in ACTS:
        raise ValueError(f"fused MoE kernels do not support act {act!r}; supported: {sorted(ACTS)}")
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    inter, top_k = two_inter // 2, topk_ids.shape[1]
    assert w13.shape == (num_experts, 2 * inter, hidden), (w13.shape, x.shape)
    assert w2.shape == (num_experts, hidden, inter), (w2.shape, w13.shape)
    assert x.dtype == w13.dtype == w2.dtype, (x.dtype, w13.dtype, w2.dtype)
    assert x.stride(1) == 1 and w13.stride(2) == 1 and w2.stride(2) == 1, "rows must be contiguous"
    assert topk_ids.shape == topk_weights.shape == (num_tokens, top_k)
    assert topk_ids.is_contiguous() and topk_weights.is_contiguous()
    assert topk_weights.dtype == torch.float32, topk_weights.dtype
    assert topk_ids.dtype in (torch.int32, torch.int64), topk_ids.dtype
    assert x.device == w13.device == w2.device == topk_ids.device == topk_weights.device
    return num_tokens, hidden, num_experts, inter, top_k


@triton.jit
def _block_rows(
    pid_m,
    pid_n,
    sorted_pair_ids_ptr,
    expert_block_ids_ptr,
    num_pairs,
    N: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
):
    """A grouped GEMM tile's rows: its pairs (sentinel padding masked), their expert, and the
    output columns; weight rows are taken modulo N so loads stay in bounds (stores are masked)."""
    offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    pair = tl.load(sorted_pair_ids_ptr + offs_m).to(tl.int64)  # [BM]
    row_mask = pair < num_pairs
    expert = tl.load(expert_block_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    return pair, row_mask, expert, offs_n, offs_n % N, offs_k


@triton.jit
def _swizzle(pid, num_blocks_m, num_blocks_n, GROUP_SIZE_M: tl.constexpr):
    """Program id -> (block row, block column), GROUP_SIZE_M block rows at a time so the programs
    running together share weight tiles in L2."""
    blocks_per_group = GROUP_SIZE_M * num_blocks_n
    first_m = (pid // blocks_per_group) * GROUP_SIZE_M
    group_m = tl.minimum(num_blocks_m - first_m, GROUP_SIZE_M)
    in_group = pid % blocks_per_group
    return first_m + in_group % group_m, in_group // group_m
