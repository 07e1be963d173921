"""`moeflow info`: the config, parameter counts and the memory plan, computed from the module as
the loader would build it, on the meta device from the checkpoint's headers (never from a table
of known models, never by loading the weights). No timing here; bench/default.py measures speed."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from torch import nn

from moeflow.config import ModelConfig
from moeflow.loading.memory_plan import MemoryPlan

_LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# HF config keys for routed experts: (experts per token, experts in all), first hit wins.


@dataclass(frozen=True)
class ParamCounts:
    """Element counts over the module's unique parameters (a tied LM head is counted once)."""

    total: int
    embedding: int  # the input embedding matrix
    lm_head: int  # 0 when tied to the embedding
    per_layer: tuple[int, ...]  # one entry per decoder layer
    attention: int  # every `self_attn` parameter, all layers
    mlp: int  # every `mlp` parameter, all layers (experts, router and shared experts included)
    routed_experts: int  # parameters under `.experts.`, all layers
    active_per_token: int  # total minus the routed experts a token does not visit
    weight_bytes: int  # bytes of all unique parameters as stored (the compute dtype)
    embedding_row_bytes: int  # one row of the input embedding (what a lookup reads)
    is_tied: bool


def count_parameters(model: nn.Module, config: ModelConfig) -> ParamCounts:
    """Walk named_parameters (which skips shared tensors) and bucket every element once. Works
    on a module on the meta device (the memory plan's)."""
    total = embedding = lm_head = attention = mlp = experts = weight_bytes = 0
    per_layer = [0] * config.num_hidden_layers
    embedding_row_bytes = 0
    embedding_ptr = lm_head_ptr = None
    for name, p in model.named_parameters():
        n = math.prod(getattr(p, "logical_shape", p.shape))  # quantised: the weights it holds
        total += n
        weight_bytes += p.numel() * p.element_size()  # quantised: bytes of the blocks
        if name.endswith("embed_tokens.weight"):
            embedding += n
            embedding_ptr = p.data_ptr()
            embedding_row_bytes = p.shape[-1] * p.element_size()
        elif name.startswith("lm_head."):
            lm_head += n
            lm_head_ptr = p.data_ptr()
        m = _LAYER_NAME.search(name)
        if m is None:
            continue
        idx = int(m.group(1))
        if idx < len(per_layer):
            per_layer[idx] += n
        if ".self_attn." in name:
            attention += n
        elif ".mlp." in name:
            mlp += n
            if ".experts." in name:
                experts += n
    # A tied head shares the embedding's storage, so named_parameters never yields it. (On the
    # meta device every data_ptr is 0: there only the first test holds.)
    is_tied = lm_head == 0 or (lm_head_ptr == embedding_ptr and bool(lm_head_ptr))
    top_k, num_experts = _routing(config)
    inactive = experts - experts * top_k // num_experts if num_experts else 0
    return ParamCounts(
        total=total,
        embedding=embedding,
        lm_head=lm_head,
        per_layer=tuple(per_layer),
        attention=attention,
        mlp=mlp,
        routed_experts=experts,
        active_per_token=total - inactive,
        weight_bytes=weight_bytes,
        embedding_row_bytes=embedding_row_bytes,
        is_tied=is_tied,
    )


def decode_weight_bytes(counts: ParamCounts) -> int:
    """Weight bytes one batch-1 decode step reads: every parameter (routed experts scaled by
    top-k / experts), except that an untied input embedding is read one row at a time.

    NOTE: a tied embedding is counted once, as the LM head, which reads all of it."""
    itemsize = counts.weight_bytes / counts.total if counts.total else 0.0
    read = counts.weight_bytes - int((counts.total - counts.active_per_token) * itemsize)
    if not counts.is_tied:
        read -= int(counts.embedding * itemsize) - counts.embedding_row_bytes
    return read


def model_info(plan: MemoryPlan) -> str:
    """A readable report of a model, from its memory plan (nothing loaded): config, parameter
    counts and the plan."""
    cfg = plan.model_config
    counts = count_parameters(plan.model, cfg)
    layers = counts.per_layer
    layer_line = (
        _n(layers[0]) if len(set(layers)) == 1 else f"{_n(min(layers))} .. {_n(max(layers))}"
    )
    top_k, num_experts = _routing(cfg)
    lines = [
        f"model            {plan.source}",
        f"architecture     {cfg.architecture} (model_type {cfg.model_type})",
        f"layers           {cfg.num_hidden_layers}",
        f"hidden           {cfg.hidden_size}",
        f"heads / KV heads {cfg.num_attention_heads} / {cfg.num_key_value_heads}"
        f" (head_dim {cfg.head_dim})",
        f"intermediate     {cfg.intermediate_size}",
        f"vocab            {cfg.vocab_size}",
        f"context          {cfg.max_position_embeddings}"
        f" (max_model_len {plan.engine_config.max_model_len})",
    ]
    if num_experts:
        lines.append(f"experts          {num_experts} routed, top-{top_k}")
    lines += [
        "",
        "parameters",
        f"  total          {_n(counts.total)}",
        f"  embedding      {_n(counts.embedding)}"
        + (" (tied: also the LM head)" if counts.is_tied else ""),
    ]
    if not counts.is_tied:
        lines.append(f"  lm_head        {_n(counts.lm_head)}")
    lines += [
        f"  per layer      {layer_line}",
        f"  attention      {_n(counts.attention)} ({_pct(counts.attention, counts.total)})",
        f"  mlp            {_n(counts.mlp)} ({_pct(counts.mlp, counts.total)})",
        f"  active / token {_n(counts.active_per_token)}",
        "",
        "memory plan (before loading: from the config and the checkpoint's headers)",
        *plan.describe(),
    ]
    return "\n".join(lines)


def _routing(config: ModelConfig) -> tuple[int, int]:
    """(experts per token, routed experts); (0, 0) for a dense model."""
    top_k, num_experts = config.num_experts_per_tok, config.num_experts  # normalised in config.py
    return (top_k, num_experts) if top_k and num_experts else (0, 0)


def _n(count: int) -> str:
    """12,345,678 (12.35M)."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count:,} ({count / scale:.2f}{unit})"
    return f"{count:,}"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"
