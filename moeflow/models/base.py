"""The interface every family's top-level class implements (the engine calls only these), and the
views of a model's parts it hands out: its MoE layers' routing statistics, its decoder as parts."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from moeflow.layers.activation import GatedAct
from moeflow.layers.attention import PagedAttention
from moeflow.layers.embedding import VocabEmbedding
from moeflow.layers.linear import Linear
from moeflow.layers.mla import MLAAttention
from moeflow.layers.moe import MoE
from moeflow.layers.norm import RMSNorm
from moeflow.layers.rotary import RotaryEmbedding
from moeflow.weights.ggml_quants import QuantizedTensor


class MoEStats(Protocol):
    """Routing statistics of one MoE layer (layers/moe.py MoE). While enabled, every forward
    counts its tokens per expert and which experts it touched, on the device (no host sync);
    reading them syncs."""

    def enable_stats(self, enabled: bool) -> None: ...

    def reset_stats(self) -> None: ...

    def tokens_per_expert(self) -> list[int]:
        """Tokens routed to each expert since the last reset."""
        ...

    def experts_touched_per_forward(self) -> float:
        """Mean number of distinct experts a forward ran since the last reset (0 if none ran)."""
        ...

    def expert_bytes(self) -> int:
        """Bytes of one routed expert's weights (what touching it reads)."""
        ...


@dataclass(frozen=True, slots=True)
class LayerParts:
    """One pre-norm decoder layer of attention + gated MLP or MoE, as its parts (HF names in
    brackets):
      h = x + o_proj(attn(rotary(norm_qk(clip(qkv_proj(input_norm(x)))))))
      out = h + mlp(post_norm(h)),  mlp(y) = down_proj(act(gate_up_proj(y)))
    or, in an MoE layer, out = h + moe(post_norm(h)) where the MoE layer's own shared experts
    (gate_up_proj / down_proj / act here, None without them) add to its routed experts.
    q_norm / k_norm normalise each head or, without qk_norm_per_head, the whole projection.
    A latent-attention layer (DeepSeek) has no qkv_proj (None) nor q/k norms: `attn` is then the
    MLAAttention (layers/mla.py) whose q / q_a + q_b, kv_a, kv_a_norm, float kv_b (the absorbed
    W_UK, W_UV per head), scale and latent cache stand in for them; `rotary` and `o_proj` are
    its own."""

    input_norm: RMSNorm  # [input_layernorm]
    qkv_proj: Linear | None  # None: latent attention
    q_norm: RMSNorm | None
    k_norm: RMSNorm | None
    qk_norm_per_head: bool
    clip_qkv: float | None
    rotary: RotaryEmbedding  # [rotary_emb]
    attn: PagedAttention | MLAAttention  # heads, scale, window, and the cache the engine binds
    o_proj: Linear
    post_norm: RMSNorm  # [post_attention_layernorm]
    gate_up_proj: Linear | None
    down_proj: Linear | None
    act: GatedAct | None  # [act_fn]
    moe: MoE | None = None  # [mlp] of an MoE layer


@dataclass(frozen=True, slots=True)
class DecoderParts:
    """A model whose every layer is a LayerParts: embedding -> layers -> final norm. A backend
    may run it as one step (kernels/decode_stack.py)."""

    embed: VocabEmbedding
    layers: list[LayerParts]
    norm: RMSNorm


class CausalLM(nn.Module):
    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, E]."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Logits [S, V] of the rows `indices` of `hidden`."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedTensor]]) -> None:
        """Fill every parameter from (HF checkpoint name, tensor) pairs."""

    def moe_layers(self) -> list[MoEStats]:
        """The MoE layers, in model order; none in a dense model."""
        return []

    def decoder_parts(self) -> DecoderParts | None:
        """The decoder as its parts when every layer is attention (q/k/v or latent) + a gated
        MLP or an MoE layer; None otherwise."""
        return None
