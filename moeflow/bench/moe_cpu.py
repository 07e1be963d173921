"""`moeflow bench --workload moe-cpu`: an MoE GGUF on the CPU beside llama.cpp's own
multi-stream benchmark on the same file, one engine after the other, each in its own process
(so each peak RSS is its own and a crash of either is reported, not fatal).

The model is a GGUF file, or a preset's real shape written as a random-weight GGUF (whole or
its first --num-layers layers, in --gguf-type; cached). For each stream count S: S prompts of
--prompt-len distinct random tokens prefilled together, then --decode-tokens steps of S tokens,
--passes times in a row by each engine (default 2), the last pass reported: the first pass at a
stream count meets that shape's buffers untouched (page faults), which a serving engine pays
once; every pass's figures stay in the JSON. Before any of them moeflow's process runs
one-stream passes for WARM_UP_SECONDS (llama.cpp's load repacks its weights, seconds of CPU,
just before it measures). moeflow samples (temperature 1, seeded) so each
step feeds new tokens and routing spreads over the experts; the experts touched per step are
reported. The decode roofline is the measured memory bandwidth over the bytes a step actually
reads: dense weights as held, the touched experts' blocks, the KV cache. The prefill roofline is
compute: the int8 multiply-add rate of the kernels' register tile, measured on every thread,
over the multiply-adds a prompt token needs (from the file's tensor shapes)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moeflow import env
from moeflow.bench.common import measure_bandwidth
from moeflow.bench.gguf_models import FTYPES, bench_gguf
from moeflow.bench.llama_cpp_tools import (
    PeerRun,
    build_batched_bench,
    find_batched_bench,
    run_batched_bench,
)
from moeflow.kernels import cpu_ext
from moeflow.loading.presets import preset_config
from moeflow.loading.source import Preset, parse_model_source
from moeflow.weights.ggml_quants import Q4_K_R16
from moeflow.weights.gguf import GGUFReader

# seconds each measurement of the int8 multiply-add rate runs (the best of three counts)
MAC_RATE_SECONDS = 0.25


def run_moe_cpu(args: argparse.Namespace) -> int:
    """The workload described by the `moeflow bench` arguments; 0 on success."""
    threads = args.threads or os.cpu_count() or 1
    streams = sorted({int(s) for s in args.streams.split(",") if s.strip()})
    if not streams or streams[0] < 1:
        raise ValueError("--streams: stream counts >= 1, e.g. 1,4,16")
    if args.gguf_type not in FTYPES:
        raise ValueError(f"--gguf-type: one of {', '.join(FTYPES)}")
    passes = _passes(args)
    path = _model_file(args)
    size = os.path.getsize(path)
    print(f"model: {path} ({size / 1e9:.2f} GB)")
    print(
        f"workload: {args.prompt_len}-token prompts, {args.decode_tokens} decode steps, streams "
        f"{','.join(map(str, streams))}, {threads} threads, {passes} pass(es) of each "
        "stream count by each engine, the last reported; moeflow's activations "
        + ("int8 (llama.cpp's numerics, the default)" if env.MOEFLOW_CPU_INT8 else "fp32 (exact)")
    )
    torch.set_num_threads(threads)
    bandwidth = measure_bandwidth(torch.device("cpu"))
    compute = _compute_roof(path, args.prompt_len, threads)
    spec = {
        "path": str(path),
        "prompt_len": args.prompt_len,
        "decode_tokens": args.decode_tokens,
        "streams": streams,
        "threads": threads,
        "seed": args.seed or 0,
        "int8_activations": env.MOEFLOW_CPU_INT8,
        "use_mmap": args.use_mmap,
        "passes": passes,
    }
    warmed = _warm_page_cache(path)
    if warmed:
        print("page cache: the file is read (twice) before each engine's run")
    mf = _run_moeflow_child(spec)
    if warmed:
        _warm_page_cache(path)
    peer = _run_peer(args, str(path), streams, threads, passes)
    compute = _compute_roof(path, args.prompt_len, threads, compute)
    report = _report(mf, peer, streams, bandwidth, size, compute)
    print(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "command": " ".join(sys.argv),
                    "spec": spec,
                    "file_bytes": size,
                    "bandwidth_bytes_per_s": bandwidth,
                    "prefill_compute": compute,
                    "moeflow": mf,
                    "llama_cpp": dataclasses.asdict(peer) if peer else None,
                },
                f,
                indent=2,
            )
        print(f"wrote {args.json}")
    return 0 if "error" not in mf else 1


def _warm_page_cache(path: Path) -> bool:
    """Read the file twice, so that each engine starts with it in the page cache (the other
    engine's run may have evicted it). Twice: pages read once sit on the kernel's inactive list,
    which goes before the pages of an earlier file read more often (the likely cause of this: a
    48-layer Qwen3 file read once after a 10 GB file had been used, moeflow's one-stream prefill
    read 13.9 tok/s; 44.5 after dropping the caches). Skipped (False) for a file larger than
    the memory available: its pages would evict each other, and both engines then read it from
    disk."""
    from moeflow.loading.memory_plan import available_memory

    size = os.path.getsize(path)
    available = available_memory("cpu")
    if not available.holds(size):
        print(f"page cache: not warmed (file {size / 1e9:.2f} GB > available: {available.source})")
        return False
    buf = bytearray(64 << 20)
    for _ in range(2):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return True


def _model_file(args: argparse.Namespace) -> Path:
    source = parse_model_source(args.model)
    if isinstance(source, Preset):
        hf = preset_config(source.name)
        return bench_gguf(source.name, hf, args.gguf_type, args.num_layers)
    path = Path(source.path)
    if path.suffix != ".gguf":
        raise ValueError("--workload moe-cpu runs a .gguf file or preset:<name>")
    return path


def _run_peer(
    args: argparse.Namespace, path: str, streams: list[int], threads: int, passes: int
) -> PeerRun | None:
    if args.compare in ("none", ""):
        return None
    binary = find_batched_bench()
    if binary is None:
        try:
            binary = build_batched_bench()
        except (RuntimeError, OSError) as e:
            return PeerRun(note=f"skipped: no llama-batched-bench ({e})")
    return run_batched_bench(
        binary, path, args.prompt_len, args.decode_tokens, streams, threads, passes=passes
    )


def _passes(args: argparse.Namespace) -> int:
    passes = getattr(args, "passes", 2)
    if passes < 1:
        raise ValueError("--passes: at least 1")
    return passes


def _run_moeflow_child(spec: dict[str, Any]) -> dict[str, Any]:
    """moeflow's figures from a child process (its own peak RSS; a crash is reported)."""
    code = "import sys; from moeflow.bench.moe_cpu import child_main; child_main(sys.argv[1])"
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return {"error": f"moeflow run failed (status {proc.returncode}): {tail}"}
    return json.loads(lines[-1])


def child_main(spec_json: str) -> None:
    """The moeflow side, in its own process: prints one JSON line of figures."""
    from moeflow.api import LLM

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    cpu_ext.ops()  # a first use builds the kernels: not part of the load time
    prompt_len, decode_tokens, streams = spec["prompt_len"], spec["decode_tokens"], spec["streams"]
    start = time.perf_counter()
    llm = LLM(
        model=spec["path"],
        device="cpu",
        max_model_len=prompt_len + decode_tokens + 16,
        kv_cache_tokens=max(streams) * (prompt_len + decode_tokens + 16) + 256,
        max_num_seqs=max(max(streams), 16),
        max_num_batched_tokens=max(2048, prompt_len),
        use_mmap=spec["use_mmap"],
    )
    load_s = time.perf_counter() - start
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rng = random.Random(spec["seed"])
    vocab = llm.loaded.model_config.vocab_size
    engine = llm.engine
    warm_s = _warm_up(
        engine, lambda: [[rng.randrange(vocab) for _ in range(prompt_len)]], spec["seed"]
    )
    result: dict[str, Any] = {
        "load_s": load_s,
        "rss_after_load_bytes": rss_loaded,
        "mean_context": prompt_len + decode_tokens / 2,
        "use_mmap": spec["use_mmap"],
        "warm_up_s": warm_s,
        "runs": {},
    }
    for s in streams:
        passes = []
        for i in range(spec["passes"]):
            prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(s)]
            engine.enable_routing_stats()
            passes.append(_one_pass(engine, prompts, decode_tokens, spec["seed"] + s + 1000 * i))
            touched = engine.experts_touched_per_step()
            engine.enable_routing_stats(False)
            passes[-1]["experts_touched_per_step"] = (
                sum(touched) / len(touched) if touched else None
            )
        result["runs"][str(s)] = {**passes[-1], "passes": passes}
    model = llm.loaded.model
    result["weights"] = _weight_bytes(model)
    result["expert_bytes"] = [m.expert_bytes() for m in model.moe_layers()]
    result["repacked_bytes"] = _repacked_bytes(model)
    result["kv_bytes_per_token"] = _kv_bytes_per_token(llm)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result), flush=True)


