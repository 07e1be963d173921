"""ForwardBatch: the flattened batch one model forward reads (set by engine/model_runner.py, read
by layers/attention.py), and `forward_context`, which makes it current. Leaf module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class ForwardBatch:
    """B sequences, T new tokens in all. Sequence i owns new tokens
    cu_seqlens_q[i]:cu_seqlens_q[i+1]; its KV after this step spans context_lens[i] tokens."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64, cache slot (block_idx * block_size + offset) per token
    block_tables: torch.Tensor  # [B, max_blocks] int64, -1 padded
    context_lens: torch.Tensor  # [B] int64
    cu_seqlens_q: torch.Tensor  # [B + 1] int64
    logits_indices: torch.Tensor  # [S] int64, rows of the hidden states to turn into logits
    # Host copies of the lengths, so reference kernels can slice without a device sync.
    query_lens_cpu: list[int]
    context_lens_cpu: list[int]
    is_decode: bool  # every sequence has exactly one new token

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)


_current: ForwardBatch | None = None


@contextmanager
def forward_context(batch: ForwardBatch) -> Iterator[ForwardBatch]:
    """Make `batch` the current one for the duration of a forward; nesting is a bug."""
    global _current
    assert _current is None, "forward_context does not nest"
    _current = batch
    try:
        yield batch
    finally:
        _current = None


def get_forward_batch() -> ForwardBatch:
    assert _current is not None, "no forward_context is active"
    return _current
