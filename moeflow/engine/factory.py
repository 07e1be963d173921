"""Builds an LLMEngine from the user's EngineArgs: picks the device and compute dtype ("auto"),
checks the memory plan and loads the model, measures what a GPU's memory holds for the KV cache
and resolves the EngineConfig. The engine then allocates its KV cache and captures its graphs
itself."""

from __future__ import annotations

import dataclasses

import torch

from moeflow import env
from moeflow.config import EngineArgs, EngineConfig
from moeflow.distributed.parallel_state import device_of_rank, get_state
from moeflow.engine.executor import current_executor, resolved_device, run_rank, start_executor
from moeflow.engine.kv_cache import kv_bytes_per_token
from moeflow.engine.llm_engine import LLMEngine
from moeflow.loading.loader import LoadedModel, default_dtype, load_model
from moeflow.loading.memory_plan import MemoryPlan, check_memory, kv_tokens_that_fit, plan_memory
from moeflow.loading.source import ModelSource, parse_model_source
from moeflow.utils.dtype import dtype_name, parse_dtype
from moeflow.utils.host_memory import keep_freed_memory


def build_engine(args: EngineArgs, loaded: LoadedModel | None = None) -> LLMEngine:
    """The engine `args` describe, over `loaded` (loaded here from args.model when None; when
    given, its device and dtype hold and args' loading knobs are not read)."""
    if loaded is None:
        loaded = load(args)
    executor = current_executor()
    if executor is not None:
        # SPMD steps: every rank runs the same eager forward (no graphs, no overlap); a cached
        # prefix block lives on one data-parallel replica only (engine/data_parallel.py)
        prefix_caching = args.enable_prefix_caching and args.data_parallel_size == 1
        args = dataclasses.replace(
            args, enforce_eager=True, overlap_schedule=False, enable_prefix_caching=prefix_caching
        )
    config = EngineConfig.resolve(
        args,
        model=loaded.path,
        device=loaded.device,
        dtype=dtype_name(loaded.dtype),
        model_max_len=loaded.model_config.max_position_embeddings,
        kv_tokens_that_fit=_kv_tokens_that_fit(loaded, args.gpu_memory_utilization),
    )
    engine = LLMEngine(config, loaded.model, loaded.model_config, loaded.tokenizer)
    if torch.device(config.device).type == "cpu":
        keep_freed_memory()  # each step's buffers reuse the last step's pages
    if executor is not None:
        executor.start_engine(config.num_cache_blocks, config.block_size, config.dtype)
        engine.runner.executor = executor
    return engine


def load(args: EngineArgs) -> LoadedModel:
    """Parse the model source, resolve "auto" device and dtype, check the memory plan (too
    little memory is an InsufficientMemoryError before any weight is read), seed torch, then
    load; `args.chat_template` replaces the checkpoint's template."""
    args.check_parallel()
    if args.world_size > 1 and get_state() is None:
        _join_group(args)
    state = get_state()
    if state is not None:
        device = device_of_rank(resolved_device(args.device), state.rank)
        args = dataclasses.replace(args, device=device)
    source, device, dtype = _resolve(args)
    if args.gpu_memory_utilization is not None and not device.startswith("cuda"):
        raise ValueError(
            "--gpu-memory-utilization sizes a GPU's KV cache; on a CPU give --kv-cache-tokens"
        )
    check_memory(plan_memory(source, device, dtype, args))
    torch.manual_seed(args.seed)
    loaded = load_model(
        source,
        device,
        dtype,
        args.hf_overrides,
        args.quantize,
        args.tokenizer,
        args.expert_placement,
        args.use_mmap,
    )
    if args.chat_template is not None:
        loaded.tokenizer = loaded.tokenizer.with_chat_template(args.chat_template)
    return loaded


def _join_group(args: EngineArgs) -> None:
    """Rank 0 starts the other ranks and forms the group; a rank torchrun started other than 0
    serves rank 0's steps here and leaves the program when rank 0 stops it."""
    launched = env.torchrun_rank()
    backend = args.distributed_executor_backend
    if launched is not None and launched[0] != 0 and backend in (None, "external_launcher"):
        run_rank(launched[0], args, None)
        raise SystemExit(0)
    start_executor(args)


def shutdown_executor() -> None:
    """Stop this process's parallel group, if it formed one."""
    executor = current_executor()
    if executor is not None:
        executor.shutdown()


def plan(args: EngineArgs) -> MemoryPlan:
    """The memory plan of the engine `args` describe, from the config and headers only."""
    return plan_memory(*_resolve(args), args)


def _resolve(args: EngineArgs) -> tuple[ModelSource, str, torch.dtype]:
    """The model source, the device ("auto": CUDA when there is one) and the compute dtype."""
    source = parse_model_source(args.model)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype
    if dtype == "auto":
        dtype = default_dtype(source, device, args.quantize)
    return source, device, parse_dtype(dtype)


def _kv_tokens_that_fit(loaded: LoadedModel, gpu_memory_utilization: float | None) -> int | None:
    """KV tokens a GPU's free memory holds after the weights; None off a GPU."""
    device = torch.device(loaded.device)
    if device.type != "cuda":
        return None
    per_token = kv_bytes_per_token(loaded.model, loaded.dtype)
    free, total = torch.cuda.mem_get_info(device)
    return kv_tokens_that_fit(free, per_token, total, gpu_memory_utilization)