def _repacked_bytes(model: Any) -> int:
    """Bytes of the weights held repacked on load (Q4_K_R16) rather than as the file's blocks:
    linear layers and experts."""
    total = sum(m.weight.numel() for m in model.modules() if getattr(m, "qtype", None) == Q4_K_R16)
    for layer in model.moe_layers():
        q = getattr(layer.experts, "quantized", None)
        if q is None:
            continue
        for data, qtype in ((q.gate, q.gate_type), (q.up, q.up_type), (q.down, q.down_type)):
            if qtype == Q4_K_R16:
                total += data.numel()
    return total


# seconds of one-stream passes run before anything is measured
WARM_UP_SECONDS = 3.0


def _warm_up(engine: Any, prompt: Callable[[], list[list[int]]], seed: int) -> float:
    """One-stream passes (a prompt, 4 decode steps) until WARM_UP_SECONDS have gone, at least
    one; returns the seconds taken. One pass was not enough on the shared 2-core machines:
    right after a load, one 128-token prefill of Qwen3's 4-layer cut after another took 1016,
    282, 227, 176, 163, then 151-160 ms (no page faults, no garbage collection among them), and
    after 4 s of other work the first took 191 ms; llama.cpp's own load repacks its weights for
    seconds of CPU just before it measures."""
    start = time.perf_counter()
    while True:
        _one_pass(engine, prompt(), 4, seed)
        if time.perf_counter() - start >= WARM_UP_SECONDS:
            return time.perf_counter() - start


