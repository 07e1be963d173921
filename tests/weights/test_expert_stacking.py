"""Routed experts load into the stacked layers/moe.py parameters from every checkpoint layout:
per-expert names (`experts.3.gate_proj`, Mixtral's `block_sparse_moe.experts.3.w1`, what
transformers 5 `save_pretrained` writes) and transformers 5's in-memory fused 3-D tensors
(`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]); a missing expert is an error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow.errors import ModelFormatError
from moeflow.loading.loader import load_model
from moeflow.loading.source import HFFolder
from tests.helpers.checkpoints import make_tiny_checkpoint


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_fused_and_per_expert_names_fill_the_same_weights(family: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder = make_tiny_checkpoint(family, tmp_path / family)
    loaded = load_model(HFFolder(str(folder)), "cpu", torch.float32)  # per-expert names on disk
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    fused = dict(hf.state_dict())
    assert any(name.endswith(".experts.gate_up_proj") for name in fused)

    model = loaded.model
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.load_weights(iter(fused.items()))
    reference = load_model(HFFolder(str(folder)), "cpu", torch.float32).model.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=name)


def test_missing_expert_is_an_error(tmp_path: Path) -> None:
    folder = make_tiny_checkpoint("qwen3_moe", tmp_path / "qwen3_moe")
    model = load_model(HFFolder(str(folder)), "cpu", torch.float32).model
    from safetensors.torch import load_file

    weights = load_file(str(folder / "model.safetensors"))
    del weights["model.layers.1.mlp.experts.5.up_proj.weight"]
    with pytest.raises(ModelFormatError, match=r"experts\.w13\[up:5\]"):
        model.load_weights(iter(weights.items()))
