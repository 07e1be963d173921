"""GLM-4.5's config.json (cut down) builds our Glm4MoeForCausalLM with the right family fields and
runs a forward through the paged cache. HF parity of a tiny GLM-4.5 is in test_parity.py."""

from __future__ import annotations

import copy
from typing import Any

from moeflow.layers.attention import PagedAttention
from moeflow.layers.moe import MoE
from moeflow.models.glm4_moe import Glm4MoeForCausalLM
from tests.helpers.models import run_one_forward

# zai-org/GLM-4.5's config.json (same keys and values), with the sizes cut down below.
GLM45_CONFIG: dict[str, Any] = {
    "architectures": ["Glm4MoeForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "pad_token_id": 151329,
    "eos_token_id": [151329, 151336, 151338],
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 5120,
    "partial_rotary_factor": 0.5,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 131072,
    "model_type": "glm4_moe",
    "moe_intermediate_size": 1536,
    "norm_topk_prob": True,
    "num_attention_heads": 96,
    "n_group": 1,
    "topk_group": 1,
    "n_routed_experts": 160,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.5,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "num_hidden_layers": 92,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.54.0",
    "use_cache": True,
    "use_qk_norm": True,
    "vocab_size": 151552,
}


def test_glm45_config_builds_and_runs() -> None:
    hf = copy.deepcopy(GLM45_CONFIG)
    hf.update(
        hidden_size=64,
        head_dim=16,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        n_routed_experts=16,
        vocab_size=512,
    )
    model, logits = run_one_forward(hf)
    assert isinstance(model, Glm4MoeForCausalLM)
    assert logits.shape == (1, 512) and logits.isfinite().all()
    layers = model.model.layers
    assert [isinstance(layer.mlp, MoE) for layer in layers] == [False, False, False, True]
    moe = layers[3].mlp
    assert isinstance(moe, MoE)
    assert (moe.num_experts, moe.top_k, moe.scoring_func) == (16, 8, "sigmoid")
    assert moe.gate.e_score_correction_bias is not None and moe.routed_scaling_factor == 2.5
    assert moe.shared_experts.down_proj.in_features == 32  # type: ignore[union-attr]
    attn = layers[0].self_attn
    assert attn.rotary_emb.rotary_dim == 8  # half of head_dim 16
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None
    assert attn.q_norm is not None and attn.k_norm is not None
    cache = [m for m in model.modules() if isinstance(m, PagedAttention)]
    assert len(cache) == 4 and cache[0].num_kv_heads == 2
