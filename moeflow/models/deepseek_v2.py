"""DeepSeek-V2 / V3 / R1 and Kimi K2 (which uses the V3 class): multi-head latent attention with
a latent paged cache (layers/mla.py), the first `first_k_dense_replace` layers dense, the rest
MoE with shared experts. V2 routes with softmax (greedy or group-limited by each group's best
score), V3 with sigmoid scores plus e_score_correction_bias (groups ranked by their top-2 sum),
renormalised, times routed_scaling_factor. Rope on neighbouring pairs; YaRN."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from moeflow.config import ModelConfig
from moeflow.layers.mla import MLAAttention
from moeflow.layers.mlp import GatedMLP
from moeflow.layers.moe import MoE
from moeflow.models.llama import LlamaForCausalLM


@dataclass(frozen=True)
class DeepseekConfig:
    """The family-only fields, read once from config.json (docs/STYLE.md §2.6)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    moe_intermediate_size: int
    n_shared_experts: int
    first_k_dense_replace: int
    moe_layer_freq: int
    n_group: int
    topk_group: int
    topk_method: str
    scoring_func: str
    norm_topk_prob: bool
    routed_scaling_factor: float
    rope_layout: str

    @classmethod
    def from_model_config(cls, config: ModelConfig, is_v3: bool) -> DeepseekConfig:
        hf: dict[str, Any] = config.hf
        q_lora = hf.get("q_lora_rank")
        interleave = bool(hf.get("rope_interleave", True))
        return cls(
            q_lora_rank=int(q_lora) if q_lora else None,
            kv_lora_rank=int(hf["kv_lora_rank"]),
            qk_nope_head_dim=int(hf["qk_nope_head_dim"]),
            qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
            v_head_dim=int(hf["v_head_dim"]),
            moe_intermediate_size=int(hf.get("moe_intermediate_size") or 0),
            n_shared_experts=int(hf.get("n_shared_experts") or 0),
            first_k_dense_replace=int(hf.get("first_k_dense_replace") or 0),
            moe_layer_freq=int(hf.get("moe_layer_freq") or 1),
            n_group=int(hf.get("n_group") or 1),
            topk_group=int(hf.get("topk_group") or 1),
            topk_method=str(hf.get("topk_method") or ("noaux_tc" if is_v3 else "greedy")),
            scoring_func=str(hf.get("scoring_func") or ("sigmoid" if is_v3 else "softmax")),
            norm_topk_prob=bool(hf.get("norm_topk_prob", is_v3)),
            routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
            rope_layout=("deinterleave" if interleave else "neox") if is_v3 else "interleaved",
        )


class DeepseekV2ForCausalLM(LlamaForCausalLM):
    is_v3 = False
    # q_proj is DeepSeek's own projection here (no q/k/v merge); gate/up are fused, and a GGUF
    # file's halves of kv_b_proj (gguf_hf.py) fill it as shards (layers/mla.py KVBProj).
    packed_modules_mapping = {
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
        "k_b_proj": ("kv_b_proj", "k_b"),
        "v_b_proj": ("kv_b_proj", "v_b"),
    }

    @classmethod
    def family(cls, config: ModelConfig) -> DeepseekConfig:
        return DeepseekConfig.from_model_config(config, cls.is_v3)

    @classmethod
    def make_attention(cls, config: ModelConfig) -> nn.Module:  # type: ignore[override]
        ds = cls.family(config)
        return MLAAttention(
            config.hidden_size,
            config.num_attention_heads,
            ds.q_lora_rank,
            ds.kv_lora_rank,
            ds.qk_nope_head_dim,
            ds.qk_rope_head_dim,
            ds.v_head_dim,
            1e-6,  # NOTE: HF builds q_a_layernorm / kv_a_layernorm with the default eps
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            ds.rope_layout,
            bias=config.attention_bias,
        )

    @classmethod
    def make_mlp(cls, config: ModelConfig, layer_idx: int) -> nn.Module:
        ds = cls.family(config)
        is_moe = layer_idx >= ds.first_k_dense_replace and layer_idx % ds.moe_layer_freq == 0
        if not is_moe or config.num_experts == 0:
            return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        grouped = ds.topk_method in ("group_limited_greedy", "noaux_tc")
        return MoE(
            config.hidden_size,
            ds.moe_intermediate_size,
            config.num_experts,
            config.num_experts_per_tok,
            scoring_func=ds.scoring_func,
            norm_topk_prob=ds.norm_topk_prob,
            num_expert_group=ds.n_group if grouped else 1,
            topk_group=ds.topk_group if grouped else 1,
            group_score="top2_sum" if cls.is_v3 else "max",
            group_mask_value=float("-inf") if cls.is_v3 else 0.0,
            use_correction_bias=cls.is_v3,
            routed_scaling_factor=ds.routed_scaling_factor,
            shared_intermediate_size=ds.moe_intermediate_size * ds.n_shared_experts,
            shared_prefix="shared_experts",
            hidden_act=config.hidden_act,
        )


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    is_v3 = True


ENTRY_CLASSES = [DeepseekV2ForCausalLM, DeepseekV3ForCausalLM]
