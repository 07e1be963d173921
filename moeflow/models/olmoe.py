"""OLMoE: Llama-like attention with RMSNorm over the whole q and k projections (not per head)
and optional clipping of q/k/v; a softmax top-k router, renormalised when norm_topk_prob."""

from __future__ import annotations

from torch import nn

from moeflow.config import ModelConfig
from moeflow.layers.moe import MoE
from moeflow.models.llama import LlamaAttention, LlamaForCausalLM


class OlmoeForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_attention(cls, config: ModelConfig) -> LlamaAttention:
        clip = config.hf.get("clip_qkv")
        return LlamaAttention(
            config,
            qkv_bias=config.attention_bias,
            o_bias=config.attention_bias,
            qk_norm=True,
            sliding_window=None,
            qk_norm_per_head=False,
            clip_qkv=float(clip) if clip is not None else None,
        )

    @classmethod
    def make_mlp(cls, config: ModelConfig, layer_idx: int) -> nn.Module:
        hf = config.hf
        return MoE(
            config.hidden_size,
            config.intermediate_size,
            config.num_experts,
            config.num_experts_per_tok,
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            hidden_act=config.hidden_act,
        )


ENTRY_CLASSES = [OlmoeForCausalLM]
