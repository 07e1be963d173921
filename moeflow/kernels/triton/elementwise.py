"""Triton kernels for the memory-bound per-token ops: RMSNorm (+ residual add, in place), rotary
embedding of q and k in place (neox, interleaved, deinterleave), gated activations. No host sync
in any launcher: grids come from shapes only, so each is CUDA-graph capturable."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeflow.kernels.triton_utils import next_power_of_2

# Legend: T tokens (rows), H hidden size (or head dim for qk-norm), NQ / NK query / key heads,
# D head dim, R rotated dims (R <= D), I intermediate size.

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_NORM_BLOCK = 8192  # widest row kept in registers (DeepSeek-V3's 7168 fits)
_ROTARY_LAYOUTS = {"neox": 0, "interleaved": 1, "deinterleave": 2}
# Gated activations (HF's hidden_act names) -> the ACT constexpr of `activation`.
ACTS: dict[str, int] = {"silu": 0, "gelu": 1, "gelu_pytorch_tanh": 2}


# ---- RMSNorm (+ residual) -------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    num_rows,
    hidden,
    x_inner,
    x_stride_outer,
    x_stride_inner,
    r_inner,
    r_stride_outer,
    r_stride_inner,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # Rows are addressed as (r // inner) * stride_outer + (r % inner) * stride_inner, so x may
    # be a strided [A, B, H] view (qk-norm over the heads of a fused qkv buffer).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < num_rows
    x_row = (rows // x_inner) * x_stride_outer + (rows % x_inner) * x_stride_inner
    r_row = (rows // r_inner) * r_stride_outer + (rows % r_inner) * r_stride_inner
    o_row = rows * hidden  # out is contiguous
    cols = tl.arange(0, BLOCK_H)
    dtype = x_ptr.dtype.element_ty
    if NUM_CHUNKS == 1:
        mask = row_mask[:, None] & (cols < hidden)[None, :]
        x = tl.load(x_ptr + x_row[:, None] + cols[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + r_row[:, None] + cols[None, :], mask=mask, other=0.0)
            # x + residual rounded to the input dtype first, as torch (and HF) compute it
            x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
            tl.store(res_ptr + r_row[:, None] + cols[None, :], x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / hidden + eps)  # [BLOCK_ROWS]
        w = tl.load(w_ptr + cols, mask=cols < hidden, other=0.0).to(tl.float32)
        y = (xf * rstd[:, None]).to(dtype).to(tl.float32) * w[None, :]
        tl.store(out_ptr + o_row[:, None] + cols[None, :], y.to(out_ptr.dtype.element_ty), mask)
    else:
        # Wide rows: pass 1 adds the residual (stored back) and sums squares chunk by chunk;
        # pass 2 re-reads the sum (from the residual buffer, or x) and writes the output. The
        # trip count is a constexpr: Triton 3.6's interpreter cannot loop to a runtime bound
        # under numpy 2 (it turns the bound into a 1-element array).
        sq = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        for chunk in range(NUM_CHUNKS):
            c = chunk * BLOCK_H + cols
            mask = row_mask[:, None] & (c < hidden)[None, :]
            x = tl.load(x_ptr + x_row[:, None] + c[None, :], mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(res_ptr + r_row[:, None] + c[None, :], mask=mask, other=0.0)
                x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
                tl.store(res_ptr + r_row[:, None] + c[None, :], x, mask=mask)
            xf = x.to(tl.float32)
            sq += tl.sum(xf * xf, axis=1)
        rstd = tl.rsqrt(sq / hidden + eps)
        tl.debug_barrier()  # pass 1's residual stores are visible to every thread of pass 2
        for chunk in range(NUM_CHUNKS):
            c = chunk * BLOCK_H + cols
            mask = row_mask[:, None] & (c < hidden)[None, :]
            if HAS_RESIDUAL:
                x = tl.load(res_ptr + r_row[:, None] + c[None, :], mask=mask, other=0.0)
            else:
                x = tl.load(x_ptr + x_row[:, None] + c[None, :], mask=mask, other=0.0)
            w = tl.load(w_ptr + c, mask=c < hidden, other=0.0).to(tl.float32)
            y = (x.to(tl.float32) * rstd[:, None]).to(dtype).to(tl.float32) * w[None, :]
            tl.store(out_ptr + o_row[:, None] + c[None, :], y.to(out_ptr.dtype.element_ty), mask)


def rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """As rms_norm_ref over the last dim of x [.., H]: (out, x + residual), the sum written into
    `residual` in place and returned; without a residual, (out, x). out is contiguous, in the
    dtype torch's `weight * x` would have."""
    hidden = x.shape[-1]
    assert x.dtype in _DTYPES and weight.dtype in _DTYPES, (x.dtype, weight.dtype)
    assert weight.shape == (hidden,) and weight.is_contiguous() and weight.device == x.device
    x_rows = _row_layout(x)
    if x_rows is None:
        x = x.contiguous()
        x_rows = _row_layout(x)
        assert x_rows is not None
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, (residual.shape, x.shape)
        r_rows = _row_layout(residual)
        assert r_rows is not None, "the residual is updated in place: its rows must be strided"
    else:
        r_rows = x_rows  # unused
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    num_rows = x.numel() // hidden if hidden else 0
    if num_rows == 0:
        return out, x if residual is None else residual
    block_h = min(next_power_of_2(hidden), _MAX_NORM_BLOCK)
    # narrow rows (qk-norm over a head) take several per program: ~2K elements per program.
    # Not chosen from the row count, so batch sizes do not multiply the compiled variants.
    block_rows = max(1, 2048 // block_h)
    tile = block_rows * block_h
    grid = (triton.cdiv(num_rows, block_rows),)
    _rms_norm_kernel[grid](
        x,
        residual if residual is not None else x,
        weight,
        out,
        num_rows,
        hidden,
        *x_rows,
        *r_rows,
        eps,
        HAS_RESIDUAL=residual is not None,
        NUM_CHUNKS=triton.cdiv(hidden, block_h),
        BLOCK_ROWS=block_rows,
        BLOCK_H=block_h,
        num_warps=min(16, max(1, tile // 512)),  # pyright: ignore[reportCallIssue]
    )
    return out, x if residual is None else residual


# ---- Rotary embedding -----------------------------------------------------------------------


@triton.jit
def _rotate_heads(
    x_ptr,
    stride_h,
    num_heads,
    head0,
    cos,
    sin,
    HALF: tl.constexpr,
    LAYOUT: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotate heads head0.. head0 + BLOCK_HEADS of one token in place; cos, sin: [BLOCK_HALF]."""
    heads = head0 + tl.arange(0, BLOCK_HEADS)
    i = tl.arange(0, BLOCK_HALF)
    mask = (heads < num_heads)[:, None] & (i < HALF)[None, :]
    base = x_ptr + heads.to(tl.int64)[:, None] * stride_h
    if LAYOUT == 0:  # neox: pairs (i, i + R/2)
        in1 = i
        in2 = i + HALF
    else:  # interleaved / deinterleave: pairs (2i, 2i + 1)
        in1 = 2 * i
        in2 = 2 * i + 1
    x1 = tl.load(base + in1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + in2[None, :], mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    if LAYOUT == 2:  # deinterleave: results land as [rotated evens | rotated odds]
        out1 = i
        out2 = i + HALF
        # NOTE: other threads' stores overwrite dims this thread has not yet read: every load
        # of the tile must finish before any store.
        tl.debug_barrier()
    else:
        out1 = in1
        out2 = in2
    dtype = x_ptr.dtype.element_ty
    tl.store(base + out1[None, :], o1.to(dtype), mask=mask)
    tl.store(base + out2[None, :], o2.to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_stride_t,
    q_stride_h,
    k_stride_t,
    k_stride_h,
    table_stride,
    num_q_heads,
    num_k_heads,
    num_q_blocks,
    HALF: tl.constexpr,
    LAYOUT: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # grid (T, q head blocks + k head blocks): each program rotates a block of one token's heads
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + pos * table_stride + i, mask=i < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * table_stride + i, mask=i < HALF, other=0.0).to(tl.float32)
    if hb < num_q_blocks:
        _rotate_heads(
            q_ptr + t * q_stride_t,
            q_stride_h,
            num_q_heads,
            hb * BLOCK_HEADS,
            cos,
            sin,
            HALF,
            LAYOUT,
            BLOCK_HEADS,
            BLOCK_HALF,
        )
    else:
        _rotate_heads(
            k_ptr + t * k_stride_t,
            k_stride_h,
            num_k_heads,
            (hb - num_q_blocks) * BLOCK_HEADS,
            cos,
            sin,
            HALF,
            LAYOUT,
            BLOCK_HEADS,
            BLOCK_HALF,
        )


def rotary_triton_(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layout: str,
) -> None:
    """Rotate the first R dims of each head of q [T, NQ, D] and k [T, NK, D] in place, by the
    rows `positions` [T] of the fp32 tables cos, sin: [P, R] (neox: both halves repeat) or
    [P, R/2] (interleaved, deinterleave). q and k may be strided views of a fused qkv buffer."""
    assert layout in _ROTARY_LAYOUTS, layout
    assert q.dim() == 3 and k.dim() == 3, (q.shape, k.shape)
    assert q.dtype == k.dtype and q.dtype in _DTYPES, (q.dtype, k.dtype)
    assert q.stride(2) == 1 and k.stride(2) == 1, "head dims must be contiguous"
    num_tokens = q.shape[0]
    assert k.shape[0] == num_tokens and positions.shape == (num_tokens,), positions.shape
    assert cos.shape == sin.shape and cos.dim() == 2 and cos.dtype == sin.dtype == torch.float32
    assert cos.stride() == sin.stride() and cos.stride(1) == 1
    half = cos.shape[1] // 2 if layout == "neox" else cos.shape[1]
    assert 2 * half <= q.shape[2] and 2 * half <= k.shape[2], (half, q.shape, k.shape)
    if num_tokens == 0 or half == 0:
        return
    positions = positions.contiguous()  # [T]; a copy (no sync) only for a strided view
    block_half = next_power_of_2(half)
    # ~1K pairs per program: qwen3 (32 + 4 heads x 64 pairs) gives 2 + 1 programs per token
    block_heads = min(next_power_of_2(max(q.shape[1], k.shape[1])), max(1, 1024 // block_half))
    num_q_blocks = triton.cdiv(q.shape[1], block_heads)
    grid = (num_tokens, num_q_blocks + triton.cdiv(k.shape[1], block_heads))
    _rotary_kernel[grid](
        positions,
        q,
        k,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        q.shape[1],
        k.shape[1],
        num_q_blocks,
        HALF=half,
        LAYOUT=_ROTARY_LAYOUTS[layout],
        BLOCK_HEADS=block_heads,
        BLOCK_HALF=block_half,
        num_warps=4,  # pyright: ignore[reportCallIssue] (a launch option)
    )


# ---- Gated activations ----------------------------------------------------------------------


@triton.jit
def _act_and_mul_kernel(
    x_ptr,
    out_ptr,
    x_stride_row,
    inter,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # grid (rows, column blocks); x row: [gate (I) | up (I)], out row: [I] contiguous
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * x_stride_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride_row + inter + cols, mask=mask, other=0.0)
    act = activation(gate, ACT)
    dtype = x_ptr.dtype.element_ty
    # act(gate) rounded to the input dtype before the product, as torch computes it
    out = act.to(dtype).to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * inter + cols, out.to(dtype), mask=mask)


@triton.jit
def activation(gate, ACT: tl.constexpr):
    """act(gate) of an fp32 tile; ACT codes as in ACTS (the fused MoE kernels use it too)."""
    if ACT == 0:  # silu
        a = gate * tl.sigmoid(gate)
    elif ACT == 1:  # gelu (erf)
        a = 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476))
    else:  # gelu, tanh approximation; tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        a = gate * tl.sigmoid(2.0 * z)
    return a


def act_and_mul_triton(x: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """act(gate) * up over x [.., 2I] = [gate | up] -> [.., I] (contiguous); act is a key of
    ACTS."""
    assert act in ACTS, act
    assert x.dtype in _DTYPES and x.shape[-1] % 2 == 0, (x.dtype, x.shape)
    inter = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    x2 = x.reshape(-1, 2 * inter)  # [T, 2I], a view when the rows are evenly strided
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] == 0 or inter == 0:
        return out
    block = min(next_power_of_2(inter), 1024)
    grid = (x2.shape[0], triton.cdiv(inter, block))
    _act_and_mul_kernel[grid](
        x2,
        out,
        x2.stride(0),
        inter,
        ACT=ACTS[act],
        BLOCK=block,
        num_warps=4,  # pyright: ignore[reportCallIssue]
    )
    return out


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up over x [.., 2I] -> [.., I]."""
    return act_and_mul_triton(x, "silu")


def _row_layout(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(inner, stride_outer, stride_inner) addressing the rows of x [.., H] (last dim contiguous)
    as (r // inner) * stride_outer + (r % inner) * stride_inner; None when x has no such form."""
    if x.dim() == 0 or (x.stride(-1) != 1 and x.shape[-1] > 1):
        return None
    if x.dim() == 1:
        return 1, 0, 0
    if x.dim() == 2:
        return 1, x.stride(0), 0
    if x.dim() == 3:
        return x.shape[1], x.stride(0), x.stride(1)
    try:
        return _row_layout(x.view(-1, *x.shape[-2:]))  # [A, B, H]: leading dims merged
    except RuntimeError:
        return None
