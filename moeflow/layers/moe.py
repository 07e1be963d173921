"""The Mixture-of-Experts layer every MoE family uses: router -> top-k expert ids and weights ->
the chosen experts (stacked weights, layers/fused_experts.py, run through kernels.fused_moe) ->
weighted sum, plus shared experts. Routing statistics (tokens per expert) accumulate on the
device when enabled.

Parallel experts (distributed/parallel_state.py): with expert parallelism each rank holds E/ep
experts (or the slots an EPLB placement gives it, distributed/eplb.py, hot experts copied on
several ranks); every rank routes every token, runs only the pairs whose expert copy it holds
(layers/moe_ep.py) and the ranks' partial outputs are summed. Without it, tensor parallelism
splits every expert's intermediate size (gate/up rows, down columns). The shared experts are
split like a dense MLP.

Shape legend: T tokens, H hidden, E experts, I expert intermediate size, K experts per token."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from moeflow import env
from moeflow.distributed.comm import all_reduce
from moeflow.distributed.parallel_state import ep_rank_size, tp_rank_size
from moeflow.kernels import cpu_ext
from moeflow.kernels.fused_moe import (
    fused_moe,
    fused_moe_quantized,
    select_experts,
)
from moeflow.kernels.gemm import linear
from moeflow.layers.fused_experts import FusedExperts
from moeflow.layers.linear import (
    Linear,
    split_size,
)
from moeflow.layers.mlp import GatedMLP
from moeflow.layers.moe_ep import ReplicaTables, local_pairs, replica_tables, run_local_experts

logger = logging.getLogger("moeflow")


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

    On the CPU, with the experts kept in ggml blocks and the compiled kernels built, the router
    and the routed experts run as one compiled layer (csrc/moe.h MoeLayer: the same selection in
    float32, ties to the lower index), which the fused decode step (kernels/decode_stack.py) also
    runs; elsewhere `select_experts` and the expert ops run one by one.

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
        self.hidden_size, self.moe_intermediate_size = hidden_size, moe_intermediate_size
        self.tp_rank, self.tp_size = tp_rank_size()
        self.ep_rank, self.ep_size = ep_rank_size()
        # Expert parallelism: the checkpoint expert of every physical slot, the ranks' slots
        # one after the other (distributed/eplb.py); None: expert e in slot e on one rank.
        self.placement: list[int] | None = None
        self.first_slot = 0  # this rank's first physical slot
        self.replica_ids: torch.Tensor  # [E, Rmax] physical slots holding each expert
        self.num_replicas: torch.Tensor  # [E]
        self.register_buffer("replica_ids", torch.zeros(0, dtype=torch.int64), persistent=False)
        self.register_buffer("num_replicas", torch.zeros(0, dtype=torch.int64), persistent=False)
        if self.ep_size > 1:
            per = split_size(num_experts, self.ep_size, "experts")
            self.set_placement(list(range(num_experts)), per * self.ep_rank)
        else:
            tp = (self.tp_rank, self.tp_size)
            self.experts = FusedExperts(
                num_experts, hidden_size, moe_intermediate_size, hidden_act, tp=tp
            )
        self.shared_prefix = shared_prefix
        shared_intermediate_size = (
            shared_intermediate_size or num_shared_experts * moe_intermediate_size
        )
        if shared_intermediate_size:
            # the shared experts' partial sums join the routed experts' before one all-reduce
            shared = GatedMLP(
                hidden_size, shared_intermediate_size, hidden_act, reduce_results=False
            )
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
        self._cpu: tuple[Any, Any] | None = None  # (kernel module, its MoeLayer)

    def set_placement(self, placement: list[int], first_slot: int | None = None) -> None:
        """Hold the experts as `placement` says: physical slot p holds checkpoint expert
        placement[p]; the ep ranks own equal runs of slots, this rank [first_slot, first_slot +
        len / ep). Every expert must have a slot. Called before the weights load (the experts
        are rebuilt on the meta device); a token's pair goes to one copy of its expert, chosen
        by the token's position, so every placement gives the same sums."""
        e, device = self.num_experts, self.gate.weight.device
        tables = replica_tables(placement, e, self.ep_size, device)
        self.replica_ids, self.num_replicas = tables.replica_ids, tables.num_replicas
        per_rank = len(placement) // self.ep_size
        if first_slot is None:
            first_slot = per_rank * self.ep_rank
        self.placement = list(placement)
        self.first_slot = first_slot
        slots = placement[first_slot : first_slot + per_rank]
        tp = (0, 1) if self.ep_size > 1 else (self.tp_rank, self.tp_size)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(self.gate.weight.dtype)  # the model's compute dtype
        try:
            with torch.device(device):
                self.experts = FusedExperts(
                    e, self.hidden_size, self.moe_intermediate_size, self.hidden_act, slots, tp
                )
        finally:
            torch.set_default_dtype(prev)

    def local_experts(
        self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        """Expert parallelism (layers/moe_ep.py): this rank's partial sum [T, H], from the
        pairs routed to its slots only; weights / ids [T, K] are every token's routing."""
        experts = self.experts
        tables = ReplicaTables(self.replica_ids, self.num_replicas)
        pairs = local_pairs(weights, ids, tables, self.first_slot, experts.num_experts)
        quantized = experts.quantized
        w13, w2 = (None, None) if quantized is not None else (experts.w13, experts.w2)
        return run_local_experts(x, pairs, w13, w2, quantized, self.hidden_act)

    def shared_mlp(self) -> GatedMLP | None:
        """The shared experts as one gated MLP (None without them)."""
        shared = getattr(self, self.shared_prefix, None)
        return shared if isinstance(shared, GatedMLP) else None

    def cpu_layer(self, ops: Any) -> Any | None:
        """The compiled router + routed experts (`ops.MoeLayer`) of this layer, built once per
        kernel module, or None where it does not run them: experts not kept in blocks, another
        activation than SiLU, or a router that is not float32 on the CPU."""
        if self._cpu is not None and self._cpu[0] is ops:
            return self._cpu[1]
        q, router, bias = (
            self.experts.quantized,
            self.gate.weight,
            self.gate.e_score_correction_bias,
        )
        floats = [router] if bias is None else [router, bias]
        if (
            ops is None
            or q is None
            or self.placement is not None
            or self.hidden_act != "silu"
            or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in floats)
        ):
            return None
        layer = ops.MoeLayer(
            router.detach().contiguous(),
            None if bias is None else bias.detach().contiguous(),
            self.top_k,
            self.scoring_func,
            self.norm_topk_prob,
            self.num_expert_group,
            self.topk_group,
            self.group_score,
            self.routed_scaling_factor,
            self.group_mask_value,
            q.gate,
            q.gate_type,
            q.up,
            q.up_type,
            q.down,
            q.down_type,
        )
        self._cpu = (ops, layer)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        experts = self.experts
        cpu = self.cpu_layer(cpu_ext.ops()) if x.device.type == "cpu" else None
        if cpu is not None:
            out, ids = cpu.forward(x.float().contiguous(), env.MOEFLOW_CPU_INT8)
            out = out.to(x.dtype)
        else:
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
            if experts.quantized is None and experts.w13.is_meta:
                raise RuntimeError(
                    f"layer {self.layer_idx}: the experts' weights were never loaded"
                )
            if self.placement is not None:
                out = self.local_experts(x, weights, ids)
            elif experts.quantized is not None:
                out = fused_moe_quantized(x, experts.quantized, weights, ids, self.hidden_act)
            else:
                out = fused_moe(x, experts.w13, experts.w2, weights, ids, self.hidden_act)
        if self.stats_enabled:
            self.record_routing(ids)
        shared = self.shared_mlp()
        if shared is not None:
            s = shared(x)  # [T, H]
            if self.shared_expert_gate is not None:
                s = torch.sigmoid(self.shared_expert_gate(x)) * s
            out = out + s
        if self.tp_size > 1:
            out = all_reduce(out)  # the ranks' experts (or expert rows) summed
        return out

    # ---- routing statistics (models/base.py MoEStats) ----------------------------------------
    def enable_stats(self, enabled: bool) -> None:
        self.stats_enabled = enabled

    def record_routing(self, ids: torch.Tensor) -> None:
        """Count one forward's routing, ids [T, K] (when stats are enabled)."""
        flat = ids.reshape(-1)  # [T*K]; NOTE: not bincount, which syncs on CUDA to size its output
        counts = torch.zeros_like(self.expert_counts).index_add_(0, flat, torch.ones_like(flat))
        self.expert_counts += counts
        self.expert_steps += counts > 0
        self.stats_forwards += 1

    def reset_stats(self) -> None:
        self.expert_counts.zero_()
        self.expert_steps.zero_()
        self.stats_forwards = 0

    def tokens_per_expert(self) -> list[int]:
        return self.expert_counts.tolist()

    def experts_touched_per_forward(self) -> float:
        return self.expert_steps.sum().item() / max(self.stats_forwards, 1)

    def expert_bytes(self) -> int:
        if self.experts.quantized is not None:
            return self.experts.quantized.expert_bytes()
        w13, w2 = self.experts.w13, self.experts.w2  # [E, 2I, H], [E, H, I]
        return (w13[0].numel() + w2[0].numel()) * w13.element_size()
