"""Random-weight GGUF files of the presets' real shapes, whole or their first N layers, laid out
as llama.cpp's converter and quantizer write them (tensor names, expert stacking, Q4_K_M's type
per tensor; IQ4_XS throughout for iq4_xs), so moeflow and llama.cpp can be benchmarked on the
same file: qwen3moe, qwen3, llama, olmoe, and deepseek2 (DeepSeek-V2/V3 and Kimi K2, MLA with
the split k_b / v_b of today's converter). Quantised tensors hold random blocks with small
finite scales (values of about the preset's init scale); the router and norms are float32.
Files are written once and cached under MOEFLOW_CACHE_DIR.

Shape legend: V vocab, H hidden, I intermediate, E experts, Nh / Nkv heads, D head dim."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moeflow import env
from moeflow.weights.ggml_quants import GGML_QUANT_SIZES, GGMLType
from moeflow.weights.gguf import GGUFValueType
from moeflow.weights.gguf_writer import GGUFWriter

logger = logging.getLogger("moeflow")

FTYPES = ("q4_k_m", "q8_0", "iq4_xs")
_WEIGHT_STD = 0.02
# Byte offsets of the fp16 scale fields in a block, and the scale that gives the values a
# standard deviation of about _WEIGHT_STD given random quants (std of the quant part per type).
_F16_FIELDS: dict[GGMLType, tuple[int, ...]] = {
    GGMLType.Q4_0: (0,),
    GGMLType.Q5_0: (0,),
    GGMLType.Q5_1: (0, 2),
    GGMLType.Q8_0: (0,),
    GGMLType.Q4_K: (0, 2),
    GGMLType.Q5_K: (0, 2),
    GGMLType.Q6_K: (208,),
    GGMLType.IQ4_NL: (0,),
    GGMLType.IQ4_XS: (0,),
}
_QUANT_STD = {
    GGMLType.Q4_0: 4.6,  # uniform 0..15 minus 8
    GGMLType.Q5_0: 9.2,
    GGMLType.Q5_1: 9.2,
    GGMLType.Q8_0: 74.0,  # uniform int8
    GGMLType.Q4_K: 166.0,  # 6-bit scale x 4-bit quant
    GGMLType.Q5_K: 331.0,
    GGMLType.Q6_K: 1369.0,  # int8 scale x 6-bit quant
    GGMLType.IQ4_NL: 67.4,  # the 16-value codebook
    GGMLType.IQ4_XS: 1246.0,  # 6-bit scale minus 32 x the codebook
}
# A K-quant whose rows are not whole 256-value super-blocks takes llama.cpp's fallback type.
_FALLBACK = {
    GGMLType.Q4_K: GGMLType.Q5_0,
    GGMLType.Q5_K: GGMLType.Q5_1,
    GGMLType.Q6_K: GGMLType.Q8_0,
    GGMLType.IQ4_XS: GGMLType.IQ4_NL,
}
_GGUF_ARCH = {
    "qwen3_moe": "qwen3moe",
    "qwen3": "qwen3",
    "llama": "llama",
    "olmoe": "olmoe",
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",
}


def bench_gguf(preset: str, hf: dict[str, Any], ftype: str, num_layers: int | None = None) -> Path:
    """The cached GGUF file of `preset` (its HF config `hf`) in `ftype`, first `num_layers`
    layers (all when None); written on first use."""
    if ftype not in FTYPES:
        raise ValueError(f"unknown GGUF type {ftype!r}; choose one of {', '.join(FTYPES)}")
    model_type = hf.get("model_type")
    if model_type not in _GGUF_ARCH:
        raise ValueError(
            f"preset {preset!r} ({model_type}) has no GGUF layout here yet; GGUF benchmark "
            f"files exist for {', '.join(sorted(_GGUF_ARCH))}"
        )
    layers = num_layers or int(hf["num_hidden_layers"])
    hf = {**hf, "num_hidden_layers": layers}
    key = hashlib.sha256(json.dumps(hf, sort_keys=True).encode()).hexdigest()[:8]
    path = Path(env.MOEFLOW_CACHE_DIR) / "bench-models" / f"{preset}-{layers}L-{ftype}-{key}.gguf"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    logger.info("writing %s (random weights, first use)", path)
    size = _writer(hf, ftype).write(tmp)
    os.replace(tmp, path)
    logger.info("wrote %s (%.2f GB)", path, size / 1e9)
    return path


def write_gguf(hf: dict[str, Any], ftype: str, path: str | Path) -> int:
    """bench_gguf's file of `hf` (random weights) written to `path`; returns the size."""
    return _writer(hf, ftype).write(path)


