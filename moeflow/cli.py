"""The `moeflow` command: chat | generate | info | bench | serve | router. Argument parsing and
printing only; the work is in api, bench, server and disagg."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from moeflow import env
from moeflow.bench.flags import add_bench_parser
from moeflow.errors import MoeflowError
from moeflow.loading.presets import PRESETS
from moeflow.sampling_params import GENERATION_CONFIG_KEYS, sampling_defaults
from moeflow.server.args import (
    add_router_parser,
    add_serve_parser,
    add_tokenizer_flag,
    generation_defaults,
    with_config_file,
)

if TYPE_CHECKING:
    from moeflow.api import LLM
    from moeflow.config import EngineArgs
    from moeflow.sampling_params import SamplingParams

# `moeflow serve`: how many times (~18 ns each here) an engine OpenMP worker polls at a barrier
# before it sleeps: ~50 us, longer than a decode step's barriers mostly wait on a quiet machine.
# libgomp's default (300,000: ~5 ms) stalls a served model on an oversubscribed machine; its
# throttled count (100: ~2 us, when it manages more threads than CPUs) sleeps at almost every
# barrier. GOMP_SPINCOUNT in the environment wins.
SERVE_GOMP_SPINCOUNT = 3000


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
    sampling = _sampling_parser()
    chat = sub.add_parser(
        "chat",
        parents=[common, sampling],
        help="answer one message, or chat interactively with no message",
        description="With a message: print the answer and exit. Without: an interactive "
        "session that streams tokens and keeps the conversation (Ctrl-D or /exit to leave).",
    )
    chat.add_argument("message", nargs="?", help="the user message")
    chat.add_argument("--system", default=None, help="a system message")
    add_tokenizer_flag(chat)

    gen = sub.add_parser("generate", parents=[common, sampling], help="raw completion of a prompt")
    gen.add_argument("--prompt", required=True)
    add_tokenizer_flag(gen)

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

    add_bench_parser(sub, common)
    add_serve_parser(sub, common)
    add_router_parser(sub)
    return parser


def _common_parser() -> argparse.ArgumentParser:
    """The flags every command takes: the model, its device and dtype, its context."""
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
    common.add_argument(
        "--exact-cpu-activations",
        action="store_true",
        help="the CPU kernels over quantised weights multiply fp32 activations (greedy output "
        "then equals the dequantised fp32 reference's) instead of quantising them to int8 as "
        "llama.cpp does (the default, faster; MOEFLOW_CPU_INT8=0 is the same as this flag)",
    )
    common.add_argument(
        "--no-repack",
        action="store_true",
        help="keep Q4_K weights (MoE experts and linear layers) as the GGUF file stores them "
        "instead of repacking them on load 16 rows side by side for the AVX-512 kernels (as "
        "llama.cpp's --no-repack: faster to load, used in place from the mapping, slower to "
        "run; MOEFLOW_CPU_REPACK=0 is the same as this flag)",
    )
    common.add_argument(
        "--no-mmap",
        dest="use_mmap",
        action="store_false",
        help="read a GGUF file's weights into the process's own memory on load (as llama.cpp's "
        "--no-mmap) instead of using them in place from the memory-mapped file: a slower load, "
        "faster decoding where the page cache reads slowly (some virtual machines)",
    )
    common.add_argument("--max-model-len", type=int, default=None, help="context length")
    common.add_argument(
        "--enforce-eager", action="store_true", help="never capture CUDA graphs for decode"
    )
    common.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="ranks that split every layer (one process each; docs/DISTRIBUTED.md)",
    )
    common.add_argument(
        "--enable-expert-parallel",
        action="store_true",
        help="split the MoE layers by expert over the tensor-parallel ranks (else by rows)",
    )
    common.add_argument(
        "--data-parallel-size",
        "-dp",
        type=int,
        default=1,
        help="model replicas, each its own process(es) with the whole model (or its -tp shard); "
        "one engine spreads requests round-robin over them and runs their pieces of each step "
        "at once; experts are not shared across replicas; prefix caching off (docs/DISTRIBUTED.md)",
    )
    common.add_argument(
        "--distributed-executor-backend",
        choices=["mp", "ray", "external_launcher"],
        default=None,
        help="how the ranks start: mp (processes here), ray (Ray actors, a placement-group "
        "bundle per rank; RAY_ADDRESS joins a cluster, MOEFLOW_RAY_PLACEMENT=STRICT_SPREAD puts "
        "each rank on its own node), external_launcher (torchrun started them); default: "
        "external_launcher under torchrun, else mp",
    )
    common.add_argument(
        "--disable-overlap-schedule",
        action="store_true",
        help="read each step's tokens before launching the next (on a GPU the next step is "
        "launched first, so the host's scheduling hides behind the device's work)",
    )
    return common


def _sampling_parser() -> argparse.ArgumentParser:
    """The sampling flags of the commands that generate in this process (chat, generate)."""
    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--max-tokens", type=int, default=256, help="new tokens at most")
    sampling.add_argument(
        "--temperature", type=float, default=0.0, help="0 is greedy (the default)"
    )
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--top-k", type=int, default=0)
    sampling.add_argument("--seed", type=int, default=None, help="sampling seed")
    return sampling


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = with_config_file(parser, argv)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    args = parser.parse_args(argv)
    if getattr(args, "exact_cpu_activations", False):  # here and in the processes started
        env.MOEFLOW_CPU_INT8 = False
        os.environ["MOEFLOW_CPU_INT8"] = "0"
    if getattr(args, "no_repack", False):
        env.MOEFLOW_CPU_REPACK = False
        os.environ["MOEFLOW_CPU_REPACK"] = "0"
    level = env.MOEFLOW_LOG_LEVEL or ("INFO" if args.command in ("serve", "router") else "WARNING")
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(message)s")
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return 130
    except (MoeflowError, ValueError, OSError) as e:
        if level.upper() == "DEBUG":
            raise
        print(f"moeflow: error: {e}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "router":
        from moeflow.disagg.router import RouterConfig, run_router

        return run_router(
            RouterConfig(args.prefill, args.decode, args.host, args.port, args.timeout)
        )
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
        if args.workload == "json-schema":
            from moeflow.bench.structured import run_structured

            return run_structured(args)
        if args.workload == "serve":
            from moeflow.bench.serving import run_serve_bench

            return run_serve_bench(args)
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
    engine_args = EngineArgs(
        model=args.model,
        tokenizer=getattr(args, "tokenizer", None),  # chat, generate and serve take it
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        quantize=args.quantize,
        use_mmap=args.use_mmap,
        enforce_eager=args.enforce_eager,
        overlap_schedule=False if args.disable_overlap_schedule else None,
        tensor_parallel_size=args.tensor_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        data_parallel_size=args.data_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend,
        **(
            {"kv_cache_tokens": args.kv_cache_tokens, "max_num_seqs": args.max_num_seqs}
            if args.command == "info"
            else {}
        ),
    )
    if args.command == "serve":
        return _serve(args, engine_args)
    if args.command == "info":
        from moeflow.bench.report import model_info
        from moeflow.engine.factory import check_memory, plan

        memory_plan = plan(engine_args)  # reads no weight
        print(model_info(memory_plan))
        check_memory(memory_plan)  # does not fit: the error after the numbers, exit 1
        return 0
    # Bad sampling arguments fail before the model is loaded.
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
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


def _serve(args: argparse.Namespace, engine_args: EngineArgs) -> int:
    # Set before torch loads libgomp, which reads it once (cpu_ext.release_openmp_pool says why).
    os.environ.setdefault("GOMP_SPINCOUNT", str(SERVE_GOMP_SPINCOUNT))
    from moeflow.engine.factory import build_engine
    from moeflow.server.run import serve
    from moeflow.server.serving import ServerConfig
    from moeflow.tokenizer.chat_template import read_chat_template

    if not args.enable_chunked_prefill:
        raise ValueError(
            "--no-enable-chunked-prefill is not supported: moeflow always prefills long prompts "
            "in chunks of --max-num-batched-tokens"
        )
    if args.kv_cache_dtype != "auto":
        raise ValueError(
            f"--kv-cache-dtype {args.kv_cache_dtype} is not supported yet: the KV cache is "
            "stored in the compute dtype (auto)"
        )
    if args.role != "colocated" and args.kv_transfer_addr is None:
        raise ValueError(f"--role {args.role} needs --kv-transfer-addr HOST:PORT")
    model = args.model_tag or args.model  # the positional wins, as in vLLM
    # Bad files and defaults fail before the model is loaded.
    template = None if args.chat_template is None else read_chat_template(args.chat_template)
    defaults = generation_defaults(args.generation_config, model)
    if args.override_generation_config is not None:
        if not isinstance(args.override_generation_config, dict):
            raise ValueError("--override-generation-config must be a JSON object")
        defaults = {**defaults, **args.override_generation_config}
        unknown = set(defaults) - set(GENERATION_CONFIG_KEYS)
        if unknown:
            raise ValueError(
                f"--override-generation-config: unknown keys {sorted(unknown)}; "
                f"known: {', '.join(GENERATION_CONFIG_KEYS)}"
            )
        sampling_defaults(defaults)  # validates
    engine_args = replace(
        engine_args,
        model=model,
        kv_cache_tokens=args.kv_cache_tokens,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        seed=args.seed,
        chat_template=template,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    # The engine loads (and sizes its KV cache) before the server binds: too little memory
    # exits non-zero.
    engine = build_engine(engine_args)
    connector = None
    if args.role != "colocated":
        from moeflow.disagg.connector import attach_kv_connector

        other = "decode" if args.role == "prefill" else "prefill"
        print(f"moeflow: waiting for the {other} instance on {args.kv_transfer_addr}", flush=True)
        connector = attach_kv_connector(
            engine,
            args.role,
            args.kv_transfer_addr,
            connect_timeout_s=args.kv_connect_timeout,
            wait_timeout_s=args.kv_transfer_timeout,
            on_failure=args.kv_transfer_failure,
        )
    config = ServerConfig(
        served_model_name=args.served_model_name
        or os.path.basename(engine.config.model.rstrip("/")),
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_waiting=args.max_waiting,
        reasoning=args.reasoning_parser if args.reasoning_parser in ("auto", "off") else "on",
        default_sampling=defaults,
        allowed_origins=args.allowed_origins,
        price_per_hour=args.price_per_hour,
        tool_call_parser=args.tool_call_parser,
    )
    try:
        return serve(engine, config)
    finally:
        if connector is not None:
            connector.transport.close()


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
