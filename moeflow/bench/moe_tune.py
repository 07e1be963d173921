"""The fused-MoE tuning command: times the Triton kernels' candidate configs (both paths) for the
expert shapes of presets on this CUDA device and writes the table kernels/triton/fused_moe.py
reads (kernels/configs/fused_moe/<device>.json). Needs a GPU; only the CLI imports it.

Shape legend: T tokens, H hidden, E experts, I expert intermediate size, K experts per token."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from moeflow.errors import MoeflowError
from moeflow.kernels.fused_moe import select_experts
from moeflow.loading.presets import preset_config
from moeflow.loading.source import parse_preset
from moeflow.utils.dtype import parse_dtype

# Search space. Grouped path: BLOCK_SIZE_M is capped by the pairs per expert (below).
_GROUPED_SPACE = {
    "BLOCK_SIZE_M": (16, 32, 64, 128),
    "BLOCK_SIZE_N": (32, 64, 128),
    "BLOCK_SIZE_K": (64, 128, 256),
    "GROUP_SIZE_M": (1, 8),
    "num_warps": (4, 8),
    "num_stages": (2, 3, 4),
}
_SMALL_SPACE = {
    "BLOCK_SIZE_N": (16, 32, 64),
    "BLOCK_SIZE_K": (128, 256, 512),
    "num_warps": (2, 4, 8),
    "num_stages": (1, 2, 3),
}
# The small-batch path is timed up to this many pairs (T*K).
_SMALL_MAX_TIMED_PAIRS = 128
# Shared memory a grouped candidate may ask for (H100: 227 KiB per block).
_MAX_SHARED_BYTES = 200 * 1024
# Weight copies rotate between timed calls so a call does not find the last one's experts in L2.
_WEIGHT_BYTES_IN_FLIGHT = 2 << 30


def run_moe_tune(args: argparse.Namespace) -> int:
    """The command. Reads `args.model` ("preset:<name>" or a comma list of them; ignored when
    `args.moe_shape` "E,I,H,K" is given), `args.dtype` ("auto" = bfloat16, or bfloat16 /
    float16 / float32), `args.tune_tokens` (comma list or ints; default every table bucket) and
    `args.tune_output` (default: the package's table for this device). Missing attributes take
    those defaults. Raises MoeflowError without CUDA."""
    if not torch.cuda.is_available():
        raise MoeflowError(
            "moe tuning times the Triton fused-MoE kernels on a CUDA GPU; no CUDA device is "
            "visible (the kernels fall back to their default configs without a table)"
        )
    from moeflow.kernels.triton import fused_moe as moe_triton

    device = torch.device("cuda")
    dtype = _dtype(getattr(args, "dtype", "auto"))
    tokens = _tokens(getattr(args, "tune_tokens", None), moe_triton.TOKEN_BUCKETS)
    shapes = _shapes(getattr(args, "model", None), getattr(args, "moe_shape", None))
    device_name = torch.cuda.get_device_name(device)
    output = getattr(args, "tune_output", None) or str(
        moe_triton.CONFIG_DIR / f"{moe_triton.device_config_name(device_name)}.json"
    )
    command = shlex.join(["moeflow", *sys.argv[1:]])
    table = _read_table(output)
    for num_experts, inter, hidden, top_k in shapes:
        key = moe_triton.shape_key(num_experts, inter, hidden, dtype)
        print(f"tuning {key}, K={top_k} on {device_name}: token counts {list(tokens)}")

        def save(entries: dict[int, dict[str, int]], key: str = key) -> None:
            # after every token count, so a search cut short leaves the counts it finished
            merge_entries(table, key, entries, command, device_name, _versions())
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(table, indent=1, sort_keys=True) + "\n"
            Path(output).write_text(text, encoding="utf-8")
            print(f"    wrote {output} ({len(entries)} token counts of {key})", flush=True)

        tune_moe_shape(num_experts, inter, hidden, top_k, dtype, tokens, device, on_count=save)
    return 0


def merge_entries(
    table: dict[str, Any],
    key: str,
    entries: dict[int, dict[str, int]],
    command: str,
    device_name: str,
    versions: dict[str, str],
) -> None:
    """Put one shape's entries (token count -> config) into `table` (kernels/configs/fused_moe's
    format), with the command that made them; the table's other shapes stay."""
    table[key] = {str(t): cfg for t, cfg in sorted(entries.items())}
    table.setdefault("commands", {})[key] = command
    table["command"] = " ; ".join(dict.fromkeys(table["commands"].values()))
    table["device"] = device_name
    table["versions"] = versions


