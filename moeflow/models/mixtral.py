"""Mixtral: Mistral's attention (optional sliding window) with a sparse MoE in place of the MLP:
softmax router, top-k, weights renormalised to sum 1. HF names the block `block_sparse_moe`."""

from __future__ import annotations

from torch import nn

from moeflow.config import ModelConfig
from moeflow.layers.moe import MoE
from moeflow.models.mistral import MistralForCausalLM


class MixtralForCausalLM(MistralForCausalLM):
    renames = {".block_sparse_moe.": ".mlp."}
    expert_params_mapping = {
        "w1": ("w13", "gate"),
        "w3": ("w13", "up"),
        "w2": ("w2", "down"),
    }

    @classmethod
    def make_mlp(cls, config: ModelConfig, layer_idx: int) -> nn.Module:
        return MoE(
            config.hidden_size,
            config.intermediate_size,
            config.num_experts,
            config.num_experts_per_tok,
            norm_topk_prob=True,
            hidden_act=config.hidden_act,
        )


ENTRY_CLASSES = [MixtralForCausalLM]
