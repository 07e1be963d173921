"""EngineConfig (the user's knobs, frozen once "auto" is resolved) and ModelConfig (one normalised
view of an HF config.json or of GGUF metadata converted to the same keys). Leaf module."""

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


@dataclass(frozen=True)
class EngineConfig:
    """What the user chose, with every "auto" resolved before freezing."""

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
    # Launch step N+1 before reading step N's sampled ids (engine/llm_engine.py step()); the
    # offline API and CLI turn it on for CUDA devices.
    overlap_schedule: bool = False

    @property
    def sink_block(self) -> int:
        """The KV block past the block manager's, where padding rows of graph batches write."""
        return self.num_kv_blocks

    @property
    def num_kv_blocks(self) -> int:
        return max(1, math.ceil(self.kv_cache_tokens / self.block_size))


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
