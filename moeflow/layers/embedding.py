"""Token embedding and the LM head, which computes logits only for the rows the sampler needs.
The table may stay quantised (GGUF blocks, see layers/linear.py); a tied head then multiplies by
the embedding's blocks.

Tensor parallelism splits the vocabulary: rank r holds rows [r * Vr, (r + 1) * Vr) with
Vr = ceil(V / tp) (the last rank's rows past V are zero). The embedding looks up the ids in its
range and the ranks' rows are summed; the head's logits of each range are gathered.

Shape legend: T tokens, S sampled rows, H hidden, V vocab, Vr rows per rank."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeflow.distributed.comm import all_gather, all_reduce
from moeflow.distributed.parallel_state import tp_rank_size
from moeflow.kernels.gemm import linear
from moeflow.kernels.quant_gemm import qembedding, qlinear_logits
from moeflow.layers.linear import QuantizableWeight
from moeflow.weights.ggml_quants import QuantizedTensor


class VocabParallel(QuantizableWeight):
    """A [V, H] table split by rows over the tensor-parallel ranks (whole in one process)."""

    def _init_vocab(self, vocab_size: int, hidden_size: int) -> None:
        self.tp_rank, self.tp_size = tp_rank_size()
        self.vocab_size = vocab_size
        rows = -(-vocab_size // self.tp_size)  # Vr
        self.vocab_start = self.tp_rank * rows
        self.vocab_end = min(self.vocab_start + rows, vocab_size)
        self.out_features, self.in_features = rows, hidden_size

    def shard_tensor(
        self, param_name: str, tensor: torch.Tensor | QuantizedTensor
    ) -> torch.Tensor | QuantizedTensor:
        if self.tp_size == 1:
            return tensor
        if isinstance(tensor, QuantizedTensor):  # rows of blocks; padding rows of zero bytes
            data = tensor.data[self.vocab_start : self.vocab_end]  # [<= Vr, row_bytes]
            pad = self.out_features - data.shape[0]
            data = F.pad(data, (0, 0, 0, pad)) if pad else data  # zero scales: zero rows
            return QuantizedTensor(data, tensor.qtype, (self.out_features, self.in_features))
        rows = tensor[self.vocab_start : self.vocab_end]  # [<= Vr, H]
        pad = self.out_features - rows.shape[0]
        return F.pad(rows, (0, 0, 0, pad)) if pad else rows


class VocabEmbedding(VocabParallel):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self._init_vocab(vocab_size, hidden_size)
        self.weight = nn.Parameter(torch.empty(self.out_features, hidden_size), requires_grad=False)
        self.out_dtype = self.weight.dtype  # the model's compute dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)  # [T]
            local = (input_ids - self.vocab_start).masked_fill(outside, 0)
            rows = self._rows(local).masked_fill(outside.unsqueeze(-1), 0.0)
            return all_reduce(rows)  # [T, H]
        return self._rows(input_ids)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of this rank's table, [T, H] in the compute dtype."""
        if self.qtype is not None:
            return qembedding(ids, self.weight, self.qtype, self.in_features).to(self.out_dtype)
        return F.embedding(ids, self.weight)


class LMHead(VocabParallel):
    """logits = h W^T for the selected rows. With tied embeddings W is the embedding's weight."""

    def __init__(self, vocab_size: int, hidden_size: int, tie_to: VocabEmbedding | None) -> None:
        super().__init__()
        self._init_vocab(vocab_size, hidden_size)
        # A tuple, so the tied embedding is not registered a second time as a submodule.
        self._tied = (tie_to,) if tie_to is not None else ()
        if tie_to is None:
            self.weight = nn.Parameter(
                torch.empty(self.out_features, hidden_size), requires_grad=False
            )

    def forward(self, hidden: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        table: QuantizableWeight = self._tied[0] if self._tied else self
        rows = hidden.index_select(0, indices)
        if table.qtype is not None:
            logits = qlinear_logits(rows, table.weight, table.qtype)  # [S, Vr]
        else:
            logits = linear(rows, table.weight)  # [S, Vr]
        if self.tp_size > 1:
            logits = all_gather(logits, dim=-1)[:, : self.vocab_size]  # [S, V]
        return logits
