"""Token embedding and the LM head, which computes logits only for the rows the sampler needs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeflow.kernels.gemm import linear


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """logits = h W^T for the selected rows. With tied embeddings W is the embedding's weight."""

    def __init__(self, vocab_size: int, hidden_size: int, tie_to: VocabEmbedding | None) -> None:
        super().__init__()
        if tie_to is not None:
            self.weight = tie_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, hidden: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return linear(hidden.index_select(0, indices), self.weight)  # [S, V]
