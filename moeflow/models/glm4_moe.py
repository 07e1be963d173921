"""GLM-4.5 / GLM-4.5-Air: GQA attention with q/k/v bias, optional per-head qk-norm and rotary on
the first partial_rotary_factor of each head; after `first_k_dense_replace` dense layers, MoE with
a sigmoid router plus correction bias (grouped as DeepSeek-V3), renormalised and scaled, and
shared experts."""

from __future__ import annotations

from torch import nn

from moeflow.config import ModelConfig
from moeflow.layers.mlp import GatedMLP
from moeflow.layers.moe import MoE
from moeflow.models.llama import LlamaAttention, LlamaForCausalLM


class Glm4MoeForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_attention(cls, config: ModelConfig) -> LlamaAttention:
        hf = config.hf
        rope = hf.get("rope_parameters") or {}  # transformers >= 5 nests it there
        factor = float(hf.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0)
        return LlamaAttention(
            config,
            qkv_bias=config.attention_bias,
            o_bias=False,
            qk_norm=bool(hf.get("use_qk_norm", False)),
            sliding_window=None,
            rotary_dim=int(config.head_dim * factor),
        )

    @classmethod
    def make_mlp(cls, config: ModelConfig, layer_idx: int) -> nn.Module:
        hf = config.hf
        if layer_idx < int(hf.get("first_k_dense_replace") or 0) or config.num_experts == 0:
            return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        moe_inter = int(hf["moe_intermediate_size"])
        return MoE(
            config.hidden_size,
            moe_inter,
            config.num_experts,
            config.num_experts_per_tok,
            scoring_func="sigmoid",
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            num_expert_group=int(hf.get("n_group") or 1),
            topk_group=int(hf.get("topk_group") or 1),
            group_score="top2_sum",
            group_mask_value=float("-inf"),
            use_correction_bias=True,
            routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
            shared_intermediate_size=moe_inter * int(hf.get("n_shared_experts") or 0),
            shared_prefix="shared_experts",
            hidden_act=config.hidden_act,
        )


ENTRY_CLASSES = [Glm4MoeForCausalLM]
