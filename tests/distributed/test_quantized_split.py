"""Quantised weights split over tensor-parallel ranks in one process: each rank's slice of a
ggml tensor is a view of its bytes (whole rows, or whole blocks of every row) that dequantises
to the same slice of the whole tensor; a split that cuts a block is a clear error; row-parallel
layers holding quantised slices sum to the whole layer."""

from __future__ import annotations

import pytest
import torch

from moeflow.distributed.parallel_state import ParallelState, set_state_for_tests
from moeflow.errors import ModelFormatError
from moeflow.layers.embedding import LMHead, VocabEmbedding
from moeflow.layers.linear import Linear, RowParallelLinear, narrow_quantized
from moeflow.weights.ggml_quants import GGMLType, QuantizedTensor
from tests.helpers.gguf import random_blocks


def _q(qtype: GGMLType, n: int, k: int) -> QuantizedTensor:
    return QuantizedTensor(random_blocks(qtype, n, k), int(qtype), (n, k))


@pytest.mark.parametrize("qtype", [GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K])
def test_a_quantised_slice_dequantises_to_the_slice_of_the_whole(qtype: GGMLType) -> None:
    q = _q(qtype, 8, 512)
    whole = q.dequantize(torch.float32)  # [8, 512]
    for r in range(2):
        rows = narrow_quantized(q, 0, r, 2)
        assert rows.data.data_ptr() == q.data[4 * r].data_ptr()  # a view: nothing copied
        torch.testing.assert_close(rows.dequantize(torch.float32), whole[4 * r : 4 * r + 4])
        cols = narrow_quantized(q, 1, r, 2)
        assert cols.shape == (8, 256)
        torch.testing.assert_close(
            cols.dequantize(torch.float32), whole[:, 256 * r : 256 * (r + 1)]
        )


def test_stacked_experts_split_by_rows_and_by_columns() -> None:
    data = random_blocks(GGMLType.Q8_0, 4 * 16, 64).view(4, 16, -1)  # [E, N, row_bytes]
    q = QuantizedTensor(data, int(GGMLType.Q8_0), (4, 16, 64))
    whole = q.dequantize(torch.float32)  # [4, 16, 64]
    rows, cols = narrow_quantized(q, 1, 1, 2), narrow_quantized(q, 2, 1, 2)
    torch.testing.assert_close(rows.dequantize(torch.float32), whole[:, 8:])
    torch.testing.assert_close(cols.dequantize(torch.float32), whole[:, :, 32:])


def test_a_split_inside_a_block_is_a_clear_error() -> None:
    q = _q(GGMLType.Q4_K, 4, 512)  # 256-weight super-blocks
    with pytest.raises(ModelFormatError, match="128 columns per rank are not whole 256-weight"):
        narrow_quantized(q, 1, 0, 4)


def _rank(rank: int) -> ParallelState:
    return ParallelState(rank, 2, rank, 2, 0, 1, False, None, None)


def test_row_parallel_quantised_slices_sum_to_the_whole_layer() -> None:
    torch.manual_seed(0)
    q = _q(GGMLType.Q8_0, 16, 128)  # [out, in]
    x = torch.randn(3, 128)
    whole = Linear(128, 16)
    whole.load("weight", q)
    assert whole.qtype == int(GGMLType.Q8_0)
    parts = []
    try:
        for r in range(2):
            set_state_for_tests(_rank(r))
            row = RowParallelLinear(128, 16, reduce_results=False)
            row.load("weight", q)
            assert row.qtype == int(GGMLType.Q8_0) and row.weight.shape == (16, 64 // 32 * 34)
            parts.append(row(x[:, 64 * r : 64 * (r + 1)]))
    finally:
        set_state_for_tests(None)
    torch.testing.assert_close(parts[0] + parts[1], whole(x), rtol=1e-4, atol=1e-4)


def test_vocab_parallel_quantised_table_pads_with_zero_rows() -> None:
    q = _q(GGMLType.Q8_0, 7, 64)  # V = 7: 4 rows per rank, the last rank's 4th row padding
    whole = q.dequantize(torch.float32)
    want = [whole[:4], torch.cat([whole[4:], torch.zeros(1, 64)])]
    try:
        for r in range(2):
            set_state_for_tests(_rank(r))
            emb, head = VocabEmbedding(7, 64), LMHead(7, 64, None)
            emb.load("weight", q)
            head.load("weight", q)
            assert emb.qtype == head.qtype == int(GGMLType.Q8_0)
            rows = emb._rows(torch.arange(4))  # the rank's table through the kernel
            torch.testing.assert_close(rows, want[r], rtol=1e-5, atol=1e-5)
            table = QuantizedTensor(head.weight.data, int(GGMLType.Q8_0), (4, 64))
            torch.testing.assert_close(table.dequantize(torch.float32), want[r])
    finally:
        set_state_for_tests(None)
