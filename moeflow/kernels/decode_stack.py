"""The fused CPU decode step of a Llama-layout decoder (Llama, Mistral, Qwen2, Qwen3 and the MoE
families on their attention: Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, GLM-4.5) or of DeepSeek's
(V2, V3, R1, Kimi K2: multi-head latent attention, leading dense layers, shared experts): every
layer and the final norm in one call of the compiled kernels (csrc/cpu_ops.cpp DecodeStack,
csrc/mla.h), one OpenMP region for the whole step instead of ~10 Python dispatches and thread
fork/joins per layer. It runs the single ops' own row functions (an MoE layer: the compiled router
and grouped expert pass its eager path runs, csrc/moe.h; a latent-attention layer: the compiled
MlaAttention its eager decode runs, layers/mla.py), so its output is theirs.

It applies to decode steps on the CPU of up to `MAX_ROWS` sequences when every projection is kept
quantised (GGUF blocks or `--quantize`; MoE experts as blocks too; MLA's kv_b may stay float32, as a
safetensors folder or an older GGUF file gives it), activations and the KV cache are float32, the
rotary layout is NeoX (MLA: any of its three) and the MLP (and the shared experts, gated by a
sigmoid or not) gated SiLU, q/k normed per head (Qwen3) or over all heads and q/k/v clipped (OLMoE);
otherwise the model runs layer by layer. The engine's runner asks `fits` on each eager step and then
calls `forward` instead of the model. MoE layers' routing statistics, when enabled, are counted from
the experts the step chose.

The model is read through its models.base.DecoderParts view (kernels may not import models, so
it is typed Any here): `embed`, `norm` and, per layer, the fields of models.base.LayerParts."""

from __future__ import annotations

import logging
from typing import Any

import torch

from moeflow import env
from moeflow.context import ForwardBatch
from moeflow.kernels import cpu_ext

logger = logging.getLogger("moeflow")

MAX_ROWS = 16  # the quantised GEMV's limit (kernels/quant_gemm.py)


class CpuDecodeStack:
    """Built on the first decode step that fits (the KV cache is bound by then) and rebuilt when
    the cache is reallocated. Holds no tensors: the compiled stack points at the model's own."""

    def __init__(self, decoder: Any) -> None:
        """`decoder`: the model's DecoderParts, or None when it has none."""
        self._decoder = decoder
        self._stack: Any = None
        self._key: tuple[int, ...] | None = None
        # Why the model cannot use the fused step (None: it can).
        self.unfit_reason: str | None = (
            None
            if decoder is not None
            else "the model is not a stack of attention + gated-MLP or MoE layers"
        )
        self.enabled = True  # False: always run layer by layer

    def fits(self, batch: ForwardBatch) -> bool:
        """Whether `batch` runs fused: a CPU decode step of at most MAX_ROWS sequences, of a
        model that fits, with the kernels built (the stack is built or rebuilt here)."""
        if not self.enabled or self.unfit_reason is not None:
            return False
        if batch.input_ids.device.type != "cpu" or not batch.is_decode:
            return False
        ops = cpu_ext.ops()
        if batch.num_seqs > MAX_ROWS or ops is None:
            return False
        layers = self._decoder.layers
        if self._stack is None or _cache_key(layers) != self._key:
            self._stack = None
            self.unfit_reason = unfit_reason(self._decoder, ops)  # the model's make-up: for good
            if self.unfit_reason is not None:
                logger.debug("fused CPU decode step off: %s", self.unfit_reason)
                return False
            if not _cache_fits(layers):  # not yet allocated (or not float32): try again later
                return False
            self._stack, self._key = _build(ops, self._decoder), _cache_key(layers)
        return True

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """The final-normed hidden states [B, E] of this decode step (where `fits`)."""
        hidden = self._decoder.embed(batch.input_ids)  # [B, E]
        out = self._stack.forward(
            hidden.contiguous(),
            batch.positions.contiguous(),
            batch.slot_mapping,
            batch.block_tables,
            batch.context_lens,
            env.MOEFLOW_CPU_INT8,
        )
        moes = [layer.moe for layer in self._decoder.layers if layer.moe is not None]
        if any(moe.stats_enabled for moe in moes):
            ids = self._stack.routed_ids()  # [MoE layers, B, K]
            for moe, layer_ids in zip(moes, ids, strict=True):
                if moe.stats_enabled:
                    moe.record_routing(layer_ids)
        return out


