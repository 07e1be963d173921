"""Qwen2-MoE / Qwen1.5-MoE: Qwen2 attention (q/k/v bias) with a softmax top-k router and a
shared expert whose output is scaled by sigmoid(shared_expert_gate(x))."""

from __future__ import annotations

from torch import nn

from moeflow.config import ModelConfig
from moeflow.layers.mlp import GatedMLP
from moeflow.layers.moe import MoE
from moeflow.models.qwen2 import Qwen2ForCausalLM
from moeflow.models.qwen3_moe import is_sparse_layer


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    @classmethod
    def make_mlp(cls, config: ModelConfig, layer_idx: int) -> nn.Module:
        hf = config.hf
        if not is_sparse_layer(config, layer_idx):
            return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        return MoE(
            config.hidden_size,
            int(hf["moe_intermediate_size"]),
            config.num_experts,
            config.num_experts_per_tok,
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            shared_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0),
            shared_expert_gate=True,
            shared_prefix="shared_expert",
            hidden_act=config.hidden_act,
        )


ENTRY_CLASSES = [Qwen2MoeForCausalLM]