def write_gguf_layout(hf: dict[str, Any], ftype: str, path: str | Path) -> int:
    """bench_gguf's file of `hf` without its tensor data (a sparse file of the full size);
    returns the size."""
    return _writer(hf, ftype).write(path, with_data=False)


def _writer(hf: dict[str, Any], ftype: str) -> GGUFWriter:
    arch = _GGUF_ARCH[hf["model_type"]]
    w = GGUFWriter()
    _metadata(w, hf, arch, ftype)
    vocab, hidden = int(hf["vocab_size"]), int(hf["hidden_size"])
    num_layers = int(hf["num_hidden_layers"])
    seed = iter(range(1, 1 << 30))
    typer = _type_rule(ftype, num_layers, int(hf.get("num_experts") or 0))

    def add(name: str, shape: tuple[int, ...], layer: int = -1) -> None:
        row = int(shape[len(shape) - 1])
        qtype = typer(name, layer) if len(shape) >= 2 else GGMLType.F32
        if qtype is not GGMLType.F32 and row % GGML_QUANT_SIZES[qtype][0]:
            qtype = _FALLBACK.get(qtype, GGMLType.F32)
        w.add_tensor(name, shape, qtype, _random(qtype, shape, next(seed), name))

    add("token_embd.weight", (vocab, hidden))
    for i in range(num_layers):
        _layer_tensors(hf, i, lambda n, s, i=i: add(f"blk.{i}.{n}", s, i))
    add("output_norm.weight", (hidden,))
    if not hf.get("tie_word_embeddings", False):
        add("output.weight", (vocab, hidden))
    return w


def _layer_tensors(
    hf: dict[str, Any], layer: int, add: Callable[[str, tuple[int, ...]], None]
) -> None:
    h = int(hf["hidden_size"])
    add("attn_norm.weight", (h,))
    if "kv_lora_rank" in hf:
        _mla_tensors(hf, add)
    else:
        _attention_tensors(hf, add)
    add("ffn_norm.weight", (h,))
    num_experts = int(hf.get("num_experts") or hf.get("n_routed_experts") or 0)
    dense = layer in (hf.get("mlp_only_layers") or []) or layer < int(
        hf.get("first_k_dense_replace") or 0
    )
    if not num_experts or dense:
        inter = int(hf["intermediate_size"])
        add("ffn_gate.weight", (inter, h))
        add("ffn_up.weight", (inter, h))
        add("ffn_down.weight", (h, inter))
        return
    inter = int(hf.get("moe_intermediate_size") or hf["intermediate_size"])  # OLMoE: the latter
    add("ffn_gate_inp.weight", (num_experts, h))
    if hf.get("topk_method") == "noaux_tc":
        add("exp_probs_b.bias", (num_experts,))
    add("ffn_gate_exps.weight", (num_experts, inter, h))
    add("ffn_up_exps.weight", (num_experts, inter, h))
    add("ffn_down_exps.weight", (num_experts, h, inter))
    shared = int(hf.get("n_shared_experts") or 0) * inter
    if shared:
        add("ffn_gate_shexp.weight", (shared, h))
        add("ffn_up_shexp.weight", (shared, h))
        add("ffn_down_shexp.weight", (h, shared))


