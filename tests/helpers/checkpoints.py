"""Tiny random HF checkpoints written with transformers at test time (one per family, plus the
scripted llama whose greedy output is fixed)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tests.helpers.tokenizer_files import TINY_EOS, TINY_VOCAB, write_tiny_tokenizer

# The config entries every tiny checkpoint shares (the families add their own).
TINY_BASE: dict[str, Any] = {
    "vocab_size": TINY_VOCAB,
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 256,
    "eos_token_id": TINY_EOS,
}

# family -> (transformers config class, model class, extra config kwargs)
# The tiny DeepSeek shape (MLA dims, 8 experts, top-2, one shared expert, first layer dense) of
# the V2 and V3 tiny families (which add 4 expert groups, 2 kept) and the GGUF MoE tests.
TINY_DEEPSEEK_SHAPE: dict[str, Any] = {
    "num_key_value_heads": 4,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "moe_intermediate_size": 32,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
}

TINY_FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4096}),
    # MoE families: 8 experts, top-2; routers and expert weights randomised like the rest.
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 32},
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
            "norm_topk_prob": False,
            "mlp_only_layers": [1],  # one dense layer between sparse ones
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
            "head_dim": 16,
        },
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        {"num_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 32, "clip_qkv": 4.0},
    ),
    # The other side of each renormalisation flag (qwen3: only layer 1 sparse, step 2).
    "olmoe_renorm": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        {
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "intermediate_size": 32,
            "norm_topk_prob": True,
        },
    ),
    "qwen3_moe_no_renorm": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": False,
            "decoder_sparse_step": 2,
            "head_dim": 16,
        },
    ),
    # DeepSeek: MLA (no q LoRA in V2, q LoRA in V3), first layer dense, 8 experts in 4 groups,
    # 2 groups kept, top-2, a shared expert; V2 softmax + YaRN, V3 sigmoid + correction bias.
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        {
            **TINY_DEEPSEEK_SHAPE,
            "n_group": 4,
            "topk_group": 2,
            "q_lora_rank": None,
            "topk_method": "group_limited_greedy",
            "norm_topk_prob": False,
            "routed_scaling_factor": 1.5,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 128,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
            },
        },
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {
            **TINY_DEEPSEEK_SHAPE,
            "n_group": 4,
            "topk_group": 2,
            "q_lora_rank": 48,
            "norm_topk_prob": True,
            "routed_scaling_factor": 2.5,
        },
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        {
            "head_dim": 16,
            "partial_rotary_factor": 0.5,
            "moe_intermediate_size": 32,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "n_group": 2,
            "topk_group": 1,
            "norm_topk_prob": True,
            "routed_scaling_factor": 2.5,
            "use_qk_norm": True,
            "attention_bias": True,
        },
    ),
}


DEEPSEEK_YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 128,
    "mscale": 1.0,
    "mscale_all_dim": 0.8,  # != mscale: the cos/sin factor and the softmax scale both move
    "beta_fast": 32,
    "beta_slow": 1,
    "rope_theta": 10000.0,
}

# The tiny DeepSeek checkpoints of tests/models/test_deepseek.py (and the CUDA-graph, Triton and fp8
# tests): name -> (HF config class, HF model class, config kwargs on top of DEEPSEEK_COMMON)
DEEPSEEK_VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # V2: softmax router limited to the 2 best of 4 groups (by each group's max), direct q_proj,
    # YaRN, rope on interleaved pairs (complex multiply)
    "v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        {
            "q_lora_rank": None,
            "topk_method": "group_limited_greedy",
            "rope_parameters": DEEPSEEK_YARN,
        },
    ),
    # V3: sigmoid + correction bias, groups by top-2 sum, renormalised, low-rank q, plain rope
    # on de-interleaved pairs (rope_interleave)
    "v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {"q_lora_rank": 48, "norm_topk_prob": True},
    ),
    # V3 with YaRN and without rope_interleave (rotate_half on halves)
    "v3_yarn": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {"q_lora_rank": 48, "rope_parameters": DEEPSEEK_YARN, "rope_interleave": False},
    ),
}

DEEPSEEK_COMMON: dict[str, Any] = {
    **TINY_BASE,
    **TINY_DEEPSEEK_SHAPE,
    "intermediate_size": 128,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 1.5,
}


def write_random_checkpoint(
    cfg_name: str,
    model_name: str,
    config_kwargs: dict,
    folder: Path,
    seed: int = 0,
    randomize_vector: Callable[[torch.Tensor], bool] = lambda p: False,
) -> Path:
    """A transformers model of that class with widened random weights (every matrix, and the
    1-D parameters `randomize_vector` picks; DeepSeek's correction bias too), saved with
    save_pretrained next to the tiny tokenizer."""
    import transformers

    config = getattr(transformers, cfg_name)(**config_kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).float().eval()
    with torch.no_grad():  # random init is small; widen it so logits are far from ties
        for p in model.parameters():
            if p.dim() > 1 or randomize_vector(p):
                p.normal_(0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)  # so it changes which experts are chosen
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    write_tiny_tokenizer(folder)
    return folder


def make_tiny_checkpoint(family: str, folder: Path, seed: int = 0, **overrides: Any) -> Path:
    """A tiny random checkpoint of `family`; `overrides` replace config entries."""
    cfg_name, model_name, extra = TINY_FAMILIES[family]
    kwargs = {
        **TINY_BASE,
        "intermediate_size": 128,
        "num_key_value_heads": 2,
        "rope_theta": 10000.0,
    }
    has_biases = family.startswith(("qwen2", "glm4"))  # q/k/v biases (1-D, not hidden-sized)
    return write_random_checkpoint(
        cfg_name,
        model_name,
        {**kwargs, **extra, **overrides},
        folder,
        seed,
        lambda p: has_biases and p.dim() == 1 and p.shape[0] != 64,
    )


def make_deepseek_checkpoint(variant: str, folder: Path, seed: int = 0) -> Path:
    """A tiny random DeepSeek checkpoint of `variant` (a key of DEEPSEEK_VARIANTS)."""
    cfg_name, model_name, extra = DEEPSEEK_VARIANTS[variant]
    return write_random_checkpoint(cfg_name, model_name, {**DEEPSEEK_COMMON, **extra}, folder, seed)


THINK_SCRIPT = ["<think>", "a", "b", "c", "</think>", "X", "Y", "Z"]


def make_scripted_checkpoint(
    folder: Path,
    script: list[str] = THINK_SCRIPT,
    template: str | None = None,
    special: tuple[str, ...] = (),
) -> Path:
    """A real llama checkpoint whose greedy output is scripted: every layer adds nothing (o_proj
    and down_proj are zero), embeddings are one-hot and the LM head maps each token to its
    successor in `script` (pieces that are not one byte become added tokens, special ones for
    those in `special`, which decoding skips by default; all distinct), so
    any prompt continues with the script then EOS. The default script is
    "<think>abc</think>XYZ", and the default chat template opens the think block itself when
    enable_thinking is true."""
    import transformers
    from tokenizers import Tokenizer as HFTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(folder)
    tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(list(special))
    tok.add_tokens([t for t in dict.fromkeys(script) if tok.token_to_id(t) is None])
    tok.save(str(folder / "tokenizer.json"))
    template = template or (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n"
        "{% if enable_thinking is defined and enable_thinking %}<think>{% endif %}{% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": template})
    )
    ids = [tok.token_to_id(t) for t in script]
    assert all(i is not None for i in ids) and len(set(ids)) == len(ids)
    hidden = TINY_VOCAB
    config = transformers.LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=256,
        eos_token_id=TINY_EOS,
    )
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(TINY_VOCAB, hidden))
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        successor = dict.fromkeys(range(TINY_VOCAB), ids[0])
        successor.update(dict(zip(ids, ids[1:] + [TINY_EOS], strict=True)))
        for t, nxt in successor.items():
            model.lm_head.weight[nxt, t] = 1.0
    model.save_pretrained(folder)
    return folder
