"""Checks the engine tests share: an engine left idle, and two runs' outputs compared."""

from __future__ import annotations

import torch

from moeflow import LLM


def assert_idle(llm: LLM) -> None:
    """No request left, and every KV block back in the free queue (cached or not)."""
    engine = llm.engine
    assert not engine.has_unfinished()
    assert not engine.requests
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(c == 0 for c in bm.ref_counts)


def assert_same_outputs(got: list, want: list, atol: float) -> None:
    """Same greedy tokens per sequence, log-probs within `atol`."""
    for (ids, lps), (ref_ids, ref_lps) in zip(got, want, strict=True):
        assert ids == ref_ids
        assert torch.allclose(torch.tensor(lps), torch.tensor(ref_lps), atol=atol)
