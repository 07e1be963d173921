"""MoE GGUF files (qwen2moe, qwen3moe, deepseek2, Mixtral as llama, olmoe, glm4moe) written with
gguf.GGUFWriter from tiny random HF checkpoints as llama.cpp's converter lays them out (names,
Q/K permutation, stacked experts, metadata, GLM-4.5's MTP layer): moeflow's greedy output (and
prefill logits) from the GGUF equals transformers' on the HF checkpoint, and a deepseek2 file
fills exactly the tensors and config fields the HF folder gives (old single kv_b and newer split
k_b / v_b layouts)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.kernels import cpu_ext
from moeflow.layers.fused_experts import FusedExperts
from moeflow.loading.loader import load_model
from moeflow.loading.source import parse_model_source
from moeflow.weights.ggml_quants import GGMLType
from moeflow.weights.gguf import GGUFReader
from moeflow.weights.gguf_hf import gguf_to_hf_config, iter_hf_weights
from tests.helpers.checkpoints import (
    TINY_BASE,
    TINY_DEEPSEEK_SHAPE,
    make_tiny_checkpoint,
    write_random_checkpoint,
)
from tests.helpers.parity import assert_matches_hf
from tests.helpers.tokenizer_files import TINY_EOS, TINY_VOCAB

# llama.cpp's names (gguf-py constants.py TENSOR_NAMES), written out so the test does not reuse
# the mapping it checks.
_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "self_attn.q_a_proj": "attn_q_a",
    "self_attn.q_a_layernorm": "attn_q_a_norm",
    "self_attn.q_b_proj": "attn_q_b",
    "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "self_attn.kv_a_layernorm": "attn_kv_a_norm",
    "self_attn.kv_b_proj": "attn_kv_b",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
    "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
    "block_sparse_moe.gate": "ffn_gate_inp",  # Mixtral
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias|e_score_correction_bias)")
_EXPERT_NAME = re.compile(
    r"(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)"
)
_EXPERT_PROJ = {
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "w1": "gate",
    "w3": "up",
    "w2": "down",
}

# Tiny DeepSeek checkpoints: MLA (V2 without q LoRA, V3 with), first layer dense, shared expert.
_DEEPSEEK: dict[str, dict[str, Any]] = {
    "deepseek_v2": {
        "q_lora_rank": None,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "greedy",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
    },
    "deepseek_v3": {
        "q_lora_rank": 48,
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
    },
}
_NUM_NEXTN = 1  # GLM-4.5's MTP layers, written after the main ones

_DEEPSEEK_COMMON: dict[str, Any] = {
    **TINY_BASE,
    **TINY_DEEPSEEK_SHAPE,
    "intermediate_size": 96,
    "rope_theta": 10000.0,
}


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _write_gguf(
    folder: Path,
    path: Path,
    arch: str,
    hf: dict[str, Any],
    split_kv_b: bool = False,
    split_max_tensors: int = 0,
    q8_0: bool = False,
) -> None:
    """A GGUF of the checkpoint in `folder` as convert_hf_to_gguf.py would lay it out (with
    `split_max_tensors`, a split set `<path stem>-0000N-of-0000M.gguf` as its option of that
    name writes it; with `q8_0`, its matrices in Q8_0 by gguf-py's quantiser, --outtype q8_0)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)

    def add(name: str, a: np.ndarray) -> None:
        if q8_0 and a.ndim >= 2 and a.shape[-1] % 32 == 0:
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(a, q8), raw_dtype=q8)
        else:
            w.add_tensor(name, a)

    n_layers = hf["num_hidden_layers"]
    if arch != "glm4moe":
        w.add_block_count(n_layers)
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(hf["num_attention_heads"])
    w.add_head_count_kv(hf["num_key_value_heads"])
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_rope_freq_base((hf.get("rope_parameters") or hf)["rope_theta"])
    w.add_expert_count(_num_experts(hf))
    w.add_expert_used_count(hf["num_experts_per_tok"])
    if arch not in ("llama", "olmoe"):  # Mixtral's and OLMoE's experts are feed_forward_length wide
        w.add_expert_feed_forward_length(hf["moe_intermediate_size"])
    if arch in ("qwen3moe", "glm4moe"):
        w.add_key_length(hf["head_dim"])
        w.add_value_length(hf["head_dim"])
    if arch == "llama":
        w.add_vocab_size(hf["vocab_size"])
        w.add_rope_dimension_count(hf["hidden_size"] // hf["num_attention_heads"])
    if arch == "olmoe" and hf.get("clip_qkv"):
        w.add_clamp_kqv(hf["clip_qkv"])
    if arch == "glm4moe":  # the block count includes the MTP layers written below
        w.add_block_count(n_layers + _NUM_NEXTN)
        rope = hf["rope_parameters"]
        w.add_rope_dimension_count(int(hf["head_dim"] * rope["partial_rotary_factor"]))
        w.add_expert_shared_count(hf["n_shared_experts"])
        w.add_leading_dense_block_count(hf["first_k_dense_replace"])
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_weights_scale(hf["routed_scaling_factor"])
        w.add_expert_weights_norm(hf["norm_topk_prob"])
        w.add_nextn_predict_layers(_NUM_NEXTN)
        w.add_expert_group_count(hf["n_group"])
        w.add_expert_group_used_count(hf["topk_group"])
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(hf["shared_expert_intermediate_size"])
    if arch == "deepseek2":
        rope = hf["qk_rope_head_dim"]
        if hf["q_lora_rank"]:
            w.add_q_lora_rank(hf["q_lora_rank"])
        w.add_kv_lora_rank(hf["kv_lora_rank"])
        w.add_rope_dimension_count(rope)
        if split_kv_b:  # newer files: the absorbed cache's shape, per-head sizes apart
            w.add_key_length(hf["kv_lora_rank"] + rope)
            w.add_value_length(hf["kv_lora_rank"])
            w.add_key_length_mla(hf["qk_nope_head_dim"] + rope)
            w.add_value_length_mla(hf["v_head_dim"])
        else:
            w.add_key_length(hf["qk_nope_head_dim"] + rope)
            w.add_value_length(hf["v_head_dim"])
        w.add_leading_dense_block_count(hf["first_k_dense_replace"])
        w.add_expert_shared_count(hf["n_shared_experts"])
        w.add_expert_weights_scale(hf["routed_scaling_factor"])
        w.add_expert_weights_norm(hf["norm_topk_prob"])
        is_v3 = hf["architectures"][0] == "DeepseekV3ForCausalLM"
        w.add_expert_gating_func(
            gguf.ExpertGatingFuncType.SIGMOID if is_v3 else gguf.ExpertGatingFuncType.SOFTMAX
        )
        w.add_expert_group_count(hf["n_group"])
        w.add_expert_group_used_count(hf["topk_group"])
        yarn = hf.get("rope_parameters") or {}
        if yarn.get("rope_type") == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(yarn["factor"])
            w.add_rope_scaling_orig_ctx_len(yarn["original_max_position_embeddings"])
            w.add_rope_scaling_yarn_log_mul(0.1 * yarn["mscale_all_dim"])
    # Byte-level vocabulary padded to the model's vocab size; one merge so the list is not empty.
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = sorted(ByteLevel.alphabet()) + ["<s>", "</s>", "ab"]
    types = [1] * 256 + [3, 3, 1]
    tokens += [f"<unused{i}>" for i in range(TINY_VOCAB - len(tokens))]
    types += [4] * (TINY_VOCAB - len(types))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(256)
    w.add_eos_token_id(TINY_EOS)

    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for name, t in _hf_tensors(folder).items():
        a = t.float().numpy()
        if name in _GLOBAL:
            add(_GLOBAL[name], a)
            continue
        m = _LAYER_NAME.fullmatch(name)
        assert m is not None, name
        layer, module, kind = int(m[1]), m[2], m[3]
        if (e := _EXPERT_NAME.fullmatch(module)) is not None:
            experts.setdefault((layer, _EXPERT_PROJ[e[2]]), {})[int(e[1])] = a
            continue
        if arch == "llama" and module == "self_attn.q_proj":
            a = _llama_permute(a, hf["num_attention_heads"])
        if arch == "llama" and module == "self_attn.k_proj":
            a = _llama_permute(a, hf["num_key_value_heads"])
        if arch == "glm4moe" and module == "post_attention_layernorm":
            add(f"blk.{layer}.post_attention_norm.{kind}", a)
            continue
        if kind == "e_score_correction_bias":
            w.add_tensor(f"blk.{layer}.exp_probs_b.bias", a)
            continue
        if module == "self_attn.kv_b_proj" and split_kv_b:
            heads = hf["num_attention_heads"]
            nope, v_dim = hf["qk_nope_head_dim"], hf["v_head_dim"]
            kv_b = a.reshape(heads, nope + v_dim, a.shape[-1])
            w.add_tensor(f"blk.{layer}.attn_k_b.weight", kv_b[:, :nope].transpose(0, 2, 1).copy())
            w.add_tensor(f"blk.{layer}.attn_v_b.weight", kv_b[:, nope:].copy())
            continue
        if module == "mlp.shared_expert_gate":
            a = a.reshape(-1)  # llama.cpp keeps it as a vector
        add(f"blk.{layer}.{_LAYER[module]}.{kind}", a)
    for (layer, proj), per_expert in experts.items():
        stacked = np.stack([per_expert[i] for i in range(len(per_expert))])  # [E, out, in]
        add(f"blk.{layer}.ffn_{proj}_exps.weight", stacked)
    if arch == "glm4moe":  # the MTP layer (HF's layer n_layers, never run by transformers)
        _add_nextn_layer(w, n_layers, hf)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py `LlamaModel.permute`: each head's rows from halves to pairs."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _add_nextn_layer(w: Any, layer: int, hf: dict[str, Any]) -> None:
    """GLM-4.5's next-token-prediction layer as llama.cpp's converter appends it: a full
    decoder block plus the nextn.* tensors, random here (a model that ran it would diverge)."""
    rng = np.random.default_rng(7)
    h, e, inter = hf["hidden_size"], hf["n_routed_experts"], hf["moe_intermediate_size"]
    q, kv = hf["num_attention_heads"] * hf["head_dim"], hf["num_key_value_heads"] * hf["head_dim"]
    shapes = {
        "attn_norm.weight": (h,),
        "attn_q.weight": (q, h),
        "attn_q.bias": (q,),
        "attn_k.weight": (kv, h),
        "attn_k.bias": (kv,),
        "attn_v.weight": (kv, h),
        "attn_v.bias": (kv,),
        "attn_output.weight": (h, q),
        "post_attention_norm.weight": (h,),
        "ffn_gate_inp.weight": (e, h),
        "exp_probs_b.bias": (e,),
        "ffn_gate_exps.weight": (e, inter, h),
        "ffn_up_exps.weight": (e, inter, h),
        "ffn_down_exps.weight": (e, h, inter),
        "nextn.eh_proj.weight": (h, 2 * h),
        "nextn.enorm.weight": (h,),
        "nextn.hnorm.weight": (h,),
        "nextn.shared_head_norm.weight": (h,),
    }
    for name, shape in shapes.items():
        w.add_tensor(f"blk.{layer}.{name}", rng.standard_normal(shape).astype(np.float32))


def _num_experts(hf: dict[str, Any]) -> int:
    return next(
        hf[k] for k in ("num_experts", "num_local_experts", "n_routed_experts") if hf.get(k)
    )


def _hf_config(folder: Path) -> dict[str, Any]:
    import json

    return json.loads((folder / "config.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(("family", "arch"), [("qwen3_moe", "qwen3moe"), ("qwen2_moe", "qwen2moe")])
def test_qwen_moe_gguf_greedy_matches_hf(family: str, arch: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder = make_tiny_checkpoint(family, tmp_path / family)
    hf_cfg = _hf_config(folder)
    path = tmp_path / f"{family}.gguf"
    _write_gguf(folder, path, arch, hf_cfg)
    with GGUFReader(path) as reader:
        cfg = gguf_to_hf_config(reader)
    assert cfg["architectures"] == hf_cfg["architectures"]
    assert cfg["norm_topk_prob"] == (arch == "qwen3moe")
    assert cfg["mlp_only_layers"] == hf_cfg.get("mlp_only_layers", [])

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # type: ignore[union-attr]
    llm = LLM(str(path), dtype="float32", device="cpu", max_model_len=128)
    prompts = [[7, 100, 42, 3, 250], list(range(60, 90))]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    for ids, out in zip(prompts, llm.generate(prompts, params), strict=True):
        with torch.no_grad():
            ref = hf.generate(  # type: ignore[operator]
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=32,
                do_sample=False,
                pad_token_id=0,
            )
        assert out.token_ids == ref[0, len(ids) :].tolist()


@pytest.mark.parametrize("split_kv_b", [False, True], ids=["kv_b", "k_b+v_b"])
@pytest.mark.parametrize("family", sorted(_DEEPSEEK))
def test_deepseek2_gguf_fills_the_hf_tensors(family: str, split_kv_b: bool, tmp_path: Path) -> None:
    cls = "DeepseekV3" if family == "deepseek_v3" else "DeepseekV2"
    folder = write_random_checkpoint(
        f"{cls}Config",
        f"{cls}ForCausalLM",
        {**_DEEPSEEK_COMMON, **_DEEPSEEK[family]},
        tmp_path / family,
        randomize_vector=lambda p: True,  # norms too, so a swapped norm would show
    )
    hf_cfg = _hf_config(folder)
    path = tmp_path / f"{family}.gguf"
    _write_gguf(folder, path, "deepseek2", hf_cfg, split_kv_b=split_kv_b)

    with GGUFReader(path) as reader:
        cfg = gguf_to_hf_config(reader)
    keys = [
        "architectures",
        "q_lora_rank",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "moe_intermediate_size",
        "num_experts_per_tok",
        "n_shared_experts",
        "first_k_dense_replace",
        "n_group",
        "topk_group",
        "norm_topk_prob",
        "routed_scaling_factor",
        "num_key_value_heads",
    ]
    assert {k: cfg[k] for k in keys} == {k: hf_cfg[k] for k in keys}
    assert _num_experts(cfg) == _num_experts(hf_cfg) == 8
    yarn = hf_cfg["rope_parameters"]
    if family == "deepseek_v2":
        assert yarn["rope_type"] == "yarn"
        ours = cfg["rope_scaling"]
        for key in ("factor", "original_max_position_embeddings", "mscale", "mscale_all_dim"):
            assert ours[key] == pytest.approx(yarn[key]), key
    assert cfg["topk_method"] == hf_cfg.get("topk_method", "noaux_tc")

    # Every parameter moeflow fills from the GGUF equals the one it fills from the HF folder.
    from_gguf = load_model(parse_model_source(str(path)), "cpu", torch.float32).model.state_dict()
    from_hf = load_model(parse_model_source(str(folder)), "cpu", torch.float32).model.state_dict()
    assert from_gguf.keys() == from_hf.keys()
    for name, tensor in from_hf.items():
        torch.testing.assert_close(from_gguf[name], tensor, rtol=0, atol=0, msg=name)


# GGUF architecture -> (tiny family, config overrides). llama.cpp's converter writes OLMoE's
# rms_norm_eps as 1e-5 whatever the config says: the checkpoint uses that value.
_ARCH_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("mixtral", {}),
    "olmoe": ("olmoe", {"rms_norm_eps": 1e-5}),
    "glm4moe": ("glm4_moe", {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(_ARCH_FAMILIES))
def test_gguf_matches_hf(arch: str, tmp_path: Path) -> None:
    family, overrides = _ARCH_FAMILIES[arch]
    folder = make_tiny_checkpoint(family, tmp_path / family, **overrides)
    hf_cfg = _hf_config(folder)
    path = tmp_path / f"{family}.gguf"
    _write_gguf(folder, path, arch, hf_cfg)
    with GGUFReader(path) as reader:
        cfg = gguf_to_hf_config(reader)
        unused: list[str] = []
        names = [name for name, _ in iter_hf_weights(reader, torch.float32, unused)]
    assert cfg["architectures"] == hf_cfg["architectures"]
    assert cfg["num_hidden_layers"] == hf_cfg["num_hidden_layers"] == 3
    assert all(not n.startswith("model.layers.3.") for n in names)
    if arch == "glm4moe":  # the MTP layer is skipped, whole
        assert len(unused) == 18 and all(n.startswith("blk.3.") for n in unused)
        assert cfg["partial_rotary_factor"] == 0.5 and cfg["first_k_dense_replace"] == 1
    else:
        assert unused == []
    assert_matches_hf(path, seed=3, hf_path=folder)


def test_split_gguf_loads_as_one(tmp_path: Path) -> None:
    """A split set of the glm4moe file, opened from its middle shard, fills the same tensors."""
    folder = make_tiny_checkpoint("glm4_moe", tmp_path / "glm4_moe")
    hf_cfg = _hf_config(folder)
    _write_gguf(folder, tmp_path / "one.gguf", "glm4moe", hf_cfg)
    _write_gguf(folder, tmp_path / "split.gguf", "glm4moe", hf_cfg, split_max_tensors=20)
    shards = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert len(shards) == 4
    one = load_model(parse_model_source(str(tmp_path / "one.gguf")), "cpu", torch.float32)
    split = load_model(parse_model_source(str(shards[1])), "cpu", torch.float32)
    assert split.model_config == one.model_config
    ours, ref = split.model.state_dict(), one.model.state_dict()
    assert ours.keys() == ref.keys()
    for name, tensor in ref.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.skipif(not cpu_ext.available(), reason=f"CPU kernels: {cpu_ext.unavailable_reason()}")
@pytest.mark.parametrize("arch", sorted(_ARCH_FAMILIES))
def test_q8_0_gguf_kernels_match_the_reference(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Q8_0 file run with its blocks kept and the CPU kernels' exact path gives the greedy
    tokens of the reference: the same file dequantised to fp32, no compiled kernel (the
    criterion of tests/models/test_quantized_cpu.py)."""
    family, overrides = _ARCH_FAMILIES[arch]
    folder = make_tiny_checkpoint(family, tmp_path / family, **overrides)
    path = tmp_path / f"{family}-q8_0.gguf"
    _write_gguf(folder, path, arch, _hf_config(folder), q8_0=True)
    prompts = [[7, 100, 42, 3, 250], list(range(60, 90))]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    fast = LLM(str(path), device="cpu", max_model_len=128, kv_cache_tokens=1024)
    kept = {m.qtype for m in fast.loaded.model.modules() if getattr(m, "qtype", None) is not None}
    experts = [m for m in fast.loaded.model.modules() if isinstance(m, FusedExperts)]
    assert kept == {int(GGMLType.Q8_0)} and experts
    assert all(m.quantized is not None for m in experts)
    fast_ids = [o.token_ids for o in fast.generate(prompts, params)]
    del fast

    monkeypatch.setattr(cpu_ext, "ops", lambda: None)
    monkeypatch.setattr(cpu_ext, "available", lambda: False)
    ref = LLM(str(path), dtype="float32", device="cpu", max_model_len=128, kv_cache_tokens=1024)
    assert all(getattr(m, "qtype", None) is None for m in ref.loaded.model.modules())
    assert [o.token_ids for o in ref.generate(prompts, params)] == fast_ids
