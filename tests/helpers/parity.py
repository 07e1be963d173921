"""Our engine against HF transformers on the same checkpoint: greedy ids and prefill logits (the
parity tests of every family, DeepSeek and fp8)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from moeflow import LLM, SamplingParams
from moeflow.context import forward_context
from moeflow.engine.flatten import flatten_batch
from moeflow.engine.request import Request
from moeflow.engine.scheduler import ScheduledBatch

NEW_TOKENS = 40


def hf_model(path: Path) -> torch.nn.Module:
    """transformers' model of the checkpoint at `path`, fp32, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    """Plain greedy for exactly n tokens: no EOS stop and no EOS suppression either."""
    model.generation_config.eos_token_id = None  # type: ignore[union-attr]
    with torch.no_grad():
        input_ids = torch.tensor([ids])
        out = model.generate(  # type: ignore[operator]
            input_ids,
            attention_mask=torch.ones_like(input_ids),  # else HF masks out ids equal to pad
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def prompts_of_lengths(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(n)] for n in lengths]


def prefill_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Logits at every prompt position, through the paged engine's runner (one chunk)."""
    engine = llm.engine
    req = Request("logits", list(ids), SamplingParams(), max_tokens=1)
    assert engine.block_manager.allocate_slots(req, len(ids))
    try:
        runner = engine.runner
        fb, _ = flatten_batch(ScheduledBatch([req], [len(ids)]), runner.block_size, runner.device)
        with torch.inference_mode(), forward_context(fb):
            hidden = llm.loaded.model(fb.input_ids, fb.positions)
            return llm.loaded.model.compute_logits(hidden, torch.arange(len(ids))).float()
    finally:
        engine.block_manager.free(req)


def assert_matches_hf(path: Path, seed: int, hf_path: Path | None = None) -> LLM:
    """Greedy ids of 4 prompts (batched; a small token budget forces chunked prefill) and the
    prefill logits of the longest equal transformers' on the checkpoint at `path` (or at
    `hf_path`, the HF folder a GGUF at `path` was written from); every KV block is free again
    afterwards. Returns the LLM for further checks."""
    hf = hf_model(hf_path or path)
    llm = LLM(
        str(path), dtype="float32", device="cpu", max_model_len=256, max_num_batched_tokens=24
    )
    prompts = prompts_of_lengths(seed, [5, 17, 33, 60])
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for ids, out in zip(prompts, outs, strict=True):
        assert len(out.token_ids) == NEW_TOKENS
        assert out.token_ids == hf_greedy(hf, ids, NEW_TOKENS)

    ids = prompts[-1]
    ours = prefill_logits(llm, ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert llm.engine.block_manager.num_free_blocks == llm.config.num_kv_blocks
    return llm
