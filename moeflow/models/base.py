"""The interface every family's top-level class implements (the engine calls only these)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable

import torch
from torch import nn

from moeflow.weights.ggml_quants import QuantizedTensor


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
