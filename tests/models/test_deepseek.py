"""DeepSeek-V2 / V3 (and Kimi K2's config) against HF transformers: greedy ids through the paged
engine (batched, chunked prefill) and prefill logits; the MLA latent cache's size; the absorbed
latent decode against the decompressed path."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.context import forward_context
from moeflow.engine.flatten import flatten_batch
from moeflow.engine.kv_cache import kv_bytes_per_token
from moeflow.engine.request import Request
from moeflow.engine.scheduler import ScheduledBatch
from moeflow.layers.mla import MLAAttention
from moeflow.layers.moe import MoE
from moeflow.models.deepseek_v2 import DeepseekV3ForCausalLM
from tests.helpers.checkpoints import (
    DEEPSEEK_VARIANTS,
    TINY_BASE,
    TINY_DEEPSEEK_SHAPE,
    make_deepseek_checkpoint,
)
from tests.helpers.models import run_one_forward
from tests.helpers.parity import assert_matches_hf, prompts_of_lengths

KV_LORA_RANK = TINY_DEEPSEEK_SHAPE["kv_lora_rank"]
ROPE_DIM = TINY_DEEPSEEK_SHAPE["qk_rope_head_dim"]
NUM_LAYERS = TINY_BASE["num_hidden_layers"]


@pytest.fixture(scope="module")
def deepseek_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """variant -> its checkpoint folder, written once per module on first use."""
    root = tmp_path_factory.mktemp("deepseek")
    made: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in made:
            made[variant] = make_deepseek_checkpoint(variant, root / variant)
        return made[variant]

    return get


# v2 and v3 (interleaved rope) run in tests/models/test_parity.py with the other families.
@pytest.mark.parametrize("variant", ["v3_yarn"])
def test_greedy_and_logits_match_hf(
    variant: str, deepseek_checkpoint: Callable[[str], Path]
) -> None:
    assert_matches_hf(deepseek_checkpoint(variant), sorted(DEEPSEEK_VARIANTS).index(variant))


def test_latent_cache_size_and_absorbed_decode(
    deepseek_checkpoint: Callable[[str], Path],
) -> None:
    llm = LLM(str(deepseek_checkpoint("v2")), dtype="float32", device="cpu", max_model_len=256)
    model = llm.loaded.model
    per_token = (KV_LORA_RANK + ROPE_DIM) * NUM_LAYERS * 4
    assert kv_bytes_per_token(model, torch.float32) == per_token
    layers = [m for m in model.modules() if isinstance(m, MLAAttention)]
    assert len(layers) == NUM_LAYERS
    # The block manager's blocks plus the sink block of padded CUDA-graph rows.
    num_blocks, block_size = llm.config.num_kv_blocks + 1, llm.config.block_size
    for layer in layers:
        assert tuple(layer.latent_cache.shape) == (
            num_blocks,
            block_size,
            KV_LORA_RANK + ROPE_DIM,
        )
    assert llm.kv_cache_bytes == num_blocks * block_size * per_token

    # One decode step of three sequences: latent (absorbed) path vs decompressed path.
    engine = llm.engine
    prompts = prompts_of_lengths(7, [9, 20, 35])
    reqs = [Request(f"r{i}", p, SamplingParams(), max_tokens=2) for i, p in enumerate(prompts)]
    try:
        for r in reqs:
            assert engine.block_manager.allocate_slots(r, r.num_tokens)
        _run(llm, ScheduledBatch(reqs, [r.num_tokens for r in reqs]))
        for r, nxt in zip(reqs, (11, 22, 33), strict=True):
            r.num_computed_tokens = r.num_tokens
            r.output_ids.append(nxt)
            assert engine.block_manager.allocate_slots(r, 1)
        decode = ScheduledBatch(reqs, [1, 1, 1])
        absorbed = _run(llm, decode)
        for layer in layers:
            layer.force_decompressed = True
        decompressed = _run(llm, decode)
    finally:
        for layer in layers:
            layer.force_decompressed = False
        for r in reqs:
            engine.block_manager.free(r)
    torch.testing.assert_close(absorbed, decompressed, rtol=1e-5, atol=1e-5)

    # And whole generations agree token for token.
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    latent_ids = [o.token_ids for o in llm.generate(prompts, params)]
    for layer in layers:
        layer.force_decompressed = True
    assert [o.token_ids for o in llm.generate(prompts, params)] == latent_ids


def _run(llm: LLM, batch: ScheduledBatch) -> torch.Tensor:
    """Logits of the last token of each sequence of `batch`."""
    runner = llm.engine.runner
    fb, _ = flatten_batch(batch, runner.block_size, runner.device)
    assert fb.is_decode == all(n == 1 for n in batch.num_new_tokens)
    with torch.inference_mode(), forward_context(fb):
        hidden = llm.loaded.model(fb.input_ids, fb.positions)
        last = fb.cu_seqlens_q[1:] - 1
        return llm.loaded.model.compute_logits(hidden, last).float()


# Kimi-K2-Instruct's config.json (same keys and values), with the sizes cut down below.
KIMI_K2_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 163584,
    "eos_token_id": 163585,
    "ep_size": 1,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 131072,
    "model_type": "kimi_k2",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 384,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 64,
    "num_nextn_predict_layers": 0,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 50000.0,
    "routed_scaling_factor": 2.827,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.48.3",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 163840,
}

_TINY_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 16,
    "vocab_size": 512,
}


def test_kimi_k2_config_builds_and_runs() -> None:
    hf = copy.deepcopy(KIMI_K2_CONFIG)
    hf.update(_TINY_SIZES)
    model, logits = run_one_forward(json.loads(json.dumps(hf)))
    assert isinstance(model, DeepseekV3ForCausalLM)
    assert logits.shape == (1, 512) and torch.isfinite(logits).all()
    layers = model.model.layers  # type: ignore[union-attr]
    assert not isinstance(layers[0].mlp, MoE)  # first_k_dense_replace 1
    moe = layers[1].mlp
    assert isinstance(moe, MoE)
    assert (moe.num_experts, moe.top_k) == (16, 8)
    assert moe.scoring_func == "sigmoid" and moe.gate.e_score_correction_bias is not None
    assert moe.routed_scaling_factor == pytest.approx(2.827)
    attn = layers[0].self_attn
    assert isinstance(attn, MLAAttention) and attn.q_a_proj is not None
    # mscale == mscale_all_dim: cos/sin unscaled; softmax scale times mscale(32, 1)^2
    mscale = 0.1 * torch.log(torch.tensor(32.0)).item() + 1.0
    assert attn.scale == pytest.approx((16 + 8) ** -0.5 * mscale**2)
    assert kv_bytes_per_token(model, torch.bfloat16) == (32 + 8) * 3 * 2
