"""`moeflow bench --workload suite`: the workloads of docs/BENCHMARKS.md on a preset (random
weights, real shapes): decode at several batch sizes (ms/step, tok/s, MBU counting the experts
actually touched), prefill N x L (tok/s, MFU) and offline throughput, then the same decode and
prefill through HF transformers in the same command. Writes JSON and a PNG plot of tok/s against
batch size beside the bandwidth roofline. Runs on any device; its limits are a GPU's."""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from moeflow.api import LLM
from moeflow.bench.common import measure_bandwidth, parse_compare, resolve_device, sync
from moeflow.bench.peers import require_bench_extra, skip_reason
from moeflow.bench.plot import plot
from moeflow.bench.report import ParamCounts, count_parameters
from moeflow.config import ModelConfig
from moeflow.engine.kv_cache import kv_bytes_per_token
from moeflow.engine.llm_engine import LLMEngine
from moeflow.loading.presets import preset_config
from moeflow.loading.source import Preset, parse_preset
from moeflow.sampling_params import SamplingParams
from moeflow.utils.dtype import parse_dtype

# Datasheet peaks: (name fragment, memory bytes/s, dense bf16 FLOP/s). H100 SXM / H200 SXM.
_PEAKS = (
    ("H200", 4.8e12, 989e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100", 3.35e12, 989e12),
)
DECODE_PROMPT_LEN = 128
ROUTING_STEPS = 8  # eager steps counting the experts touched, before the timed decode
THROUGHPUT_INPUT = (128, 1024)
THROUGHPUT_OUTPUT = (128, 512)


@dataclass(slots=True)
class DecodeFigure:
    batch: int
    ms_per_step: float
    tok_s: float
    bytes_per_step: int
    experts_touched_per_layer: float | None  # mean distinct experts per MoE layer per step
    mbu: float | None  # against the datasheet peak (None: no peak known for this device)
    mbu_measured: float  # against the measured copy bandwidth
    roofline_tok_s: float | None
    # From the engine's step profile over the timed steps:
    host_overhead_share: float | None = None  # schedule + prepare + post-process / step wall
    host_us_per_step: float | None = None  # the same host work, microseconds per step
    gpu_idle_share: float | None = None  # 1 - GPU time of forward + sampling / wall (GPU only)
    overlap: bool = False  # run with the overlap schedule


@dataclass(slots=True)
class PrefillFigure:
    seqs: int
    seq_len: int
    seconds: float
    tok_s: float
    flops: float
    mfu: float | None


@dataclass(slots=True)
class EngineFigures:
    name: str
    note: str = ""
    decode: list[DecodeFigure] = field(default_factory=list)
    # The smallest decode batch again, with the overlap schedule off (when it was on): the
    # idle gap the overlap closes.
    decode_without_overlap: list[DecodeFigure] = field(default_factory=list)
    prefill: list[PrefillFigure] = field(default_factory=list)
    throughput: dict[str, float] | None = None
    load_s: float | None = None
    graph_capture_s: float | None = None


@dataclass(slots=True)
class _SuiteSpec:
    """What one `--workload suite` run measures, parsed from its arguments."""

    preset: Preset
    device: torch.device
    dtype: str
    overrides: dict[str, Any] | None
    batches: list[int]
    prefills: list[tuple[int, int]]
    steps: int
    peers: list[str]


def run_suite(args: argparse.Namespace) -> int:
    """The `--workload suite` benchmark; 0 on success."""
    spec = _parse_spec(args)
    bw_name, bw_peak, flops_peak = device_peaks(spec.device)
    bandwidth = measure_bandwidth(spec.device)
    print(
        f"device: {bw_name}; measured copy bandwidth {bandwidth / 1e9:.0f} GB/s"
        + (
            f", datasheet {bw_peak / 1e12:.2f} TB/s and {flops_peak / 1e12:.0f} TFLOP/s bf16"
            if bw_peak and flops_peak
            else ""
        )
    )
    mf, counts, config, kv_per_token = _run_moeflow(args, spec, bandwidth, bw_peak, flops_peak)
    results = [mf]
    for _peer in spec.peers:  # only hf so far
        try:
            hf = _run_hf(
                spec.preset,
                spec.overrides,
                spec.dtype,
                spec.device,
                spec.batches,
                spec.prefills,
                spec.steps,
                counts,
                config,
                flops_peak,
            )
        except Exception as e:  # a broken peer must not hide moeflow's figures
            hf = EngineFigures("hf", note=f"failed: {type(e).__name__}: {e}")
            print(f"hf: {hf.note}")
        results.append(hf)
        _free_memory(spec.device)

    print()
    print(_table(results))
    report = {
        "command": " ".join(sys.argv),
        "device": bw_name,
        "torch": torch.__version__,
        "model": args.model,
        "dtype": spec.dtype,
        "params_total": counts.total,
        "params_active_per_token": counts.active_per_token,
        "kv_bytes_per_token": kv_per_token,
        "bandwidth_measured_bytes_per_s": bandwidth,
        "bandwidth_peak_bytes_per_s": bw_peak,
        "flops_peak": flops_peak,
        "results": [asdict(r) for r in results],
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _parse_spec(args: argparse.Namespace) -> _SuiteSpec:
    if not args.model:
        raise ValueError("--workload suite runs a preset: --model preset:<name>")
    preset = parse_preset(args.model)  # a checkpoint's path is no preset's name: ValueError
    device = torch.device(resolve_device(args.device))
    dtype = (
        args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    )
    peers = parse_compare(args.compare)
    if args.compare.strip() == "auto":  # the installed peers that run a preset
        peers = [p for p in peers if p == "hf" and skip_reason(p, args.model) is None]
    if peers not in ([], ["hf"]):
        raise ValueError("--workload suite compares with hf only (or none)")
    if args.decode_tokens < 1:
        raise ValueError("--decode-tokens must be >= 1")
    if args.plot:
        require_bench_extra("--plot", ("matplotlib",))
    return _SuiteSpec(
        preset=preset,
        device=device,
        dtype=dtype,
        overrides=json.loads(args.hf_overrides) if args.hf_overrides else None,
        batches=_int_list(args.batch_sizes),
        prefills=[_shape(s) for s in args.prefill_shapes.split(",") if s],
        steps=args.decode_tokens,
        peers=peers,
    )


def _run_moeflow(
    args: argparse.Namespace,
    spec: _SuiteSpec,
    bandwidth: float,
    bw_peak: float | None,
    flops_peak: float | None,
) -> tuple[EngineFigures, ParamCounts, ModelConfig, int]:
    """moeflow's figures on the preset, and what the peers' figures are compared by."""
    steps, batches, prefills = spec.steps, spec.batches, spec.prefills
    max_len = max(
        [DECODE_PROMPT_LEN + steps + ROUTING_STEPS + 8]
        + [length + 8 for _, length in prefills]
        + ([THROUGHPUT_INPUT[1] + THROUGHPUT_OUTPUT[1] + 8] if args.num_requests else [])
    )
    start = time.perf_counter()
    llm = LLM(
        model=str(spec.preset),
        dtype=spec.dtype,
        device=str(spec.device),
        max_model_len=max_len,
        kv_cache_tokens=args.kv_cache_tokens,
        max_num_seqs=max([*batches, args.max_num_seqs]),
        max_num_batched_tokens=max([2048] + [n * length for n, length in prefills]),
        hf_overrides=spec.overrides,
        enforce_eager=args.enforce_eager,
        overlap_schedule=False if args.disable_overlap_schedule else None,
    )
    mf = EngineFigures("moeflow", note=spec.dtype, load_s=time.perf_counter() - start)
    graphs = llm.engine.runner.graphs
    mf.graph_capture_s = graphs.capture_s if graphs is not None and graphs.graphs else None
    config = llm.loaded.model_config
    counts = count_parameters(llm.loaded.model, config)
    kv_per_token = kv_bytes_per_token(llm.loaded.model, parse_dtype(spec.dtype))
    print(
        f"model: {args.model} ({config.architecture}, {counts.total / 1e9:.2f}B params, "
        f"{counts.active_per_token / 1e9:.2f}B active, {spec.dtype}); load {mf.load_s:.1f} s"
        + (
            f"; {len(graphs.graphs)} decode CUDA graphs captured in {mf.graph_capture_s:.1f} s"
            if graphs is not None and mf.graph_capture_s
            else "; decode eager"
        )
    )
    engine = llm.engine
    rng = random.Random(args.seed or 0)
    vocab = config.vocab_size
    for n, length in prefills:
        mf.prefill.append(_prefill(engine, rng, vocab, n, length, counts, config, flops_peak))
        _print_prefill("moeflow", mf.prefill[-1])
    for b in batches:
        mf.decode.append(
            _decode(engine, rng, vocab, b, steps, counts, kv_per_token, bandwidth, bw_peak)
        )
        _print_decode("moeflow", mf.decode[-1])
    if batches and engine.overlap_schedule:
        engine.overlap_schedule = False
        mf.decode_without_overlap.append(
            _decode(engine, rng, vocab, batches[0], steps, counts, kv_per_token, bandwidth, bw_peak)
        )
        engine.overlap_schedule = True
        _print_decode("moeflow (overlap schedule off)", mf.decode_without_overlap[-1])
    if args.num_requests:
        mf.throughput = _throughput(engine, rng, vocab, args.num_requests)
        t = mf.throughput
        print(
            f"moeflow offline throughput: {args.num_requests} requests in {t['seconds']:.1f} s: "
            f"{t['total_tok_s']:.0f} tok/s in all, {t['output_tok_s']:.0f} output tok/s"
        )
    del llm, engine
    _free_memory(spec.device)
    return mf, counts, config, kv_per_token


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_peaks(device: torch.device) -> tuple[str, float | None, float | None]:
    """(device name, datasheet bandwidth, datasheet bf16 FLOP/s); None where unknown."""
    if device.type != "cuda":
        return "cpu", None, None
    name = torch.cuda.get_device_name(device)
    for fragment, bw, flops in _PEAKS:
        if fragment in name:
            return name, bw, flops
    return name, None, None


def weight_bytes_read(counts: ParamCounts, batch: int, expert_bytes: float) -> int:
    """Weight bytes a decode step of `batch` rows reads: every parameter but the routed experts
    (an untied input embedding only its `batch` rows), plus `expert_bytes` of the experts the
    step touched."""
    itemsize = counts.weight_bytes / counts.total
    dense = counts.weight_bytes - counts.routed_experts * itemsize
    if not counts.is_tied:
        dense -= counts.embedding * itemsize - batch * counts.embedding_row_bytes
    return int(dense + expert_bytes)


# ---- moeflow workloads ---------------------------------------------------------------------


def _decode(
    engine: LLMEngine,
    rng: random.Random,
    vocab: int,
    batch: int,
    steps: int,
    counts: ParamCounts,
    kv_per_token: int,
    bandwidth: float,
    peak: float | None,
) -> DecodeFigure:
    """`batch` requests of DECODE_PROMPT_LEN-token prompts decode together: ROUTING_STEPS eager
    steps count the experts touched, then `steps` timed steps (graphs when captured)."""
    params = SamplingParams(temperature=0.0, max_tokens=1 + ROUTING_STEPS + steps, ignore_eos=True)
    reqs = [
        engine.add_request(_random_ids(rng, vocab, DECODE_PROMPT_LEN), params) for _ in range(batch)
    ]
    while not all(r.output_ids for r in reqs):
        engine.step()
    engine.enable_routing_stats()
    engine.reset_routing_stats()
    for _ in range(ROUTING_STEPS):
        engine.step()
    touched = engine.experts_touched_per_step()
    engine.enable_routing_stats(False)
    sync(engine.device)
    first_step = engine.stats.num_steps
    engine.start_profile()
    start = time.perf_counter()
    while not all(r.is_finished for r in reqs):
        engine.step()
    sync(engine.device)
    elapsed = time.perf_counter() - start
    profile = engine.stop_profile()
    gpu_s = profile.gpu_busy_s()
    step_s = elapsed / (engine.stats.num_steps - first_step)
    layers = engine.moe_layers()
    expert_bytes = sum(t * m.expert_bytes() for t, m in zip(touched, layers, strict=True))
    mean_ctx = DECODE_PROMPT_LEN + 1 + ROUTING_STEPS + steps / 2
    kv = int(batch * mean_ctx * kv_per_token)
    nbytes = weight_bytes_read(counts, batch, expert_bytes) + kv
    return DecodeFigure(
        batch=batch,
        ms_per_step=1000 * step_s,
        tok_s=batch / step_s,
        bytes_per_step=nbytes,
        experts_touched_per_layer=sum(touched) / len(touched) if touched else None,
        mbu=nbytes / step_s / peak if peak else None,
        mbu_measured=nbytes / step_s / bandwidth,
        roofline_tok_s=batch * (peak or bandwidth) / nbytes,
        # over the measured wall of the steps, not the sum of the profiled phases (on the first
        # GPU run the phases summed to ~0.5 ms of an 8.4 ms step: the share read 61% for 4%)
        host_overhead_share=profile.host_overhead_s / elapsed if elapsed > 0 else None,
        host_us_per_step=1e6 * profile.host_overhead_s / profile.steps if profile.steps else None,
        gpu_idle_share=1.0 - gpu_s / elapsed if gpu_s is not None else None,
        overlap=engine.overlap_schedule,
    )


def _prefill(
    engine: LLMEngine,
    rng: random.Random,
    vocab: int,
    n: int,
    length: int,
    counts: ParamCounts,
    config: ModelConfig,
    peak: float | None,
) -> PrefillFigure:
    """n prompts of `length` tokens in one step (after a warm-up of the same shape)."""
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    elapsed = 0.0
    for _ in range(2):  # the first run warms up; the second is timed
        reqs = [engine.add_request(_random_ids(rng, vocab, length), params) for _ in range(n)]
        sync(engine.device)
        start = time.perf_counter()
        while not all(r.is_finished for r in reqs):
            engine.step()
        sync(engine.device)
        elapsed = time.perf_counter() - start
    flops = prefill_flops(counts, config, n, length)
    mfu = flops / elapsed / peak if peak else None
    return PrefillFigure(n, length, elapsed, n * length / elapsed, flops, mfu)


def prefill_flops(counts: ParamCounts, config: ModelConfig, n: int, length: int) -> float:
    """2 x (active matmul params) x tokens, the LM head on the last token of each prompt only,
    plus causal attention (QK^T and PV over half the L x L square, per head and layer)."""
    tokens = n * length
    head = counts.lm_head if not counts.is_tied else counts.embedding
    body = counts.active_per_token - counts.embedding - counts.lm_head
    hf = config.hf
    if "kv_lora_rank" in hf:  # MLA prefill attends decompressed: qk = nope + rope, v
        d_qk = int(hf["qk_nope_head_dim"]) + int(hf["qk_rope_head_dim"])
        d_v = int(hf["v_head_dim"])
    else:
        d_qk = d_v = config.head_dim
    attn = (
        2
        * config.num_attention_heads
        * (d_qk + d_v)
        * (length * (length + 1) / 2)
        * config.num_hidden_layers
        * n
    )
    return 2.0 * body * tokens + 2.0 * head * n + attn


def _throughput(engine: LLMEngine, rng: random.Random, vocab: int, num: int) -> dict[str, float]:
    """`num` requests, input and output lengths uniform in their ranges, all queued at once."""
    reqs = []
    for _ in range(num):
        n_in = rng.randint(*THROUGHPUT_INPUT)
        n_out = rng.randint(*THROUGHPUT_OUTPUT)
        params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
        reqs.append(engine.add_request(_random_ids(rng, vocab, n_in), params))
    sync(engine.device)
    start = time.perf_counter()
    engine.run_to_completion()
    sync(engine.device)
    elapsed = time.perf_counter() - start
    n_out = sum(len(r.output_ids) for r in reqs)
    n_in = sum(len(r.prompt_ids) for r in reqs)
    return {
        "seconds": elapsed,
        "total_tok_s": (n_in + n_out) / elapsed,
        "output_tok_s": n_out / elapsed,
        "input_tokens": n_in,
        "output_tokens": n_out,
    }


# ---- HF transformers, the same preset ------------------------------------------------------------


def _run_hf(
    preset: Preset,
    overrides: dict[str, Any] | None,
    dtype: str,
    device: torch.device,
    batches: list[int],
    prefills: list[tuple[int, int]],
    steps: int,
    counts: ParamCounts,
    config: ModelConfig,
    flops_peak: float | None,
) -> EngineFigures:
    """The preset built by transformers with random weights on the device; prefill as one forward
    of n x L, decode as greedy steps over its own KV cache (model(token, past_key_values))."""
    import transformers

    hf_cfg = dict(preset_config(preset.name, overrides))
    cfg_cls = transformers.AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    start = time.perf_counter()
    with torch.device(device):
        net: Any = transformers.AutoModelForCausalLM.from_config(cfg_cls, dtype=parse_dtype(dtype))
    net.eval()
    fig = EngineFigures(
        "hf",
        note=f"transformers {transformers.__version__}, {dtype}",
        load_s=time.perf_counter() - start,
    )
    rng = random.Random(1)
    vocab = config.vocab_size
    try:
        with torch.inference_mode():
            for n, length in prefills:
                ids = torch.tensor(
                    [_random_ids(rng, vocab, length) for _ in range(n)], device=device
                )
                net(ids[:, :16], use_cache=False, logits_to_keep=1)  # warm-up
                sync(device)
                start = time.perf_counter()
                net(ids, use_cache=False, logits_to_keep=1)
                sync(device)
                elapsed = time.perf_counter() - start
                flops = prefill_flops(counts, config, n, length)
                fig.prefill.append(
                    PrefillFigure(
                        n,
                        length,
                        elapsed,
                        n * length / elapsed,
                        flops,
                        flops / elapsed / flops_peak if flops_peak else None,
                    )
                )
                _print_prefill("hf", fig.prefill[-1])
            for b in batches:
                ids = torch.tensor(
                    [_random_ids(rng, vocab, DECODE_PROMPT_LEN) for _ in range(b)], device=device
                )
                out = net(ids, use_cache=True, logits_to_keep=1)
                past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                for _ in range(2):  # warm-up steps
                    out = net(token, past_key_values=past, use_cache=True)
                    past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                sync(device)
                start = time.perf_counter()
                for _ in range(steps):
                    out = net(token, past_key_values=past, use_cache=True)
                    past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                sync(device)
                step_s = (time.perf_counter() - start) / steps
                del out, past
                fig.decode.append(
                    DecodeFigure(b, 1000 * step_s, b / step_s, 0, None, None, 0.0, None)
                )
                _print_decode("hf", fig.decode[-1])
    finally:
        del net
    fig.note += f", decode timed over {steps} steps"
    return fig


# ---- printing and helpers ------------------------------------------------------------------


def _print_decode(name: str, d: DecodeFigure) -> None:
    extra = ""
    if d.bytes_per_step:
        extra = (
            f", {d.bytes_per_step / 2**30:.2f} GiB/step"
            + (
                f", {d.experts_touched_per_layer:.1f} experts/layer"
                if d.experts_touched_per_layer
                else ""
            )
            + (f", MBU {100 * d.mbu:.1f}%" if d.mbu is not None else "")
            + f" ({100 * d.mbu_measured:.1f}% of measured copy bandwidth)"
        )
    if d.host_overhead_share is not None and d.host_us_per_step is not None:
        extra += (
            f"; host overhead {d.host_us_per_step:.0f} us/step, "
            f"{100 * d.host_overhead_share:.1f}% of the step"
        )
    if d.gpu_idle_share is not None:
        extra += f", GPU idle {100 * d.gpu_idle_share:.1f}%"
    print(f"{name} decode batch {d.batch}: {d.ms_per_step:.2f} ms/step, {d.tok_s:.1f} tok/s{extra}")


def _print_prefill(name: str, p: PrefillFigure) -> None:
    mfu = f", MFU {100 * p.mfu:.1f}%" if p.mfu is not None else ""
    print(
        f"{name} prefill {p.seqs} x {p.seq_len}: {p.seconds * 1000:.1f} ms, "
        f"{p.tok_s:.0f} tok/s{mfu}"
    )


def _table(results: list[EngineFigures]) -> str:
    rows = ["| engine | workload | ms | tok/s | MBU / MFU |", "|---|---|---|---|---|"]
    for r in results:
        for p in r.prefill:
            mfu = f"MFU {100 * p.mfu:.1f}%" if p.mfu is not None else "-"
            rows.append(
                f"| {r.name} | prefill {p.seqs}x{p.seq_len} | {1000 * p.seconds:.1f} | "
                f"{p.tok_s:.0f} | {mfu} |"
            )
        modes = [(d, "") for d in r.decode] + [
            (d, ", no overlap") for d in r.decode_without_overlap
        ]
        for d, mode in modes:
            mbu = f"MBU {100 * d.mbu:.1f}%" if d.mbu is not None else "-"
            rows.append(
                f"| {r.name} | decode bs{d.batch}{mode} | {d.ms_per_step:.2f}/step | "
                f"{d.tok_s:.1f} | {mbu} |"
            )
        if r.throughput:
            t = r.throughput
            rows.append(
                f"| {r.name} | offline throughput | {1000 * t['seconds']:.0f} | "
                f"{t['total_tok_s']:.0f} (output {t['output_tok_s']:.0f}) | - |"
            )
    return "\n".join(rows)


def _random_ids(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def _int_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x]
    if not values or min(values) < 1:
        raise ValueError(f"expected a comma list of positive integers, got {text!r}")
    return values


def _shape(text: str) -> tuple[int, int]:
    n, _, length = text.partition("x")
    if not n.isdigit() or not length.isdigit() or int(n) < 1 or int(length) < 1:
        raise ValueError(f"a prefill shape is NxL (e.g. 8x2048), got {text!r}")
    return int(n), int(length)
