"""The memory plan and the paged KV tensors. Every cache-owning layer implements
`allocate_cache(num_blocks, block_size, dtype, device) -> bytes` and
`cache_bytes_per_token(dtype) -> bytes` and `cache_tensors() -> [N, S, ...] tensors`
(layers/attention.py PagedAttention: a K/V pair; an MLA layer: its latent); this module only
walks the model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from moeflow.errors import MoeflowError


@runtime_checkable
class CacheLayer(Protocol):
    def allocate_cache(
        self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> int: ...

    def cache_bytes_per_token(self, dtype: torch.dtype) -> int: ...

    def cache_tensors(self) -> list[torch.Tensor]: ...


def cache_layers(model: nn.Module) -> Iterator[CacheLayer]:
    for module in model.modules():
        if isinstance(module, CacheLayer):
            yield module


def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes the cache stores per token, all layers together."""
    return sum(layer.cache_bytes_per_token(dtype) for layer in cache_layers(model))


def cache_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every cache tensor of the model, [N, S, ...] with blocks first, in model order (what a
    KV connector copies block by block)."""
    return [t for layer in cache_layers(model) for t in layer.cache_tensors()]


def allocate_kv_cache(
    model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> int:
    """Give every cache-owning layer its cache; returns the bytes allocated."""
    return sum(
        layer.allocate_cache(num_blocks, block_size, dtype, device) for layer in cache_layers(model)
    )


def plan_kv_cache(
    model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> int:
    """Check the cache fits the free memory of `device`, then allocate it. Too little memory is
    a MoeflowError with the numbers (so a server exits before binding its port)."""
    need = num_blocks * block_size * kv_bytes_per_token(model, dtype)
    free = _free_memory(device)
    if free is not None and need > free:
        raise MoeflowError(
            f"the KV cache needs {need / 2**20:.0f} MiB ({num_blocks} blocks of {block_size} "
            f"tokens) but {device} has {free / 2**20:.0f} MiB free; lower --kv-cache-tokens"
        )
    try:
        return allocate_kv_cache(model, num_blocks, block_size, dtype, device)
    except (RuntimeError, MemoryError) as e:  # the allocator's own out-of-memory
        raise MoeflowError(
            f"could not allocate the KV cache ({need / 2**20:.0f} MiB on {device}): {e}"
        ) from None


def _free_memory(device: torch.device) -> int | None:
    """Bytes available on the device: cudaMemGetInfo, or MemAvailable of /proc/meminfo."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