def _attention_tensors(hf: dict[str, Any], add: Callable[[str, tuple[int, ...]], None]) -> None:
    h = int(hf["hidden_size"])
    nh, nkv = int(hf["num_attention_heads"]), int(hf.get("num_key_value_heads") or 0)
    nkv = nkv or nh
    d = int(hf.get("head_dim") or h // nh)
    add("attn_q.weight", (nh * d, h))
    add("attn_k.weight", (nkv * d, h))
    add("attn_v.weight", (nkv * d, h))
    add("attn_output.weight", (h, nh * d))
    if hf["model_type"] in ("qwen3", "qwen3_moe"):
        add("attn_q_norm.weight", (d,))
        add("attn_k_norm.weight", (d,))
    elif hf["model_type"] == "olmoe":  # normed over all heads at once
        add("attn_q_norm.weight", (nh * d,))
        add("attn_k_norm.weight", (nkv * d,))


def _mla_tensors(hf: dict[str, Any], add: Callable[[str, tuple[int, ...]], None]) -> None:
    """DeepSeek's MLA as llama.cpp's converter writes it today: kv_b_proj split into per-head
    attn_k_b [heads, kv_lora, nope] and attn_v_b [heads, v, kv_lora] (the absorbed cache)."""
    h, nh = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    nope, rope = int(hf["qk_nope_head_dim"]), int(hf["qk_rope_head_dim"])
    kv_lora, v_dim = int(hf["kv_lora_rank"]), int(hf["v_head_dim"])
    q_lora = int(hf.get("q_lora_rank") or 0)
    if q_lora:
        add("attn_q_a.weight", (q_lora, h))
        add("attn_q_a_norm.weight", (q_lora,))
        add("attn_q_b.weight", (nh * (nope + rope), q_lora))
    else:
        add("attn_q.weight", (nh * (nope + rope), h))
    add("attn_kv_a_mqa.weight", (kv_lora + rope, h))
    add("attn_kv_a_norm.weight", (kv_lora,))
    add("attn_k_b.weight", (nh, kv_lora, nope))
    add("attn_v_b.weight", (nh, v_dim, kv_lora))
    add("attn_output.weight", (h, nh * v_dim))


def _type_rule(ftype: str, num_layers: int, num_experts: int) -> Callable[[str, int], GGMLType]:
    """The ggml type llama.cpp's quantizer gives each 2-D tensor for `ftype` (Q4_K_M: Q6_K for
    the output, for attn_v and ffn_down in the layers that get more bits; Q5_K for attn_output
    of 8-expert models; Q4_K elsewhere); iq4_xs: IQ4_XS for every matrix (llama.cpp's IQ4_XS
    rules give a few tensors more bits; not modelled here); the router stays float32."""

    def more_bits(i: int) -> bool:
        n = num_layers
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

    def rule(name: str, layer: int) -> GGMLType:
        if name.endswith("ffn_gate_inp.weight"):
            return GGMLType.F32
        if ftype == "q8_0":
            return GGMLType.Q8_0
        if ftype == "iq4_xs":
            return GGMLType.IQ4_XS
        if name == "output.weight":
            return GGMLType.Q6_K
        if (".attn_v." in name or ".ffn_down" in name) and more_bits(layer):
            return GGMLType.Q6_K
        if ".attn_output." in name and num_experts == 8:
            return GGMLType.Q5_K
        return GGMLType.Q4_K

    return rule


def _random(
    qtype: GGMLType, shape: tuple[int, ...], seed: int, name: str
) -> Callable[[], np.ndarray]:
    def make() -> np.ndarray:
        rng = np.random.default_rng(seed)
        n = int(np.prod(shape))
        if qtype is GGMLType.F32:
            if name.endswith("norm.weight"):
                return np.ones(n, dtype=np.float32)
            return (rng.standard_normal(n, dtype=np.float32) * _WEIGHT_STD).astype(np.float32)
        block, size = GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, size=(n // block, size), dtype=np.uint8)
        scale = np.float16(_WEIGHT_STD / _QUANT_STD[qtype])
        fields = _F16_FIELDS[qtype]
        blocks[:, fields[0] : fields[0] + 2] = (
            np.full(len(blocks), scale).view(np.uint8).reshape(-1, 2)
        )
        if len(fields) > 1:  # the min (K-quants: dmin) centres the values
            centre = {GGMLType.Q4_K: 7.5, GGMLType.Q5_K: 15.5, GGMLType.Q5_1: -15.5}[qtype]
            centre = np.float16(float(scale) * centre)
            blocks[:, fields[1] : fields[1] + 2] = (
                np.full(len(blocks), centre).view(np.uint8).reshape(-1, 2)
            )
        return blocks

    return make


def _metadata(w: GGUFWriter, hf: dict[str, Any], arch: str, ftype: str) -> None:
    h, nh = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    d = int(hf.get("head_dim") or h // nh)
    w.add("general.architecture", arch)
    w.add("general.name", f"moeflow random {hf['model_type']} ({ftype})")
    w.add("general.file_type", {"q4_k_m": 15, "q8_0": 7, "iq4_xs": 30}[ftype])  # llama_ftype
    w.add(f"{arch}.block_count", int(hf["num_hidden_layers"]))
    w.add(f"{arch}.context_length", int(hf["max_position_embeddings"]))
    w.add(f"{arch}.embedding_length", h)
    w.add(f"{arch}.feed_forward_length", int(hf["intermediate_size"]))
    w.add(f"{arch}.attention.head_count", nh)
    w.add(f"{arch}.rope.freq_base", float(hf.get("rope_theta") or 10000.0))
    w.add(f"{arch}.attention.layer_norm_rms_epsilon", float(hf.get("rms_norm_eps") or 1e-6))
    if arch == "deepseek2":
        _deepseek2_metadata(w, hf)
    else:
        w.add(f"{arch}.attention.head_count_kv", int(hf.get("num_key_value_heads") or nh))
        w.add(f"{arch}.attention.key_length", d)
        w.add(f"{arch}.attention.value_length", d)
    if hf.get("num_experts"):
        w.add(f"{arch}.expert_count", int(hf["num_experts"]))
        w.add(f"{arch}.expert_used_count", int(hf["num_experts_per_tok"]))
        if hf.get("moe_intermediate_size"):  # OLMoE's experts are feed_forward_length wide
            w.add(f"{arch}.expert_feed_forward_length", int(hf["moe_intermediate_size"]))
    _tokenizer(w, int(hf["vocab_size"]))


def _deepseek2_metadata(w: GGUFWriter, hf: dict[str, Any]) -> None:
    """deepseek2's keys as the converter writes them for the absorbed MLA cache: one KV head of
    kv_lora + rope dims, the per-head sizes in *_length_mla; V3's sigmoid router with groups."""
    arch = "deepseek2"
    nope, rope = int(hf["qk_nope_head_dim"]), int(hf["qk_rope_head_dim"])
    kv_lora = int(hf["kv_lora_rank"])
    w.add(f"{arch}.attention.head_count_kv", 1)
    w.add(f"{arch}.attention.key_length", kv_lora + rope)
    w.add(f"{arch}.attention.value_length", kv_lora)
    w.add(f"{arch}.attention.key_length_mla", nope + rope)
    w.add(f"{arch}.attention.value_length_mla", int(hf["v_head_dim"]))
    w.add(f"{arch}.attention.q_lora_rank", int(hf.get("q_lora_rank") or 0))
    w.add(f"{arch}.attention.kv_lora_rank", kv_lora)
    w.add(f"{arch}.rope.dimension_count", rope)
    w.add(f"{arch}.leading_dense_block_count", int(hf.get("first_k_dense_replace") or 0))
    w.add(f"{arch}.expert_count", int(hf["n_routed_experts"]))
    w.add(f"{arch}.expert_used_count", int(hf["num_experts_per_tok"]))
    w.add(f"{arch}.expert_feed_forward_length", int(hf["moe_intermediate_size"]))
    w.add(f"{arch}.expert_shared_count", int(hf.get("n_shared_experts") or 0))
    w.add(f"{arch}.expert_weights_scale", float(hf.get("routed_scaling_factor") or 1.0))
    w.add(f"{arch}.expert_weights_norm", bool(hf.get("norm_topk_prob")))
    w.add(f"{arch}.expert_gating_func", 2 if hf.get("scoring_func") == "sigmoid" else 1)
    w.add(f"{arch}.expert_group_count", int(hf.get("n_group") or 1))
    w.add(f"{arch}.expert_group_used_count", int(hf.get("topk_group") or 1))
    yarn = hf.get("rope_scaling")
    if yarn and yarn.get("type", yarn.get("rope_type")) == "yarn":
        w.add(f"{arch}.rope.scaling.type", "yarn")
        w.add(f"{arch}.rope.scaling.factor", float(yarn["factor"]))
        original = int(yarn["original_max_position_embeddings"])
        w.add(f"{arch}.rope.scaling.original_context_length", original)
        w.add(f"{arch}.rope.scaling.yarn_log_multiplier", 0.1 * float(yarn["mscale_all_dim"]))


def _tokenizer(w: GGUFWriter, vocab_size: int) -> None:
    """A byte-level BPE vocabulary of `vocab_size` tokens: the 256 byte symbols, fillers, and
    an end-of-text control token last (benchmarks feed token ids; text round-trips bytes)."""
    symbols = _byte_symbols()
    tokens = symbols + [f"<|filler_{i}|>" for i in range(vocab_size - len(symbols) - 1)]
    tokens.append("<|endoftext|>")
    types = [1] * (vocab_size - 1) + [3]  # normal, then control
    w.add("tokenizer.ggml.model", "gpt2")
    w.add("tokenizer.ggml.pre", "qwen2")
    w.add("tokenizer.ggml.tokens", tokens)
    w.add("tokenizer.ggml.token_type", types, GGUFValueType.INT32)
    w.add("tokenizer.ggml.merges", [], GGUFValueType.STRING)
    w.add("tokenizer.ggml.eos_token_id", vocab_size - 1)
    w.add("tokenizer.ggml.add_bos_token", False)


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (the byte-level BPE alphabet)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