def _one_pass(engine: Any, prompts: list[list[int]], decode_tokens: int, seed: int) -> dict:
    """Prefill every prompt together, then decode `decode_tokens` steps of all of them."""
    from moeflow.sampling_params import SamplingParams

    params = SamplingParams(
        temperature=1.0, max_tokens=decode_tokens + 1, ignore_eos=True, seed=seed
    )
    start = time.perf_counter()
    reqs = [engine.add_request(p, params) for p in prompts]
    while not all(r.output_ids for r in reqs):
        engine.step()
    prefill_s = time.perf_counter() - start
    engine.reset_routing_stats()  # experts touched per decode step, not per prefill
    done = sum(len(r.output_ids) for r in reqs)
    start = time.perf_counter()
    while not all(r.is_finished for r in reqs):
        engine.step()
    decode_s = time.perf_counter() - start
    decoded = sum(len(r.output_ids) for r in reqs) - done
    return {
        "prefill_tok_s": sum(map(len, prompts)) / prefill_s,
        "decode_tok_s": decoded / decode_s if decode_s > 0 else None,
    }


def _weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes a decode step reads of the weights held: routed experts apart from the rest (the
    input embedding is read a row at a time, so it is apart too). DeepSeek's kv_b_proj counts
    as its quantised halves where the decode reads those instead of its floats."""
    experts = embedding = other = 0
    for name, p in model.named_parameters():
        n = p.numel() * p.element_size()
        if ".experts." in name:
            experts += n
        elif name.endswith("embed_tokens.weight"):
            embedding += n
        else:
            other += n
    for m in model.modules():  # layers/mla.py KVBProj (bench may not import layers)
        halves_of: Any = getattr(m, "quantized_halves", None)
        halves: Any = halves_of() if callable(halves_of) else None
        if halves is not None:
            weight = m.get_parameter("weight")
            other += sum(h.data.numel() for h in halves) - weight.numel() * weight.element_size()
    return {"experts": experts, "embedding": embedding, "other": other}


def _kv_bytes_per_token(llm: Any) -> int:
    from moeflow.engine.kv_cache import kv_bytes_per_token
    from moeflow.utils.dtype import parse_dtype

    return kv_bytes_per_token(llm.loaded.model, parse_dtype(llm.config.dtype))


def _compute_roof(
    path: Path, prompt_len: int, threads: int, before: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The prefill roofline's parts: the int8 multiply-add rate of the kernels' register tile on
    `threads` threads (and of vpdpbusd alone, where the build has it), the multiply-adds a
    prompt token needs, and their quotient in tokens a second (None without the CPU kernels, or
    on the exact path, whose products are fp32). The bench measures before and after the
    engines' runs and keeps the higher rates (`before`, whose multiply-adds a token it reuses):
    a background task on a core (the page cache refilled after a drop) once took a third off
    one measurement."""
    ops = cpu_ext.ops()
    if ops is None or not env.MOEFLOW_CPU_INT8:
        return None
    vnni = cpu_ext.isa() == "avx512"
    rates = {"tile": _mac_rate(ops, threads, False)}
    if vnni:
        rates["vpdpbusd"] = _mac_rate(ops, threads, True)
    if before is not None:
        rates = {k: max(v, before["macs_per_s"][k]) for k, v in rates.items()}
    macs = before["macs_per_token"] if before else prefill_macs_per_token(path, prompt_len)
    return {
        "isa": cpu_ext.isa(),
        "threads": threads,
        "macs_per_s": rates,
        "macs_per_token": macs,
        "roofline_tok_s": rates["tile"] / macs,
    }


