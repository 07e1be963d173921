"""The `moeflow` command: chat | generate | info | bench | serve. Argument parsing and printing
only; the work is in api, bench and server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from moeflow import env
from moeflow.errors import MoeflowError
from moeflow.loading.presets import PRESETS

if TYPE_CHECKING:
    from moeflow.api import LLM
    from moeflow.sampling_params import SamplingParams


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeflow",
        description="Run open-weight MoE and dense language models. With no --model, the "
        "embedded SmolLM2-135M-Instruct (Q4_1 GGUF) is used. Before reading any weight, every "
        "command plans the memory the model will take (weights as held, KV cache, working "
        "memory) and exits 1 with the numbers when it does not fit (`moeflow info` prints the "
        "plan; MOEFLOW_SKIP_MEMORY_CHECK=1 loads anyway).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = _common_parser()
    chat = sub.add_parser(
        "chat",
        parents=[common],
        help="answer one message, or chat interactively with no message",
        description="With a message: print the answer and exit. Without: an interactive "
        "session that streams tokens and keeps the conversation (Ctrl-D or /exit to leave).",
    )
    chat.add_argument("message", nargs="?", help="the user message")
    chat.add_argument("--system", default=None, help="a system message")

    gen = sub.add_parser("generate", parents=[common], help="raw completion of a prompt")
    gen.add_argument("--prompt", required=True)

    info = sub.add_parser(
        "info",
        parents=[common],
        help="model config, parameter counts and memory plan, without loading the weights",
        description="Read the config and the checkpoint's headers only (fast even for a large "
        "GGUF) and print the config, the parameter counts and the memory plan: weights as held "
        "on this device (allocated, or GGUF blocks mapped from the file), buffers, the KV cache "
        "and working memory, against the memory available. Exits 1 when the model does not fit "
        "(every command that loads a model makes the same check before reading weights; "
        "MOEFLOW_SKIP_MEMORY_CHECK=1 loads anyway).",
    )
    info.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache size in tokens")
    info.add_argument("--max-num-seqs", type=int, default=64, help="running sequences at most")

    _add_bench_parser(sub, common)
    _add_serve_parser(sub, common)
    return parser


def _common_parser() -> argparse.ArgumentParser:
    """The flags every command takes: the model, its device and dtype, sampling."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model",
        default=None,
        help="HF folder, .gguf file (any shard of a split set), org/name or org/name-GGUF:QUANT "
        "from the local Hugging Face cache (nothing is downloaded), "
        "or preset:<name> (random weights of a real shape: "
        f"{', '.join(PRESETS)}); default: the embedded SmolLM2",
    )
    common.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    common.add_argument(
        "--dtype",
        default="auto",
        help="float32, bfloat16, float16 or auto (float32 over quantised weights on a CPU with "
        "the compiled kernels, else bfloat16)",
    )
    common.add_argument(
        "--quantize",
        choices=["q8_0", "q4_0", "q4_k"],
        default=None,
        help="quantise the float linear layers and MoE experts on load (CPU kernels; routers "
        "stay float; GGUF files stay as stored)",
    )
    common.add_argument("--max-model-len", type=int, default=None, help="context length")
    common.add_argument(
        "--enforce-eager", action="store_true", help="never capture CUDA graphs for decode"
    )
    common.add_argument(
        "--disable-overlap-schedule",
        action="store_true",
        help="read each step's tokens before launching the next (on a GPU the next step is "
        "launched first, so the host's scheduling hides behind the device's work)",
    )
    common.add_argument("--max-tokens", type=int, default=256, help="new tokens at most")
    common.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    common.add_argument("--top-p", type=float, default=1.0)
    common.add_argument("--top-k", type=int, default=0)
    common.add_argument("--seed", type=int, default=None, help="sampling seed")

    return common


