"""The memory plan: what an engine will hold once its model is loaded (weights, buffers, the KV
cache, working memory), set against the memory available, before any weight is read.

The weight bytes are not estimated from a table: the loader's own steps run on the meta device
over the checkpoint's headers (GGUF tensor infos; safetensors dtypes and shapes; a preset's
config), so every rule of a real load holds here too (which GGUF types stay in their blocks,
merged projections, stacked experts kept as blocks, `--quantize`). A GGUF block used in place is
"mapped" (file-backed page cache), unless `--no-mmap` reads it into memory; everything else is
"allocated". Nothing here reads tensor data.

Rule (check_memory): allocated weights + buffers + KV cache + working memory must fit the memory
available, else InsufficientMemoryError with the numbers, before loading. Mapped blocks need not
fit (the kernel may evict their pages and read them again, as llama.cpp's mmap allows), but a
decode step reads them all, so a warning says when they do not fit beside the rest."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from moeflow import env
from moeflow.config import CPU_KV_CACHE_TOKENS, EngineArgs, EngineConfig, ModelConfig
from moeflow.errors import InsufficientMemoryError
from moeflow.layers.fused_experts import FusedExperts, materialize_experts
from moeflow.loading.loader import build_model, read_model_config
from moeflow.loading.presets import preset_config
from moeflow.loading.quantize import (
    keep_quantized_types,
    quantize_experts,
    quantize_linears,
    repack_linears,
)
from moeflow.loading.source import GGUFFile, HFFolder, ModelSource, Preset
from moeflow.models.base import CausalLM
from moeflow.utils.dtype import dtype_name
from moeflow.weights import fp8, gguf, gguf_hf, safetensors

logger = logging.getLogger("moeflow")

# On a GPU the KV cache takes this share of the memory left after the weights, less a reserve for
# activations and CUDA graphs (vLLM's gpu_memory_utilization, applied to what is left).
GPU_KV_SHARE = 0.9
GPU_RESERVE_BYTES = 2 * 2**30
_MEMINFO = "/proc/meminfo"
_CGROUP = "/sys/fs/cgroup"


@dataclass(frozen=True)
class Available:
    """Bytes the process may still use (None: unknown, no check) and where the figure comes from."""

    bytes: int | None
    source: str

    def holds(self, nbytes: int) -> bool:
        """Whether `nbytes` fit in what is available (always, when that is unknown)."""
        return self.bytes is None or nbytes <= self.bytes


@dataclass(frozen=True, eq=False)
class MemoryPlan:
    """Bytes an engine over `source` will hold, computed before loading (plan_memory)."""

    source: str  # the file or folder; "preset:<name>"
    model_config: ModelConfig
    engine_config: EngineConfig  # "auto" resolved as the engine will (KV blocks, lengths)
    model: CausalLM  # the module as loaded, on the meta device: shapes and dtypes, no data
    weights_allocated: int  # parameters in process memory (floats, copied or quantised blocks)
    weights_mapped: int  # GGUF blocks used in place from the memory-mapped file
    buffers: int  # module buffers (rotary tables, routing counters)
    kv_bytes_per_token: int
    kv_cache: int  # the engine's cache blocks, the sink block included
    kv_sizing: str  # how the number of KV tokens was chosen
    working: int  # a rough bound on one step's activations and logits (not measured)
    available: Available

    @property
    def allocated(self) -> int:
        """What must fit: everything but the mapped blocks."""
        return self.weights_allocated + self.buffers + self.kv_cache + self.working

    @property
    def fits(self) -> bool:
        return self.available.holds(self.allocated)

    @property
    def mapped_fits(self) -> bool:
        """Whether the mapped blocks also stay resident beside the rest."""
        return self.available.holds(self.allocated + self.weights_mapped)

    def describe(self) -> list[str]:
        """The plan as report lines (`moeflow info`)."""
        cfg = self.engine_config
        weights = f"{fmt_bytes(self.weights_allocated)} allocated"
        if self.weights_mapped:
            weights += f" + {fmt_bytes(self.weights_mapped)} mapped from the file (page cache)"
        if not self.fits:
            verdict = "does NOT fit: commands that load it exit before reading weights"
        elif self.mapped_fits:
            verdict = "fits"
        else:
            verdict = (
                "fits, but the mapped blocks do not stay resident beside the rest: decoding "
                "reads pages from disk again (slow)"
            )
        return [
            f"  device / dtype {cfg.device}, {cfg.dtype}",
            f"  weights        {weights}",
            f"  buffers        {fmt_bytes(self.buffers)}",
            f"  KV per token   {fmt_bytes(self.kv_bytes_per_token)} ({self.kv_bytes_per_token} B)",
            f"  KV cache       {cfg.num_kv_blocks} blocks x {cfg.block_size} = "
            f"{cfg.num_kv_blocks * cfg.block_size} tokens (+1 sink block), "
            f"{fmt_bytes(self.kv_cache)}",
            f"                 ({self.kv_sizing})",
            f"  working        ~{fmt_bytes(self.working)} (rough bound: one step of "
            f"{cfg.max_num_batched_tokens} tokens' activations, logits of {cfg.max_num_seqs} "
            "sequences, float32)",
            f"  needs          {fmt_bytes(self.allocated)} allocated"
            + (f" (+ {fmt_bytes(self.weights_mapped)} mapped)" if self.weights_mapped else ""),
            f"  available      {_available_line(self.available)}",
            f"  verdict        {verdict}",
        ]

    def shortfall_message(self) -> str:
        """One line: what does not fit, with the numbers and what to change."""
        cfg = self.engine_config
        mapped = (
            f"; {fmt_bytes(self.weights_mapped)} of GGUF blocks come mapped from the file on top"
            if self.weights_mapped
            else ""
        )
        return (
            f"{self.source} does not fit in memory: it needs {fmt_bytes(self.allocated)} "
            f"(weights {fmt_bytes(self.weights_allocated)}, KV cache {fmt_bytes(self.kv_cache)} "
            f"for {cfg.num_cache_blocks * cfg.block_size} tokens, buffers and working memory "
            f"~{fmt_bytes(self.buffers + self.working)}) but {_available_line(self.available)}"
            f"{mapped}; nothing was loaded. Lower --max-model-len or --kv-cache-tokens, use "
            "--quantize, or set MOEFLOW_SKIP_MEMORY_CHECK=1 to load anyway"
        )


def plan_memory(
    source: ModelSource, device: str, dtype: torch.dtype, args: EngineArgs
) -> MemoryPlan:
    """The plan of an engine built from `args` over `source` on `device` in `dtype` (resolved
    already: engine/factory.py). Reads the config and the checkpoint's headers only; a malformed
    header or a checkpoint that lacks a tensor fails here, as the load would."""
    model_config, net, blocks = _dry_run(source, device, dtype, args)
    # NOTE: `blocks` stay alive while their storages are compared: a freed storage's identity
    # could be reused by a copy made later.
    mapped_storages = {_storage_id(b) for b in blocks}
    allocated = mapped = 0
    for p in net.parameters():  # unique: a tied head is counted once
        nbytes = p.numel() * p.element_size()
        if _storage_id(p) in mapped_storages and args.use_mmap:
            mapped += nbytes
        else:
            allocated += nbytes
    buffers = sum(b.numel() * b.element_size() for b in net.buffers())
    per_token = _kv_bytes_per_token(net, dtype)
    available = available_memory(device)
    fit: int | None = None
    if torch.device(device).type == "cuda" and available.bytes is not None:
        fit = kv_tokens_that_fit(
            available.bytes - allocated - buffers,
            per_token,
            torch.cuda.mem_get_info(torch.device(device))[1],
            args.gpu_memory_utilization,
        )
    engine = EngineConfig.resolve(
        args,
        model=str(source),
        device=device,
        dtype=dtype_name(dtype),
        model_max_len=model_config.max_position_embeddings,
        kv_tokens_that_fit=fit,
    )
    return MemoryPlan(
        source=str(source),
        model_config=model_config,
        engine_config=engine,
        model=net,
        weights_allocated=allocated,
        weights_mapped=mapped,
        buffers=buffers,
        kv_bytes_per_token=per_token,
        kv_cache=engine.num_cache_blocks * engine.block_size * per_token,
        kv_sizing=_kv_sizing(args, engine, fit),
        working=_working_bytes(model_config, net, engine),
        available=available,
    )


def check_memory(plan: MemoryPlan) -> None:
    """Raise InsufficientMemoryError when the plan's allocated bytes exceed the memory available
    (unless MOEFLOW_SKIP_MEMORY_CHECK); warn when mapped blocks will not stay resident."""
    if plan.fits and plan.mapped_fits:
        return
    if not plan.fits and not env.MOEFLOW_SKIP_MEMORY_CHECK:
        raise InsufficientMemoryError(plan.shortfall_message())
    if not plan.fits:
        logger.warning("MOEFLOW_SKIP_MEMORY_CHECK: loading anyway; %s", plan.shortfall_message())
        return
    logger.warning(
        "%s: %s of GGUF blocks mapped from the file do not fit in memory beside the %s the "
        "engine allocates (%s); decoding will read pages from disk again and run slowly",
        plan.source,
        fmt_bytes(plan.weights_mapped),
        fmt_bytes(plan.allocated),
        _available_line(plan.available),
    )


def kv_tokens_that_fit(
    free_bytes: int,
    per_token: int,
    total_bytes: int | None = None,
    gpu_memory_utilization: float | None = None,
) -> int:
    """KV tokens a GPU with `free_bytes` free after the weights holds: GPU_KV_SHARE of them, or
    with `gpu_memory_utilization` (vLLM's meaning: the share of the GPU's `total_bytes` the
    engine may hold in all) what that share leaves beside the memory in use; both less
    GPU_RESERVE_BYTES for activations and graphs."""
    if gpu_memory_utilization is None:
        budget = free_bytes * GPU_KV_SHARE
    else:
        if total_bytes is None:
            raise ValueError("gpu_memory_utilization needs the GPU's total memory")
        budget = gpu_memory_utilization * total_bytes - (total_bytes - free_bytes)
    return int((budget - GPU_RESERVE_BYTES) // max(per_token, 1))


def available_memory(device: str) -> Available:
    """Free memory of a CUDA device; on a CPU, MemAvailable of /proc/meminfo, lowered to what a
    cgroup v2 memory limit leaves (memory.max less the cgroup's working set) when one is set."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
        return Available(free, f"free on {device}")
    best: int | None = None
    notes: list[str] = []
    meminfo = _meminfo_available()
    if meminfo is not None:
        best = meminfo
        notes.append(f"MemAvailable {fmt_bytes(meminfo)}")
    limit = _cgroup_left()
    if limit is not None:
        left, max_bytes, used = limit
        notes.append(f"cgroup memory.max {fmt_bytes(max_bytes)}, {fmt_bytes(used)} in use")
        best = left if best is None else min(best, left)
    return Available(best, "; ".join(notes) or "no /proc/meminfo nor cgroup limit: unchecked")


def fmt_bytes(n: int | float) -> str:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


# ----------------------------------------------------------------------------------------------
# Private helpers


def _dry_run(
    source: ModelSource, device: str, dtype: torch.dtype, args: EngineArgs
) -> tuple[ModelConfig, CausalLM, list[torch.Tensor]]:
    """(config, the module as loaded on the meta device, the raw GGUF blocks a real load would
    map from the file). NOTE: mirrors loader.py load_model step for step; the tests compare
    both."""
    blocks: list[torch.Tensor] = []
    target = _indexed(device)
    # NOTE: the device context is entered inside _OnMeta, so it fills in the device first.
    with _OnMeta(), torch.device(target):
        if isinstance(source, Preset):
            config = ModelConfig.from_hf(preset_config(source.name, args.hf_overrides))
            net = build_model(config, target, dtype)
            materialize_experts(net)
        elif isinstance(source, GGUFFile):
            reader = _HeaderOnlyGGUF(source.path)
            try:
                config = ModelConfig.from_hf(gguf_hf.gguf_to_hf_config(reader))
                net = build_model(config, target, dtype)
                if args.quantize is not None:
                    quantize_experts(net, args.quantize, device)  # as load_model does
                keep = keep_quantized_types(device)
                net.load_weights(gguf_hf.iter_hf_weights(reader, dtype, keep_quantized=keep))
            finally:
                reader.close()
            blocks = reader.blocks
        else:
            assert isinstance(source, HFFolder)
            config, hf = read_model_config(source.path)
            net = build_model(config, target, dtype)
            if args.quantize is not None:
                quantize_experts(net, args.quantize, device)  # as load_model does
            weights: Iterator[tuple[str, torch.Tensor]] = _safetensors_headers(source.path)
            quant = hf.get("quantization_config")
            if isinstance(quant, dict) and quant.get("quant_method") == "fp8":
                block = tuple(quant.get("weight_block_size") or (128, 128))
                weights = fp8.dequantize_fp8_weights(weights, dtype, (int(block[0]), int(block[1])))
            net.load_weights(weights)
        if args.quantize is not None:
            quantize_linears(net, args.quantize, device)
        repack_linears(net)  # as load_model does
    return config, net, blocks


class _OnMeta(TorchFunctionMode):
    """While active, every tensor created with a device lives on the meta device instead (no
    memory, no data). Entered outside a `torch.device(target)` context, which gives every
    factory call its device first, so nothing escapes to real memory, while
    `torch.get_default_device()` still answers the target: a module that records it
    (layers/moe.py FusedExperts) decides as in a real load."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        if kwargs.get("device") is not None:
            kwargs["device"] = "meta"
        if func is torch.cat and set(kwargs) <= {"dim"} and args and _all_meta(args[0]):
            # torch's meta cat goes through torch._refs, whose first use imports torch._dynamo
            # (seconds): the shape is plain arithmetic
            return _meta_cat(args[0], args[1] if len(args) > 1 else kwargs.get("dim", 0))
        return func(*args, **kwargs)


def _all_meta(tensors: Any) -> bool:
    return (
        isinstance(tensors, (list, tuple))
        and len(tensors) > 0
        and all(isinstance(t, torch.Tensor) and t.is_meta for t in tensors)
        and len({(t.dim(), t.dtype) for t in tensors}) == 1
    )


def _meta_cat(tensors: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat of meta tensors of one dtype and rank, by shape arithmetic."""
    first = tensors[0]
    dim %= first.dim()
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return torch.empty(shape, dtype=first.dtype, device="meta")


class _HeaderOnlyGGUF(gguf.GGUFReader):
    """A GGUFReader whose tensors are meta tensors of the right dtype and size: the header is
    parsed and checked as for a load, no tensor byte is read. `blocks` keeps every raw tensor
    it hands out (a real load's views of the mapped file)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.blocks: list[torch.Tensor] = []

    def raw(self, name: str) -> torch.Tensor:
        blocks = torch.empty(self._info(name).nbytes, dtype=torch.uint8, device="meta")
        self.blocks.append(blocks)
        return blocks

    def load(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(self._info(name).shape, dtype=dtype, device="meta")


def _safetensors_headers(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    """A folder's checkpoint tensors as meta tensors of their stored dtype and shape."""
    for name, dtype, shape in safetensors.iter_folder_headers(folder):
        yield name, torch.empty(shape, dtype=dtype, device="meta")


def _storage_id(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (shared by its views), valid on the meta device too."""
    return t.untyped_storage()._cdata


def _indexed(device: str) -> str:
    """`device` with an index: torch.get_default_device() then answers it without creating a
    tensor (which _OnMeta would put on the meta device)."""
    dev = torch.device(device)
    return str(dev if dev.index is not None else torch.device(dev.type, 0))


def _kv_bytes_per_token(net: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes the KV cache stores per token, all layers. NOTE: engine/kv_cache.py
    kv_bytes_per_token walks the same `cache_bytes_per_token` layers (loading may not import
    the engine)."""
    total = 0
    for m in net.modules():
        per_token: Callable[[torch.dtype], int] | None = getattr(m, "cache_bytes_per_token", None)
        if per_token is not None:
            total += per_token(dtype)
    return total


def _kv_sizing(args: EngineArgs, engine: EngineConfig, fit: int | None) -> str:
    if args.kv_cache_tokens is not None:
        return f"--kv-cache-tokens {args.kv_cache_tokens}"
    if fit is None:
        return (
            f"auto on a CPU: the larger of max_model_len {engine.max_model_len} and "
            f"{CPU_KV_CACHE_TOKENS} tokens"
        )
    if args.gpu_memory_utilization is not None:
        return (
            f"auto on a GPU: --gpu-memory-utilization {args.gpu_memory_utilization} of its "
            f"memory less what is in use after the weights, less {fmt_bytes(GPU_RESERVE_BYTES)}, "
            f"at least max_model_len {engine.max_model_len}; measured again after loading"
        )
    return (
        f"auto on a GPU: {GPU_KV_SHARE:.0%} of the memory the weights leave, less "
        f"{fmt_bytes(GPU_RESERVE_BYTES)}, at least max_model_len {engine.max_model_len}; "
        "measured again after loading"
    )


def _working_bytes(config: ModelConfig, net: torch.nn.Module, engine: EngineConfig) -> int:
    """A rough bound on working memory: one step at the token budget holds a few hidden-size
    rows, the attention projections and the widest MLP (a dense layer, or top-k experts) per
    token, in float32, and the logits and probabilities of every running sequence."""
    h, d = config.hidden_size, config.head_dim
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * d
    ffn = config.intermediate_size
    for m in net.modules():
        if isinstance(m, FusedExperts):
            ffn = max(ffn, m.intermediate_size * max(config.num_experts_per_tok, 1))
    per_token = 4 * h + qkv + 3 * ffn
    logits = 2 * engine.max_num_seqs * config.vocab_size
    return 4 * (engine.max_num_batched_tokens * per_token + logits)


def _available_line(available: Available) -> str:
    if available.bytes is None:
        return f"unknown ({available.source})"
    return f"{fmt_bytes(available.bytes)} is available ({available.source})"


def _meminfo_available() -> int | None:
    try:
        with open(_MEMINFO, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_left() -> tuple[int, int, int] | None:
    """(bytes left, memory.max, working set) of this process's cgroup v2; None when unlimited.
    The working set is memory.current less the inactive page cache of memory.stat (reclaimed
    before the limit bites; cAdvisor's definition)."""
    try:
        with open(os.path.join(_CGROUP, "memory.max"), encoding="ascii") as f:
            raw = f.read().strip()
        if raw == "max":
            return None
        max_bytes = int(raw)
        with open(os.path.join(_CGROUP, "memory.current"), encoding="ascii") as f:
            used = int(f.read().strip())
    except (OSError, ValueError):
        return None
    try:
        with open(os.path.join(_CGROUP, "memory.stat"), encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "inactive_file":
                    used = max(used - int(value), 0)
                    break
    except (OSError, ValueError):
        pass
    return max(max_bytes - used, 0), max_bytes, used
