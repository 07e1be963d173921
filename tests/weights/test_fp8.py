"""FP8 block-scaled checkpoints: block dequantisation with ragged edges, weight/scale pairing in
any order, and a tiny DeepSeek-V3 saved in fp8 that loads and matches HF on the dequantised
weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from moeflow import LLM
from moeflow.errors import ModelFormatError
from moeflow.weights.fp8 import dequantize_fp8_block, dequantize_fp8_weights
from tests.helpers.checkpoints import make_deepseek_checkpoint
from tests.helpers.parity import hf_model, prefill_logits, prompts_of_lengths

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_fp8_block(
    w: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, scale_inv) with one scale per block: amax of the block maps to FP8_MAX."""
    rows, cols = w.shape
    br, bc = block
    nr, nc = -(-rows // br), -(-cols // bc)
    padded = torch.zeros(nr * br, nc * bc)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(nr, br, nc, bc)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX  # [nr, nc]
    q = (blocks / scale[:, None, :, None]).view(nr * br, nc * bc)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale


def test_dequantize_ragged_blocks() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g)
    q, scale = quantize_fp8_block(w, (128, 128))
    assert scale.shape == (3, 2)
    expected = q.float() * scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    out = dequantize_fp8_block(q, scale, (128, 128), torch.float32)
    assert torch.equal(out, expected)
    torch.testing.assert_close(out, w, rtol=0.07, atol=0.0)  # e4m3 keeps 3 mantissa bits
    with pytest.raises(ModelFormatError, match="weight_scale_inv of shape"):
        dequantize_fp8_block(q, scale[:2], (128, 128), torch.float32)


def test_pairs_fold_in_any_order() -> None:
    w = torch.randn(40, 24)
    q, scale = quantize_fp8_block(w, (16, 16))
    expected = dequantize_fp8_block(q, scale, (16, 16), torch.float32)
    bias = torch.randn(40)
    for stream in (
        [("a.weight", q), ("a.weight_scale_inv", scale), ("a.bias", bias)],
        [("a.weight_scale_inv", scale), ("a.bias", bias), ("a.weight", q)],
    ):
        out = dict(dequantize_fp8_weights(stream, torch.float32, (16, 16)))
        assert set(out) == {"a.weight", "a.bias"}
        assert torch.equal(out["a.weight"], expected) and out["a.bias"] is bias
    with pytest.raises(ModelFormatError, match="lack their"):
        list(dequantize_fp8_weights([("a.weight", q)], torch.float32, (16, 16)))


def test_fp8_deepseek_v3_matches_hf_on_dequantised_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    block = (16, 16)  # small blocks so the tiny matrices have several, some ragged
    src = make_deepseek_checkpoint("v3", tmp_path / "bf")
    tensors = load_file(str(src / "model.safetensors"))
    fp8_tensors: dict[str, torch.Tensor] = {}
    dequantised: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        # As DeepSeek-V3: every linear projection in fp8; embeddings, head, router, norms not.
        if t.dim() == 2 and (".self_attn." in name or ".mlp." in name) and "mlp.gate." not in name:
            q, scale = quantize_fp8_block(t, block)
            fp8_tensors[name] = q
            fp8_tensors[name + "_scale_inv"] = scale
            dequantised[name] = dequantize_fp8_block(q, scale, block, torch.float32)
        else:
            fp8_tensors[name] = dequantised[name] = t
    assert sum(t.dtype == torch.float8_e4m3fn for t in fp8_tensors.values()) > 20

    fp8_dir, ref_dir = tmp_path / "fp8", tmp_path / "ref"
    shutil.copytree(src, fp8_dir)
    shutil.copytree(src, ref_dir)
    save_file(fp8_tensors, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(dequantised, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(block),
    }
    (fp8_dir / "config.json").write_text(json.dumps(config))

    llm = LLM(str(fp8_dir), dtype="float32", device="cpu", max_model_len=128)
    hf = hf_model(ref_dir)
    ids = prompts_of_lengths(3, [40])[0]
    ours = prefill_logits(llm, ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # and the fp8 weights did change the model (the test would not notice a skipped fold)
    with torch.no_grad():
        orig = hf_model(src)(torch.tensor([ids])).logits[0].float()
    assert not torch.allclose(orig, ref, atol=1e-3)
