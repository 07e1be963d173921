"""Token embedding and the LM head, which computes logits only for the rows the sampler needs.
The table may stay quantised (GGUF blocks, see layers/linear.py); a tied head then multiplies by
the embedding's blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeflow.kernels.gemm import linear
from moeflow.kernels.quant_gemm import qembedding, qlinear
from moeflow.layers.linear import QuantizableWeight


class VocabEmbedding(QuantizableWeight):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.out_features, self.in_features = vocab_size, hidden_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.out_dtype = self.weight.dtype  # the model's compute dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.qtype is not None:
            rows = qembedding(input_ids, self.weight, self.qtype, self.in_features)
            return rows.to(self.out_dtype)
        return F.embedding(input_ids, self.weight)


class LMHead(QuantizableWeight):
    """logits = h W^T for the selected rows. With tied embeddings W is the embedding's weight."""

    def __init__(self, vocab_size: int, hidden_size: int, tie_to: VocabEmbedding | None) -> None:
        super().__init__()
        self.out_features, self.in_features = vocab_size, hidden_size
        # A tuple, so the tied embedding is not registered a second time as a submodule.
        self._tied = (tie_to,) if tie_to is not None else ()
        if tie_to is None:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, hidden: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        table: QuantizableWeight = self._tied[0] if self._tied else self
        rows = hidden.index_select(0, indices)
        if table.qtype is not None:
            return qlinear(rows, table.weight, table.qtype)  # [S, V]
        return linear(rows, table.weight)  # [S, V]