def tune_moe_shape(
    num_experts: int,
    inter: int,
    hidden: int,
    top_k: int,
    dtype: torch.dtype,
    tokens: Sequence[int],
    device: torch.device,
    on_count: Callable[[dict[int, dict[str, int]]], None] | None = None,
) -> dict[int, dict[str, int]]:
    """token count -> the fastest config (graph-replayed time of the whole op: align, GEMMs,
    combine), as `table_entries` chooses between the paths; `on_count` gets the entries of the
    counts done so far after each one."""
    from moeflow.kernels.triton import fused_moe as moe_triton

    weights = _random_weights(num_experts, inter, hidden, dtype, device)
    best: dict[int, tuple[float, dict[str, int], float, dict[str, int]]] = {}
    for num_tokens in sorted(tokens):
        args = (num_tokens, top_k, num_experts, hidden, dtype, device)
        started = time.perf_counter()
        grouped_ms, grouped_cfg = _fastest(
            moe_triton.fused_moe_triton,
            _grouped_candidates(num_tokens, top_k, num_experts, dtype),
            weights,
            *args,
        )
        small_ms, small_cfg = math.inf, grouped_cfg
        if num_tokens * top_k <= _SMALL_MAX_TIMED_PAIRS:
            small_ms, small_cfg = _fastest(
                moe_triton.fused_moe_small_batch_triton, _small_candidates(), weights, *args
            )
        best[num_tokens] = (grouped_ms, grouped_cfg, small_ms, small_cfg)
        print(
            f"  T={num_tokens:5d}: grouped {grouped_ms * 1e3:8.1f} us {grouped_cfg}; "
            f"small-batch {small_ms * 1e3:8.1f} us; {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        if on_count is not None:
            on_count(table_entries(best, top_k))
    return table_entries(best, top_k)


def table_entries(
    best: dict[int, tuple[float, dict[str, int], float, dict[str, int]]], top_k: int
) -> dict[int, dict[str, int]]:
    """token count -> config, from each count's (grouped ms, its config, small-batch ms, its
    config): the small-batch path for the counts up to the largest prefix of the counts where it
    beat the grouped path; every entry carries that SMALL_BATCH_MAX_PAIRS."""
    max_small = 0
    for num_tokens in sorted(best):
        grouped_ms, _, small_ms, _ = best[num_tokens]
        if small_ms >= grouped_ms:
            break
        max_small = num_tokens * top_k
    out: dict[int, dict[str, int]] = {}
    for num_tokens, (_, grouped_cfg, _, small_cfg) in best.items():
        cfg = small_cfg if num_tokens * top_k <= max_small else grouped_cfg
        out[num_tokens] = {**cfg, "SMALL_BATCH_MAX_PAIRS": max_small}
    return out


def _fastest(
    fn: Callable[..., torch.Tensor],
    candidates: list[dict[str, int]],
    weights: list[tuple[torch.Tensor, torch.Tensor]],
    num_tokens: int,
    top_k: int,
    num_experts: int,
    hidden: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[float, dict[str, int]]:
    """(ms, config) of the fastest candidate that compiles; random routing (as the presets'
    random-weight builds see it), a different routing and weight copy per timed call."""
    import triton.testing

    g = torch.Generator(device=device).manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden, generator=g, device=device).to(dtype)  # [T, H]
    routings = [
        select_experts(torch.randn(num_tokens, num_experts, generator=g, device=device), top_k)
        for _ in weights
    ]  # [T, K] weights and ids per copy
    best_ms, best_cfg, failures = math.inf, candidates[0], 0
    for cfg in candidates:
        turns = itertools.cycle(range(len(weights)))

        def call(cfg: dict[str, int] = cfg, turns: Any = turns) -> torch.Tensor:
            i = next(turns)
            return fn(x, *weights[i], *routings[i], "silu", cfg)

        try:
            call()  # compile outside the graph
            ms = cast(float, triton.testing.do_bench_cudagraph(call, rep=20))  # mean ms
        except Exception as e:  # a config this device cannot compile or run is skipped
            failures += 1
            if failures == 1:
                print(f"    skipped {cfg}: {type(e).__name__}: {str(e)[:200]}")
            continue
        if ms < best_ms:
            best_ms, best_cfg = ms, {k: cfg[k] for k in cfg if k != "SMALL_BATCH_MAX_PAIRS"}
    if best_ms == math.inf:
        raise RuntimeError(f"no candidate config ran for T={num_tokens} ({failures} failed)")
    return best_ms, best_cfg


def _grouped_candidates(
    num_tokens: int, top_k: int, num_experts: int, dtype: torch.dtype
) -> list[dict[str, int]]:
    """The grouped-path search space, BLOCK_SIZE_M at most twice the pairs per expert (more is
    padding) and the gate/up kernel's pipelined tiles within shared memory."""
    pairs_per_expert = max(1, math.ceil(num_tokens * top_k / num_experts))
    max_block_m = max(16, 2 * (1 << (pairs_per_expert - 1).bit_length()))
    elem = torch.empty(0, dtype=dtype).element_size()
    out = []
    for values in itertools.product(*_GROUPED_SPACE.values()):
        cfg = dict(zip(_GROUPED_SPACE, values, strict=True))
        bm, bn, bk = cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"]
        if bm > max_block_m:
            continue
        if cfg["num_stages"] * (bm * bk + 2 * bn * bk) * elem > _MAX_SHARED_BYTES:
            continue
        out.append({**cfg, "SMALL_BATCH_MAX_PAIRS": 0})
    return out


def _small_candidates() -> list[dict[str, int]]:
    """The small-batch search space (BLOCK_SIZE_M / GROUP_SIZE_M unused, recorded as 16 / 1)."""
    fixed = {"BLOCK_SIZE_M": 16, "GROUP_SIZE_M": 1, "SMALL_BATCH_MAX_PAIRS": 0}
    return [
        {**fixed, **dict(zip(_SMALL_SPACE, v, strict=True))}
        for v in itertools.product(*_SMALL_SPACE.values())
    ]


def _random_weights(
    num_experts: int, inter: int, hidden: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of random w13 [E, 2I, H] and w2 [E, H, I], enough to outrun L2 (at most 4)."""
    layer_bytes = 3 * num_experts * inter * hidden * torch.empty(0, dtype=dtype).element_size()
    copies = max(1, min(4, _WEIGHT_BYTES_IN_FLIGHT // layer_bytes))
    return [
        (
            torch.randn(num_experts, 2 * inter, hidden, device=device, dtype=dtype) / hidden**0.5,
            torch.randn(num_experts, hidden, inter, device=device, dtype=dtype) / inter**0.5,
        )
        for _ in range(copies)
    ]


def _shapes(model: str | None, moe_shape: str | None) -> list[tuple[int, int, int, int]]:
    """(E, I, H, K) of each shape to tune: --moe-shape, else each preset of --model."""
    if moe_shape:
        values = [int(v) for v in moe_shape.split(",")]
        if len(values) != 4:
            raise ValueError(f"--moe-shape takes E,I,H,K; got {moe_shape!r}")
        e, i, h, k = values
        return [(e, i, h, k)]
    if not model:
        raise ValueError("name the shape: --model preset:<name>[,preset:<name>...] or --moe-shape")
    shapes = []
    for name in model.split(","):
        cfg = preset_config(parse_preset(name.strip()).name)
        num_experts = cfg.get("num_experts") or cfg.get("n_routed_experts")
        num_experts = num_experts or cfg.get("num_local_experts")
        if not num_experts:
            raise ValueError(f"preset {name!r} is not a mixture of experts")
        inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        shapes.append((num_experts, inter, cfg["hidden_size"], cfg["num_experts_per_tok"]))
    return shapes


def _dtype(name: str | None) -> torch.dtype:
    """--dtype, "auto" (or none) being bfloat16."""
    return parse_dtype("bfloat16" if name in (None, "auto") else name)


def _tokens(spec: str | Sequence[int] | None, default: Sequence[int]) -> tuple[int, ...]:
    if spec is None:
        return tuple(default)
    values = [int(v) for v in spec.split(",")] if isinstance(spec, str) else [int(v) for v in spec]
    if not values or min(values) < 1:
        raise ValueError(f"token counts are positive integers; got {spec!r}")
    return tuple(sorted(set(values)))


def _read_table(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        return {}
    table = json.loads(file.read_text(encoding="utf-8"))
    table.setdefault("commands", {})
    return table


def _versions() -> dict[str, str]:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__}
