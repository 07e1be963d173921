"""`moeflow bench`: load time, prefill and single-stream decode speed of moeflow beside its
memory-bandwidth roofline and beside peers timed in the same process. Every printed figure is
measured in this run; nothing is looked up."""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

import moeflow
from moeflow.bench.common import (
    BANDWIDTH_BYTES,
    BANDWIDTH_REPEATS,
    measure_bandwidth,
    parse_compare,
    resolve_device,
    routing_imbalance,
    sync,
)
from moeflow.bench.peers import BenchResult, run_peer, skip_reason
from moeflow.bench.report import count_parameters, decode_weight_bytes
from moeflow.engine.kv_cache import kv_bytes_per_token
from moeflow.engine.llm_engine import LLMEngine
from moeflow.sampling_params import SamplingParams
from moeflow.utils import cdiv
from moeflow.utils.dtype import parse_dtype

# Real text, tokenised and repeated/cut to the prompt length, so every engine sees the same ids.
PROMPT_TEXT = (
    "The river rises in the hills north of the town and runs south through farmland, past the "
    "old mill and under the stone bridge that the builders finished in the spring of the year "
    "the railway came. In dry summers the children walk across it on the rocks; in wet winters "
    "it floods the lower meadows and the ferry stops. The mill ground wheat for a century, then "
    "timber, and now holds a small museum of tools, maps and letters written by the families "
    "who lived along the banks. Visitors ask most often about the great flood, when the water "
    "reached the second floor and the miller's daughter rowed her neighbours to the church."
)


