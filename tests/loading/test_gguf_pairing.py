"""A Llama 3.1-style checkpoint as llama.cpp's converter writes it to GGUF: rope_freqs.weight
(its `llama3` rope scaling) applied, so prefill logits are HF's; the file's chat template used;
`tokenizer=` / `--tokenizer` pairing the GGUF with a Hugging Face tokenizer folder."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers.pre_tokenizers import ByteLevel

from moeflow import LLM, SamplingParams
from moeflow.errors import ModelFormatError, ModelNotFoundError
from moeflow.weights.gguf import GGUFReader
from moeflow.weights.gguf_hf import gguf_to_hf_config
from tests.helpers.checkpoints import make_tiny_checkpoint
from tests.helpers.parity import hf_model, prefill_logits, prompts_of_lengths
from tests.helpers.tokenizer_files import TINY_EOS, TINY_VOCAB
from tests.test_cli import assert_one_error_line, run_cli

gguf = pytest.importorskip("gguf")

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # head_dim 16: low, medium and high frequencies
}
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}<GGUF>"


def _rope_factors(dim: int, base: float, s: dict[str, Any]) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs for a `llama3` rope scaling: per frequency 1 (short
    wavelengths), `factor` (long ones) or the inverse of the smooth blend between."""
    old = s["original_max_position_embeddings"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    out = []
    for freq in 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float32) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(s["factor"])
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute (Q/K rows)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _write_llama_gguf(
    folder: Path, path: Path, rope_freqs: np.ndarray | None | str = "converter"
) -> None:
    """The GGUF convert_hf_to_gguf.py writes of the checkpoint; `rope_freqs` replaces (or with
    None leaves out) the converter's rope_freqs.weight."""
    from safetensors.torch import load_file

    hf = json.loads((folder / "config.json").read_text())
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    base = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    heads, kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]
    head_dim = hf["hidden_size"] // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(hf["num_hidden_layers"])
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_rope_freq_base(base)
    w.add_rope_dimension_count(head_dim)
    tokens = sorted(ByteLevel.alphabet()) + ["<s>", "</s>", "ab"]
    types = [1] * 256 + [3, 3, 1]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), TINY_VOCAB)]
    types += [4] * (TINY_VOCAB - len(types))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(256)
    w.add_eos_token_id(TINY_EOS)
    w.add_chat_template(TEMPLATE)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, t in load_file(str(folder / "model.safetensors")).items():
        a = t.float().numpy()
        if name in names:
            w.add_tensor(names[name], a)
            continue
        _, _, idx, rest = name.split(".", 3)
        module = rest.rsplit(".", 1)[0]
        if module == "self_attn.q_proj":
            a = _permute(a, heads)
        elif module == "self_attn.k_proj":
            a = _permute(a, kv_heads)
        w.add_tensor(f"blk.{idx}.{layer[module]}.weight", a)
    if isinstance(rope_freqs, str):
        rope_freqs = _rope_factors(head_dim, base, LLAMA3_ROPE)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def llama31(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(HF folder, GGUF) of a tiny Llama with a Llama 3.1 rope scaling."""
    tmp = tmp_path_factory.mktemp("llama31")
    folder = make_tiny_checkpoint("llama", tmp / "hf", rope_scaling=LLAMA3_ROPE)
    path = tmp / "llama31.gguf"
    _write_llama_gguf(folder, path)
    return folder, path


def test_rope_freqs_give_hf_logits(llama31: tuple[Path, Path], tmp_path: Path) -> None:
    folder, path = llama31
    hf = hf_model(folder)
    assert hf.config.rope_parameters["rope_type"] == "llama3"  # type: ignore[union-attr]
    with GGUFReader(path) as reader:
        scaling = gguf_to_hf_config(reader)["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and len(scaling["freq_factors"]) == 8
    assert scaling["freq_factors"][0] == 1.0 and scaling["freq_factors"][-1] == 8.0
    ids = prompts_of_lengths(3, [200])[0]  # positions well past the original 64
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    llm = LLM(str(path), dtype="float32", device="cpu", max_model_len=256)
    torch.testing.assert_close(prefill_logits(llm, ids), ref, rtol=1e-4, atol=1e-4)
    # The check can fail: without rope_freqs.weight the logits are another model's.
    plain = tmp_path / "no_rope_freqs.gguf"
    _write_llama_gguf(folder, plain, rope_freqs=None)
    other = prefill_logits(LLM(str(plain), dtype="float32", device="cpu", max_model_len=256), ids)
    assert (other - ref).abs().max() > 1e-2


def test_bad_rope_freqs(llama31: tuple[Path, Path], tmp_path: Path) -> None:
    folder, _ = llama31
    for bad in (
        np.full(3, 2.0, np.float32),
        np.zeros(8, np.float32),
        np.full(8, np.nan, np.float32),
    ):
        path = tmp_path / "bad.gguf"
        _write_llama_gguf(folder, path, rope_freqs=bad)
        with GGUFReader(path) as r, pytest.raises(ModelFormatError, match="rope_freqs"):
            gguf_to_hf_config(r)
    _write_llama_gguf(folder, tmp_path / "ones.gguf", rope_freqs=np.ones(8, np.float32))
    with GGUFReader(tmp_path / "ones.gguf") as r:
        assert gguf_to_hf_config(r)["rope_scaling"] is None  # ones change nothing


def test_gguf_chat_template_is_used(llama31: tuple[Path, Path]) -> None:
    _, path = llama31
    llm = LLM(str(path), dtype="float32", device="cpu", max_model_len=256)
    assert llm.tokenizer.chat_template == TEMPLATE
    msgs = [{"role": "user", "content": "hi"}]
    assert llm.tokenizer.apply_chat_template(msgs) == "[user]hi<GGUF>"


def test_tokenizer_folder_pairs_with_gguf(llama31: tuple[Path, Path], tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder, path = llama31
    llm = LLM(str(path), tokenizer=str(folder), dtype="float32", device="cpu", max_model_len=256)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    msgs = [{"role": "user", "content": "héllo"}]
    text = llm.tokenizer.apply_chat_template(msgs)
    assert text == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert llm.tokenizer.chat_template != TEMPLATE
    assert llm.tokenizer.encode(text) == hf_tok.encode(text)
    assert llm.encode_chat(msgs) == hf_tok.encode(text, add_special_tokens=False)
    [out] = llm.chat(msgs, SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out.token_ids) == 3  # runs end to end with the paired tokenizer
    # Its tokenizer.json alone names the folder too.
    alone = LLM(str(path), tokenizer=str(folder / "tokenizer.json"), device="cpu")
    assert alone.tokenizer.chat_template == llm.tokenizer.chat_template

    with pytest.raises(ModelNotFoundError, match="no such folder"):
        LLM(str(path), tokenizer=str(tmp_path / "nope"), device="cpu")
    big = tmp_path / "big"
    big.mkdir()
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([f"<x{i}>" for i in range(TINY_VOCAB)])
    tok.save(str(big / "tokenizer.json"))
    with pytest.raises(ModelFormatError, match="not this model's tokenizer"):
        LLM(str(path), tokenizer=str(big), device="cpu")


def test_cli_tokenizer_flag(llama31: tuple[Path, Path], tmp_path: Path) -> None:
    folder, path = llama31
    proc = run_cli(
        "generate", "--model", str(path), "--tokenizer", str(folder), "--prompt", "hi",
        "--max-tokens", "2", "--device", "cpu",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert_one_error_line(
        run_cli("chat", "hi", "--model", str(path), "--tokenizer", str(tmp_path / "nope")),
        "no such folder",
    )
