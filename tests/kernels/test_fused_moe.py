"""The MoE reference against a dense loop over every token and every chosen expert; the
routers against the plain formulas (softmax top-k, renormalisation, groups, correction bias)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeflow.kernels.fused_moe import fused_moe_ref, select_experts


def _naive(x, w13, w2, weights, ids):  # noqa: ANN001, ANN202
    out = torch.zeros(x.shape, dtype=torch.float64)
    inter = w13.shape[1] // 2
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            h = w13[e].double() @ x[t].double()
            y = w2[e].double() @ (F.silu(h[:inter]) * h[inter:])
            out[t] += float(weights[t, k]) * y
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_ref_matches_naive(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    tokens, hidden, experts, inter, top_k = 13, 32, 8, 16, 3
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) * 0.2).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) * 0.2).to(dtype)
    logits = torch.randn(tokens, experts, generator=g)
    logits[:, 5] = -1e9  # expert 5 never chosen: the reference must skip it cleanly
    weights, ids = select_experts(logits, top_k)
    assert not (ids == 5).any()
    out = fused_moe_ref(x, w13, w2, weights, ids)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.double(), _naive(x, w13, w2, weights, ids), rtol=tol, atol=tol)


def test_softmax_router_with_and_without_renormalisation() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    w, ids = select_experts(logits, 2, renormalize=False)
    probs = logits.softmax(-1)
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(w, probs[:, [1, 2]])
    w, _ = select_experts(logits, 2, renormalize=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(1))


def test_group_limited_sigmoid_router_with_bias() -> None:
    # 8 experts in 4 groups of 2; topk_group 2 keeps the two best groups by top-2 sum.
    logits = torch.tensor([[0.0, 0.1, 5.0, -5.0, 1.0, 1.0, -1.0, 4.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -10.0])
    w, ids = select_experts(
        logits,
        2,
        scoring_func="sigmoid",
        num_expert_group=4,
        topk_group=2,
        correction_bias=bias,
        group_score="top2_sum",
        routed_scaling_factor=2.5,
    )
    scores = logits.sigmoid()
    # Groups {0,1} {2,3} {4,5} {6,7}; top-2 sums with the bias: 1.025, 1.000, 1.462, -8.75.
    # Groups {4,5} and {0,1} remain, so expert 2 (score 0.993) is out with its weak partner,
    # and expert 7 (0.982) is sunk by its bias.
    assert sorted(ids[0].tolist()) == [4, 5]
    chosen = scores[0, ids[0]]
    torch.testing.assert_close(w[0], chosen / chosen.sum() * 2.5)


# HF router class, config class, config kwargs, select_experts kwargs: every family's routing.
_HF_ROUTERS = {
    "mixtral": (
        "mixtral.modeling_mixtral.MixtralTopKRouter",
        "MixtralConfig",
        {"num_local_experts": 8},
        {"renormalize": True},
    ),
    "qwen2_moe": (
        "qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter",
        "Qwen2MoeConfig",
        {"num_experts": 8, "norm_topk_prob": False},
        {"renormalize": False},
    ),
    "qwen3_moe": (
        "qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter",
        "Qwen3MoeConfig",
        {"num_experts": 8, "norm_topk_prob": True},
        {"renormalize": True},
    ),
    "olmoe": (
        "olmoe.modeling_olmoe.OlmoeTopKRouter",
        "OlmoeConfig",
        {"num_experts": 8, "norm_topk_prob": False},
        {"renormalize": False},
    ),
    "deepseek_v2_greedy": (
        "deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter",
        "DeepseekV2Config",
        {"n_routed_experts": 8, "topk_method": "greedy", "routed_scaling_factor": 1.5},
        {"renormalize": False, "routed_scaling_factor": 1.5},
    ),
    "deepseek_v2_grouped": (
        "deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter",
        "DeepseekV2Config",
        {
            "n_routed_experts": 8,
            "topk_method": "group_limited_greedy",
            "n_group": 4,
            "topk_group": 2,
            "routed_scaling_factor": 1.5,
        },
        {
            "renormalize": False,
            "num_expert_group": 4,
            "topk_group": 2,
            "group_score": "max",
            "routed_scaling_factor": 1.5,
        },
    ),
    "deepseek_v3": (
        "deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter",
        "DeepseekV3Config",
        {"n_routed_experts": 8, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5},
        {
            "scoring_func": "sigmoid",
            "renormalize": True,
            "num_expert_group": 4,
            "topk_group": 2,
            "group_score": "top2_sum",
            "group_mask_value": float("-inf"),
            "routed_scaling_factor": 2.5,
        },
    ),
    "glm4_moe": (
        "glm4_moe.modeling_glm4_moe.Glm4MoeTopkRouter",
        "Glm4MoeConfig",
        {"n_routed_experts": 8, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5},
        {
            "scoring_func": "sigmoid",
            "renormalize": True,
            "num_expert_group": 2,
            "topk_group": 1,
            "group_score": "top2_sum",
            "group_mask_value": float("-inf"),
            "routed_scaling_factor": 2.5,
        },
    ),
}


@pytest.mark.parametrize("family", sorted(_HF_ROUTERS))
def test_select_experts_matches_hf_router(family: str) -> None:
    """select_experts on the router logits chooses HF's experts with HF's weights."""
    import importlib

    import transformers

    path, cfg_name, cfg_kwargs, ours = _HF_ROUTERS[family]
    module_name, _, cls_name = path.rpartition(".")
    router_cls = getattr(importlib.import_module(f"transformers.models.{module_name}"), cls_name)
    hidden, top_k = 32, 2
    config = getattr(transformers, cfg_name)(
        hidden_size=hidden, num_experts_per_tok=top_k, **cfg_kwargs
    )
    router = router_cls(config).float()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, hidden, generator=g)
    bias: torch.Tensor | None = None
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g))
        if hasattr(router, "e_score_correction_bias"):
            bias = torch.randn(router.weight.shape[0], generator=g) * 0.3
            router.e_score_correction_bias.copy_(bias)
        _, hf_weights, hf_ids = router(x)
    weights, ids = select_experts(x @ router.weight.T, top_k, correction_bias=bias, **ours)
    # HF's topk may be unsorted: compare (expert, weight) pairs sorted by expert.
    hf_order, order = hf_ids.argsort(dim=-1), ids.argsort(dim=-1)
    assert torch.equal(ids.gather(1, order), hf_ids.gather(1, hf_order))
    torch.testing.assert_close(
        weights.gather(1, order), hf_weights.float().gather(1, hf_order), rtol=1e-6, atol=1e-6
    )
