"""Qwen2-MoE / Qwen1.5-MoE: Qwen2 attention (q/k/v bias) with a softmax top-k router and a
shared expert whose output is scaled by sigmoid(shared_expert_gate(x))."""

from __future__ import annotations

from torch import nn

from moeflow.config import ModelConfig
from moeflow.models.qwen2 import Qwen2ForCausalLM
from moeflow.models.qwen3_moe import qwen_moe_mlp


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    @classmethod
    def make_mlp(cls, config: ModelConfig, layer_idx: int) -> nn.Module:
        return qwen_moe_mlp(
            config,
            layer_idx,
            norm_topk_default=False,
            shared_intermediate_size=int(config.hf.get("shared_expert_intermediate_size") or 0),
            shared_expert_gate=True,
            shared_prefix="shared_expert",
        )


ENTRY_CLASSES = [Qwen2MoeForCausalLM]