def unfit_reason(decoder: Any, ops: Any) -> str | None:
    """Why this DecoderParts cannot run as one fused decode step on the kernel module `ops`
    (None when it can)."""
    norm, layers = decoder.norm, decoder.layers
    eps = norm.eps
    latent = [_is_latent(layer) for layer in layers]
    if any(latent) and not all(latent):
        return "latent and q/k/v attention layers mixed"
    for i, layer in enumerate(layers):
        moe = layer.moe
        if moe is not None:
            if moe.cpu_layer(ops) is None:
                return f"layer {i}'s experts are not kept quantised (or not SiLU) on the CPU"
            gate = moe.shared_expert_gate
            if gate is not None and gate.parts is not None:
                return f"layer {i}'s shared-expert gate mixes ggml types"
        mlp = [layer.gate_up_proj, layer.down_proj] if layer.gate_up_proj is not None else []
        attn = layer.attn
        qkv = _latent_projections(attn) if latent[i] else [layer.qkv_proj]
        projections = [*qkv, layer.o_proj, *mlp]
        if any(not _parts(p) or any(q.qtype is None for q in _parts(p)) for p in projections):
            return f"layer {i} has a projection that is not kept quantised"
        if layer.act is not None and not layer.act.is_silu:
            return f"layer {i}'s MLP activation is not SiLU"
        if layer.rotary.layout != "neox" and not latent[i]:
            return f"layer {i} needs a rotary layout the fused step lacks"
        norms = [layer.input_norm, layer.post_norm]
        norms += [layer.q_norm, layer.k_norm] if layer.q_norm is not None else []
        if any(n.eps != eps for n in norms):
            return f"layer {i}'s norms differ in eps"
        tensors = [n.weight for n in norms] + [p.bias for p in projections if p.bias is not None]
        gate = moe.shared_expert_gate if moe is not None else None
        tensors += [gate.weight] if gate is not None and gate.qtype is None else []
        if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
            return f"layer {i} has norms or biases that are not float32 on the CPU"
        if latent[i]:
            if attn.cpu_layer(ops) is None:
                return f"layer {i}'s latent attention does not run compiled (see cpu_layer)"
        elif attn.head_dim % 8 or attn.num_heads // attn.num_kv_heads > 64:
            return f"layer {i}'s head shape is not supported by the fused step"
    if norm.weight.dtype != torch.float32:
        return "the final norm is not float32"
    if any(layer.rotary.cos_cache is not layers[0].rotary.cos_cache for layer in layers):
        return "the layers' rotary tables differ"
    token = torch.zeros(1, dtype=torch.int64, device=norm.weight.device)
    if decoder.embed(token).dtype != torch.float32:
        return "the embedding's rows are not float32"
    return None


def _cache_key(layers: list[Any]) -> tuple[int, ...]:
    first, last = _caches(layers[0]), _caches(layers[-1])
    return (first[0].data_ptr(), last[-1].data_ptr(), first[0].numel())


def _cache_fits(layers: list[Any]) -> bool:
    """Every layer's K/V (or latent) cache is allocated, float32, on the CPU."""
    return all(
        c.dim() == (3 if _is_latent(layer) else 4)
        and c.dtype == torch.float32
        and c.device.type == "cpu"
        for layer in layers
        for c in _caches(layer)
    )


def _build(ops: Any, decoder: Any) -> Any:
    first, norm = decoder.layers[0], decoder.norm
    attn = first.attn
    if _is_latent(first):  # H heads over one "KV head": the latent row [L + R]
        heads, kv_heads, head_dim = attn.num_heads, 1, attn.kv_lora_rank + attn.rope
    else:
        heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
    stack = ops.DecodeStack(
        heads,
        kv_heads,
        head_dim,
        norm.eps,
        attn.scale,
        first.rotary.cos_cache,
        first.rotary.sin_cache,
        norm.weight.detach(),
    )
    for layer in decoder.layers:
        qkv, o, gate_up, down = layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj
        mla = layer.attn.cpu_layer(ops) if _is_latent(layer) else None
        if mla is not None:
            k_cache = v_cache = layer.attn.latent_cache.unsqueeze(2)  # [N, S, 1, L + R]
        else:
            k_cache, v_cache = layer.attn.k_cache, layer.attn.v_cache
        stack.add_layer(
            layer.input_norm.weight.detach(),
            *_blocks(qkv),
            _opt(qkv.bias if qkv is not None else None),
            _opt(layer.q_norm.weight if layer.q_norm is not None else None),
            _opt(layer.k_norm.weight if layer.k_norm is not None else None),
            *_blocks(o),
            _opt(o.bias),
            layer.post_norm.weight.detach(),
            *_blocks(gate_up),
            *_blocks(down),
            k_cache,
            v_cache,
            0 if mla is not None else layer.attn.sliding_window or 0,
            layer.moe.cpu_layer(ops) if layer.moe is not None else None,
            *_shared_gate(layer.moe),
            layer.clip_qkv or 0.0,
            mla,
        )
    return stack


def _is_latent(layer: Any) -> bool:
    """A latent-attention layer (models.base.LayerParts without qkv_proj; attn an MLAAttention)."""
    return layer.qkv_proj is None


def _caches(layer: Any) -> list[torch.Tensor]:
    attn = layer.attn
    return [attn.latent_cache] if _is_latent(layer) else [attn.k_cache, attn.v_cache]


def _latent_projections(attn: Any) -> list[Any]:
    """The projections of an MLAAttention that must be kept quantised: q (or q_a and q_b),
    kv_a."""
    q = [attn.q_proj] if attn.q_proj is not None else [attn.q_a_proj, attn.q_b_proj]
    return [*q, attn.kv_a_proj_with_mqa]


def _shared_gate(moe: Any) -> tuple[torch.Tensor | None, list[int]]:
    """Qwen2-MoE's shared-expert gate [1, H]: its blocks and ggml type, or its float32 row [H]
    and no type (None: the layer has none)."""
    gate = moe.shared_expert_gate if moe is not None else None
    if gate is None:
        return None, []
    if gate.qtype is not None:
        return gate.weight.detach(), [gate.qtype]
    return gate.weight.detach().reshape(-1), []


def _parts(linear: Any) -> list[Any]:
    """A Linear's quantised weight as its parts (one, unless its shards mix ggml types)."""
    return [linear] if linear.qtype is not None else list(linear.parts or [])


def _blocks(linear: Any) -> tuple[list[torch.Tensor], list[int]]:
    """(the blocks of each part, their ggml types); empty for no projection (None)."""
    parts = _parts(linear) if linear is not None else []
    return [p.weight for p in parts], [p.qtype for p in parts]


def _opt(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.detach() if t is not None else None
