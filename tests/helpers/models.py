"""One forward of a family class built from a config dict (random weights, a paged cache), for the
tests that check a real model's config.json builds and runs."""

from __future__ import annotations

from typing import Any

import torch

from moeflow.config import ModelConfig
from moeflow.context import ForwardBatch, forward_context
from moeflow.engine.kv_cache import allocate_kv_cache
from moeflow.layers.fused_experts import materialize_experts
from moeflow.models.registry import get_model_class


def run_one_forward(hf: dict[str, Any], num_tokens: int = 7) -> tuple[torch.nn.Module, Any]:
    """Build the family class from a config dict with random weights, give it a paged cache and
    run one prefill of `num_tokens` tokens; returns (model, logits of the last token)."""
    config = ModelConfig.from_hf(hf)
    model = get_model_class(config.architecture)(config).eval()
    materialize_experts(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.05, generator=gen)
    block_size = 16
    allocate_kv_cache(model, 4, block_size, torch.float32, torch.device("cpu"))
    ids = torch.arange(num_tokens, dtype=torch.int64) + 3
    fb = ForwardBatch(
        input_ids=ids,
        positions=torch.arange(num_tokens),
        slot_mapping=torch.arange(num_tokens) + block_size,  # block 1
        block_tables=torch.tensor([[1, -1]]),
        context_lens=torch.tensor([num_tokens]),
        cu_seqlens_q=torch.tensor([0, num_tokens]),
        logits_indices=torch.tensor([num_tokens - 1]),
        query_lens_cpu=[num_tokens],
        context_lens_cpu=[num_tokens],
        is_decode=False,
    )
    with torch.inference_mode(), forward_context(fb):
        hidden = model(fb.input_ids, fb.positions)
        logits = model.compute_logits(hidden, fb.logits_indices)
    return model, logits
