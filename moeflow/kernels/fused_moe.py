"""Mixture-of-Experts ops: expert selection (the routers of every family) and the expert
computation. The reference runs only the experts at least one token chose, tokens grouped by
expert; the Triton kernels (kernels/triton/fused_moe.py) run behind `fused_moe` (float experts),
the grouped CPU kernel (csrc/moe.h) behind `fused_moe_quantized` (experts in ggml blocks).

Shape legend: T tokens, H hidden, E experts, I expert intermediate size, K experts per token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeflow import env
from moeflow.kernels import cpu_ext
from moeflow.kernels.quant_gemm import dequantize_ref
from moeflow.kernels.triton_utils import use_triton

# The experts' activations, as HF's ACT2FN names them.
_ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"),
}


def select_experts(
    router_logits: torch.Tensor,  # [T, E]
    top_k: int,
    scoring_func: str = "softmax",
    renormalize: bool = True,
    num_expert_group: int = 1,
    topk_group: int = 1,
    correction_bias: torch.Tensor | None = None,  # [E], used to choose experts, not to weigh them
    group_score: str = "max",  # "max" (DeepSeek-V2) or "top2_sum" (DeepSeek-V3 / noaux_tc)
    routed_scaling_factor: float = 1.0,
    group_mask_value: float = 0.0,  # score of experts in dropped groups: 0 (V2) or -inf (V3)
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (weights [T, K] float32, expert ids [T, K] int64), computed in float32."""
    logits = router_logits.float()
    if scoring_func == "softmax":
        scores = logits.softmax(dim=-1)
    elif scoring_func == "sigmoid":
        scores = logits.sigmoid()
    else:
        raise ValueError(f"unknown scoring_func {scoring_func!r}")
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if num_expert_group > 1:
        num_tokens, num_experts = choice.shape
        grouped = choice.view(num_tokens, num_expert_group, -1)  # [T, G, E/G]
        if group_score == "top2_sum":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        else:
            group_scores = grouped.max(dim=-1).values  # [T, G]
        keep = group_scores.topk(topk_group, dim=-1).indices  # [T, topk_group]
        group_mask = torch.zeros_like(group_scores).scatter_(1, keep, 1.0)  # [T, G]
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, num_experts)
        choice = choice.masked_fill(expert_mask == 0, group_mask_value)
    topk_ids = choice.topk(top_k, dim=-1).indices  # [T, K]
    weights = scores.gather(1, topk_ids)  # [T, K]
    if renormalize:
        eps = 1e-20 if scoring_func == "sigmoid" else 0.0  # DeepSeek-V3 / GLM add it
        weights = weights / (weights.sum(dim=-1, keepdim=True) + eps)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights, topk_ids


def fused_moe_ref(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]: gate rows, then up rows
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, K]
    topk_ids: torch.Tensor,  # [T, K]
    act: str = "silu",
) -> torch.Tensor:  # [T, H]
    """Sort the T*K (token, expert) pairs by expert and run each chosen expert once on its tokens.
    NOTE: one host sync (the per-expert counts) per call; fine for a reference."""
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    flat_ids = topk_ids.reshape(-1)  # [T*K]
    order = flat_ids.argsort(stable=True)  # pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    token_of_pair = order // top_k  # [T*K]
    weight_of_pair = topk_weights.reshape(-1)[order]  # [T*K]
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    act_fn = _ACTS.get(act)
    if act_fn is None:
        raise ValueError(f"unsupported expert activation {act!r}; supported: {sorted(_ACTS)}")
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        tokens = token_of_pair[start : start + count]
        h = F.linear(x[tokens], w13[expert])  # [n, 2I]
        gate, up = h.chunk(2, dim=-1)
        y = F.linear(act_fn(gate) * up, w2[expert])  # [n, H]
        out.index_add_(0, tokens, y.float() * weight_of_pair[start : start + count, None])
        start += count
    return out.to(x.dtype)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    act: str = "silu",
) -> torch.Tensor:
    """The dispatch point: the reference unless use_triton(x); else the Triton small-batch
    (matrix-vector) path while T*K fits the config's SMALL_BATCH_MAX_PAIRS, the grouped GEMMs
    beyond. The config is the device's tuning table entry (kernels/configs/fused_moe)."""
    if not use_triton(x):
        return fused_moe_ref(x, w13, w2, topk_weights, topk_ids, act)
    from moeflow.kernels.triton import fused_moe as moe_triton

    num_tokens, hidden = x.shape
    num_experts, _, inter = w2.shape
    top_k = topk_ids.shape[1]
    config = moe_triton.get_moe_config(
        num_experts, inter, hidden, x.dtype, num_tokens, top_k, x.device
    )
    if num_tokens * top_k <= config["SMALL_BATCH_MAX_PAIRS"]:
        return moe_triton.fused_moe_small_batch_triton(
            x, w13, w2, topk_weights, topk_ids, act, config
        )
    return moe_triton.fused_moe_triton(x, w13, w2, topk_weights, topk_ids, act, config)


