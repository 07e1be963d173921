"""GGUF -> Hugging Face: a GGUF file's config.json dict and its tensors under HF parameter names,
for llama/qwen2/qwen3 (Mistral files say llama; Mixtral files say llama and carry experts),
qwen2moe/qwen3moe, olmoe, glm4moe (GLM-4.5 / 4.5-Air) and deepseek2 (DeepSeek-V2/V3/R1, Kimi K2).
Names and layouts read from llama.cpp's convert_hf_to_gguf.py (MIT); our own code."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import torch

from moeflow.errors import ModelFormatError
from moeflow.weights.ggml_quants import QuantizedTensor
from moeflow.weights.gguf import GGUFReader

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "deepseek2": "DeepseekV2ForCausalLM",  # V3 / R1 / Kimi K2 files too: see _deepseek2_config
    "olmoe": "OlmoeForCausalLM",
    "glm4moe": "Glm4MoeForCausalLM",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",  # glm4moe's name for it
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    # MoE: router, correction bias, shared experts (the `{shared}` prefix depends on the family)
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    "ffn_gate_shexp.weight": "mlp.{shared}.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.{shared}.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.{shared}.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    # DeepSeek multi-head latent attention
    "attn_q_a.weight": "self_attn.q_a_proj.weight",
    "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn_q_b.weight": "self_attn.q_b_proj.weight",
    "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn_kv_b.weight": "self_attn.kv_b_proj.weight",
}
# Stacked experts [E, out, in] -> the stacked HF-style name (weights/loader.py maps it onto
# layers/moe.py FusedExperts whole).
_EXPERT_NAMES = {
    "ffn_gate_exps.weight": "gate_proj",
    "ffn_up_exps.weight": "up_proj",
    "ffn_down_exps.weight": "down_proj",
}
# HF's name for the routed expert count, by GGUF architecture (the rest say num_experts)
_EXPERT_COUNT_KEYS = {
    "deepseek2": "n_routed_experts",
    "glm4moe": "n_routed_experts",
    "llama": "num_local_experts",  # Mixtral
}
_SHARED_PREFIX = {"qwen2moe": "shared_expert", "deepseek2": "shared_experts"}
# Newer llama.cpp files split DeepSeek's kv_b_proj into per-head K and V halves: they load as
# its shards (layers/mla.py KVBProj) through the family's packed_modules_mapping.
_KV_B_HALVES = {"attn_k_b.weight": "k_b_proj.weight", "attn_v_b.weight": "v_b_proj.weight"}
_BLOCK_NAME = re.compile(r"blk\.(0|[1-9][0-9]{0,8})\.(.+)")


def gguf_to_hf_config(reader: GGUFReader) -> dict[str, Any]:
    """An HF config.json dict for a llama/qwen2/qwen3 GGUF (Mistral GGUFs say "llama", Mixtral
    ones too, with an expert count), a qwen2moe/qwen3moe, olmoe or glm4moe GGUF or a deepseek2
    GGUF (DeepSeek-V2/V3/R1, Kimi K2)."""
    md = reader.metadata
    arch = _md(reader, "general.architecture", str)
    if arch not in _ARCHITECTURES:
        raise ModelFormatError(
            f"{reader.path}: unsupported GGUF architecture {arch!r}; "
            f"supported: {', '.join(sorted(_ARCHITECTURES))}"
        )
    hidden = _md_pos_int(reader, f"{arch}.embedding_length")
    num_heads = _md_pos_int(reader, f"{arch}.attention.head_count")
    num_kv_heads = _md_pos_int(reader, f"{arch}.attention.head_count_kv", num_heads)
    if num_heads % num_kv_heads != 0:
        raise ModelFormatError(
            f"{reader.path}: head_count {num_heads} is not a multiple of head_count_kv "
            f"{num_kv_heads}"
        )
    if f"{arch}.attention.key_length" in md:
        head_dim = _md_pos_int(reader, f"{arch}.attention.key_length")
    elif hidden % num_heads == 0:
        head_dim = hidden // num_heads
    else:
        raise ModelFormatError(
            f"{reader.path}: embedding_length {hidden} is not a multiple of head_count {num_heads}"
        )
    tokens = md.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and tokens:
        vocab_size = len(tokens)
    elif f"{arch}.vocab_size" in md:
        vocab_size = _md_pos_int(reader, f"{arch}.vocab_size")
    elif "token_embd.weight" in reader.tensors:
        vocab_size = reader.tensors["token_embd.weight"].shape[0]
    else:
        raise ModelFormatError(f"{reader.path}: cannot tell the vocabulary size")
    expert_ffn = _md(reader, f"{arch}.expert_feed_forward_length", int, None)
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        # MoE files whose every layer is sparse may leave the dense width out
        "intermediate_size": _md_pos_int(reader, f"{arch}.feed_forward_length", expert_ffn),
        "num_hidden_layers": _md_pos_int(reader, f"{arch}.block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": _md_pos_int(reader, f"{arch}.context_length"),
        "rms_norm_eps": _md_float(reader, f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": _md_float(reader, f"{arch}.rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(reader, arch, head_dim),
        "tie_word_embeddings": "output.weight" not in reader.tensors,
        "bos_token_id": _md_opt_int(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _md_opt_int(reader, "tokenizer.ggml.eos_token_id"),
        "attention_bias": "blk.0.attn_q.bias" in reader.tensors,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if arch in ("qwen2moe", "qwen3moe"):
        hf.update(_qwen_moe_config(reader, arch))
    elif arch == "deepseek2":
        hf.update(_deepseek2_config(reader, num_heads))
    elif arch == "olmoe":
        hf.update(_olmoe_config(reader))
    elif arch == "glm4moe":
        hf.update(_glm4moe_config(reader, head_dim))
    elif arch == "llama" and _md(reader, "llama.expert_count", int, 0) > 0:
        hf.update(_mixtral_config(reader))
    return hf


def iter_hf_weights(
    reader: GGUFReader,
    dtype: torch.dtype,
    unused: list[str] | None = None,
    keep_quantized: frozenset[int] = frozenset(),
) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """Yield (HF parameter name, tensor in `dtype`) in file order, one tensor in memory at a time.

    Tensors whose ggml type is in `keep_quantized` come as QuantizedTensor instead: views of the
    memory-mapped file (zero-copy; they keep the mapping alive), except Q/K rows the permutation
    below moves. The loader dequantises those a layer cannot use as they are. Routed experts come
    stacked, one tensor per projection (`...mlp.experts.gate_proj` [E, I, H], `up_proj`,
    `down_proj` [E, H, I]), as the file stores them. DeepSeek's kv_b_proj halves in newer files
    come as they are too, `...self_attn.k_b_proj.weight` [H, L, Dn] and `v_b_proj.weight` [H,
    Dv, L] (quantised or not), for the model to assemble (layers/mla.py KVBProj).

    For arch "llama" the Q/K rows permuted by llama.cpp's converter are put back in HF order.
    GGUF tensors with no HF counterpart are skipped and their names appended to `unused` when
    given; the caller decides whether that is an error. rope_freqs.weight is one: it is read
    into the config's rope_scaling by gguf_to_hf_config, not loaded as a weight.
    """
    config = gguf_to_hf_config(reader)
    arch = config["model_type"]
    num_layers = config["num_hidden_layers"]
    shared = _SHARED_PREFIX.get(arch, "shared_experts")
    kv_b_halves: dict[int, set[str]] = {}  # layers with one half seen so far
    for gguf_name in reader.tensors:
        hf_name = _GLOBAL_NAMES.get(gguf_name)
        num_perm_heads = 0
        m = _BLOCK_NAME.fullmatch(gguf_name)
        layer_idx, suffix = (int(m.group(1)), m.group(2)) if m is not None else (-1, "")
        if hf_name is None and 0 <= layer_idx < num_layers:
            prefix = f"model.layers.{layer_idx}"
            if suffix in _EXPERT_NAMES:  # every expert's projection stacked, [E, out, in]
                name = f"{prefix}.mlp.experts.{_EXPERT_NAMES[suffix]}"
                info = reader.tensors[gguf_name]
                if info.ggml_type in keep_quantized and len(info.shape) == 3:
                    data = reader.raw(gguf_name).reshape(*info.shape[:2], -1)  # the file's bytes
                    yield name, QuantizedTensor(data, info.ggml_type, tuple(info.shape))
                else:
                    yield name, reader.load(gguf_name, dtype)
                continue
            if suffix in _KV_B_HALVES and arch == "deepseek2":
                halves = kv_b_halves.setdefault(layer_idx, set())
                halves.add(suffix)
                if len(halves) == 2:
                    del kv_b_halves[layer_idx]
                name = f"{prefix}.self_attn.{_KV_B_HALVES[suffix]}"
                info = reader.tensors[gguf_name]
                if len(info.shape) != 3:
                    raise ModelFormatError(
                        f"{reader.path}: {gguf_name} has shape {tuple(info.shape)}, expected "
                        "[heads, rows, cols]"
                    )
                if info.ggml_type in keep_quantized:
                    data = reader.raw(gguf_name).reshape(*info.shape[:2], -1)  # the file's bytes
                    yield name, QuantizedTensor(data, info.ggml_type, tuple(info.shape))
                else:
                    yield name, reader.load(gguf_name, dtype)
                continue
            if suffix in _LAYER_NAMES:
                hf_name = f"{prefix}.{_LAYER_NAMES[suffix].format(shared=shared)}"
                if arch == "llama" and suffix.startswith("attn_q."):
                    num_perm_heads = config["num_attention_heads"]
                elif arch == "llama" and suffix.startswith("attn_k."):
                    num_perm_heads = config["num_key_value_heads"]
        if hf_name is None:
            if unused is not None:
                unused.append(gguf_name)
            continue
        info = reader.tensors[gguf_name]
        if info.ggml_type in keep_quantized and len(info.shape) == 2:
            rows, cols = info.shape
            data = reader.raw(gguf_name).reshape(rows, -1)  # a view of the mapped file
            if num_perm_heads:  # the permutation moves whole rows (a copy): blocks stay intact
                data = _unpermute_qk(data, num_perm_heads, reader.path, gguf_name)
            yield hf_name, QuantizedTensor(data, info.ggml_type, (rows, cols))
            continue
        # NOTE: the correction bias picks experts by small margins: never round it to bf16.
        tensor = reader.load(gguf_name, torch.float32 if suffix == "exp_probs_b.bias" else dtype)
        if num_perm_heads:
            tensor = _unpermute_qk(tensor, num_perm_heads, reader.path, gguf_name)
        if suffix == "ffn_gate_inp_shexp.weight":
            tensor = tensor.reshape(1, -1)  # llama.cpp stores HF's [1, H] as a vector
        yield hf_name, tensor
    if kv_b_halves:
        raise ModelFormatError(
            f"{reader.path}: layers {sorted(kv_b_halves)} have only one of attn_k_b / attn_v_b"
        )


# ----------------------------------------------------------------------------------------------
# Private helpers


def _md(reader: GGUFReader, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """Metadata value of the expected python type (bool never passes for a number)."""
    if key not in reader.metadata:
        if default is ...:
            raise ModelFormatError(f"{reader.path}: missing metadata key {key!r}")
        return default
    value = reader.metadata[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise ModelFormatError(
            f"{reader.path}: metadata {key!r} must be {' or '.join(k.__name__ for k in kinds)}, "
            f"got {value!r:.80}"
        )
    return value


def _md_pos_int(reader: GGUFReader, key: str, default: int | None = None) -> int:
    value = _md(reader, key, int, ... if default is None else default)
    if value <= 0:
        raise ModelFormatError(f"{reader.path}: metadata {key!r} must be positive, got {value}")
    return value


def _md_opt_int(reader: GGUFReader, key: str) -> int | None:
    return _md(reader, key, int, None)


def _md_float(reader: GGUFReader, key: str, default: float | None = None) -> float:
    value = _md(reader, key, (int, float), ... if default is None else default)
    if not math.isfinite(value) or value <= 0:
        raise ModelFormatError(f"{reader.path}: metadata {key!r} must be > 0, got {value}")
    return float(value)


def _rope_scaling(reader: GGUFReader, arch: str, head_dim: int) -> dict[str, Any] | None:
    """HF's rope_scaling from the rope.scaling.* keys, or from rope_freqs.weight: the per-
    frequency divisors llama.cpp's converter computes from a Llama 3.1-style `llama3` scaling
    (all ones, as some files carry, change nothing)."""
    scaling = _rope_scaling_keys(reader, arch)
    info = reader.tensors.get("rope_freqs.weight")
    if info is None:
        return scaling
    rope_dim = _md_pos_int(reader, f"{arch}.rope.dimension_count", head_dim)
    if tuple(info.shape) != (rope_dim // 2,):
        raise ModelFormatError(
            f"{reader.path}: rope_freqs.weight has shape {tuple(info.shape)}, expected "
            f"({rope_dim // 2},)"
        )
    factors = reader.load("rope_freqs.weight", torch.float32)
    if factors.is_meta:  # NOTE: memory_plan.py's header-only reader: the values do not count
        return {"rope_type": "llama3", "freq_factors": [1.0] * (rope_dim // 2)}
    if not bool(torch.isfinite(factors).all()) or bool((factors <= 0).any()):
        raise ModelFormatError(f"{reader.path}: rope_freqs.weight must be finite and positive")
    if bool((factors == 1).all()):
        return scaling
    if scaling is not None:
        raise ModelFormatError(
            f"{reader.path}: rope_freqs.weight with rope scaling {scaling['rope_type']!r} is "
            "not supported"
        )
    return {"rope_type": "llama3", "freq_factors": factors.tolist()}


def _rope_scaling_keys(reader: GGUFReader, arch: str) -> dict[str, Any] | None:
    kind = _md(reader, f"{arch}.rope.scaling.type", str, None)
    if kind is None and f"{arch}.rope.scale_linear" in reader.metadata:  # pre-2024 files
        return {"rope_type": "linear", "factor": _md_float(reader, f"{arch}.rope.scale_linear")}
    if kind is None or kind == "none":
        return None
    factor = _md_float(reader, f"{arch}.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = _md_pos_int(reader, f"{arch}.rope.scaling.original_context_length")
        yarn: dict[str, Any] = {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": original,
        }
        log_mul = _md(reader, f"{arch}.rope.scaling.yarn_log_multiplier", (int, float), None)
        if log_mul is not None:  # DeepSeek: llama.cpp stores 0.1 * mscale_all_dim
            mscale = float(log_mul) / 0.1
            yarn.update(mscale=mscale, mscale_all_dim=mscale)
        for key in ("beta_fast", "beta_slow"):
            beta = _md(reader, f"{arch}.rope.scaling.yarn_{key}", (int, float), None)
            if beta is not None:
                yarn[key] = float(beta)
        return yarn
    raise ModelFormatError(f"{reader.path}: unsupported rope scaling type {kind!r}")


def _qwen_moe_config(reader: GGUFReader, arch: str) -> dict[str, Any]:
    """HF Qwen2-MoE / Qwen3-MoE fields. llama.cpp always renormalises the top-k weights of
    qwen3moe and never those of qwen2moe; expert_weights_norm overrides when present."""
    norm = _md(reader, f"{arch}.expert_weights_norm", bool, arch == "qwen3moe")
    hf: dict[str, Any] = {
        **_expert_counts(reader, arch),
        "moe_intermediate_size": _md_pos_int(reader, f"{arch}.expert_feed_forward_length"),
        "norm_topk_prob": norm,
        "decoder_sparse_step": 1,
        # a layer without a router keeps its dense MLP (HF's mlp_only_layers)
        "mlp_only_layers": [
            i
            for i in range(_md_pos_int(reader, f"{arch}.block_count"))
            if f"blk.{i}.ffn_gate_inp.weight" not in reader.tensors
        ],
    }
    if arch == "qwen2moe":
        key = f"{arch}.expert_shared_feed_forward_length"
        hf["shared_expert_intermediate_size"] = _md(reader, key, int, 0)
    return hf


def _deepseek2_config(reader: GGUFReader, num_heads: int) -> dict[str, Any]:
    """HF DeepSeek-V2/V3 fields. A sigmoid gating function or a correction bias means V3 (R1,
    Kimi K2). Newer llama.cpp files describe the absorbed MLA cache (key_length = kv_lora_rank +
    rope dim, one KV head) and put the per-head sizes in key_length_mla / value_length_mla."""
    arch = "deepseek2"
    md = reader.metadata
    rope_dim = _md_pos_int(reader, f"{arch}.rope.dimension_count")
    if f"{arch}.attention.key_length_mla" in md:
        key_len = _md_pos_int(reader, f"{arch}.attention.key_length_mla")
        v_head_dim = _md_pos_int(reader, f"{arch}.attention.value_length_mla")
    else:
        key_len = _md_pos_int(reader, f"{arch}.attention.key_length")
        v_head_dim = _md_pos_int(reader, f"{arch}.attention.value_length")
    if key_len <= rope_dim:
        raise ModelFormatError(f"{reader.path}: key length {key_len} <= rope dims {rope_dim}")
    gating = _md(reader, f"{arch}.expert_gating_func", int, 1)  # 1 softmax, 2 sigmoid
    is_v3 = gating == 2 or any(name.endswith(".exp_probs_b.bias") for name in reader.tensors)
    # NOTE: files older than expert_group_count route V3 without groups, as llama.cpp then did.
    n_group = _md(reader, f"{arch}.expert_group_count", int, 1) or 1
    q_lora = _md(reader, f"{arch}.attention.q_lora_rank", int, 0)
    return {
        "architectures": ["DeepseekV3ForCausalLM" if is_v3 else "DeepseekV2ForCausalLM"],
        **_expert_counts(reader, arch),
        "num_key_value_heads": num_heads,  # HF's MLA config: every head has its own K and V
        "head_dim": rope_dim,
        "q_lora_rank": q_lora or None,
        "kv_lora_rank": _md_pos_int(reader, f"{arch}.attention.kv_lora_rank"),
        "qk_nope_head_dim": key_len - rope_dim,
        "qk_rope_head_dim": rope_dim,
        "v_head_dim": v_head_dim,
        "moe_intermediate_size": _md_pos_int(reader, f"{arch}.expert_feed_forward_length"),
        "n_shared_experts": _md(reader, f"{arch}.expert_shared_count", int, 0),
        "first_k_dense_replace": _md(reader, f"{arch}.leading_dense_block_count", int, 0),
        "routed_scaling_factor": _md_float(reader, f"{arch}.expert_weights_scale", 1.0),
        "norm_topk_prob": _md(reader, f"{arch}.expert_weights_norm", bool, False),
        "scoring_func": "sigmoid" if gating == 2 else "softmax",
        "n_group": n_group,
        "topk_group": _md(reader, f"{arch}.expert_group_used_count", int, 1) or 1,
        "topk_method": "noaux_tc"
        if is_v3
        else ("group_limited_greedy" if n_group > 1 else "greedy"),
        "rope_interleave": True,  # llama.cpp keeps HF's pairwise rope layout (no permutation)
    }


def _mixtral_config(reader: GGUFReader) -> dict[str, Any]:
    """HF Mixtral fields of a llama file with experts: llama.cpp always renormalises its top-k
    softmax weights, as HF's Mixtral does; the experts' width is feed_forward_length."""
    if "blk.0.ffn_gate.0.weight" in reader.tensors:
        raise ModelFormatError(
            f"{reader.path}: experts stored one tensor each (llama.cpp's pre-2024 Mixtral "
            f"layout) are not supported; re-convert the model with a recent llama.cpp"
        )
    return {
        "architectures": ["MixtralForCausalLM"],
        **_expert_counts(reader, "llama"),
        "sliding_window": None,
    }


def _olmoe_config(reader: GGUFReader) -> dict[str, Any]:
    """HF OLMoE fields. llama.cpp never renormalises OLMoE's top-k weights (OLMoE-1B-7B's
    norm_topk_prob is false); expert_weights_norm overrides when present. The experts' width is
    feed_forward_length; q/k are normed over all heads at once (attn_q_norm [heads * dim])."""
    arch = "olmoe"
    clip = _md(reader, f"{arch}.attention.clamp_kqv", (int, float), None)
    return {
        **_expert_counts(reader, arch),
        "norm_topk_prob": _md(reader, f"{arch}.expert_weights_norm", bool, False),
        "clip_qkv": _md_float(reader, f"{arch}.attention.clamp_kqv") if clip is not None else None,
    }


def _glm4moe_config(reader: GGUFReader, head_dim: int) -> dict[str, Any]:
    """HF GLM-4.5 fields. block_count counts the next-token-prediction (MTP) layers llama.cpp
    appends after the main ones; moeflow runs only the main layers, and iter_hf_weights skips
    the MTP layers' tensors. Rotary covers the first rope.dimension_count dims of each head
    (HF's partial_rotary_factor); the router is a sigmoid with a correction bias."""
    arch = "glm4moe"
    num_blocks = _md_pos_int(reader, f"{arch}.block_count")
    num_nextn = _md(reader, f"{arch}.nextn_predict_layers", int, 0)
    if not 0 <= num_nextn < num_blocks:
        raise ModelFormatError(
            f"{reader.path}: nextn_predict_layers {num_nextn} leaves no main layer of "
            f"block_count {num_blocks}"
        )
    rope_dim = _md_pos_int(reader, f"{arch}.rope.dimension_count", head_dim)
    if rope_dim > head_dim or rope_dim % 2:
        raise ModelFormatError(
            f"{reader.path}: rope.dimension_count {rope_dim} must be even and <= the head "
            f"size {head_dim}"
        )
    gating = _md(reader, f"{arch}.expert_gating_func", int, 2)
    if gating != 2:
        raise ModelFormatError(
            f"{reader.path}: glm4moe with expert_gating_func {gating} is not supported "
            f"(GLM-4.5 routes with a sigmoid, 2)"
        )
    return {
        **_expert_counts(reader, arch),
        "num_hidden_layers": num_blocks - num_nextn,
        "num_nextn_predict_layers": 0,
        "partial_rotary_factor": rope_dim / head_dim,
        "moe_intermediate_size": _md_pos_int(reader, f"{arch}.expert_feed_forward_length"),
        "n_shared_experts": _md(reader, f"{arch}.expert_shared_count", int, 0),
        "first_k_dense_replace": _md(reader, f"{arch}.leading_dense_block_count", int, 0),
        "n_group": _md(reader, f"{arch}.expert_group_count", int, 1) or 1,
        "topk_group": _md(reader, f"{arch}.expert_group_used_count", int, 1) or 1,
        "norm_topk_prob": _md(reader, f"{arch}.expert_weights_norm", bool, True),
        "routed_scaling_factor": _md_float(reader, f"{arch}.expert_weights_scale", 1.0),
        "use_qk_norm": "blk.0.attn_q_norm.weight" in reader.tensors,
    }


def _expert_counts(reader: GGUFReader, arch: str) -> dict[str, int]:
    num_experts = _md_pos_int(reader, f"{arch}.expert_count")
    top_k = _md_pos_int(reader, f"{arch}.expert_used_count")
    if top_k > num_experts:
        raise ModelFormatError(
            f"{reader.path}: expert_used_count {top_k} > expert_count {num_experts}"
        )
    return {_EXPERT_COUNT_KEYS.get(arch, "num_experts"): num_experts, "num_experts_per_tok": top_k}


def _unpermute_qk(tensor: torch.Tensor, num_heads: int, path: str, name: str) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py `permute` (rows regrouped per head from halves to pairs)."""
    rows = tensor.shape[0]
    if rows % (2 * num_heads) != 0:
        raise ModelFormatError(
            f"{path}: tensor {name!r} has {rows} rows, not a multiple of 2 * {num_heads} heads"
        )
    rest = tensor.shape[1:]
    # [rows, ...] -> [heads, head_dim/2, 2, ...] -> [heads, 2, head_dim/2, ...] -> [rows, ...]
    t = tensor.reshape(num_heads, rows // num_heads // 2, 2, *rest)
    return t.transpose(1, 2).reshape(tensor.shape)
