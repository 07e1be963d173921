"""The memory plan and the paged KV tensors. Every cache-owning layer implements
`allocate_cache(num_blocks, block_size, dtype, device) -> bytes` and
`cache_bytes_per_token(dtype) -> bytes` (layers/attention.py PagedAttention: a K/V pair;
an MLA layer: its latent); this module only walks the model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class CacheLayer(Protocol):
    def allocate_cache(
        self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> int: ...

    def cache_bytes_per_token(self, dtype: torch.dtype) -> int: ...


def cache_layers(model: nn.Module) -> Iterator[CacheLayer]:
    for module in model.modules():
        if isinstance(module, CacheLayer):
            yield module


def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes the cache stores per token, all layers together."""
    return sum(layer.cache_bytes_per_token(dtype) for layer in cache_layers(model))


def allocate_kv_cache(
    model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> int:
    """Give every cache-owning layer its cache; returns the bytes allocated."""
    return sum(
        layer.allocate_cache(num_blocks, block_size, dtype, device) for layer in cache_layers(model)
    )
