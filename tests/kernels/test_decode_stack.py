"""The fused CPU decode step (kernels/decode_stack.py, tried by the engine's runner): its tokens
and log-probabilities are the layer-by-layer path's, for every dense family it takes (q/k/v
bias, per-head q/k norm, sliding window), MoE layers (routed experts kept in blocks) and batched
decode; models it does not fit run layer by layer and say why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow import LLM, SamplingParams, env
from moeflow.bench.gguf_models import bench_gguf
from moeflow.kernels import cpu_ext
from tests.helpers.checkpoints import make_tiny_checkpoint
from tests.helpers.gguf import TINY_QWEN3_MOE

pytestmark = pytest.mark.skipif(
    not cpu_ext.available(), reason=f"CPU kernels: {cpu_ext.unavailable_reason()}"
)

# Three sequences of different lengths decode together (a batch of 3 rows per step).
# NOTE: every LLM here runs without prefix caching, so each run prefills the same rows: a cached
# prefix would leave a shorter prefill, whose GEMMs (torch's, MKL's on AVX-512) may round
# differently.
PROMPTS = [list(range(3, 40)), list(range(50, 60)), list(range(100, 121))]


def _run(llm: LLM, fused: bool) -> list[tuple[list[int], list[float]]]:
    stack = llm.engine.runner.decode_stack
    stack.enabled = fused
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=3, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    assert stack.unfit_reason is None
    assert (stack._stack is not None) == fused  # the fused step really ran (or not)
    stack._stack = None
    return [(o.token_ids, [lp.logprob for lp in o.logprobs or []]) for o in outs]


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("llama", {}),
        ("qwen2", {}),  # q/k/v bias
        ("qwen3", {}),  # per-head q/k RMSNorm
        ("mistral", {"sliding_window": 6}),  # the window cuts every prompt
    ],
)
@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_fused_step_matches_layer_by_layer(
    tmp_path: Path, family: str, overrides: dict, kind: str
) -> None:
    path = make_tiny_checkpoint(family, tmp_path / family, **overrides)
    llm = LLM(
        model=str(path),
        device="cpu",
        kv_cache_tokens=1024,
        quantize=kind,
        enable_prefix_caching=False,
    )
    layered = _run(llm, fused=False)
    fused = _run(llm, fused=True)
    for (ids_a, lp_a), (ids_b, lp_b) in zip(layered, fused, strict=True):
        assert ids_a == ids_b
        torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_b), rtol=0, atol=1e-4)


def test_default_model_fused_step_is_bit_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default model's fused step runs exactly the single ops' arithmetic, with the exact
    GEMV and with MOEFLOW_CPU_INT8's."""
    llm = LLM(device="cpu", max_model_len=2048, kv_cache_tokens=4096, enable_prefix_caching=False)
    exact = _run(llm, fused=True)
    assert exact == _run(llm, fused=False)
    monkeypatch.setattr(env, "MOEFLOW_CPU_INT8", True)
    int8 = _run(llm, fused=True)
    assert int8 == _run(llm, fused=False)
    assert int8 != exact  # the int8 GEMV really ran (its log-probabilities differ)


