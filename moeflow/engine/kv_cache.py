"""The memory plan and the paged KV tensors: one [N, S, Hkv, D] pair per attention layer, bound
to the layer's PagedAttention module."""

from __future__ import annotations

import torch
from torch import nn

from moeflow.config import ModelConfig


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """K and V, every layer, every KV head."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize


def allocate_kv_cache(
    model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> int:
    """Give every attention layer (a module with `k_cache`, `v_cache`, `num_kv_heads` and
    `head_dim`: layers.attention.PagedAttention) its cache; returns the bytes allocated."""
    total = 0
    for module in model.modules():
        if hasattr(module, "k_cache") and hasattr(module, "num_kv_heads"):
            shape = (num_blocks, block_size, int(module.num_kv_heads), int(module.head_dim))
            module.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            module.v_cache = torch.zeros(shape, dtype=dtype, device=device)
            total += 2 * module.k_cache.numel() * module.k_cache.element_size()
    return total
