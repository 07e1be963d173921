"""Real model shapes (the config.json of each published checkpoint) for random-weight builds:
`LLM(model="preset:qwen3-30b-a3b")`. Data only; `moeflow --help` and README list this table."""

from __future__ import annotations

from typing import Any


def _yarn(
    factor: float, mscale: float, beta_fast: float = 32, beta_slow: float = 1
) -> dict[str, Any]:
    """A DeepSeek-style yarn rope_scaling entry (4096-token original context)."""
    return {
        "type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": 4096,
        "beta_fast": beta_fast,
        "beta_slow": beta_slow,
        "mscale": mscale,
        "mscale_all_dim": mscale,
    }


# What DeepSeek-V2-Lite, V3 and Kimi K2 share: the MLA dimensions and the long context.
_DEEPSEEK_MLA: dict[str, Any] = {
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}

# deepseek-ai/DeepSeek-V3 (61 layers; too large for a preset): the base of the 4-layer cuts.
_DEEPSEEK_V3: dict[str, Any] = {
    **_DEEPSEEK_MLA,
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "n_group": 8,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "q_lora_rank": 1536,
    "rope_scaling": _yarn(40.0, mscale=1.0),
    "eos_token_id": 1,
}

PRESETS: dict[str, dict[str, Any]] = {
    # allenai/OLMoE-1B-7B-0924: 6.9B total, 1.3B active.
    "olmoe-1b-7b": {
        "architectures": ["OlmoeForCausalLM"],
        "model_type": "olmoe",
        "vocab_size": 50304,
        "hidden_size": 2048,
        "intermediate_size": 1024,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "norm_topk_prob": False,
        "clip_qkv": None,
        "tie_word_embeddings": False,
        "eos_token_id": 50279,
    },
    # Qwen/Qwen3-30B-A3B: 30.5B total, 3.3B active.
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "attention_bias": False,
        "tie_word_embeddings": False,
        "eos_token_id": 151645,
    },
    # deepseek-ai/DeepSeek-V2-Lite: 15.7B total, 2.7B active; MLA, first layer dense.
    "deepseek-v2-lite": {
        **_DEEPSEEK_MLA,
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": 102400,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "greedy",
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "q_lora_rank": None,
        "rope_scaling": _yarn(40.0, mscale=0.707),
        "eos_token_id": 100001,
    },
    # deepseek-ai/DeepSeek-V3 cut to 4 layers (3 dense + 1 MoE): per-layer cost at full scale.
    # The published checkpoint is FP8 block-scaled; random weights use the compute dtype.
    "deepseek-v3-4l": {**_DEEPSEEK_V3, "num_hidden_layers": 4},
    # moonshotai/Kimi-K2-Instruct (the DeepSeek-V3 architecture) cut to 4 layers.
    "kimi-k2-4l": {
        **_DEEPSEEK_V3,
        "vocab_size": 163840,
        "num_attention_heads": 64,
        "num_key_value_heads": 64,
        "n_routed_experts": 384,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 2.827,
        "max_position_embeddings": 131072,
        "rope_theta": 50000.0,
        "rope_scaling": _yarn(32.0, mscale=1.0, beta_fast=1.0, beta_slow=1.0),
        "num_hidden_layers": 4,
        "eos_token_id": 163585,
    },
}


def preset_config(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The HF config dict of a preset, with `overrides` applied (e.g. fewer layers); an unknown
    name is a ValueError that lists the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return {**PRESETS[name], **(overrides or {})}
