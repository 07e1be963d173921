"""Fills a model's parameters from (checkpoint name, tensor) pairs: merged projections, tied
weights, and a check that every parameter was filled. Leaf module (duck-typed on the model)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from torch import nn

from moeflow.errors import ModelFormatError
from moeflow.weights.ggml_quants import QuantizedTensor

logger = logging.getLogger("moeflow")

# Checkpoint tensors that hold nothing the model needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")

# One routed expert's projection in a checkpoint -> (stacked parameter, shard kind): per-expert
# names (`experts.3.gate_proj`, Mixtral's `experts.3.w1`) land in the stacked layers/moe.py
# FusedExperts through the family's `expert_params_mapping` (class data); already stacked
# tensors load whole (transformers 5's in-memory `experts.gate_up_proj`) or as a stacked half of
# w13 (a GGUF file's `experts.gate_proj` / `up_proj`, every expert at once: the shard "gate" or
# "up" without an expert index).
_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")
HF_EXPERT_PARAMS: dict[str, tuple[str, str]] = {
    "gate_proj": ("w13", "gate"),
    "up_proj": ("w13", "up"),
    "down_proj": ("w2", "down"),
}
_STACKED: dict[str, tuple[str, str | None]] = {
    ".experts.gate_up_proj": (".experts.w13", None),
    ".experts.gate_proj": (".experts.w13", "gate"),
    ".experts.up_proj": (".experts.w13", "up"),
    ".experts.down_proj": (".experts.w2", None),
}


def load_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor | QuantizedTensor]],
    packed_modules_mapping: dict[str, tuple[str, str]],
    skip: tuple[str, ...] = (),
    renames: dict[str, str] | None = None,
    expert_params_mapping: dict[str, tuple[str, str]] | None = None,
) -> None:
    """Copy every checkpoint tensor into its parameter; raise ModelFormatError when a parameter
    is left unfilled (every expert slot included) or a tensor has the wrong shape. Unknown names
    are logged and skipped."""
    experts = HF_EXPERT_PARAMS if expert_params_mapping is None else expert_params_mapping
    params = dict(model.named_parameters(remove_duplicate=False))
    expected: set[tuple[str, str | None]] = set()
    for name, _ in model.named_parameters():
        module_name, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        shards = _expected_shards(module, param_name)
        if shards:
            expected.update((name, s) for s in shards)
        else:
            expected.add((name, None))
    loaded: set[tuple[str, str | None]] = set()
    unknown: list[str] = []
    for ckpt_name, tensor in weights:
        if ckpt_name in skip or ckpt_name.endswith(_IGNORED_SUFFIXES):
            continue
        name, shard = _map_name(ckpt_name, packed_modules_mapping, renames or {}, experts)
        if name not in params:
            unknown.append(ckpt_name)
            continue
        module_name, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        loader = getattr(module, "load", None)
        if loader is not None:
            loader(param_name, tensor, shard)
        else:
            param = params[name]
            if isinstance(tensor, QuantizedTensor):  # kept quantised only where a layer asks
                tensor = tensor.dequantize(param.dtype)
            if tuple(param.shape) != tuple(tensor.shape):
                raise ModelFormatError(
                    f"checkpoint tensor {ckpt_name} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(tensor)
        loaded.update((name, s) for s in _filled_shards(module, param_name, shard))
        loaded.add((name, shard))
    if unknown:
        logger.warning("ignored %d checkpoint tensors, e.g. %s", len(unknown), unknown[:3])
    missing = sorted(f"{n}[{s}]" if s else n for n, s in expected - loaded)
    if missing:
        raise ModelFormatError(
            f"checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:4]}"
        )


def _filled_shards(module: nn.Module, param_name: str, shard: str | None) -> list[str]:
    """The shards one loaded tensor fills: all of them for a whole tensor; a stacked shard
    ("gate": every expert's "gate:e") as the module says."""
    if shard is None:
        return _expected_shards(module, param_name)
    expand = getattr(module, "filled_shards", None)
    return list(expand(param_name, shard)) if expand is not None else [shard]


def _expected_shards(module: nn.Module, param_name: str) -> list[str]:
    expected = getattr(module, "expected_shards", None)
    if expected is not None:
        return list(expected(param_name))
    offsets = getattr(module, "shard_offsets", None)
    return list(offsets) if offsets and param_name in ("weight", "bias") else []


def _map_name(
    name: str,
    packed: dict[str, tuple[str, str]],
    renames: dict[str, str],
    experts: dict[str, tuple[str, str]],
) -> tuple[str, str | None]:
    for old, new in renames.items():
        name = name.replace(old, new)
    m = _EXPERT.match(name)
    if m is not None and m["proj"] in experts:
        param, kind = experts[m["proj"]]
        return f"{m['prefix']}.{param}", f"{kind}:{m['e']}"
    for old, (new, stacked_shard) in _STACKED.items():
        if name.endswith(old):
            return name[: -len(old)] + new, stacked_shard
    for ckpt_part, (param_part, shard) in packed.items():
        key = f".{ckpt_part}."
        if key in name:
            return name.replace(key, f".{param_part}."), shard
    return name, None
