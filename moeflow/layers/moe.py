"""The Mixture-of-Experts layer every MoE family uses: router -> top-k expert ids and weights ->
the chosen experts (stacked weights, run through kernels.fused_moe) -> weighted sum, plus shared
experts. Routing statistics (tokens per expert) accumulate on the device when enabled.

Shape legend: T tokens, H hidden, E experts, I expert intermediate size, K experts per token."""

from __future__ import annotations

import torch
from torch import nn

from moeflow.errors import ModelFormatError
from moeflow.kernels.fused_moe import fused_moe, select_experts
from moeflow.kernels.gemm import linear
from moeflow.layers.linear import Linear, copy_checked
from moeflow.layers.mlp import GatedMLP


class TopKRouter(nn.Module):
    """HF's `mlp.gate`: router weight [E, H] (+ DeepSeek-V3's e_score_correction_bias [E])."""

    def __init__(self, hidden_size: int, num_experts: int, use_correction_bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(num_experts, dtype=torch.float32), requires_grad=False)
            if use_correction_bias
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)  # [T, E]


class FusedExperts(nn.Module):
    """Every routed expert's weights stacked: w13 [E, 2I, H] (gate rows, then up rows) and
    w2 [E, H, I]. Filled from per-expert checkpoint tensors (shard "gate:e", "up:e", "down:e")
    or from already stacked ones."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.w13 = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False
        )
        self.w2 = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False
        )

    def expected_shards(self, param_name: str) -> list[str]:
        kinds = ("gate", "up") if param_name == "w13" else ("down",)
        return [f"{k}:{e}" for e in range(self.num_experts) for k in kinds]

    def load(self, param_name: str, tensor: torch.Tensor, shard: str | None = None) -> None:
        param: torch.Tensor = getattr(self, param_name)
        if shard is None:
            dst = param.data
        else:
            kind, _, expert = shard.partition(":")
            e = int(expert)
            if not 0 <= e < self.num_experts:
                raise ModelFormatError(f"expert {e} out of range ({self.num_experts} experts)")
            i = self.intermediate_size
            dst = {"gate": param.data[e, :i], "up": param.data[e, i:], "down": param.data[e]}[kind]
        copy_checked(dst, tensor, f"{param_name}[{shard}]")


class MoE(nn.Module):
    """A sparse MoE block, [T, H] -> [T, H]. Parameters (HF names, so checkpoints map directly):
    `gate.weight` [E, H] (router), `gate.e_score_correction_bias` [E] (use_correction_bias),
    `experts.w13` [E, 2I, H] / `experts.w2` [E, H, I] (stacked experts), `<shared_prefix>.
    gate_up_proj` / `.down_proj` (shared experts as one MLP) and `shared_expert_gate.weight` [1, H].

    Routing (float32, kernels.fused_moe.select_experts): scores = softmax or sigmoid(router
    logits); experts are chosen on scores (+ correction bias), within the `topk_group` best of
    `num_expert_group` groups when grouped (groups ranked by `group_score`: "max" for DeepSeek-V2,
    "top2_sum" for V3 / GLM; experts of dropped groups get `group_mask_value`); the chosen
    experts' scores (without the bias) are renormalised to sum 1 when `norm_topk_prob`, then
    multiplied by `routed_scaling_factor`. The shared MLP is `shared_intermediate_size` wide, or
    `num_shared_experts * moe_intermediate_size` when only the count is given; qwen2_moe scales it
    by sigmoid(shared_expert_gate(x)).

    Routing statistics (models/base.py MoEStats, read by `LLMEngine.routing_stats()` and
    `LLMEngine.experts_touched_per_step()`): while enabled, tokens per expert add up in
    `expert_counts` [E] and, per forward, whether each expert was touched at all in
    `expert_steps` [E], on the device; `stats_forwards` counts the forwards."""

    def __init__(
        self,
        hidden_size: int,
        moe_intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        scoring_func: str = "softmax",
        norm_topk_prob: bool = True,
        num_expert_group: int = 1,
        topk_group: int = 1,
        group_score: str = "max",
        group_mask_value: float = 0.0,
        use_correction_bias: bool = False,
        routed_scaling_factor: float = 1.0,
        num_shared_experts: int = 0,
        shared_intermediate_size: int = 0,
        shared_expert_gate: bool = False,
        shared_prefix: str = "shared_experts",
        hidden_act: str = "silu",
        layer_idx: int = 0,
    ) -> None:
        super().__init__()
        self.top_k, self.num_experts = top_k, num_experts
        self.scoring_func, self.norm_topk_prob = scoring_func, norm_topk_prob
        self.num_expert_group, self.topk_group = num_expert_group, topk_group
        self.group_score, self.group_mask_value = group_score, group_mask_value
        self.routed_scaling_factor = routed_scaling_factor
        self.hidden_act, self.layer_idx = hidden_act, layer_idx
        self.gate = TopKRouter(hidden_size, num_experts, use_correction_bias)
        self.experts = FusedExperts(num_experts, hidden_size, moe_intermediate_size)
        self.shared_prefix = shared_prefix
        shared_intermediate_size = (
            shared_intermediate_size or num_shared_experts * moe_intermediate_size
        )
        if shared_intermediate_size:
            shared = GatedMLP(hidden_size, shared_intermediate_size, hidden_act)
            setattr(self, shared_prefix, shared)
        self.shared_expert_gate = Linear(hidden_size, 1) if shared_expert_gate else None
        # Routing statistics: tokens routed to each expert since the last reset.
        self.stats_enabled = False
        self.expert_counts: torch.Tensor
        self.register_buffer(
            "expert_counts", torch.zeros(num_experts, dtype=torch.int64), persistent=False
        )
        self.expert_steps: torch.Tensor
        self.register_buffer(
            "expert_steps", torch.zeros(num_experts, dtype=torch.int64), persistent=False
        )
        self.stats_forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_logits = self.gate(x)  # [T, E]
        weights, ids = select_experts(
            router_logits,
            self.top_k,
            self.scoring_func,
            self.norm_topk_prob,
            self.num_expert_group,
            self.topk_group,
            self.gate.e_score_correction_bias,
            self.group_score,
            self.routed_scaling_factor,
            self.group_mask_value,
        )  # [T, K] each
        if self.stats_enabled:  # NOTE: not bincount, which syncs on CUDA to size its output
            flat = ids.reshape(-1)  # [T*K]
            counts = torch.zeros_like(self.expert_counts).index_add_(0, flat, torch.ones_like(flat))
            self.expert_counts += counts
            self.expert_steps += counts > 0
            self.stats_forwards += 1
        out = fused_moe(x, self.experts.w13, self.experts.w2, weights, ids, self.hidden_act)
        shared: nn.Module | None = getattr(self, self.shared_prefix, None)
        if shared is not None:
            s = shared(x)  # [T, H]
            if self.shared_expert_gate is not None:
                s = torch.sigmoid(self.shared_expert_gate(x)) * s
            out = out + s
        return out

    # ---- routing statistics (models/base.py MoEStats) ----------------------------------------
    def enable_stats(self, enabled: bool) -> None:
        self.stats_enabled = enabled

    def reset_stats(self) -> None:
        self.expert_counts.zero_()
        self.expert_steps.zero_()
        self.stats_forwards = 0

    def tokens_per_expert(self) -> list[int]:
        return self.expert_counts.tolist()

    def experts_touched_per_forward(self) -> float:
        return self.expert_steps.sum().item() / max(self.stats_forwards, 1)

    def expert_bytes(self) -> int:
        w13, w2 = self.experts.w13, self.experts.w2  # [E, 2I, H], [E, H, I]
        return (w13[0].numel() + w2[0].numel()) * w13.element_size()