def _add_bench_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
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
    bench.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="also time this many requests decoding together (total tok/s; < 2: skip)",
    )
    bench.add_argument("--json", default=None, help="also write the results to this file")
    bench.add_argument(
        "--workload",
        choices=["default", "moe-scaling", "suite", "moe-tune", "moe-cpu", "quality"],
        default="default",
        help="default: load/prefill/decode of --model beside peers; moe-scaling: decode cost of "
        "a 64-expert top-2 MoE vs a dense model of equal active size vs all experts; suite: "
        "the GPU workloads of a preset (decode per batch size with MBU, prefill NxL with MFU, "
        "offline throughput) beside HF transformers; moe-tune: time the fused-MoE kernel's "
        "block sizes for --model's expert shapes on this GPU and write the tuning table; "
        "moe-cpu: an MoE GGUF (or preset:<name> written as one) at 1/4/16 streams beside "
        "llama.cpp's llama-batched-bench on the same file, with peak RSS, load and roofline; "
        "quality: KL divergence and top-1 agreement of the CPU kernels' exact and int8 paths "
        "against an fp32 reference on a fixed text, beside llama-perplexity's KL of the same "
        "GGUF against its F32 copy",
    )
    bench.add_argument("--streams", default="1,4,16", help="moe-cpu: stream counts (comma list)")
    bench.add_argument(
        "--gguf-type",
        default="q4_k_m",
        choices=["q4_k_m", "q8_0"],
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


def _add_serve_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    serve = sub.add_parser("serve", parents=[common], help="OpenAI-compatible HTTP server")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    serve.add_argument("--served-model-name", default=None, help="the model id clients use")
    serve.add_argument(
        "--max-waiting", type=int, default=256, help="queued requests at most (then 503)"
    )
    serve.add_argument("--max-num-seqs", type=int, default=64, help="running sequences at most")
    serve.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache size in tokens")
    serve.add_argument(
        "--reasoning-parser",
        choices=["auto", "on", "off"],
        default="auto",
        help="split <think>...</think> into reasoning_content (auto: when the vocabulary has "
        "both tags)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=env.MOEFLOW_LOG_LEVEL, format="%(levelname)s %(message)s")
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return 130
    except (MoeflowError, ValueError, OSError) as e:
        if env.MOEFLOW_LOG_LEVEL.upper() == "DEBUG":
            raise
        print(f"moeflow: error: {e}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "bench":
        if args.decode_tokens is None:
            args.decode_tokens = 256 if args.workload == "suite" else 128
        if args.workload == "moe-tune":
            from moeflow.bench.moe_tune import run_moe_tune

            return run_moe_tune(args)
        if args.workload == "quality":
            from moeflow.bench.quality import run_quality

            return run_quality(args)
        if args.workload == "moe-cpu":
            from moeflow.bench.moe_cpu import run_moe_cpu

            return run_moe_cpu(args)
        if args.workload == "suite":
            from moeflow.bench.suite import run_suite

            return run_suite(args)
        if args.workload == "moe-scaling":
            from moeflow.bench.moe_scaling import run_moe_scaling

            return run_moe_scaling(args)
        from moeflow.bench.default import run_bench

        return run_bench(args)
    from moeflow.api import LLM
    from moeflow.config import EngineArgs
    from moeflow.sampling_params import SamplingParams

    if env.MOEFLOW_NUM_THREADS:
        import torch

        torch.set_num_threads(env.MOEFLOW_NUM_THREADS)
    # Bad sampling arguments fail before the model is loaded.
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    serving = args.command in ("serve", "info")
    engine_args = EngineArgs(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        quantize=args.quantize,
        enforce_eager=args.enforce_eager,
        overlap_schedule=False if args.disable_overlap_schedule else None,
        **(
            {"kv_cache_tokens": args.kv_cache_tokens, "max_num_seqs": args.max_num_seqs}
            if serving
            else {}
        ),
    )
    if args.command == "info":
        from moeflow.bench.report import model_info
        from moeflow.engine.factory import check_memory, plan

        memory_plan = plan(engine_args)  # reads no weight
        print(model_info(memory_plan))
        check_memory(memory_plan)  # does not fit: the error after the numbers, exit 1
        return 0
    if serving:
        from moeflow.engine.factory import build_engine
        from moeflow.server.run import serve
        from moeflow.server.serving import ServerConfig

        # The engine loads (and sizes its KV cache) before the server binds: too little memory
        # exits non-zero.
        engine = build_engine(engine_args)
        config = ServerConfig(
            served_model_name=args.served_model_name
            or os.path.basename(engine.config.model.rstrip("/")),
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            max_waiting=args.max_waiting,
            reasoning=args.reasoning_parser,
        )
        return serve(engine, config)
    llm = LLM.from_engine_args(engine_args)
    if args.command == "generate":
        ids = llm.tokenizer.encode(args.prompt, add_special_tokens=True)
        _stream_to_stdout(llm.stream(ids, _fit(llm, ids, params)))
        return 0
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    if args.message is not None:
        messages.append({"role": "user", "content": args.message})
        ids = llm.encode_chat(messages)
        _stream_to_stdout(llm.stream(ids, _fit(llm, ids, params)))
        return 0
    return _interactive(llm, messages, params)


def _fit(llm: LLM, ids: list[int], params: SamplingParams) -> SamplingParams:
    """Clip the CLI's max_tokens to what the context leaves (an error would punish long chats)."""
    room = llm.config.max_model_len - len(ids)
    if room >= 1 and params.max_tokens is not None and params.max_tokens > room:
        return replace(params, max_tokens=room)
    return params


def _stream_to_stdout(deltas: Iterable[str]) -> str:
    out: list[str] = []
    for delta in deltas:
        out.append(delta)
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(out)


def _interactive(llm: LLM, messages: list[dict[str, str]], params: SamplingParams) -> int:
    print("moeflow chat: type a message; /exit or Ctrl-D to leave, /reset to start over.")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = llm.encode_chat(messages)
        if len(ids) >= llm.config.max_model_len:
            print("moeflow: the conversation no longer fits the context; /reset to start over")
            messages.pop()
            continue
        answer = _stream_to_stdout(llm.stream(ids, _fit(llm, ids, params)))
        messages.append({"role": "assistant", "content": answer})


if __name__ == "__main__":
    raise SystemExit(main())
