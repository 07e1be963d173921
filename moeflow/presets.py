"""Real model shapes (the config.json of each published checkpoint) for random-weight builds:
`LLM(model="preset:qwen3-30b-a3b", random_weights=True)`. Data only; a leaf module (the offline
API needs it, so it cannot live under bench/, which nothing imports)."""

from __future__ import annotations

from typing import Any

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
}


def preset_config(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The HF config dict of a preset, with `overrides` applied (e.g. fewer layers)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return {**PRESETS[name], **(overrides or {})}
