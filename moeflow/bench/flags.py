"""`moeflow bench`'s flags, added to the CLI by moeflow/cli.py (which builds the other
commands); the workloads are the other modules here."""

from __future__ import annotations

import argparse


def add_bench_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    bench = sub.add_parser(
        "bench", parents=[common], help="load time, prefill and decode speed beside peers"
    )
    bench.add_argument(
        "--compare",
        default="auto",
        help="peers to run in the same command: comma list of hf, llama-cpp, none, auto "
        "(auto: every installed peer)",
    )
    bench.add_argument("--prompt-len", type=int, default=256, help="prefill prompt length")
    bench.add_argument(
        "--decode-tokens",
        type=int,
        default=None,
        help="decode steps timed (default 128; suite: 256 per batch size)",
    )
    bench.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    bench.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    bench.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="also time this many requests decoding together (total tok/s; < 2: skip)",
    )
    bench.add_argument("--json", default=None, help="also write the results to this file")
    bench.add_argument(
        "--workload",
        choices=[
            "default",
            "moe-scaling",
            "suite",
            "moe-tune",
            "moe-cpu",
            "quality",
            "json-schema",
            "serve",
        ],
        default="default",
        help="default: load/prefill/decode of --model beside peers; moe-scaling: decode cost of "
        "a 64-expert top-2 MoE vs a dense model of equal active size vs all experts; suite: "
        "the GPU workloads of a preset (decode per batch size with MBU, prefill NxL with MFU, "
        "offline throughput) beside HF transformers; moe-tune: time the fused-MoE kernel's "
        "block sizes for --model's expert shapes on this GPU and write the tuning table; "
        "moe-cpu: an MoE GGUF (or preset:<name> written as one) at 1/4/16 streams beside "
        "llama.cpp's llama-batched-bench on the same file, with peak RSS, load and the decode "
        "(bandwidth) and prefill (int8 multiply-add rate) rooflines; "
        "quality: KL divergence and top-1 agreement of the CPU kernels' exact and int8 paths "
        "against an fp32 reference on a fixed text, beside llama-perplexity's KL of the same "
        "GGUF against its F32 copy; json-schema: --concurrency requests decoding together, free "
        "and under a json_schema constraint, and the ratio of their tok/s (target >= 0.9x); "
        "serve: TTFT, inter-token latency and output tok/s at 1 and --concurrency streams of "
        "the offline engine, of `moeflow serve` over HTTP (streamed chat completions) and of "
        "llama.cpp's llama-server on the same GGUF (when found), with the serving overhead and "
        "the ratio to llama-server",
    )
    _add_cpu_flags(bench)
    _add_suite_flags(bench)
    _add_tune_flags(bench)


def _add_cpu_flags(bench: argparse.ArgumentParser) -> None:
    """moe-cpu's and quality's flags."""
    bench.add_argument("--streams", default="1,4,16", help="moe-cpu: stream counts (comma list)")
    bench.add_argument(
        "--passes",
        type=int,
        default=2,
        help="moe-cpu: runs of each stream count, by both engines; the last is reported (the "
        "first meets that shape's buffers unallocated: moeflow's first 4 x 128-token prefill "
        "page-faults ~150 MB of new buffers and reads ~20%% slower); default 2",
    )
    bench.add_argument(
        "--gguf-type",
        default="q4_k_m",
        choices=["q4_k_m", "q8_0", "iq4_xs"],
        help="moe-cpu, quality: the type of the GGUF written for preset:<name>",
    )
    bench.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help="moe-cpu, quality: write preset:<name> with its first N layers only (default: all)",
    )
    bench.add_argument(
        "--text", default=None, help="quality: the text scored (default: the package's own)"
    )
    bench.add_argument(
        "--chunk-len",
        type=int,
        default=512,
        help="quality: tokens per chunk (llama-perplexity's -c); the second half is scored",
    )


def _add_suite_flags(bench: argparse.ArgumentParser) -> None:
    """suite's flags (and the KV cache size every engine-building workload reads)."""
    bench.add_argument(
        "--batch-sizes", default="1,16,64", help="suite: decode batch sizes (comma list)"
    )
    bench.add_argument(
        "--prefill-shapes", default="1x2048,8x2048", help="suite: prefill shapes NxL (comma list)"
    )
    bench.add_argument(
        "--num-requests",
        type=int,
        default=1000,
        help="suite: offline throughput requests (0: skip)",
    )
    bench.add_argument("--plot", default=None, help="suite: write a PNG of tok/s vs batch size")
    bench.add_argument(
        "--hf-overrides",
        default=None,
        help='suite: JSON config changes, e.g. {"num_hidden_layers": 4}',
    )
    bench.add_argument(
        "--max-num-seqs", type=int, default=256, help="suite: running sequences at most"
    )
    bench.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache size in tokens")


def _add_tune_flags(bench: argparse.ArgumentParser) -> None:
    """moe-tune's flags."""
    bench.add_argument(
        "--moe-shape",
        default=None,
        help="moe-tune: E,I,H,K (experts, expert intermediate size, hidden, experts per token) "
        "instead of --model preset:<name>",
    )
    bench.add_argument(
        "--tune-tokens", default=None, help="moe-tune: token counts (default 1,2,4,...,4096)"
    )
    bench.add_argument(
        "--tune-output",
        default=None,
        help="moe-tune: table to write, merged with its other shapes (default: the package's "
        "kernels/configs/fused_moe/<device>.json)",
    )