@dataclass(slots=True)
class _MoeflowRun:
    result: BenchResult
    path: str
    architecture: str
    dtype: str
    params_total: int
    weight_bytes: int
    decode_weight_bytes: int  # weights read per decode step
    kv_bytes_per_token: int
    prompt_ids: list[int]
    warm_ids: list[int]


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark described by the `moeflow bench` arguments; 0 on success."""
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    peers = parse_compare(args.compare)
    machine = _machine_info(threads)
    print(
        f"machine: {machine['cpu']} ({machine['cores']} cores, {threads} threads used"
        f"{', ' + machine['isa'] if machine['isa'] else ''}); torch {torch.__version__}, "
        f"python {platform.python_version()}"
    )
    print(f"workload: prompt {args.prompt_len} tokens, {args.decode_tokens} decode tokens, batch 1")

    device = resolve_device(args.device)
    bandwidth = measure_bandwidth(torch.device(device))
    mf = _bench_moeflow(args, device)
    gc.collect()
    print(
        f"model: {mf.path} ({mf.architecture}, {mf.params_total:,} params, {mf.dtype}, "
        f"{mf.weight_bytes / 2**20:.1f} MiB of weights)"
    )

    results = [mf.result]
    for peer in peers:
        reason = skip_reason(peer, mf.path)
        if reason is None:
            try:
                res = run_peer(
                    peer,
                    mf.path,
                    mf.prompt_ids,
                    mf.warm_ids,
                    args.decode_tokens,
                    threads,
                )
            except Exception as e:  # a broken peer must not hide moeflow's figures
                res = BenchResult(peer, note=f"failed: {type(e).__name__}: {e}")
            gc.collect()
        else:
            res = BenchResult(peer, note=f"skipped: {reason}")
        results.append(res)
        if not res.is_measured:
            print(f"{peer}: {res.note}")

    # Roofline: weights read once per step plus the KV cache at the mean decode context.
    mean_context = args.prompt_len + args.decode_tokens / 2
    kv_read = int(mean_context * mf.kv_bytes_per_token)
    bytes_per_token = mf.decode_weight_bytes + kv_read
    roofline = bandwidth / bytes_per_token
    decode = mf.result.decode_tok_s or 0.0
    ratios = _ratios(results)

    print()
    print(_table(results))
    print()
    if ratios:
        print("speed ratios (> 1: moeflow faster; load compares the time taken)")
    for name, r in ratios.items():
        print(
            f"{name}: load {_fmt_ratio(r['load'])}, prefill {_fmt_ratio(r['prefill'])}, "
            f"decode {_fmt_ratio(r['decode'])}"
        )
    conc = mf.result.concurrent_decode_tok_s
    if conc is not None:
        vs = ", ".join(
            f"{conc / r.decode_tok_s:.2f}x {r.name}'s one stream"
            for r in results[1:]
            if r.decode_tok_s
        )
        print(
            f"{args.concurrency} concurrent requests (64-token prompts, {args.decode_tokens} "
            f"tokens each): moeflow decodes {conc:.1f} tok/s in total" + (f" = {vs}" if vs else "")
        )
    print(
        f"memory bandwidth {bandwidth / 1e9:.2f} GB/s (best of {BANDWIDTH_REPEATS} copies of "
        f"{BANDWIDTH_BYTES // 2**20} MiB fp32, read + write); bytes per decode step "
        f"{bytes_per_token / 2**20:.1f} MiB (weights {mf.decode_weight_bytes / 2**20:.1f} MiB "
        f"as stored + KV {kv_read / 2**20:.2f} MiB at context {mean_context:.0f})"
    )
    print(f"roofline {roofline:.1f} tok/s, moeflow at {100 * decode / roofline:.1f}% of it")

    if args.json:
        report = {
            "command": " ".join(sys.argv),
            "versions": _versions(),
            "machine": machine,
            "settings": {
                "prompt_len": args.prompt_len,
                "decode_tokens": args.decode_tokens,
                "threads": threads,
                "device": device,
                "compare": peers,
                "concurrency": args.concurrency,
            },
            "model": {
                "path": mf.path,
                "architecture": mf.architecture,
                "dtype": mf.dtype,
                "params_total": mf.params_total,
                "weight_bytes": mf.weight_bytes,
                "decode_weight_bytes": mf.decode_weight_bytes,
                "kv_bytes_per_token": mf.kv_bytes_per_token,
            },
            "bandwidth_bytes_per_s": bandwidth,
            "bytes_per_decode_step": bytes_per_token,
            "roofline_tok_s": roofline,
            "moeflow_roofline_fraction": decode / roofline,
            "results": {r.name: r.to_json() for r in results},
            "ratios": ratios,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _bench_moeflow(args: argparse.Namespace, device: str) -> _MoeflowRun:
    from moeflow.api import LLM

    prompt_len, decode_tokens = args.prompt_len, args.decode_tokens
    if prompt_len < 1 or decode_tokens < 1:
        raise ValueError("--prompt-len and --decode-tokens must be >= 1")
    start = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        device=device,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=max(2048, prompt_len),  # the prompt is one chunk
        seed=args.seed if args.seed is not None else 0,
        quantize=args.quantize,
    )
    load_s = time.perf_counter() - start
    if prompt_len + decode_tokens + 1 > llm.config.max_model_len:
        raise ValueError(
            f"prompt {prompt_len} + {decode_tokens} decode tokens do not fit max_model_len "
            f"{llm.config.max_model_len}"
        )
    prompt_ids = _prompt_ids(
        llm.tokenizer.encode(PROMPT_TEXT, add_special_tokens=False), prompt_len
    )
    # The warm-up prompt differs from its first token on, so no block of it is a prefix hit.
    warm_ids = prompt_ids[1:] + prompt_ids[:1]
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate(warm_ids, warm)

    engine = llm.engine
    steps_before = engine.stats.num_steps
    sync(torch.device(device))
    start = time.perf_counter()
    (out,) = llm.generate(prompt_ids, SamplingParams(temperature=0.0, max_tokens=1))
    prefill_s = time.perf_counter() - start
    num_chunks = engine.stats.num_steps - steps_before
    if out.num_cached_tokens:
        raise RuntimeError(f"the timed prompt hit the prefix cache ({out.num_cached_tokens})")

    # Decode: time only the steps after the first sampled token.
    params = SamplingParams(temperature=0.0, max_tokens=decode_tokens + 1, ignore_eos=True)
    req = engine.add_request(prompt_ids, params)
    while not req.output_ids:
        engine.step()
    engine.enable_routing_stats()
    engine.reset_routing_stats()
    start = time.perf_counter()
    while not req.is_finished:
        engine.step()
    decode_s = time.perf_counter() - start
    num_decoded = len(req.output_ids) - 1
    engine.enable_routing_stats(False)
    imbalance = routing_imbalance(engine.routing_stats())
    vocab = llm.loaded.model_config.vocab_size
    concurrent_tok_s = _concurrent_decode(
        engine, prompt_ids, args.concurrency, decode_tokens, vocab
    )
    if imbalance is not None:
        print(
            f"routing over the decode: {imbalance:.2f}x load imbalance "
            "(busiest expert's tokens / mean per expert, averaged over MoE layers)"
        )

    counts = count_parameters(llm.loaded.model, llm.loaded.model_config)
    dtype = parse_dtype(llm.config.dtype)
    note = f"{llm.config.dtype}" + (f", prefill in {num_chunks} steps" if num_chunks > 1 else "")
    run = _MoeflowRun(
        result=BenchResult(
            "moeflow",
            load_s,
            prompt_len / prefill_s,
            num_decoded / decode_s,
            note,
            concurrent_decode_tok_s=concurrent_tok_s,
            concurrent=args.concurrency,
        ),
        path=llm.loaded.path,
        architecture=llm.loaded.model_config.architecture,
        dtype=llm.config.dtype,
        params_total=counts.total,
        weight_bytes=counts.weight_bytes,
        decode_weight_bytes=decode_weight_bytes(counts),
        kv_bytes_per_token=kv_bytes_per_token(llm.loaded.model, dtype),
        prompt_ids=prompt_ids,
        warm_ids=warm_ids,
    )
    del llm, engine, req, out
    return run


def _concurrent_decode(
    engine: LLMEngine, prompt_ids: list[int], n: int, decode_tokens: int, vocab: int
) -> float | None:
    """Total decode tok/s of `n` requests decoding together (one batched step per token): each
    has its own 64-token prompt (no shared prefix); timing starts once all have their first
    token and stops when the last finishes."""
    if n < 2:
        return None
    params = SamplingParams(temperature=0.0, max_tokens=decode_tokens + 1, ignore_eos=True)
    base = prompt_ids[:64]
    reqs = [engine.add_request([(t + 7 * i) % vocab for t in base], params) for i in range(n)]
    while not all(r.output_ids for r in reqs):
        engine.step()
    done = sum(len(r.output_ids) for r in reqs)
    start = time.perf_counter()
    while not all(r.is_finished for r in reqs):
        engine.step()
    elapsed = time.perf_counter() - start
    return (sum(len(r.output_ids) for r in reqs) - done) / elapsed


def _prompt_ids(text_ids: list[int], prompt_len: int) -> list[int]:
    if not text_ids:
        raise ValueError("the benchmark text tokenised to nothing")
    repeats = cdiv(prompt_len, len(text_ids))
    return (text_ids * repeats)[:prompt_len]


def _machine_info(threads: int) -> dict[str, Any]:
    model_name, flags = "", set[str]()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model_name:
                    model_name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    cpu = model_name or platform.processor() or platform.machine()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "asimd") if f in flags]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "isa": " ".join(isa),
        "platform": platform.platform(),
    }


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {
        "moeflow": moeflow.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for dist in ("transformers", "llama_cpp_python"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = None
    return found


def _ratios(results: list[BenchResult]) -> dict[str, dict[str, float | None]]:
    """moeflow / peer for each measured peer: above 1 is faster (load: peer / moeflow time)."""
    mf, out = results[0], {}
    for peer in results[1:]:
        if not peer.is_measured:
            continue
        out[f"moeflow / {peer.name}"] = {
            "load": _div(peer.load_s, mf.load_s),
            "prefill": _div(mf.prefill_tok_s, peer.prefill_tok_s),
            "decode": _div(mf.decode_tok_s, peer.decode_tok_s),
        }
    return out


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _table(results: list[BenchResult]) -> str:
    head = (
        f"{'engine':<10} {'load s':>8} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/token':>9}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r.name:<10} {_fmt(r.load_s, 2):>8} {_fmt(r.prefill_tok_s, 1):>14} "
            f"{_fmt(r.decode_tok_s, 1):>13} {_fmt(r.ms_per_token, 2):>9}  {r.note}"
        )
    return "\n".join(rows)


def _fmt(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