def _mac_rate(ops: Any, threads: int, vnni: bool) -> float:
    """The best of three runs of MAC_RATE_SECONDS each (the step count from a short first run)."""
    steps = 20_000
    start = time.perf_counter()
    ops.int8_mac_rate(threads, steps, vnni)
    steps = max(steps, int(steps * MAC_RATE_SECONDS / (time.perf_counter() - start)))
    return max(ops.int8_mac_rate(threads, steps, vnni) for _ in range(3))


def prefill_macs_per_token(path: Path | str, prompt_len: int) -> float:
    """Multiply-adds a prompt token needs in prefill, from a GGUF file's tensor shapes: each
    weight matrix of the blocks once (routed experts: used / count of their elements; DeepSeek's
    kv_b halves as the prefill's decompression), causal attention over the prompt (the mean
    context (L + 1) / 2, keys and values of each head), and the LM head once per prompt."""
    reader = GGUFReader(path)
    meta, arch = reader.metadata, reader.metadata["general.architecture"]
    used = int(meta.get(f"{arch}.expert_used_count", 0))
    count = int(meta.get(f"{arch}.expert_count", 0))
    macs = 0.0
    for name, t in reader.tensors.items():
        numel = float(torch.Size(t.shape).numel())
        if not name.startswith("blk.") or len(t.shape) < 2:
            continue
        macs += numel * used / count if "_exps." in name and count else numel
    head = reader.tensors.get("output.weight")
    if head is None:  # tied to the input embedding
        head = reader.tensors["token_embd.weight"]
    macs += float(torch.Size(head.shape).numel()) / prompt_len
    heads = meta[f"{arch}.attention.head_count"]
    heads = max(heads) if isinstance(heads, list) else int(heads)
    width = int(meta[f"{arch}.embedding_length"]) // heads
    keys = meta.get(f"{arch}.attention.key_length_mla", meta.get(f"{arch}.attention.key_length"))
    values = meta.get(
        f"{arch}.attention.value_length_mla", meta.get(f"{arch}.attention.value_length")
    )
    per_position = heads * (int(keys or width) + int(values or width))
    return macs + int(meta[f"{arch}.block_count"]) * per_position * (prompt_len + 1) / 2


