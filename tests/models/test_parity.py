"""Every tiny family (dense and MoE, TINY_FAMILIES) against HF transformers on the same
weights: greedy token ids for 32+ new tokens through the paged engine (batched, chunked
prefill), and prefill logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow import LLM, SamplingParams
from tests.helpers.checkpoints import TINY_FAMILIES
from tests.helpers.parity import NEW_TOKENS, assert_matches_hf, hf_greedy, prefill_logits
from tests.helpers.tokenizer_files import TINY_VOCAB


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_greedy_and_logits_match_hf(family: str, tiny_checkpoints: dict[str, Path]) -> None:
    llm = assert_matches_hf(tiny_checkpoints[family], sorted(TINY_FAMILIES).index(family))
    assert llm.loaded.model_config.vocab_size == TINY_VOCAB


@pytest.mark.slow
def test_smollm2_gguf_matches_hf(smollm2_gguf: str) -> None:
    """The real model: moeflow from the Q4_1 GGUF vs transformers' own GGUF loader (fp32)."""
    from transformers import AutoModelForCausalLM

    path = Path(smollm2_gguf)
    hf = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    llm = LLM(smollm2_gguf, dtype="float32", device="cpu", max_model_len=1024)
    prompts = [
        llm.encode_chat([{"role": "user", "content": "What is the capital of France?"}]),
        llm.tokenizer.encode("The three primary colours are", add_special_tokens=True),
        llm.encode_chat([{"role": "user", "content": "Write a haiku about the sea."}]),
    ]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for ids, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, ids, NEW_TOKENS)
    ours = prefill_logits(llm, prompts[0])
    with torch.no_grad():
        ref = hf(torch.tensor([prompts[0]])).logits[0].float()
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3)
