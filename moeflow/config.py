"""EngineArgs (the user's knobs as given), EngineConfig (the same, frozen once "auto" is resolved
from plain numbers) and ModelConfig (one normalised view of an HF config.json or of GGUF metadata
converted to the same keys). Leaf module: no device queries here (engine/factory.py makes them)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from moeflow.errors import ModelFormatError


@dataclass(frozen=True)
class ModelConfig:
    """Fields every family reads; family-only fields stay in `hf`, read by the family file."""

    architecture: str  # HF architectures[0], the registry key
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    hidden_act: str
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None  # dtype the checkpoint was saved in ("bfloat16", ...)
    hf: dict[str, Any] = field(repr=False, compare=False)
    num_experts: int = 0  # routed experts per MoE layer (0: dense); HF spells it three ways
    num_experts_per_tok: int = 0

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Normalise an HF config dict. Missing required keys are a ModelFormatError."""
        if not isinstance(hf, dict):
            raise ModelFormatError("config.json must hold a JSON object")
        text = hf.get("text_config")
        if isinstance(text, dict) and "hidden_size" not in hf:
            hf = {**text, "architectures": hf.get("architectures")}
        archs = hf.get("architectures") or []
        model_type = str(hf.get("model_type", ""))
        if not archs or not isinstance(archs, list):
            raise ModelFormatError("config.json has no 'architectures' list")
        try:
            hidden = _pos_int(hf, "hidden_size")
            heads = _pos_int(hf, "num_attention_heads")
            kv_heads = int(hf.get("num_key_value_heads") or heads)
            head_dim = int(hf.get("head_dim") or hidden // heads)
            eos = hf.get("eos_token_id")
            eos_ids = (
                tuple(int(e) for e in eos)
                if isinstance(eos, list)
                else ((int(eos),) if eos is not None else ())
            )
            rope_theta = hf.get("rope_theta")
            rope_params = hf.get("rope_parameters")  # transformers >= 5 nests rope settings here
            rope_scaling = hf.get("rope_scaling")
            if isinstance(rope_params, dict):
                rope_theta = rope_theta or rope_params.get("rope_theta")
                if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
                    rope_scaling = rope_params
            cfg = cls(
                architecture=str(archs[0]),
                model_type=model_type,
                vocab_size=_pos_int(hf, "vocab_size"),
                hidden_size=hidden,
                intermediate_size=int(hf.get("intermediate_size") or 0),
                num_hidden_layers=_pos_int(hf, "num_hidden_layers"),
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                head_dim=head_dim,
                max_position_embeddings=int(hf.get("max_position_embeddings") or 4096),
                rms_norm_eps=float(hf.get("rms_norm_eps") or 1e-6),
                rope_theta=float(rope_theta or 10000.0),
                rope_scaling=rope_scaling if isinstance(rope_scaling, dict) else None,
                hidden_act=str(hf.get("hidden_act") or "silu"),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
                bos_token_id=_opt_int(hf.get("bos_token_id")),
                eos_token_ids=eos_ids,
                torch_dtype=hf.get("torch_dtype") or hf.get("dtype"),
                hf=hf,
                num_experts=int(
                    hf.get("num_experts")
                    or hf.get("num_local_experts")
                    or hf.get("n_routed_experts")
                    or 0
                ),
                num_experts_per_tok=int(hf.get("num_experts_per_tok") or 0),
            )
        except (TypeError, ValueError) as e:
            raise ModelFormatError(f"config.json has a malformed field: {e}") from e
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ModelFormatError(
                f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        return cfg


# KV cache tokens on a device without a free-memory figure (a CPU): at least one full context.
CPU_KV_CACHE_TOKENS = 16384
# max_model_len when the user gives none: the model's context, capped.
DEFAULT_MAX_MODEL_LEN = 8192


@dataclass(frozen=True)
class EngineArgs:
    """The user's knobs as given (vLLM's EngineArgs): "auto" and None are resolved when the
    engine is built (engine/factory.py build_engine)."""

    model: str | None = None  # None: the embedded SmolLM2; a folder; a .gguf; org/name; preset:
    tokenizer: str | None = None  # a HF tokenizer folder instead of the model's own tokenizer
    dtype: str = "auto"  # compute dtype: float32 | bfloat16 | float16 | auto
    device: str = "auto"  # cpu | cuda | cuda:N | auto
    max_model_len: int | None = None  # None: the model's context, at most DEFAULT_MAX_MODEL_LEN
    kv_cache_tokens: int | None = None  # None: CPU_KV_CACHE_TOKENS, or what a GPU's memory holds
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    seed: int = 0
    hf_overrides: dict[str, Any] | None = None  # config.json changes of a preset
    quantize: str | None = None  # q8_0 | q4_0 | q4_k: quantise linear layers + experts on load
    # False (--no-mmap, llama.cpp's): GGUF blocks are read into the process's own memory on load
    # instead of being used in place from the memory-mapped file
    use_mmap: bool = True
    enforce_eager: bool = False
    overlap_schedule: bool | None = None  # None: on for a CUDA device
    chat_template: str | None = None  # a jinja source replacing the checkpoint's template
    # The share of a GPU's memory the engine may hold in all (vLLM's); None: the KV cache takes
    # 0.9 of what the weights leave (loading/memory_plan.py kv_tokens_that_fit).
    gpu_memory_utilization: float | None = None
    # Parallelism (vLLM's names; docs/DISTRIBUTED.md): ranks that split each layer, whether the
    # MoE layers split by expert instead of by expert rows, and the process launcher: "mp" (one
    # process per rank here), "ray" (Ray actors), "external_launcher" (torchrun started every
    # rank); None: "external_launcher" under torchrun, else "mp".
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    # Expert parallelism: the checkpoint expert held in each physical slot, per MoE layer in
    # model order (distributed/eplb.py rebalance_experts makes one from routing statistics).
    expert_placement: list[list[int]] | None = None

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.data_parallel_size

    def check_parallel(self) -> None:
        """Bad parallel settings fail before any process starts."""
        if self.tensor_parallel_size < 1 or self.data_parallel_size < 1:
            raise ValueError("tensor_parallel_size and data_parallel_size must be >= 1")
        backend = self.distributed_executor_backend
        if backend not in (None, *EXECUTOR_BACKENDS):
            raise ValueError(
                f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS}, got {backend!r}"
            )


EXECUTOR_BACKENDS = ("mp", "ray", "external_launcher")


@dataclass(frozen=True)
class EngineConfig:
    """What the user chose, with every "auto" resolved before freezing (resolve())."""

    model: str  # a folder, a .gguf file, or "preset:<name>"
    device: str = "cpu"
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
    max_model_len: int = 2048
    block_size: int = 16  # tokens per KV block
    kv_cache_tokens: int = 32768  # total tokens the paged KV cache holds
    max_num_seqs: int = 64  # running sequences at most
    max_num_batched_tokens: int = 2048  # per-step token budget (chunked prefill)
    enable_prefix_caching: bool = True
    seed: int = 0
    enforce_eager: bool = False  # never capture CUDA graphs for decode
    # Launch step N+1 before reading step N's sampled ids (engine/llm_engine.py step()); on by
    # default for CUDA devices (resolve()).
    overlap_schedule: bool = False

    @classmethod
    def resolve(
        cls,
        args: EngineArgs,
        *,
        model: str,
        device: str,
        dtype: str,
        model_max_len: int,
        kv_tokens_that_fit: int | None,
    ) -> EngineConfig:
        """`args` with "auto" resolved, from what the factory chose and measured: `device` and
        `dtype`, the model's context `model_max_len`, and `kv_tokens_that_fit`, the KV tokens a
        GPU's free memory holds (None off a GPU; never fewer than one full context is used:
        too little memory then fails when the engine allocates the cache)."""
        u = args.gpu_memory_utilization
        if u is not None and not 0 < u <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {u}")
        max_model_len = args.max_model_len
        if max_model_len is None:
            max_model_len = min(model_max_len, DEFAULT_MAX_MODEL_LEN)
        elif max_model_len > model_max_len:
            raise ValueError(
                f"max_model_len {max_model_len} exceeds the model's context {model_max_len}"
            )
        kv_cache_tokens = args.kv_cache_tokens
        if kv_cache_tokens is None:
            fit = CPU_KV_CACHE_TOKENS if kv_tokens_that_fit is None else kv_tokens_that_fit
            kv_cache_tokens = max(max_model_len, fit)
        if kv_cache_tokens < max_model_len:
            raise ValueError(
                f"kv_cache_tokens {kv_cache_tokens} cannot hold one sequence of max_model_len "
                f"{max_model_len}; raise kv_cache_tokens or lower max_model_len"
            )
        overlap = args.overlap_schedule
        return cls(
            model=model,
            device=device,
            dtype=dtype,
            max_model_len=max_model_len,
            block_size=args.block_size,
            kv_cache_tokens=kv_cache_tokens,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=args.enable_prefix_caching,
            seed=args.seed,
            enforce_eager=args.enforce_eager,
            overlap_schedule=device.startswith("cuda") if overlap is None else overlap,
        )

    @property
    def num_kv_blocks(self) -> int:
        """Blocks the block manager hands out to sequences."""
        return max(1, math.ceil(self.kv_cache_tokens / self.block_size))

    @property
    def sink_block(self) -> int:
        """NOTE: the KV cache holds one block more than the block manager hands out. The rows
        that pad a decode batch up to its CUDA graph's size write their K/V into this block
        (engine/cuda_graph.py), so they never touch a live sequence's cache. LLMEngine allocates
        `num_cache_blocks` itself, so no engine exists without it."""
        return self.num_kv_blocks

    @property
    def num_cache_blocks(self) -> int:
        """Blocks the KV cache allocates: the block manager's and the sink."""
        return self.num_kv_blocks + 1


def _pos_int(hf: dict[str, Any], key: str) -> int:
    if key not in hf:
        raise ModelFormatError(f"config.json lacks '{key}'")
    value = int(hf[key])
    if value <= 0:
        raise ModelFormatError(f"config.json '{key}' must be positive, got {value}")
    return value


def _opt_int(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None else int(value)
