"""The fused CPU decode step of a dense decoder stack (Llama, Mistral, Qwen2, Qwen3 layouts):
every layer and the final norm in one call of the compiled kernels (kernels/cpu_ext.py
DecodeStack), one OpenMP region for the whole step instead of ~10 Python dispatches and thread
fork/joins per layer. It runs the single ops' own row functions, so its output is theirs.

It applies to decode steps on the CPU of up to `MAX_ROWS` sequences when every projection is
kept quantised (GGUF blocks or `--quantize`), activations and the KV cache are float32, the
rotary layout is NeoX and the MLP is gated SiLU; otherwise the model runs layer by layer."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from moeflow import env
from moeflow.context import get_forward_batch
from moeflow.kernels import cpu_ext

logger = logging.getLogger("moeflow")

MAX_ROWS = 16  # the quantised GEMV's limit (kernels/quant_gemm.py)


class CpuDecodeStack:
    """Built on the first eligible decode step (the KV cache is bound by then) and rebuilt when
    the cache is reallocated. Not an nn.Module: it only points at the model's own tensors."""

    def __init__(self) -> None:
        self._stack: Any = None
        self._key: tuple[int, ...] | None = None
        self.unfit_reason: str | None = None  # why the model cannot use it (None: it can)
        self.enabled = True  # False: always run layer by layer

    def __call__(
        self,
        embed: Callable[[torch.Tensor], torch.Tensor],
        layers: Iterable[Any],
        norm: Any,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor | None:
        """The final-normed hidden states [B, E] of this decode step, or None when the fused
        step does not apply (the caller then runs the layers)."""
        if not self.enabled or self.unfit_reason is not None or input_ids.device.type != "cpu":
            return None
        batch = get_forward_batch()
        if not batch.is_decode or batch.num_seqs > MAX_ROWS:
            return None
        ops = cpu_ext.ops()
        if ops is None:
            return None
        layers = list(layers)
        if self._stack is None or _cache_key(layers) != self._key:
            self._stack = None
            self.unfit_reason = unfit_reason(layers, norm)  # the model's make-up: for good
            if self.unfit_reason is not None:
                logger.debug("fused CPU decode step off: %s", self.unfit_reason)
                return None
            if not _cache_fits(layers):  # not yet allocated (or not float32): try again later
                return None
            self._stack, self._key = _build(ops, layers, norm), _cache_key(layers)
        hidden = embed(input_ids)  # [B, E]
        if hidden.dtype != torch.float32:
            return None
        return self._stack.forward(
            hidden.contiguous(),
            positions.contiguous(),
            batch.slot_mapping,
            batch.block_tables,
            batch.context_lens,
            env.MOEFLOW_CPU_INT8,
        )


def _cache_key(layers: Sequence[Any]) -> tuple[int, ...]:
    first, last = layers[0].self_attn.attn, layers[-1].self_attn.attn
    return (first.k_cache.data_ptr(), last.v_cache.data_ptr(), first.k_cache.numel())


def unfit_reason(layers: Sequence[Any], norm: Any) -> str | None:
    """Why these layers cannot run as one fused decode step (None when they can)."""
    eps = norm.eps
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        names = [(attn, "qkv_proj"), (attn, "o_proj"), (mlp, "gate_up_proj"), (mlp, "down_proj")]
        if not all(hasattr(m, n) for m, n in names) or not hasattr(attn, "rotary_emb"):
            return f"layer {i} is not a dense attention + gated-MLP layer"
        projections: list[Any] = [getattr(m, n) for m, n in names]
        if any(p.qtype is None for p in projections):
            return f"layer {i} has a projection that is not kept quantised"
        if not getattr(mlp.act_fn, "is_silu", False):
            return f"layer {i}'s MLP activation is not SiLU"
        if attn.rotary_emb.layout != "neox" or attn.clip_qkv is not None:
            return f"layer {i} needs a rotary layout or q/k/v clipping the fused step lacks"
        if attn.q_norm is not None and not attn.qk_norm_per_head:
            return f"layer {i} normalises q/k over the whole projection"
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        norms += [attn.q_norm, attn.k_norm] if attn.q_norm is not None else []
        if any(n.eps != eps for n in norms):
            return f"layer {i}'s norms differ in eps"
        tensors = [n.weight for n in norms] + [p.bias for p in projections if p.bias is not None]
        if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
            return f"layer {i} has norms or biases that are not float32 on the CPU"
        if not hasattr(attn, "attn") or not hasattr(attn.attn, "k_cache"):
            return f"layer {i} has no paged K/V cache"
        if attn.head_dim % 8 or attn.num_heads // attn.num_kv_heads > 64:
            return f"layer {i}'s head shape is not supported by the fused step"
    if norm.weight.dtype != torch.float32:
        return "the final norm is not float32"
    rotary = layers[0].self_attn.rotary_emb
    if any(layer.self_attn.rotary_emb.cos_cache is not rotary.cos_cache for layer in layers):
        return "the layers' rotary tables differ"
    return None


def _cache_fits(layers: Sequence[Any]) -> bool:
    """Every layer's K/V cache is allocated, float32, on the CPU."""
    caches = [
        c for layer in layers for c in (layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache)
    ]
    return all(c.dim() == 4 and c.dtype == torch.float32 and c.device.type == "cpu" for c in caches)


def _build(ops: Any, layers: Sequence[Any], norm: Any) -> Any:
    a0 = layers[0].self_attn
    stack = ops.DecodeStack(
        a0.num_heads,
        a0.num_kv_heads,
        a0.head_dim,
        norm.eps,
        a0.attn.scale,
        a0.rotary_emb.cos_cache,
        a0.rotary_emb.sin_cache,
        norm.weight.detach(),
    )
    for layer in layers:
        attn, mlp, pa = layer.self_attn, layer.mlp, layer.self_attn.attn
        qkv, o, gate_up, down = attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj
        stack.add_layer(
            layer.input_layernorm.weight.detach(),
            qkv.weight,
            qkv.qtype,
            _opt(qkv.bias),
            _opt(attn.q_norm.weight if attn.q_norm is not None else None),
            _opt(attn.k_norm.weight if attn.k_norm is not None else None),
            o.weight,
            o.qtype,
            _opt(o.bias),
            layer.post_attention_layernorm.weight.detach(),
            gate_up.weight,
            gate_up.qtype,
            down.weight,
            down.qtype,
            pa.k_cache,
            pa.v_cache,
            pa.sliding_window or 0,
        )
    return stack


def _opt(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.detach() if t is not None else None
