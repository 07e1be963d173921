"""What the GGUF and quantised-kernel tests share about ggml block layouts."""

from __future__ import annotations

import torch

from moeflow.loading.presets import PRESETS
from moeflow.weights.ggml_quants import GGML_QUANT_SIZES, GGMLType

# byte offsets of the fp16 scale fields in one block, per type
GGUF_F16_FIELDS = {
    GGMLType.Q4_0: (0,),
    GGMLType.Q4_1: (0, 2),
    GGMLType.Q5_0: (0,),
    GGMLType.Q5_1: (0, 2),
    GGMLType.Q8_0: (0,),
    GGMLType.Q2_K: (80, 82),
    GGMLType.Q3_K: (108,),
    GGMLType.Q4_K: (0, 2),
    GGMLType.Q5_K: (0, 2),
    GGMLType.Q6_K: (208,),
    GGMLType.IQ2_XXS: (0,),
    GGMLType.IQ2_XS: (0,),
    GGMLType.IQ2_S: (0,),
    GGMLType.IQ3_XXS: (0,),
    GGMLType.IQ3_S: (0,),
    GGMLType.IQ1_S: (0,),
    GGMLType.IQ4_NL: (0,),
    GGMLType.IQ4_XS: (0,),
    GGMLType.TQ1_0: (52,),
    GGMLType.TQ2_0: (64,),
}


def random_blocks(qtype: GGMLType, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """[n, row_bytes] of random quant bytes whose fp16 scales are finite and small."""
    g = torch.Generator().manual_seed(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    b = torch.randint(0, 256, (n, k // block, size), dtype=torch.uint8, generator=g)
    for off in GGUF_F16_FIELDS[qtype]:
        scale = (torch.rand(n, k // block, generator=g) * 0.02 + 1e-3).half()
        b[:, :, off : off + 2] = scale.view(torch.uint8).view(n, k // block, 2)
    return b.reshape(n, -1).contiguous()


# A Qwen3-MoE of tiny width whose expert rows are whole K-quant super-blocks (256 values).
TINY_QWEN3_MOE = {
    **PRESETS["qwen3-30b-a3b"],
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 256,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 2048,
}

# OLMoE, DeepSeek-V2-Lite (MLA, a leading dense layer, shared experts, softmax router) and
# DeepSeek-V3 (q_lora, sigmoid router with groups and a correction bias) of the same tiny width.
TINY_OLMOE = {
    **PRESETS["olmoe-1b-7b"],
    "hidden_size": 256,
    "intermediate_size": 256,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 2048,
}
_TINY_MLA = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 256,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "kv_lora_rank": 256,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 32,
    "v_head_dim": 64,
    "vocab_size": 2048,
}
TINY_DEEPSEEK_V2 = {**PRESETS["deepseek-v2-lite"], **_TINY_MLA}
TINY_DEEPSEEK_V3 = {
    **PRESETS["deepseek-v3-4l"],
    **_TINY_MLA,
    "q_lora_rank": 256,
    "n_group": 4,
    "topk_group": 2,
    "first_k_dense_replace": 1,
}
