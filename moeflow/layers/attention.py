"""Attention over the paged KV cache: writes this step's K/V into the cache and attends, both
through kernels.attention.store_kv_and_attend. The engine binds the cache tensors
(engine/kv_cache.py)."""

from __future__ import annotations

import torch
from torch import nn

from moeflow.context import get_forward_batch
from moeflow.kernels.attention import store_kv_and_attend


class PagedAttention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        # [N, S, Hkv, D] each; empty until the engine binds the cache.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def allocate_cache(
        self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> int:
        """Allocate this layer's K and V, [N, S, Hkv, D] each; returns the bytes."""
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    def cache_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_kv_heads * self.head_dim * torch.empty(0, dtype=dtype).element_size()

    def cache_tensors(self) -> list[torch.Tensor]:
        return [self.k_cache, self.v_cache]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, Hkv, D] -> [T, H, D]."""
        batch = get_forward_batch()
        return store_kv_and_attend(
            q,
            k,
            v,
            self.k_cache,
            self.v_cache,
            batch.slot_mapping,
            batch.block_tables,
            batch.query_lens_cpu,
            batch.context_lens_cpu,
            batch.context_lens,
            batch.cu_seqlens_q,
            self.scale,
            self.sliding_window,
        )
