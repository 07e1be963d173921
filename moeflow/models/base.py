"""The interface every family's top-level class implements (the engine calls only these)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable
from typing import Protocol

import torch
from torch import nn

from moeflow.weights.gguf import QuantizedTensor


class MoEStats(Protocol):
    """Routing statistics of one MoE layer (layers/moe.py MoE). While enabled, every forward
    counts its tokens per expert and which experts it touched, on the device (no host sync);
    reading them syncs."""

    def enable_stats(self, enabled: bool) -> None: ...

    def reset_stats(self) -> None: ...

    def tokens_per_expert(self) -> list[int]:
        """Tokens routed to each expert since the last reset."""
        ...

    def experts_touched_per_forward(self) -> float:
        """Mean number of distinct experts a forward ran since the last reset (0 if none ran)."""
        ...

    def expert_bytes(self) -> int:
        """Bytes of one routed expert's weights (what touching it reads)."""
        ...


class CausalLM(nn.Module):
    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, E]."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Logits [S, V] of the rows `indices` of `hidden`."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedTensor]]) -> None:
        """Fill every parameter from (HF checkpoint name, tensor) pairs."""

    def moe_layers(self) -> list[MoEStats]:
        """The MoE layers, in model order; none in a dense model."""
        return []
