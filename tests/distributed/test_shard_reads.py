"""What a tensor-parallel rank reads of a GGUF file: its shard's bytes, not the rest. The
file's pages are dropped from the page cache, one rank's shard is loaded in this process (its
ParallelState set, no group: loading runs no collective) with read-ahead off on the reader's
mapping, every byte the shard holds is read once (weights kept as views of the mapping, the
vocabulary tables, are read on first use), and the pages brought in are listed (mincore).
One process's load reads every tensor; a rank of tp=2 reads its rows of the vocabulary tables,
of the column-parallel projections and of every expert (by intermediate rows), or with expert
parallelism its experts only: the other rank's interior pages stay unread. (Row-parallel
weights are split inside each row, rows shorter than a page here: pages cannot tell.) Q4_K_M
files (Q4_K / Q6_K blocks) of qwen3_moe and deepseek_v3 (MLA); their tokens at tp=2:
test_parallel.py test_gguf_tp2_equals_tp1."""

from __future__ import annotations

import math
import mmap
import sys
from pathlib import Path

import gguf
import pytest
import torch

from moeflow.bench.gguf_models import write_gguf
from moeflow.config import EngineArgs
from moeflow.distributed.parallel_state import ParallelState, set_state_for_tests
from moeflow.engine.factory import load
from moeflow.kernels import cpu_ext
from moeflow.weights import gguf as moeflow_gguf
from moeflow.weights.ggml_quants import QuantizedTensor
from tests.distributed.test_parallel import TINY_KQUANT_GGUFS
from tests.helpers.page_cache import (
    evict,
    file_pages_reclaimed,
    interior_pages,
    resident_pages,
)

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore / fadvise: Linux"),
    # without the CPU kernels every quantised tensor loads as floats: dequantised whole first
    pytest.mark.skipif(
        not cpu_ext.available(), reason=f"CPU kernels: {cpu_ext.unavailable_reason()}"
    ),
]

# The tensors a rank splits by rows of its logical dim 0 (vocabulary rows, heads, intermediate
# rows) or, for stacked experts, by dim 1 (each expert's intermediate rows), per the layers'
# design (docs/DISTRIBUTED.md); with expert parallelism the stacked experts go by dim 0.
ROW_SPLIT = {
    "qwen3_moe": ("token_embd", "output", "attn_q", "attn_k", "attn_v"),
    "deepseek_v3": (
        *("token_embd", "output", "attn_q_b"),
        *("ffn_gate", "ffn_up", "ffn_gate_shexp", "ffn_up_shexp"),
    ),
}
GATE_UP_EXPERTS = ("ffn_gate_exps", "ffn_up_exps")
ALL_EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


@pytest.fixture(autouse=True)
def no_read_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader's mappings fault in only the pages touched (no read-around)."""
    original = moeflow_gguf._map

    def mapped(path: str) -> mmap.mmap:
        mm = original(path)
        mm.madvise(mmap.MADV_RANDOM)
        return mm

    monkeypatch.setattr(moeflow_gguf, "_map", mapped)


@pytest.fixture(scope="module", params=sorted(TINY_KQUANT_GGUFS))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reads") / f"{request.param}-q4_k_m.gguf"
    write_gguf(TINY_KQUANT_GGUFS[request.param], "q4_k_m", path)
    return path


Tensors = list[tuple[str, tuple[int, ...], int, int]]


def _tensors(path: Path) -> Tensors:
    """(name, torch-order shape, first byte, end byte) of each tensor, by the gguf package (its
    reader reads the whole file: call it before evicting)."""
    found = []
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        found.append((t.name, shape, int(t.data_offset), int(t.data_offset) + int(t.n_bytes)))
    return found


def _loaded_pages(
    path: Path, tensors: Tensors, rank: int | None, expert_parallel: bool = False
) -> list[bool]:
    """The file's pages resident after loading rank `rank`'s shard of tp=2 (None: the whole
    model) into a cold page cache. A load during which the kernel reclaimed file pages (memory
    pressure from elsewhere: a page read may have left again) is done again, up to 3 times."""
    for _ in range(3):
        before = file_pages_reclaimed()
        pages = _load_cold(path, tensors, rank, expert_parallel)
        if before is None or file_pages_reclaimed() == before:
            return pages
    pytest.skip("the kernel reclaimed file pages during each of 3 loads: reads cannot be seen")


def _load_cold(path: Path, tensors: Tensors, rank: int | None, expert_parallel: bool) -> list[bool]:
    evict(path)
    data_start = min(start for _, _, start, _ in tensors)
    if any(resident_pages(path)[data_start // mmap.PAGESIZE + 1 :]):
        pytest.skip("this filesystem keeps the file's pages cached: reads cannot be seen")
    if rank is not None:
        set_state_for_tests(ParallelState(rank, 2, rank, 2, 0, 1, expert_parallel, None, None))
    try:
        args = EngineArgs(str(path), dtype="float32", device="cpu", max_model_len=128)
        _touch_everything(load(args).model)
        return resident_pages(path)
    finally:
        set_state_for_tests(None)


def _touch_everything(model: torch.nn.Module) -> None:
    """Read every byte the shard holds: weights kept as views of the mapping (the vocabulary
    tables) are read when first used, not at load."""
    held = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        held += [v.data for v in vars(module).values() if isinstance(v, QuantizedTensor)]
    for t in held:
        if t.device.type != "meta" and t.numel():
            t.detach().reshape(-1).view(torch.uint8).sum()


def _pieces(shape: tuple[int, ...], start: int, end: int, dim: int) -> list[list[range]]:
    """Each of 2 ranks' interior pages of a tensor split in halves along `dim` (< the last:
    rows of blocks), its bytes laid out as [prod(shape[:dim]), chunk]."""
    outer = math.prod(shape[:dim])
    chunk = (end - start) // outer
    half = chunk // 2
    return [
        [
            interior_pages(start + p * chunk + r * half, start + p * chunk + (r + 1) * half)
            for p in range(outer)
        ]
        for r in range(2)
    ]


def test_one_process_reads_every_tensor(model: Path) -> None:
    tensors = _tensors(model)
    pages = _loaded_pages(model, tensors, None)
    for name, _, start, end in tensors:
        unread = sum(not pages[p] for p in interior_pages(start, end))
        assert not unread, f"{name}: {unread} of its pages unread"


@pytest.mark.parametrize("expert_parallel", [False, True])
@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_reads_only_its_slices(model: Path, rank: int, expert_parallel: bool) -> None:
    family = model.name.removesuffix("-q4_k_m.gguf")
    tensors = _tensors(model)
    pages = _loaded_pages(model, tensors, rank, expert_parallel)
    checked = set()
    for name, shape, start, end in tensors:
        base = name.removesuffix(".weight")
        base = base.split(".", 2)[2] if base.startswith("blk.") else base  # blk.N.<base>
        if expert_parallel and base in ALL_EXPERTS:
            dim = 0  # whole experts
        elif base in GATE_UP_EXPERTS:
            dim = 1  # each expert's intermediate rows
        elif base in ROW_SPLIT[family]:
            dim = 0
        else:
            continue
        pieces = _pieces(shape, start, end, dim)
        mine, other = pieces[rank], pieces[1 - rank]
        assert any(len(r) for r in mine), f"{name}: too small to tell"
        assert all(pages[p] for r in mine for p in r), f"{name}: the rank's own slice unread"
        assert not any(pages[p] for r in other for p in r), f"{name}: the other rank's slice read"
        checked.add(base)
    want = set(ROW_SPLIT[family]) | set(ALL_EXPERTS if expert_parallel else GATE_UP_EXPERTS)
    assert checked == want
