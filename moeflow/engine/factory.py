"""Builds an LLMEngine from the user's EngineArgs: picks the device and compute dtype ("auto"),
loads the model, measures what a GPU's memory holds for the KV cache and resolves the
EngineConfig. The engine then allocates its KV cache and captures its graphs itself."""

from __future__ import annotations

import torch

from moeflow.config import EngineArgs, EngineConfig
from moeflow.engine.kv_cache import kv_bytes_per_token
from moeflow.engine.llm_engine import LLMEngine
from moeflow.loading.loader import LoadedModel, default_dtype, load_model
from moeflow.loading.source import parse_model_source
from moeflow.utils.dtype import dtype_name, parse_dtype

# On a GPU the KV cache takes this share of the memory left after the weights, less a reserve for
# activations and CUDA graphs (vLLM's gpu_memory_utilization, applied to what is left).
_GPU_KV_SHARE = 0.9
_GPU_RESERVE_BYTES = 2 * 2**30


def build_engine(args: EngineArgs, loaded: LoadedModel | None = None) -> LLMEngine:
    """The engine `args` describe, over `loaded` (loaded here from args.model when None; when
    given, its device and dtype hold and args' loading knobs are not read)."""
    if loaded is None:
        loaded = load(args)
    config = EngineConfig.resolve(
        args,
        model=loaded.path,
        device=loaded.device,
        dtype=dtype_name(loaded.dtype),
        model_max_len=loaded.model_config.max_position_embeddings,
        kv_tokens_that_fit=_kv_tokens_that_fit(loaded),
    )
    return LLMEngine(config, loaded.model, loaded.model_config, loaded.tokenizer)


def load(args: EngineArgs) -> LoadedModel:
    """Parse the model source, resolve "auto" device (CUDA when there is one) and dtype, seed
    torch, then load."""
    source = parse_model_source(args.model)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype
    if dtype == "auto":
        dtype = default_dtype(source, device, args.quantize)
    torch_dtype = parse_dtype(dtype)
    torch.manual_seed(args.seed)
    return load_model(source, device, torch_dtype, args.hf_overrides, args.quantize)


def _kv_tokens_that_fit(loaded: LoadedModel) -> int | None:
    """KV tokens a GPU's free memory holds after the weights; None off a GPU."""
    device = torch.device(loaded.device)
    if device.type != "cuda":
        return None
    per_token = kv_bytes_per_token(loaded.model, loaded.dtype)
    free = torch.cuda.mem_get_info(device)[0]
    return int((free * _GPU_KV_SHARE - _GPU_RESERVE_BYTES) // max(per_token, 1))
