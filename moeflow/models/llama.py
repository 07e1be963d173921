"""Llama: GQA attention with RoPE, gated-SiLU MLP, RMSNorm. The dense families that differ only
by flags (bias on q/k/v, qk-norm, sliding window) subclass it in their own files.

Shape legend: T new tokens in the batch, E hidden size, H / Hkv query / KV heads, D head dim,
I intermediate size, V vocab."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from moeflow.config import ModelConfig
from moeflow.errors import ModelFormatError
from moeflow.layers.attention import PagedAttention
from moeflow.layers.embedding import LMHead, VocabEmbedding
from moeflow.layers.linear import (
    MergedColumnParallelLinear,
    RowParallelLinear,
    split_size,
)
from moeflow.layers.mla import MLAAttention
from moeflow.layers.mlp import GatedMLP
from moeflow.layers.moe import MoE
from moeflow.layers.norm import RMSNorm
from moeflow.layers.rotary import RotaryEmbedding
from moeflow.models.base import CausalLM, DecoderParts, LayerParts, MoEStats
from moeflow.weights.ggml_quants import QuantizedTensor
from moeflow.weights.loader import HF_EXPERT_PARAMS, load_weights


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
        sliding_window: int | None,
        qk_norm_per_head: bool = True,
        clip_qkv: float | None = None,
        rotary_dim: int | None = None,
    ) -> None:
        super().__init__()
        h, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        # tensor parallelism: this rank's heads (q/k/v split by column, o_proj by row)
        self.qkv_proj = MergedColumnParallelLinear(
            config.hidden_size, {"q": h * d, "k": hkv * d, "v": hkv * d}, bias=qkv_bias
        )
        self.o_proj = RowParallelLinear(h * d, config.hidden_size, bias=o_bias)
        tp = self.qkv_proj.tp_size
        if qk_norm and not qk_norm_per_head and tp > 1:
            raise ModelFormatError(
                "qk-norm over the whole projection (olmoe) is not split across tensor-parallel "
                "ranks yet: run this family with tensor_parallel_size 1"
            )
        h, hkv = split_size(h, tp, "attention heads"), split_size(hkv, tp, "KV heads")
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, d
        # qk-norm over each head (qwen3) or over the whole projection (olmoe)
        self.qk_norm_per_head = qk_norm_per_head
        self.q_norm = (
            RMSNorm(d if qk_norm_per_head else h * d, config.rms_norm_eps) if qk_norm else None
        )
        self.k_norm = (
            RMSNorm(d if qk_norm_per_head else hkv * d, config.rms_norm_eps) if qk_norm else None
        )
        self.clip_qkv = clip_qkv
        self.rotary_emb = RotaryEmbedding(
            d, config.max_position_embeddings, config.rope_theta, config.rope_scaling, rotary_dim
        )
        self.attn = PagedAttention(h, hkv, d, d**-0.5, sliding_window)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [T, (H + 2 Hkv) D]
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([self.num_heads * self.head_dim, kv_size, kv_size], dim=-1)
        if self.q_norm is not None and self.k_norm is not None and not self.qk_norm_per_head:
            q, k = self.q_norm.norm(q), self.k_norm.norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None and self.qk_norm_per_head:
            q, k = self.q_norm.norm(q), self.k_norm.norm(k)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v)  # [T, H, D]
        return self.o_proj(out.flatten(1))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp  # a GatedMLP, or an MoE in the MoE families

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, res = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, res = self.post_attention_layernorm(hidden, res)
        return self.mlp(hidden), res


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, family: type[LlamaForCausalLM]) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, family.make_attention(config), family.make_mlp(config, i))
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, E]
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer.forward(positions, hidden, residual)  # no hooks: skip __call__
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(CausalLM):
    # Checkpoint projection -> (merged parameter, shard) it fills.
    packed_modules_mapping: dict[str, tuple[str, str]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    # Checkpoint name parts -> ours, where a family's HF name differs (Mixtral's block_sparse_moe).
    renames: dict[str, str] = {}

    # MoE families: a routed expert's projection (`experts.N.<proj>`) -> (stacked parameter, shard)
    expert_params_mapping: dict[str, tuple[str, str]] = HF_EXPERT_PARAMS

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, type(self))
        tie = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tie)

    @classmethod
    def make_attention(cls, config: ModelConfig) -> LlamaAttention:
        """Llama puts attention_bias on q, k, v and o alike."""
        bias = config.attention_bias
        return LlamaAttention(
            config, qkv_bias=bias, o_bias=bias, qk_norm=False, sliding_window=None
        )

    @classmethod
    def make_mlp(cls, config: ModelConfig, layer_idx: int) -> nn.Module:
        """The dense families' MLP; the MoE families return their MoE layer here."""
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)  # [T, E]

    def compute_logits(self, hidden: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden, indices)  # [S, V]

    def decoder_parts(self) -> DecoderParts | None:
        layers: list[LayerParts] = []
        for layer in self.model.layers:
            assert isinstance(layer, LlamaDecoderLayer)
            attn, mlp = layer.self_attn, layer.mlp
            if not isinstance(attn, LlamaAttention | MLAAttention):
                return None
            if isinstance(mlp, MoE):
                moe, dense = mlp, mlp.shared_mlp()
            elif isinstance(mlp, GatedMLP):
                moe, dense = None, mlp
            else:
                return None
            mla = isinstance(attn, MLAAttention)
            layers.append(
                LayerParts(
                    input_norm=layer.input_layernorm,
                    qkv_proj=None if mla else attn.qkv_proj,
                    q_norm=None if mla else attn.q_norm,
                    k_norm=None if mla else attn.k_norm,
                    qk_norm_per_head=not mla and attn.qk_norm_per_head,
                    clip_qkv=None if mla else attn.clip_qkv,
                    rotary=attn.rotary_emb,
                    attn=attn if mla else attn.attn,
                    o_proj=attn.o_proj,
                    post_norm=layer.post_attention_layernorm,
                    gate_up_proj=dense.gate_up_proj if dense is not None else None,
                    down_proj=dense.down_proj if dense is not None else None,
                    act=dense.act_fn if dense is not None else None,
                    moe=moe,
                )
            )
        return DecoderParts(self.model.embed_tokens, layers, self.model.norm)

    def moe_layers(self) -> list[MoEStats]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedTensor]]) -> None:
        skip = ("lm_head.weight",) if self.config.tie_word_embeddings else ()
        load_weights(
            self,
            weights,
            self.packed_modules_mapping,
            skip=skip,
            renames=self.renames,
            expert_params_mapping=self.expert_params_mapping,
        )


ENTRY_CLASSES = [LlamaForCausalLM]
