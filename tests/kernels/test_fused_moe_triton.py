"""The Triton fused MoE against fused_moe_ref: the expert alignment, the grouped-GEMM and the
small-batch paths in fp32 and fp16 at small shapes (interpreted on CPU) with skewed routing,
batched rows equal to solo rows, the dispatch point, the tuning table loader; real model shapes
in bf16 and CUDA-graph capture on the GPU."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moeflow.errors import MoeflowError
from moeflow.kernels.fused_moe import fused_moe, fused_moe_ref, select_experts
from tests.helpers.devices import TRITON_DEVICE, needs_triton

pytestmark = needs_triton

# (rtol, atol): one rounding of fp32-accumulated results against the reference's roundings.
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)}
# Small shapes: I not a power of two (partial N and K blocks), E=8 with K=2.
E, K, H, I = 8, 2, 64, 48  # noqa: E741 (the shape legend's I)
# The interpreted small-batch path at T=33 takes 64-wide output slices (fewer programs).
SMALL_CFG = {
    "BLOCK_SIZE_M": 16,
    "BLOCK_SIZE_N": 64,
    "BLOCK_SIZE_K": 32,
    "GROUP_SIZE_M": 1,
    "num_warps": 4,
    "num_stages": 1,
    "SMALL_BATCH_MAX_PAIRS": 1 << 20,
}


def _paths() -> dict[str, Callable[..., torch.Tensor]]:
    from moeflow.kernels.triton import fused_moe as moe_triton

    return {
        "grouped": moe_triton.fused_moe_triton,
        "small": moe_triton.fused_moe_small_batch_triton,
    }


def _config(path: str) -> dict[str, int]:
    from moeflow.kernels.triton.fused_moe import default_moe_config

    return SMALL_CFG if path == "small" else default_moe_config(E, 1, K, interpreted=True)


def _skewed_routing(
    num_tokens: int, num_experts: int, top_k: int, seed: int, device: str = TRITON_DEVICE
) -> tuple[torch.Tensor, torch.Tensor]:
    """select_experts on random logits where expert 0 takes most tokens and experts 4 and 6
    take none -> (weights [T, K] float32, ids [T, K] int64)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    logits[:, 0] += 3.0
    logits[:, [4, 6]] = -1e9
    weights, ids = select_experts(logits, top_k)
    return weights.to(device), ids.to(device)