@pytest.mark.parametrize("ftype", ["q4_k_m", "q8_0"])
@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_moe_fused_step_matches_layer_by_layer(
    ftype: str, int8: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A Qwen3-MoE GGUF (experts kept in the file's blocks; Q4_K_M mixes Q4_K and Q6_K shards in
    one q/k/v projection): the fused step routes and runs the experts as the layer-by-layer path
    does (the same compiled MoE layer) and counts the same routing statistics. (Its per-head q/k
    norm is torch's on the layer-by-layer path: log-probabilities agree to rounding, as for the
    dense Qwen3 above.)"""
    monkeypatch.setattr(env, "MOEFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(env, "MOEFLOW_CPU_INT8", int8)
    path = bench_gguf("tiny-qwen3-moe", TINY_QWEN3_MOE, ftype, num_layers=2)
    llm = LLM(
        model=str(path),
        device="cpu",
        max_model_len=256,
        kv_cache_tokens=1024,
        enable_prefix_caching=False,
    )
    runs = []
    for fused in (False, True):
        llm.engine.enable_routing_stats()
        llm.engine.reset_routing_stats()
        runs.append((_run(llm, fused), llm.engine.routing_stats()))
    (layered, layered_stats), (fused_out, fused_stats) = runs
    for (ids_a, lp_a), (ids_b, lp_b) in zip(layered, fused_out, strict=True):
        assert ids_a == ids_b
        torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_b), rtol=0, atol=1e-4)
    assert layered_stats == fused_stats and sum(fused_stats[0]) > 0


@pytest.mark.parametrize(
    "family",
    [
        "mixtral",  # softmax top-2, sliding-window attention layout
        "glm4_moe",  # sigmoid + correction bias + expert groups, shared experts, partial rotary
        "qwen2_moe",  # a shared expert scaled by sigmoid(x . gate), q/k/v bias
        "olmoe",  # q/k RMSNorm over all heads at once, top-k weights not renormalised
    ],
)
def test_moe_families_fused_step_match_layer_by_layer(tmp_path: Path, family: str) -> None:
    """Safetensors MoE folders under --quantize q8_0 (experts quantised on load) run their MoE
    layers, shared experts and dense layers in the fused step, as layer by layer."""
    # Qwen2-MoE's tiny shared expert (48 wide) would stay float: rows of whole Q8_0 blocks.
    overrides = {"shared_expert_intermediate_size": 64} if family == "qwen2_moe" else {}
    path = make_tiny_checkpoint(family, tmp_path / family, **overrides)
    llm = LLM(
        model=str(path),
        device="cpu",
        kv_cache_tokens=1024,
        quantize="q8_0",
        enable_prefix_caching=False,
    )
    layered = _run(llm, fused=False)
    fused = _run(llm, fused=True)
    for (ids_a, lp_a), (ids_b, lp_b) in zip(layered, fused, strict=True):
        assert ids_a == ids_b
        torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_b), rtol=0, atol=1e-4)


def test_float_shared_expert_gate_in_fused_step(tmp_path: Path) -> None:
    """Qwen2-MoE GGUF files keep the shared-expert gate in float32 (llama.cpp does not quantise
    it): the fused step takes that row as it is, as layer by layer."""
    path = make_tiny_checkpoint("qwen2_moe", tmp_path / "moe", shared_expert_intermediate_size=64)
    llm = LLM(
        model=str(path),
        device="cpu",
        kv_cache_tokens=1024,
        quantize="q8_0",
        enable_prefix_caching=False,
    )
    ops = cpu_ext.ops()
    assert ops is not None
    gates = [m.shared_expert_gate for m in llm.loaded.model.moe_layers()]
    assert gates and all(g is not None and g.qtype is not None for g in gates)
    for g in gates:
        assert g is not None and g.qtype is not None
        w = ops.dequantize(g.weight, g.qtype, g.in_features)  # [1, H] float32
        g.weight = torch.nn.Parameter(w, requires_grad=False)
        g.qtype = None
    layered = _run(llm, fused=False)
    fused = _run(llm, fused=True)
    for (ids_a, lp_a), (ids_b, lp_b) in zip(layered, fused, strict=True):
        assert ids_a == ids_b
        torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_b), rtol=0, atol=1e-4)


def test_float_model_runs_layer_by_layer(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("llama", tmp_path / "llama")
    llm = LLM(model=str(path), dtype="float32", device="cpu", kv_cache_tokens=1024)
    llm.generate([PROMPTS[1]], SamplingParams(max_tokens=3, temperature=0.0))
    stack = llm.engine.runner.decode_stack
    assert stack._stack is None and "not kept quantised" in (stack.unfit_reason or "")


def test_decode_stack_rejects_bad_shapes() -> None:
    ops = cpu_ext.ops()
    assert ops is not None
    cos = torch.ones(16, 8)
    stack = ops.DecodeStack(4, 2, 8, 1e-6, 0.35, cos, cos, torch.ones(32))
    ln = torch.ones(32)
    q8 = 8  # ggml Q8_0: 34 bytes per 32 weights
    qkv = torch.zeros(64, 34, dtype=torch.uint8)
    cache = torch.zeros(4, 16, 2, 8)
    good = {
        "o": torch.zeros(32, 34, dtype=torch.uint8),
        "gate_up": torch.zeros(128, 34, dtype=torch.uint8),
        "down": torch.zeros(32, 68, dtype=torch.uint8),
    }

    def add(qkv_w: torch.Tensor, down: torch.Tensor, k_cache: torch.Tensor) -> None:
        stack.add_layer(
            ln,
            [qkv_w],
            [q8],
            None,
            None,
            None,
            [good["o"]],
            [q8],
            None,
            ln,
            [good["gate_up"]],
            [q8],
            [down],
            [q8],
            k_cache,
            cache,
            0,
        )

    with pytest.raises(RuntimeError, match="qkv rows"):
        add(torch.zeros(60, 34, dtype=torch.uint8), good["down"], cache)
    with pytest.raises(RuntimeError, match="bytes"):
        add(qkv, torch.zeros(32, 34, dtype=torch.uint8), cache)
    with pytest.raises(RuntimeError, match="cache shape"):
        add(qkv, good["down"], torch.zeros(4, 16, 3, 8))
    add(qkv, good["down"], cache)
    assert stack.num_layers() == 1
    hidden = torch.randn(1, 32)
    idx = torch.zeros(1, dtype=torch.int64)
    table, lens = torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="position out of range"):
        stack.forward(hidden, torch.tensor([16]), idx, table, lens, False)
    with pytest.raises(RuntimeError, match="slot out of range"):
        stack.forward(hidden, idx, torch.tensor([64]), table, lens, False)
    out = stack.forward(hidden, idx, idx, table, lens, False)
    assert out.shape == (1, 32) and torch.isfinite(out).all()