# ---- routed experts kept in ggml blocks (CPU) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class QuantizedExperts:
    """Every routed expert's projections in ggml blocks, as a GGUF file stacks them: gate and up
    uint8 [E, I, row_bytes(H)], down [E, H, row_bytes(I)], each with its ggml type. The tensors
    may be read-only views of a memory-mapped file."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_type: int
    up_type: int
    down_type: int

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.gate.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.down.shape[1]

    def expert_bytes(self) -> int:
        """Bytes of one expert's three projections (what touching it reads)."""
        return self.gate[0].numel() + self.up[0].numel() + self.down[0].numel()  # uint8

    def dequantize(
        self, experts: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [n, 2I, H], w2 [n, H, I]) of the experts listed in `experts` [n]."""
        h, i = self.hidden_size, self.intermediate_size

        def rows(w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
            return torch.stack([dequantize_ref(w[e], qtype, k) for e in experts.tolist()])

        w13 = torch.cat([rows(self.gate, self.gate_type, h), rows(self.up, self.up_type, h)], 1)
        return w13.to(dtype), rows(self.down, self.down_type, i).to(dtype)


def quantized_experts_supported(
    act: str, hidden_size: int, intermediate_size: int, device: torch.device
) -> bool:
    """Whether the grouped CPU kernel runs experts of this make-up in their blocks here (the
    loader otherwise dequantises them into the stacked float weights)."""
    return (
        device.type == "cpu"
        and act == "silu"
        and hidden_size % 32 == 0
        and intermediate_size % 32 == 0
        and cpu_ext.ops() is not None
    )


def fused_moe_quantized_ref(
    x: torch.Tensor,
    experts: QuantizedExperts,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    act: str = "silu",
) -> torch.Tensor:
    """fused_moe_ref over the dequantised experts that some token chose (fp32)."""
    touched, local_ids = topk_ids.unique(return_inverse=True)  # [n], [T, K]
    w13, w2 = experts.dequantize(touched, torch.float32)
    out = fused_moe_ref(x.float(), w13, w2, topk_weights, local_ids, act)
    return out.to(x.dtype)


def fused_moe_quantized(
    x: torch.Tensor,
    experts: QuantizedExperts,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    act: str = "silu",
) -> torch.Tensor:
    """The dispatch point for experts kept in ggml blocks: the grouped CPU kernel
    (csrc/moe.h: pairs grouped by expert, each touched expert's weight rows multiplied by all
    its tokens; activations in fp32, or quantised to int8 as llama.cpp does with
    MOEFLOW_CPU_INT8=1), else the reference."""
    ops = cpu_ext.ops() if x.device.type == "cpu" else None
    if ops is None or act != "silu":
        return fused_moe_quantized_ref(x, experts, topk_weights, topk_ids, act)
    xf = x.float().contiguous()  # [T, H]
    out = ops.moe_experts(
        xf,
        experts.gate,
        experts.gate_type,
        experts.up,
        experts.up_type,
        experts.down,
        experts.down_type,
        topk_ids.contiguous(),
        topk_weights.float().contiguous(),
        env.MOEFLOW_CPU_INT8,
    )
    return out.to(x.dtype)
