"""Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B): Qwen3 attention (per-head qk-norm) with a softmax top-k
router (renormalised when norm_topk_prob); layers in mlp_only_layers, or off the
decoder_sparse_step grid, keep a dense MLP."""

from __future__ import annotations

from typing import Any

from torch import nn

from moeflow.config import ModelConfig
from moeflow.layers.mlp import GatedMLP
from moeflow.layers.moe import MoE
from moeflow.models.qwen3 import Qwen3ForCausalLM


def is_sparse_layer(config: ModelConfig, layer_idx: int) -> bool:
    """HF's rule for the Qwen MoE families."""
    hf = config.hf
    step = int(hf.get("decoder_sparse_step") or 1)
    return (
        layer_idx not in (hf.get("mlp_only_layers") or [])
        and config.num_experts > 0
        and (layer_idx + 1) % step == 0
    )


def qwen_moe_mlp(
    config: ModelConfig, layer_idx: int, norm_topk_default: bool, **moe_kwargs: Any
) -> nn.Module:
    """The Qwen MoE families' MLP at `layer_idx`: a dense GatedMLP where HF's rule keeps one,
    else an MoE (`moe_kwargs`: the family's shared-expert settings)."""
    hf = config.hf
    if not is_sparse_layer(config, layer_idx):
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
    return MoE(
        config.hidden_size,
        int(hf["moe_intermediate_size"]),
        config.num_experts,
        config.num_experts_per_tok,
        norm_topk_prob=bool(hf.get("norm_topk_prob", norm_topk_default)),
        hidden_act=config.hidden_act,
        **moe_kwargs,
    )


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    @classmethod
    def make_mlp(cls, config: ModelConfig, layer_idx: int) -> nn.Module:
        return qwen_moe_mlp(config, layer_idx, norm_topk_default=True)


ENTRY_CLASSES = [Qwen3MoeForCausalLM]
