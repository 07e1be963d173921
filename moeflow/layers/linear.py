"""Linear layers whose parameters are filled from checkpoint tensors by name. A merged linear
holds several checkpoint projections side by side (q/k/v -> qkv_proj, gate/up -> gate_up_proj)."""

from __future__ import annotations

import torch
from torch import nn

from moeflow.errors import ModelFormatError
from moeflow.kernels.gemm import linear


class Linear(nn.Module):
    """y = x W^T (+ b). Parameters are allocated uninitialised: the loader fills them."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def load(self, param_name: str, tensor: torch.Tensor, shard: str | None = None) -> None:
        param = getattr(self, param_name)
        copy_checked(param, tensor, param_name)


class MergedLinear(Linear):
    """Output rows are the concatenation of named shards, e.g. ("q", "k", "v")."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size

    def load(self, param_name: str, tensor: torch.Tensor, shard: str | None = None) -> None:
        if shard is None:
            super().load(param_name, tensor)
            return
        offset, size = self.shard_offsets[shard]
        param = getattr(self, param_name)
        copy_checked(param.data.narrow(0, offset, size), tensor, f"{param_name}[{shard}]")


def copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ModelFormatError(
            f"checkpoint tensor for {what} has shape {tuple(src.shape)}, "
            f"expected {tuple(dst.shape)}"
        )
    with torch.no_grad():
        dst.copy_(src)
