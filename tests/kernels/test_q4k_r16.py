"""Q4_K repacked 16 rows at a time (Q4_K_R16, kernels/csrc/q4k_r16.h): the kernels' repack is
the plain-torch one and undoes exactly; the repacked blocks dequantise to the file layout's
values; every product over them (int8 and fp32 activations, any row count, the grouped MoE
kernel with experts that get no token, one expert taking every token) equals the same product
over the file's Q4_K rows bit for bit, on every instruction set this machine has (the AVX2
build unpacks a group and runs the Q4_K kernels); and the loader's choice (repacked_for_cpu)
follows the switches and releases the mapped pages it copied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from moeflow import env
from moeflow.kernels import cpu_ext
from moeflow.kernels.quant_gemm import dequantize_ref, repacked_for_cpu, repacks_q4k
from moeflow.weights import gguf
from moeflow.weights.ggml_quants import Q4_K_R16, GGMLType, repack_q4k_r16, unpack_q4k_r16
from tests.helpers.gguf import random_blocks

pytestmark = pytest.mark.skipif(
    not cpu_ext.available(), reason=f"CPU kernels: {cpu_ext.unavailable_reason()}"
)
Q4_K = int(GGMLType.Q4_K)


@pytest.fixture
def ops(isa_ops: Any) -> Any:
    """The kernels built for each instruction set the machine has (conftest.py isa_ops)."""
    return isa_ops


def _experts(e: int, n: int, k: int, seed: int) -> torch.Tensor:
    return torch.stack([random_blocks(GGMLType.Q4_K, n, k, seed=seed + x) for x in range(e)])


def test_repack_is_the_torch_layout_and_undoes(ops: Any) -> None:
    w = _experts(3, 48, 512, 0)  # [E, N, row_bytes]
    packed = ops.repack_q4k_r16(w)
    assert torch.equal(packed, repack_q4k_r16(w))
    assert not torch.equal(packed, w)
    assert torch.equal(ops.unpack_q4k_r16(packed), w)
    assert torch.equal(unpack_q4k_r16(packed), w)
    # a super-block of 16 rows: word f of row l at 64 f + 4 l
    first = packed[0].reshape(-1)[: 16 * 144].view(36, 16, 4)
    for row in (0, 5, 15):
        assert torch.equal(first[:, row].reshape(-1), w[0, row, :144])
    assert torch.equal(dequantize_ref(packed[1], Q4_K_R16, 512), dequantize_ref(w[1], Q4_K, 512))
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ops.repack_q4k_r16(w[:, :40])
    with pytest.raises(ValueError, match="multiple of 16"):
        repack_q4k_r16(w[:, :40])


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 17, 40])
def test_products_are_the_file_layouts_bit_for_bit(ops: Any, m: int) -> None:
    n, k = 96, 1024
    w = random_blocks(GGMLType.Q4_K, n, k, seed=m)
    packed = ops.repack_q4k_r16(w)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    assert torch.equal(ops.qgemm_i8(x, packed, Q4_K_R16), ops.qgemm_i8(x, w, Q4_K))
    assert torch.equal(ops.qgemm(x, packed, Q4_K_R16), ops.qgemm(x, w, Q4_K))
    if m == 1:  # the exact path's dequantised weight (prefill of more than 16 rows)
        assert torch.equal(ops.dequantize(packed, Q4_K_R16, k), ops.dequantize(w, Q4_K, k))


def _routing(case: str, t: int, e: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(t + k)
    if case == "random":
        return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    if case == "one-expert-all-tokens":
        rest = torch.stack([torch.randperm(e - 1, generator=g)[: k - 1] for _ in range(t)])
        return torch.cat([torch.full((t, 1), 3), rest + (rest >= 3).long()], 1)
    return torch.stack([torch.randperm(k, generator=g) for _ in range(t)])  # few experts


@pytest.mark.parametrize("case", ["random", "one-expert-all-tokens", "few-experts"])
@pytest.mark.parametrize("t", [1, 4, 37])
@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_moe_experts_are_the_file_layouts_bit_for_bit(
    ops: Any, case: str, t: int, int8: bool
) -> None:
    """Gate and up repacked, down repacked (Q4_K) or left as it is (Q6_K, Q4_K_M's other
    expert type): the grouped kernel's output equals the file layout's bit for bit."""
    e, h, i, k = 8, 512, 256, 3
    gate, up = _experts(e, i, h, 0), _experts(e, i, h, 100)
    downs = {Q4_K: _experts(e, h, i, 200)}
    downs[int(GGMLType.Q6_K)] = torch.stack(
        [random_blocks(GGMLType.Q6_K, h, i, seed=300 + x) for x in range(e)]
    )
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(7))
    ids = _routing(case, t, e, k)
    weights = torch.rand(t, k, generator=torch.Generator().manual_seed(8))
    pg, pu = ops.repack_q4k_r16(gate), ops.repack_q4k_r16(up)
    for down_type, down in downs.items():
        ref = ops.moe_experts(x, gate, Q4_K, up, Q4_K, down, down_type, ids, weights, int8)
        pd, pd_type = (
            (ops.repack_q4k_r16(down), Q4_K_R16) if down_type == Q4_K else (down, down_type)
        )
        out = ops.moe_experts(x, pg, Q4_K_R16, pu, Q4_K_R16, pd, pd_type, ids, weights, int8)
        assert torch.equal(out, ref)


def test_moe_experts_reject_repacked_rows_not_in_sixteens(ops: Any) -> None:
    gate = _experts(2, 256, 256, 0)
    down = _experts(2, 256, 256, 9)
    x, w, ids = torch.randn(1, 256), torch.ones(1, 1), torch.tensor([[0]])
    with pytest.raises(RuntimeError, match="multiple of 16 rows"):
        ops.moe_experts(
            x, gate[:, :40], Q4_K_R16, gate[:, :40], Q4_K_R16, down[:, :, :144], Q4_K, ids, w, True
        )


def test_the_loaders_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Repacked only where the AVX-512 build runs, int8 activations and MOEFLOW_CPU_REPACK on,
    for Q4_K rows in sixteens; meta tensors (the memory plan) repack to a meta copy."""
    w = _experts(2, 32, 256, 0)
    monkeypatch.setattr(env, "MOEFLOW_CPU_INT8", True)
    monkeypatch.setattr(env, "MOEFLOW_CPU_REPACK", True)
    expect = cpu_ext.isa() == "avx512"
    assert repacks_q4k() == expect
    data, qtype = repacked_for_cpu(w, Q4_K)
    assert (qtype == Q4_K_R16) == expect
    assert torch.equal(data, repack_q4k_r16(w) if expect else w)
    meta, meta_type = repacked_for_cpu(torch.empty(w.shape, dtype=torch.uint8, device="meta"), Q4_K)
    assert meta.is_meta and meta_type == qtype
    for off in ("MOEFLOW_CPU_INT8", "MOEFLOW_CPU_REPACK"):
        with monkeypatch.context() as patch:
            patch.setattr(env, off, False)
            assert not repacks_q4k()
            assert repacked_for_cpu(w, Q4_K) == (w, Q4_K)
    assert repacked_for_cpu(w[:, :24], Q4_K)[1] == Q4_K  # rows not in sixteens
    q6 = random_blocks(GGMLType.Q6_K, 32, 256)[None]
    assert repacked_for_cpu(q6, int(GGMLType.Q6_K))[1] == int(GGMLType.Q6_K)


def _mapping_rss(address: int) -> int:
    """This process's resident bytes of the mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps", encoding="utf-8") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


def test_release_mapped_drops_only_mapped_pages(tmp_path: Path) -> None:
    """A view of a GGUF file's mapping: its whole pages leave this process's resident memory
    and read back the same bytes (from the page cache); other memory is never touched."""
    path = tmp_path / "blocks.gguf"
    page = 4096
    size = 64 * page
    path.write_bytes(bytes(range(256)) * (size // 256))
    mm = gguf._map(str(path))  # noqa: SLF001
    view = torch.frombuffer(mm, dtype=torch.uint8, count=size - 2 * page, offset=page + 100)
    before = view.clone()
    assert int(view.sum()) > 0  # read: every page of the view resident
    resident = _mapping_rss(view.data_ptr())
    assert resident >= size - 2 * page
    released = gguf.release_mapped(view)
    assert released == size - 3 * page  # the whole pages inside the view
    assert _mapping_rss(view.data_ptr()) <= resident - released
    assert torch.equal(view, before)  # read back from the page cache
    own = before.clone()
    assert gguf.release_mapped(own) == 0
    assert torch.equal(own, before)
