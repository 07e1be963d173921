"""`moeflow bench --workload moe-scaling`: does CPU decode cost follow active parameters? Times
single-stream decode of (a) a random MoE model with 64 experts, top-2, (b) a dense model with the
same active parameters, (c) the same MoE running all 64 experts for every token. Same process,
same shapes otherwise, one after the other."""

from __future__ import annotations

import argparse
import gc
import json
import time
from typing import Any

import torch

from moeflow.api import LLM
from moeflow.bench.common import routing_imbalance
from moeflow.bench.report import count_parameters
from moeflow.sampling_params import SamplingParams

HIDDEN, EXPERT_INTER, EXPERTS, TOP_K = 1024, 512, 64, 2
BASE: dict[str, Any] = {
    "num_hidden_layers": 8,
    "hidden_size": HIDDEN,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 8192,
    "moe_intermediate_size": EXPERT_INTER,
    "num_experts": EXPERTS,
}
VARIANTS: dict[str, dict[str, Any]] = {
    f"moe {EXPERTS}x top-{TOP_K}": {"num_experts_per_tok": TOP_K},
    "dense, same active": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "intermediate_size": TOP_K * EXPERT_INTER,
    },
    f"moe all {EXPERTS} experts": {"num_experts_per_tok": EXPERTS},
}


def measure_moe_scaling(
    decode_tokens: int = 32, threads: int = 0, dtype: str = "auto"
) -> dict[str, Any]:
    """Decode ms/token, total and active parameters and routing imbalance of each variant:
    {"workload": "moe-scaling", "threads": n, "decode_tokens": n, "rows": [...]}."""
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    rows: list[dict[str, Any]] = []
    for name, overrides in VARIANTS.items():
        llm = LLM(
            "preset:qwen3-30b-a3b",
            hf_overrides={**BASE, **overrides},
            dtype=dtype,
            device="cpu",
            max_model_len=256,
        )
        counts = count_parameters(llm.loaded.model, llm.loaded.model_config)
        total, active = counts.total, counts.active_per_token
        engine = llm.engine
        req = engine.add_request(
            list(range(1, 33)),
            SamplingParams(temperature=0, max_tokens=decode_tokens + 1, ignore_eos=True),
        )
        while not req.output_ids:
            engine.step()
        engine.enable_routing_stats()
        start = time.perf_counter()
        while not req.is_finished:
            engine.step()
        ms = (time.perf_counter() - start) / decode_tokens * 1e3
        rows.append(
            {
                "variant": name,
                "total_params": total,
                "active_params": active,
                "ms_per_token": ms,
                "imbalance": routing_imbalance(engine.routing_stats()),
            }
        )
        del llm, engine, req
        gc.collect()
    return {
        "workload": "moe-scaling",
        "threads": threads,
        "decode_tokens": decode_tokens,
        "rows": rows,
    }


def run_moe_scaling(args: argparse.Namespace) -> int:
    """The command: measure, print a table and the ratios, optionally write JSON."""
    threads = args.threads or torch.get_num_threads()
    print(
        f"workload: decode {args.decode_tokens} tokens at batch 1 after a 32-token prompt; "
        f"{BASE['num_hidden_layers']} layers, hidden {HIDDEN}, experts of {EXPERT_INTER}; "
        f"random weights, {threads} threads"
    )
    result = measure_moe_scaling(args.decode_tokens, threads, args.dtype)
    rows = result["rows"]
    print(f"{'variant':24} {'total':>9} {'active':>9} {'ms/token':>9}")
    for r in rows:
        print(
            f"{r['variant']:24} {r['total_params'] / 1e6:8.1f}M {r['active_params'] / 1e6:8.1f}M "
            f"{r['ms_per_token']:9.2f}"
        )
    moe, dense, every = (r["ms_per_token"] for r in rows)
    print(
        f"moe top-{TOP_K} / dense same active = {moe / dense:.2f}; "
        f"moe top-{TOP_K} / all experts = {moe / every:.2f} "
        f"(active-parameter ratio {rows[0]['active_params'] / rows[2]['active_params']:.2f})"
    )
    if rows[0]["imbalance"] is not None:
        print(
            f"routing of the top-{TOP_K} run: {rows[0]['imbalance']:.2f}x load imbalance "
            "(busiest expert's tokens / mean per expert, averaged over MoE layers)"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0
