"""The fused CPU decode step (kernels/decode_stack.py, tried by the engine's runner): its tokens
and log-probabilities are the layer-by-layer path's, for every dense family it takes (q/k/v
bias, per-head q/k norm, sliding window), MoE layers (routed experts kept in blocks), DeepSeek's
latent attention and routers, and batched decode; models it does not fit run layer by layer and
say why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow import LLM, SamplingParams, env
from moeflow.bench.gguf_models import bench_gguf
from moeflow.kernels import cpu_ext
from moeflow.layers.moe import MoE
from tests.helpers.checkpoints import (
    DEEPSEEK_COMMON,
    DEEPSEEK_VARIANTS,
    make_tiny_checkpoint,
    write_random_checkpoint,
)
from tests.helpers.gguf import TINY_DEEPSEEK_V2, TINY_DEEPSEEK_V3, TINY_QWEN3_MOE

pytestmark = pytest.mark.skipif(
    not cpu_ext.available(), reason=f"CPU kernels: {cpu_ext.unavailable_reason()}"
)

# Three sequences of different lengths decode together (a batch of 3 rows per step).
# NOTE: every LLM here runs without prefix caching, so each run prefills the same rows: a cached
# prefix would leave a shorter prefill, whose GEMMs (torch's, MKL's on AVX-512) may round
# differently.
PROMPTS = [list(range(3, 40)), list(range(50, 60)), list(range(100, 121))]


def _run(
    llm: LLM, fused: bool, prompts: list[list[int]] = PROMPTS
) -> list[tuple[list[int], list[float]]]:
    stack = llm.engine.runner.decode_stack
    stack.enabled = fused
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=3, ignore_eos=True)
    outs = llm.generate(prompts, params)
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
    # int8: a rounding difference (the q/k norm) can move an activation's int8 value by a step
    atol = 3e-4 if int8 else 1e-4
    for (ids_a, lp_a), (ids_b, lp_b) in zip(layered, fused_out, strict=True):
        assert ids_a == ids_b
        torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_b), rtol=0, atol=atol)
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


def _assert_close(
    a: list[tuple[list[int], list[float]]], b: list[tuple[list[int], list[float]]], atol: float
) -> None:
    for (ids_a, lp_a), (ids_b, lp_b) in zip(a, b, strict=True):
        assert ids_a == ids_b
        torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_b), rtol=0, atol=atol)


# The tiny DeepSeek variants (tests/helpers/checkpoints.py), with a q LoRA rank of whole Q8_0
# blocks where there is one (48 would leave q_b float, which the fused step refuses).
_MLA_VARIANTS = {
    "v2": {},  # q_proj, softmax router over 2 of 4 groups (group max), YaRN, interleaved rope
    "v3": {"q_lora_rank": 64},  # q LoRA, sigmoid + correction bias, top-2-sum groups, renorm
    "v3_yarn": {"q_lora_rank": 64},  # rope on halves (NeoX) with YaRN's scaled tables
}


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("variant", sorted(_MLA_VARIANTS))
def test_mla_fused_step_matches_layer_by_layer(
    variant: str, int8: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """DeepSeek-V2/V3 safetensors folders under --quantize q8_0: latent attention (q with and
    without LoRA, each rope layout, YaRN's softmax scale) writes the latent cache and attends as
    the layer-by-layer path does, the leading dense layer, shared experts and both routers run
    fused, and the routing statistics are the same; each row of the batch decodes as it does
    alone. Both paths run the same compiled ops (layers/mla.py takes csrc/mla.h's op on the CPU
    too), so they agree bit for bit."""
    monkeypatch.setattr(env, "MOEFLOW_CPU_INT8", int8)
    cfg_name, model_name, extra = DEEPSEEK_VARIANTS[variant]
    config = {**DEEPSEEK_COMMON, **extra, **_MLA_VARIANTS[variant]}
    path = write_random_checkpoint(cfg_name, model_name, config, tmp_path / variant, seed=3)
    llm = LLM(
        model=str(path),
        device="cpu",
        kv_cache_tokens=1024,
        quantize="q8_0",
        enable_prefix_caching=False,
    )
    runs = []
    for fused in (False, True):
        llm.engine.enable_routing_stats()
        llm.engine.reset_routing_stats()
        runs.append((_run(llm, fused), llm.engine.routing_stats()))
    (layered, layered_stats), (fused_out, fused_stats) = runs
    assert fused_out == layered  # the same compiled ops, bit for bit
    assert layered_stats == fused_stats and sum(fused_stats[0]) > 0
    if not int8:  # (int8 rounding magnifies the prefill's: torch's GEMMs round per batch)
        solo = [_run(llm, True, [prompt])[0] for prompt in PROMPTS]
        _assert_close(fused_out, solo, 1e-5)  # batched rows == solo rows


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("family", ["deepseek-v2", "deepseek-v3"])
def test_mla_gguf_fused_step_matches_layer_by_layer(
    family: str, int8: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """DeepSeek-V2/V3 GGUF files as llama.cpp's converter lays them out (Q4_K_M: q / q_a / q_b,
    kv_a and o in their blocks, kv_b from the split k_b / v_b halves, which the latent
    attention reads in their blocks, experts in Q4_K / Q6_K): the fused step gives the
    layer-by-layer path's tokens and log-probabilities, bit for bit."""
    monkeypatch.setattr(env, "MOEFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(env, "MOEFLOW_CPU_INT8", int8)
    hf = TINY_DEEPSEEK_V2 if family == "deepseek-v2" else TINY_DEEPSEEK_V3
    path = bench_gguf(f"tiny-{family}", hf, "q4_k_m", num_layers=2)
    llm = LLM(
        model=str(path),
        device="cpu",
        max_model_len=256,
        kv_cache_tokens=1024,
        enable_prefix_caching=False,
    )
    kv_b = [layer.self_attn.kv_b_proj for layer in llm.loaded.model.model.layers]
    assert all(p.quantized_halves() is not None for p in kv_b)
    assert _run(llm, True) == _run(llm, False)


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
    gates = [m.shared_expert_gate for m in llm.loaded.model.moe_layers() if isinstance(m, MoE)]
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


def test_mla_with_float_q_b_runs_layer_by_layer(tmp_path: Path) -> None:
    """A q LoRA rank of 48 is not whole Q8_0 blocks, so --quantize leaves q_b float: the model
    runs layer by layer and says why."""
    cfg_name, model_name, extra = DEEPSEEK_VARIANTS["v3"]
    config = {**DEEPSEEK_COMMON, **extra}
    path = write_random_checkpoint(cfg_name, model_name, config, tmp_path / "v3")
    llm = LLM(model=str(path), device="cpu", kv_cache_tokens=1024, quantize="q8_0")
    llm.generate([PROMPTS[1]], SamplingParams(max_tokens=3, temperature=0.0))
    stack = llm.engine.runner.decode_stack
    assert stack._stack is None and "not kept quantised" in (stack.unfit_reason or "")


def test_mla_attention_rejects_bad_shapes() -> None:
    ops = cpu_ext.ops()
    assert ops is not None
    q8 = 8  # ggml Q8_0: 34 bytes per 32 weights
    hidden, heads, lora, nope, rope, v_dim = 32, 2, 32, 8, 8, 16
    norm = torch.ones(lora)

    def make(
        kv_b: torch.Tensor | None,
        rope_layout: str = "interleaved",
        halves: tuple[torch.Tensor | None, int, torch.Tensor | None, int] = (None, 0, None, 0),
        nope: int = nope,
    ) -> object:
        qa = torch.zeros(heads * (nope + rope) + lora + rope, 34, dtype=torch.uint8)  # q | kv_a
        return ops.MlaAttention(
            hidden,
            heads,
            lora,
            nope,
            rope,
            v_dim,
            0,
            [qa],
            [q8],
            None,
            None,
            [],
            [],
            norm,
            kv_b,
            *halves,
            1e-6,
            rope_layout,
        )

    good = torch.zeros(heads * (nope + v_dim), lora)
    with pytest.raises(RuntimeError, match="kv_b must be"):
        make(torch.zeros(heads * nope, lora))
    with pytest.raises(RuntimeError, match="unknown rotary layout"):
        make(good, "gptj")
    # the quantised halves: k_b [H L, blocks of nope], v_b [H Dv, blocks of L]; one or the other
    k_b = torch.zeros(heads * lora, 34, dtype=torch.uint8)
    v_b = torch.zeros(heads * v_dim, 34, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="give kv_b"):
        make(good, halves=(k_b, q8, v_b, q8), nope=32)
    with pytest.raises(RuntimeError, match="give kv_b"):
        make(None, halves=(k_b, q8, None, 0), nope=32)
    with pytest.raises(RuntimeError, match="block size"):
        make(None, halves=(k_b, q8, v_b, q8))  # nope 8: not whole Q8_0 blocks
    with pytest.raises(RuntimeError, match="v_b must hold"):
        make(None, halves=(k_b, q8, v_b[:-1], q8), nope=32)
    make(None, halves=(k_b, q8, v_b, q8), nope=32)
    mla = make(good)
    cos = torch.ones(16, rope // 2)
    stack = ops.DecodeStack(heads, 1, lora + rope, 1e-6, 0.3, cos, cos, torch.ones(hidden))
    ln = torch.ones(hidden)
    cache = torch.zeros(4, 16, 1, lora + rope)
    o = [torch.zeros(hidden, 34, dtype=torch.uint8)]
    mlp = [torch.zeros(64, 34, dtype=torch.uint8)], [q8], [torch.zeros(32, 34, dtype=torch.uint8)]
    stack.add_layer(
        ln,
        [],
        [],
        None,
        None,
        None,
        o,
        [q8],
        None,
        ln,
        mlp[0],
        mlp[1],
        mlp[2],
        [q8],
        cache,
        cache,
        0,
        None,
        None,
        [],
        0.0,
        mla,
    )
    with pytest.raises(RuntimeError, match="latent and q/k/v"):
        qkv = [torch.zeros(4 * (lora + rope), 34, dtype=torch.uint8)]
        stack.add_layer(
            ln,
            qkv,
            [q8],
            None,
            None,
            None,
            o,
            [q8],
            None,
            ln,
            mlp[0],
            mlp[1],
            mlp[2],
            [q8],
            cache,
            cache,
            0,
        )
    hidden_rows = torch.randn(2, hidden)
    idx = torch.tensor([0, 16])
    table, lens = torch.tensor([[0], [1]]), torch.ones(2, dtype=torch.int64)
    out = stack.forward(hidden_rows, torch.zeros(2, dtype=torch.int64), idx, table, lens, False)
    assert out.shape == (2, hidden) and torch.isfinite(out).all()