def _report(
    mf: dict[str, Any],
    peer: PeerRun | None,
    streams: list[int],
    bandwidth: float,
    size: int,
    compute: dict[str, Any] | None = None,
) -> str:
    lines = []
    if "error" in mf:
        lines.append(f"moeflow: {mf['error']}")
        mf_runs: dict[str, Any] = {}
    else:
        mf_runs = mf["runs"]
        held = (
            "weights used in place from the mapped file"
            if mf["use_mmap"]
            else "weights read into its own memory, --no-mmap"
        )
        if mf.get("repacked_bytes"):
            held += (
                f"; {mf['repacked_bytes'] / 1e9:.2f} GB of Q4_K blocks repacked on load into its "
                "own memory (--no-repack: as stored)"
            )
        lines.append(
            f"moeflow: load {mf['load_s']:.2f} s, peak RSS {mf['peak_rss_bytes'] / 1e9:.2f} GB "
            f"(file {size / 1e9:.2f} GB; {held})"
        )
    if peer is not None:
        rss = f"peak RSS {peer.peak_rss_bytes / 1e9:.2f} GB" if peer.peak_rss_bytes else ""
        lines.append(
            f"llama.cpp (llama-batched-bench): {rss} {peer.note}".rstrip()
            + " (its defaults: the file mapped, weight repacking on: repacked tensors are copies "
            "in its own memory)"
        )
    head = (
        f"{'streams':>7} {'moeflow pp':>11} {'llama pp':>9} {'ratio':>6} {'moeflow tg':>11} "
        f"{'llama tg':>9} {'ratio':>6} {'experts/step':>12} {'roofline tg':>11} "
        f"{'roofline pp':>11}"
    )
    lines += ["", "tok/s (pp: prefill, tg: decode)", head, "-" * len(head)]
    for s in streams:
        run = mf_runs.get(str(s), {})
        pp, tg = run.get("prefill_tok_s"), run.get("decode_tok_s")
        lpp = peer.prefill_tok_s.get(s) if peer else None
        ltg = peer.decode_tok_s.get(s) if peer else None
        touched = run.get("experts_touched_per_step")
        roof = _roofline(mf, s, touched, bandwidth) if mf_runs else None
        roof_pp = compute["roofline_tok_s"] if compute else None
        lines.append(
            f"{s:>7} {_f(pp):>11} {_f(lpp):>9} {_r(pp, lpp):>6} {_f(tg):>11} {_f(ltg):>9} "
            f"{_r(tg, ltg):>6} {_f(touched):>12} {_f(roof):>11} {_f(roof_pp):>11}"
        )
    lines.append(
        f"memory bandwidth {bandwidth / 1e9:.2f} GB/s (measured copy); roofline tg = S tokens "
        "per step / (bytes a step reads / bandwidth): dense weights as held + the experts "
        "touched + KV at the mean context"
    )
    if compute:
        rates = compute["macs_per_s"]
        tile = _TILE_INSTRUCTIONS.get(compute["isa"], compute["isa"])
        dp = rates.get("vpdpbusd")
        lines.append(
            f"int8 multiply-adds {rates['tile'] / 1e9:.0f} G/s ({tile}, the int8 kernels' "
            f"products, {compute['threads']} threads"
            + (f"; vpdpbusd alone {dp / 1e9:.0f} G/s" if dp else "")
            + f"); roofline pp = that rate / {compute['macs_per_token'] / 1e6:.1f} M "
            "multiply-adds a prompt token needs"
        )
    return "\n".join(lines)


# the instructions of the int8 register tile (kernels/csrc/gemm_i8.h) per ISA
_TILE_INSTRUCTIONS = {
    "avx512": "vpmaddubsw + vpdpwssd",
    "avx2": "vpmaddubsw + vpmaddwd + vpaddd",
}


def _roofline(mf: dict[str, Any], s: int, touched: float | None, bandwidth: float) -> float:
    w = mf["weights"]
    per_expert = sum(mf["expert_bytes"]) / max(len(mf["expert_bytes"]), 1)
    layers = len(mf["expert_bytes"])
    expert_read = (touched or 0.0) * per_expert * layers
    ctx = mf["mean_context"]
    step_bytes = w["other"] + expert_read + s * ctx * mf["kv_bytes_per_token"]
    return s * bandwidth / step_bytes


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _r(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"
