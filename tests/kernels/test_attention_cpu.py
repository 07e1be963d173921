"""The compiled CPU paged decode attention (kernels/csrc/cpu_ops.cpp) with its K/V store against
the torch reference: GQA, scattered block tables, sliding windows, contexts split into tasks."""

from __future__ import annotations

import pytest
import torch

from moeflow.kernels import cpu_ext
from moeflow.kernels.attention import paged_decode_attention_ref, store_kv

ops = cpu_ext.ops()
pytestmark = pytest.mark.skipif(ops is None, reason=f"CPU kernels: {cpu_ext.unavailable_reason()}")


# Contexts over 128 keys are split into several tasks and merged: window 200 starts mid-block
# and mid-split.
# Query heads per KV head: 4 (pairs of heads share each K/V row), 1 (MHA: one head alone), 3
# (two pairs' worth, the last head alone).
@pytest.mark.parametrize("window", [0, 20, 200])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("h", "hkv"), [(8, 2), (8, 8), (6, 2)])
def test_decode_attention_matches_reference(window: int, head_dim: int, h: int, hkv: int) -> None:
    torch.manual_seed(0)
    b, s, n = 3, 16, 40
    lens = torch.tensor([1, 37, 300 // 16 * 16 + 5])
    tables = torch.full((b, 20), -1, dtype=torch.int64)
    perm = torch.randperm(n)
    used = 0
    for i, ln in enumerate(lens.tolist()):
        nb = -(-ln // s)
        tables[i, :nb] = perm[used : used + nb]
        used += nb
    kc, vc = torch.randn(n, s, hkv, head_dim), torch.randn(n, s, hkv, head_dim)
    q = torch.randn(b, h, head_dim)
    k, v = torch.randn(b, hkv, head_dim), torch.randn(b, hkv, head_dim)
    last = lens - 1
    slots = tables.gather(1, (last // s)[:, None])[:, 0] * s + last % s
    ref_k, ref_v = kc.clone(), vc.clone()
    store_kv(k, v, ref_k, ref_v, slots)
    win = window or None
    ref = paged_decode_attention_ref(q, ref_k, ref_v, tables, lens, 0.125, win)
    out = ops.decode_attention(q, k, v, kc, vc, slots, tables, lens, 0.125, window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)  # the step's K/V were stored