def _inputs(
    num_tokens: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], skewed routing."""
    g = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(num_tokens, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    weights, ids = _skewed_routing(num_tokens, E, K, seed)
    on = {"dtype": dtype, "device": TRITON_DEVICE}
    return x.to(**on), w13.to(**on), w2.to(**on), weights, ids


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    rtol, atol = TOL[ref.dtype]
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)


# ---- alignment ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_tokens", "top_k", "num_experts", "block_m"),
    [(1, 2, 8, 16), (13, 3, 8, 4), (33, 2, 8, 16), (40, 4, 64, 8), (5, 1, 3, 1)],
)
def test_align_groups_pairs_by_expert_in_padded_blocks(
    num_tokens: int, top_k: int, num_experts: int, block_m: int
) -> None:
    from moeflow.kernels.triton.fused_moe import moe_align_block_size

    g = torch.Generator().manual_seed(num_tokens)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    logits[:, 0] += 3.0  # expert 0 takes most tokens
    logits[:, num_experts - 1] = -1e9  # the last expert none
    topk_ids = logits.topk(top_k, dim=-1).indices.to(TRITON_DEVICE)  # [T, K]
    sorted_ids, block_experts, num_post = moe_align_block_size(topk_ids, num_experts, block_m)
    num_pairs = num_tokens * top_k
    # Sizes come from the shapes only.
    max_padded = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    num_blocks = -(-max_padded // block_m)
    assert sorted_ids.shape == (num_blocks * block_m,) and block_experts.shape == (num_blocks,)
    assert sorted_ids.dtype == block_experts.dtype == num_post.dtype == torch.int32
    flat = topk_ids.reshape(-1).cpu()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    total = int(num_post.item())
    assert total == int(padded.sum())
    sorted_ids, block_experts = sorted_ids.cpu(), block_experts.cpu()
    # Every pair once; the rest (inside the used range and beyond) is the sentinel.
    used = sorted_ids[:total]
    real = used[used != num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))
    assert (sorted_ids[total:] == num_pairs).all()
    # Each expert's run: its pairs in order, then sentinels, in blocks of that expert.
    start = 0
    for e in range(num_experts):
        run = sorted_ids[start : start + int(padded[e])]
        n = int(counts[e])
        assert run[:n].tolist() == (flat == e).nonzero().flatten().tolist()
        assert (run[n:] == num_pairs).all()
        blocks = block_experts[start // block_m : (start + int(padded[e])) // block_m]
        assert (blocks == e).all()
        start += int(padded[e])
    assert (block_experts[total // block_m :] == -1).all()


# ---- both paths against the reference -----------------------------------------------------


@pytest.mark.parametrize("path", ["grouped", "small"])
@pytest.mark.parametrize("num_tokens", [1, 3, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_paths_match_reference(path: str, num_tokens: int, dtype: torch.dtype) -> None:
    x, w13, w2, weights, ids = _inputs(num_tokens, dtype)
    out = _paths()[path](x, w13, w2, weights, ids, "silu", _config(path))
    _close(out, fused_moe_ref(x, w13, w2, weights, ids))


@pytest.mark.parametrize("path", ["grouped", "small"])
@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_gelu_acts(path: str, act: str) -> None:
    x, w13, w2, weights, ids = _inputs(5, torch.float32, seed=3)
    out = _paths()[path](x, w13, w2, weights, ids, act, _config(path))
    if act == "gelu":
        _close(out, fused_moe_ref(x, w13, w2, weights, ids, act))
        return
    # fused_moe_ref maps every non-silu act to exact gelu; HF's gelu_pytorch_tanh is the tanh
    # approximation (as layers.activation.GatedAct has it).
    ref = torch.zeros_like(out)
    for t in range(x.shape[0]):
        for k in range(K):
            e = int(ids[t, k])
            gate, up = (w13[e] @ x[t]).chunk(2)
            ref[t] += weights[t, k] * (w2[e] @ (F.gelu(gate, approximate="tanh") * up))
    _close(out, ref)


def test_unknown_act_raises() -> None:
    x, w13, w2, weights, ids = _inputs(2, torch.float32)
    for fn in _paths().values():
        with pytest.raises(ValueError, match="'relu2'"):
            fn(x, w13, w2, weights, ids, "relu2")


@pytest.mark.parametrize("path", ["grouped", "small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_batched_rows_equal_solo_rows(path: str, dtype: torch.dtype) -> None:
    """With one config, a token's row does not depend on the batch around it (no atomics, a
    fixed reduction order per row): bit-equal. NOTE: except the interpreter's fp32 tl.dot
    (numpy's BLAS), whose rows may differ in the last bit with the other rows of the tile."""
    interpreted_fp32_dot = TRITON_DEVICE == "cpu" and dtype == torch.float32 and path == "grouped"
    num_tokens = 9
    x, w13, w2, weights, ids = _inputs(num_tokens, dtype, seed=5)
    fn, cfg = _paths()[path], _config(path)
    batched = fn(x, w13, w2, weights, ids, "silu", cfg)
    for t in range(num_tokens):
        row = slice(t, t + 1)
        solo = fn(x[row], w13, w2, weights[row], ids[row], "silu", cfg)
        if interpreted_fp32_dot:
            torch.testing.assert_close(solo, batched[row], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(solo, batched[row]), t


# ---- dispatch -----------------------------------------------------------------------------


@pytest.mark.usefixtures("triton_on_cpu")
@pytest.mark.parametrize("num_tokens", [1, 33])
def test_dispatch_picks_small_batch_then_grouped(
    num_tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moeflow.kernels.triton import fused_moe as moe_triton

    calls: list[str] = []
    for name in ("fused_moe_triton", "fused_moe_small_batch_triton"):
        real = getattr(moe_triton, name)

        def spy(*args: object, _real: Callable = real, _name: str = name) -> torch.Tensor:
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(moe_triton, name, spy)
    x, w13, w2, weights, ids = _inputs(num_tokens, torch.float32, seed=7)
    out = fused_moe(x, w13, w2, weights, ids)
    if TRITON_DEVICE == "cpu":  # interpreted: threshold 32 pairs
        assert calls == [
            "fused_moe_small_batch_triton" if num_tokens * K <= 32 else "fused_moe_triton"
        ]
    assert len(calls) == 1
    _close(out, fused_moe_ref(x, w13, w2, weights, ids))


def test_dispatch_takes_the_reference_without_triton_on_cpu() -> None:
    """Without the triton_on_cpu fixture, CPU tensors take the reference (bit-equal)."""
    x, w13, w2, weights, ids = _cpu_inputs()
    torch.testing.assert_close(
        fused_moe(x, w13, w2, weights, ids), fused_moe_ref(x, w13, w2, weights, ids), rtol=0, atol=0
    )


# ---- tuning table -------------------------------------------------------------------------


def _entry(block_m: int, block_n: int, small: int) -> dict[str, int]:
    return {
        "BLOCK_SIZE_M": block_m,
        "BLOCK_SIZE_N": block_n,
        "BLOCK_SIZE_K": 64,
        "GROUP_SIZE_M": 1,
        "num_warps": 4,
        "num_stages": 3,
        "SMALL_BATCH_MAX_PAIRS": small,
    }


def test_table_loader_picks_nearest_bucket_of_the_path(tmp_path: Path) -> None:
    from moeflow.kernels.triton.fused_moe import (
        default_moe_config,
        load_moe_table,
        moe_config_from_table,
        shape_key,
    )

    key = shape_key(8, 48, 64, torch.bfloat16)
    assert key == "E=8,I=48,H=64,dtype=bfloat16"
    # Small-batch path up to 4 pairs (K=2: T <= 2); grouped buckets 16 and 64.
    table = {
        "command": "moeflow bench --tune-moe --moe-shape 8,48,64,2",
        "device": "Test GPU",
        key: {
            "1": _entry(16, 16, 4),
            "2": _entry(16, 32, 4),
            "16": _entry(32, 64, 4),
            "64": _entry(64, 128, 4),
        },
    }
    path = tmp_path / "Test_GPU.json"
    path.write_text(json.dumps(table))
    assert set(load_moe_table(str(path))) == {key}

    def pick(num_tokens: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
        return moe_config_from_table(str(path), 8, 48, 64, dtype, num_tokens, 2)

    assert pick(1)["BLOCK_SIZE_N"] == 16
    assert pick(2)["BLOCK_SIZE_N"] == 32
    assert pick(3)["BLOCK_SIZE_N"] == 64  # 6 pairs > 4: the grouped path's nearest bucket, 16
    assert pick(40)["BLOCK_SIZE_N"] == 64  # a tie between 16 and 64 goes to the smaller
    assert pick(41)["BLOCK_SIZE_N"] == 128
    assert pick(5000)["BLOCK_SIZE_N"] == 128
    assert all(pick(t)["SMALL_BATCH_MAX_PAIRS"] == 4 for t in (1, 3, 5000))
    # Another dtype, or no file at all: the default heuristic.
    assert pick(3, torch.float16) == default_moe_config(8, 3, 2)
    missing = moe_config_from_table(str(tmp_path / "none.json"), 8, 48, 64, torch.bfloat16, 3, 2)
    assert missing == default_moe_config(8, 3, 2)


def test_table_loader_rejects_malformed_entries(tmp_path: Path) -> None:
    from moeflow.kernels.triton.fused_moe import load_moe_table

    path = tmp_path / "bad.json"
    bad = _entry(16, 24, 0)  # not a power of two
    path.write_text(json.dumps({"command": "x", "E=8,I=48,H=64,dtype=bfloat16": {"1": bad}}))
    with pytest.raises(ValueError, match="powers of two"):
        load_moe_table(str(path))
    path2 = tmp_path / "bad2.json"
    missing_key = {k: v for k, v in _entry(16, 32, 0).items() if k != "num_stages"}
    path2.write_text(json.dumps({"E=8,I=48,H=64,dtype=bfloat16": {"1": missing_key}}))
    with pytest.raises(ValueError, match="exactly the keys"):
        load_moe_table(str(path2))


def test_default_config_grows_blocks_with_the_batch() -> None:
    from moeflow.kernels.triton.fused_moe import default_moe_config

    decode = default_moe_config(128, 4, 8)  # 32 pairs: the small-batch path
    assert decode["SMALL_BATCH_MAX_PAIRS"] >= 4 * 8
    sizes = [default_moe_config(128, t, 8)["BLOCK_SIZE_M"] for t in (64, 512, 4096, 16384)]
    assert sizes == sorted(sizes) and sizes[0] == 16 and sizes[-1] >= 64


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_tune_command_needs_cuda() -> None:
    from moeflow.bench.moe_tune import run_moe_tune

    args = argparse.Namespace(model="preset:qwen3-30b-a3b", dtype="auto")
    with pytest.raises(MoeflowError, match="CUDA"):
        run_moe_tune(args)


def test_tune_command_reads_preset_shapes() -> None:
    from moeflow.bench.moe_tune import _shapes

    assert _shapes("preset:qwen3-30b-a3b,deepseek-v2-lite", None) == [
        (128, 768, 2048, 8),
        (64, 1408, 2048, 6),
    ]
    assert _shapes("preset:olmoe-1b-7b", None) == [(64, 1024, 2048, 8)]
    assert _shapes(None, "8,48,64,2") == [(8, 48, 64, 2)]


def test_tune_entries_choose_the_small_batch_path_up_to_where_it_stops_winning() -> None:
    from moeflow.bench.moe_tune import table_entries

    grouped = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1}
    small = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 256, "GROUP_SIZE_M": 1}
    # (grouped ms, config, small-batch ms, config): small wins at 1 and 2 tokens, loses at 4,
    # wins again at 8 (past the first loss: not taken), untimed (inf) at 64.
    best = {
        1: (0.020, grouped, 0.010, small),
        2: (0.021, grouped, 0.012, small),
        4: (0.022, grouped, 0.030, small),
        8: (0.030, grouped, 0.025, small),
        64: (0.050, grouped, float("inf"), grouped),
    }
    out = table_entries(best, top_k=8)
    assert {t: e["SMALL_BATCH_MAX_PAIRS"] for t, e in out.items()} == dict.fromkeys(best, 16)
    assert out[1]["BLOCK_SIZE_N"] == out[2]["BLOCK_SIZE_N"] == 32  # the small-batch config
    assert all(out[t]["BLOCK_SIZE_N"] == 64 for t in (4, 8, 64))
    # Only the counts done so far (a search cut short): the same rule over those.
    assert table_entries({1: best[1]}, top_k=8)[1]["SMALL_BATCH_MAX_PAIRS"] == 8


def test_tune_table_merge_keeps_other_shapes_and_loads(tmp_path: Path) -> None:
    from moeflow.bench.moe_tune import merge_entries
    from moeflow.kernels.triton.fused_moe import load_moe_table

    entry = _entry(16, 32, 0)
    table = {"commands": {"E=8,I=48,H=64,dtype=bfloat16": "moeflow a"}}
    table["E=8,I=48,H=64,dtype=bfloat16"] = {"1": entry}
    merge_entries(table, "E=4,I=32,H=64,dtype=bfloat16", {2: entry, 1: entry}, "moeflow b", "X", {})
    assert set(table["E=4,I=32,H=64,dtype=bfloat16"]) == {"1", "2"}
    assert "E=8,I=48,H=64,dtype=bfloat16" in table
    assert table["command"] == "moeflow a ; moeflow b" and table["device"] == "X"
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    loaded = load_moe_table(str(path))
    assert set(loaded) >= {"E=8,I=48,H=64,dtype=bfloat16", "E=4,I=32,H=64,dtype=bfloat16"}


# ---- real shapes on the GPU ---------------------------------------------------------------

# name: (E, I, H, K)
REAL_SHAPES = {"qwen3-30b-a3b": (128, 768, 2048, 8), "deepseek-v2-lite": (64, 1408, 2048, 6)}


def _real_inputs(
    shape: tuple[int, int, int, int], num_tokens: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    num_experts, inter, hidden, top_k = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    on = {"device": "cuda", "generator": g}
    x = torch.randn(num_tokens, hidden, **on).bfloat16()
    w13 = (torch.randn(num_experts, 2 * inter, hidden, **on) / hidden**0.5).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, **on) / inter**0.5).bfloat16()
    weights, ids = select_experts(torch.randn(num_tokens, num_experts, **on), top_k)
    return x, w13, w2, weights, ids


@pytest.mark.gpu
@pytest.mark.parametrize("model", sorted(REAL_SHAPES))
@pytest.mark.parametrize("num_tokens", [1, 8, 64, 512])
def test_real_shapes_bf16(model: str, num_tokens: int) -> None:
    x, w13, w2, weights, ids = _real_inputs(REAL_SHAPES[model], num_tokens)
    ref = fused_moe_ref(x, w13, w2, weights, ids)
    _close(fused_moe(x, w13, w2, weights, ids), ref)  # the dispatch (its config)
    for path, fn in _paths().items():
        if path == "small" and num_tokens > 64:
            continue
        _close(fn(x, w13, w2, weights, ids), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [2, 64])
def test_cuda_graph_capture_and_replay(num_tokens: int) -> None:
    """Both paths capture into a CUDA graph (no host sync, grids from shapes) and replay on new
    routing into the same static buffers."""
    x, w13, w2, weights, ids = _real_inputs(REAL_SHAPES["qwen3-30b-a3b"], num_tokens)
    for fn in _paths().values():
        fn(x, w13, w2, weights, ids)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(x, w13, w2, weights, ids)
            torch.cuda.current_stream().synchronize()
            with torch.cuda.graph(graph):
                out = fn(x, w13, w2, weights, ids)
        torch.cuda.current_stream().wait_stream(stream)
        _, _, _, new_weights, new_ids = _real_inputs(REAL_SHAPES["qwen3-30b-a3b"], num_tokens, 1)
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        _close(out, fused_moe_ref(x, w13, w2, weights, ids))


def _cpu_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    weights, ids = _skewed_routing(3, E, K, 11, device="cpu")
    return x, w13, w2, weights, ids
