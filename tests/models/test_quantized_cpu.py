"""The CPU fast path end to end: the default GGUF model with its blocks kept quantised and the
fused kernels gives the same greedy tokens as the plain-torch reference (weights dequantised to
fp32, no compiled kernels); `--quantize` on load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moeflow import LLM, SamplingParams, env
from moeflow.bench.gguf_models import bench_gguf
from moeflow.kernels import cpu_ext
from moeflow.layers.fused_experts import FusedExperts
from moeflow.layers.linear import Linear
from moeflow.loading.loader import load_model
from moeflow.loading.source import HFFolder
from moeflow.weights.ggml_quants import Q4_K_R16, GGMLType, quantize
from tests.helpers.checkpoints import make_tiny_checkpoint
from tests.helpers.gguf import TINY_DEEPSEEK_V2, TINY_DEEPSEEK_V3, TINY_OLMOE, TINY_QWEN3_MOE

pytestmark = pytest.mark.skipif(
    not cpu_ext.available(), reason=f"CPU kernels: {cpu_ext.unavailable_reason()}"
)

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How do I reverse a list in Python?",
]


def _greedy_ids(llm: LLM) -> list[list[int]]:
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    outs = llm.chat(convs, SamplingParams(max_tokens=32, temperature=0.0))  # type: ignore[arg-type]
    return [o.token_ids for o in outs]


def test_default_model_fast_path_keeps_reference_greedy(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = LLM(dtype="auto", device="cpu", max_model_len=2048, kv_cache_tokens=4096)
    assert fast.config.dtype == "float32"  # auto: fp32 compute over the kept blocks
    model = fast.loaded.model
    kept = {m.qtype for m in model.modules() if getattr(m, "qtype", None) is not None}
    assert kept == {int(GGMLType.Q4_1), int(GGMLType.Q8_0)}  # layers Q4_1, tied table Q8_0
    fast_ids = _greedy_ids(fast)
    del fast

    # The reference: every tensor dequantised to fp32 on load, no compiled kernel anywhere.
    monkeypatch.setattr(cpu_ext, "ops", lambda: None)
    monkeypatch.setattr(cpu_ext, "available", lambda: False)
    ref = LLM(dtype="float32", device="cpu", max_model_len=2048, kv_cache_tokens=4096)
    assert all(getattr(m, "qtype", None) is None for m in ref.loaded.model.modules())
    assert _greedy_ids(ref) == fast_ids
    assert all(len(ids) > 5 for ids in fast_ids)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantize_matches_gguf_py(kind: str) -> None:
    """Our on-load quantiser writes the blocks gguf-py's reference quantiser writes."""
    gguf_quants = pytest.importorskip("gguf.quants")
    from gguf.constants import GGMLQuantizationType

    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(7))
    ours = quantize(w, kind).data.numpy()
    qt = GGMLQuantizationType.Q8_0 if kind == "q8_0" else GGMLQuantizationType.Q4_0
    theirs = gguf_quants.quantize(w.numpy(), qt)
    assert ours.shape == theirs.shape
    # rounding ties (x / d exactly half-way) may round differently: allow a handful of bytes
    assert np.count_nonzero(ours != theirs) <= ours.size // 1000


def test_quantize_on_load_runs_a_safetensors_model(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("llama", tmp_path / "llama")
    plain = LLM(
        model=str(path), dtype="float32", device="cpu", max_model_len=256, kv_cache_tokens=1024
    )
    q8 = LLM(model=str(path), device="cpu", kv_cache_tokens=1024, quantize="q8_0")
    assert q8.config.dtype == "float32"
    layers = [m for m in q8.loaded.model.modules() if isinstance(m, Linear)]
    assert layers and all(m.qtype == int(GGMLType.Q8_0) for m in layers)
    # The reference: the float model with each linear weight replaced by its Q8_0 round trip.
    with torch.no_grad():
        for m in plain.loaded.model.modules():
            if isinstance(m, Linear):
                m.weight.copy_(quantize(m.weight, "q8_0").dequantize(torch.float32))
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=5, ignore_eos=True)
    prompts = [list(range(3, 40)), list(range(50, 60))]  # prefill (GEMM) and decode (GEMV)
    for a, b in zip(plain.generate(prompts, params), q8.generate(prompts, params), strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs is not None and b.logprobs is not None
        for la, lb in zip(a.logprobs, b.logprobs, strict=True):
            assert abs(la.logprob - lb.logprob) < 1e-3


def test_quantize_needs_the_kernels(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = make_tiny_checkpoint("llama", tmp_path / "llama")
    monkeypatch.setattr(cpu_ext, "available", lambda: False)
    with pytest.raises(ValueError, match="CPU kernels"):
        load_model(HFFolder(str(path)), "cpu", torch.float32, quantize="q8_0")


@pytest.mark.parametrize("ftype", ["q4_k_m", "q8_0", "iq4_xs"])
def test_moe_gguf_experts_stay_quantized(
    ftype: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A qwen3moe GGUF's routed experts stay in the file's blocks (uint8 views, no float copy)
    and the grouped kernel's exact path gives the reference's tokens (every tensor dequantised
    to fp32, no compiled kernel); batched rows and solo rows agree (the MoE kernel is
    batch-invariant bit for bit, tests/kernels/test_moe_cpu.py; the dense GEMMs around it sum
    in another order for more rows)."""
    monkeypatch.setattr(env, "MOEFLOW_CACHE_DIR", str(tmp_path))
    path = bench_gguf("tiny-qwen3-moe", TINY_QWEN3_MOE, ftype, num_layers=2)
    fast = LLM(model=str(path), device="cpu", max_model_len=256, kv_cache_tokens=1024)
    experts = [m for m in fast.loaded.model.modules() if isinstance(m, FusedExperts)]
    assert len(experts) == 2
    for m in experts:
        assert m.quantized is not None
        names = {n for n, _ in m.named_parameters()}
        assert names == {"gate_proj", "up_proj", "down_proj"}  # no float w13 / w2 at all
        gate = m.quantized.gate
        assert gate.dtype == torch.uint8 and gate.shape[:2] == (16, 256)
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=3, ignore_eos=True)
    prompts = [list(range(3, 40)), list(range(50, 60)), [7]]  # prefill (many pairs) and decode
    fast_out = fast.generate(prompts, params)
    solo = [fast.generate([p], params)[0] for p in prompts]
    del fast

    monkeypatch.setattr(cpu_ext, "ops", lambda: None)
    monkeypatch.setattr(cpu_ext, "available", lambda: False)
    ref = LLM(
        model=str(path), device="cpu", dtype="float32", max_model_len=256, kv_cache_tokens=1024
    )
    assert all(
        m.quantized is None for m in ref.loaded.model.modules() if isinstance(m, FusedExperts)
    )
    ref_out = ref.generate(prompts, params)
    for a, b, s in zip(ref_out, fast_out, solo, strict=True):
        assert a.token_ids == b.token_ids == s.token_ids
        assert a.logprobs is not None and b.logprobs is not None and s.logprobs is not None
        for la, lb, ls in zip(a.logprobs, b.logprobs, s.logprobs, strict=True):
            assert abs(la.logprob - lb.logprob) < 1e-3
            assert abs(lb.logprob - ls.logprob) < 1e-5  # batched rows == solo rows


@pytest.mark.skipif(cpu_ext.isa() != "avx512", reason="Q4_K experts repack for AVX-512 only")
def test_repacked_experts_give_the_file_layouts_logprobs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With int8 activations (the default) a Q4_K_M file's Q4_K experts and linear layers are
    repacked on load (Q4_K_R16; the Q6_K down projections of its last layer stay as stored,
    the fused decode step runs them), and the model
    gives the file layout's tokens and log-probs bit for bit (MOEFLOW_CPU_REPACK=0), in batches
    and alone; --exact-cpu-activations never repacks."""
    monkeypatch.setattr(env, "MOEFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(env, "MOEFLOW_CPU_INT8", True)
    path = bench_gguf("tiny-qwen3-moe", TINY_QWEN3_MOE, "q4_k_m", num_layers=2)
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=3, ignore_eos=True)
    prompts = [list(range(3, 40)), list(range(50, 60)), [7]]
    outs, types = [], []
    for repack in (True, False):
        monkeypatch.setattr(env, "MOEFLOW_CPU_REPACK", repack)
        llm = LLM(model=str(path), device="cpu", max_model_len=256, kv_cache_tokens=1024)
        experts = [m.quantized for m in llm.loaded.model.modules() if isinstance(m, FusedExperts)]
        types.append([(q.gate_type, q.up_type, q.down_type) for q in experts if q is not None])
        linears = {m.qtype for m in llm.loaded.model.modules() if isinstance(m, Linear)}
        assert (Q4_K_R16 in linears) == repack  # q/k/o (and merged parts) too
        outs.append(llm.generate(prompts, params))
        if repack:
            solo = [llm.generate([p], params)[0] for p in prompts]
        del llm
    q4k, q6k = int(GGMLType.Q4_K), int(GGMLType.Q6_K)
    assert types[0] == [(Q4_K_R16, Q4_K_R16, Q4_K_R16), (Q4_K_R16, Q4_K_R16, q6k)]
    assert types[1] == [(q4k, q4k, q4k), (q4k, q4k, q6k)]
    for a, b, c in zip(outs[0], outs[1], solo, strict=True):
        assert a.token_ids == b.token_ids == c.token_ids
        assert a.logprobs is not None and b.logprobs is not None and c.logprobs is not None
        for la, lb, lc in zip(a.logprobs, b.logprobs, c.logprobs, strict=True):
            assert la.logprob == lb.logprob == lc.logprob
    monkeypatch.setattr(env, "MOEFLOW_CPU_REPACK", True)
    monkeypatch.setattr(env, "MOEFLOW_CPU_INT8", False)
    exact = LLM(model=str(path), device="cpu", max_model_len=256, kv_cache_tokens=1024)
    kept = [m.quantized for m in exact.loaded.model.modules() if isinstance(m, FusedExperts)]
    assert all(q is not None and q.gate_type == q4k for q in kept)


@pytest.mark.skipif(cpu_ext.isa() != "avx512", reason="Q4_K experts repack for AVX-512 only")
@pytest.mark.parametrize(
    ("name", "hf"),
    [("olmoe", TINY_OLMOE), ("deepseek-v2", TINY_DEEPSEEK_V2), ("deepseek-v3", TINY_DEEPSEEK_V3)],
)
def test_repacked_families_give_the_file_layouts_logprobs(
    name: str, hf: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """OLMoE (q/k norm over whole projections) and DeepSeek (MLA's projections repacked, its
    absorbed k_b / v_b halves left as stored; shared experts; DeepSeek-V3's q_lora): repacked
    on load, the file layout's log-probs bit for bit."""
    monkeypatch.setattr(env, "MOEFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(env, "MOEFLOW_CPU_INT8", True)
    path = bench_gguf(f"tiny-{name}", hf, "q4_k_m", num_layers=2)
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=2, ignore_eos=True)
    prompts = [list(range(3, 30)), [7, 8]]
    outs = []
    for repack in (True, False):
        monkeypatch.setattr(env, "MOEFLOW_CPU_REPACK", repack)
        llm = LLM(model=str(path), device="cpu", max_model_len=256, kv_cache_tokens=1024)
        held = {m.qtype for m in llm.loaded.model.modules() if isinstance(m, Linear)} | {
            m.quantized.gate_type
            for m in llm.loaded.model.modules()
            if isinstance(m, FusedExperts) and m.quantized is not None
        }
        assert (Q4_K_R16 in held) == repack
        outs.append(llm.generate(prompts, params))
        del llm
    for a, b in zip(*outs, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs is not None and b.logprobs is not None
        assert [x.logprob for x in a.logprobs] == [x.logprob for x in b.logprobs]


_ROUND_TRIP = {
    "olmoe": (TINY_OLMOE, ("num_experts", "num_experts_per_tok", "intermediate_size")),
    "deepseek-v2": (
        TINY_DEEPSEEK_V2,
        (
            "n_routed_experts",
            "n_shared_experts",
            "first_k_dense_replace",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "moe_intermediate_size",
            "scoring_func",
            "norm_topk_prob",
        ),
    ),
    "deepseek-v3": (
        TINY_DEEPSEEK_V3,
        (
            "n_routed_experts",
            "q_lora_rank",
            "kv_lora_rank",
            "n_group",
            "topk_group",
            "topk_method",
            "scoring_func",
            "routed_scaling_factor",
            "norm_topk_prob",
        ),
    ),
}


@pytest.mark.parametrize("ftype", ["q4_k_m", "q8_0"])
@pytest.mark.parametrize("family", sorted(_ROUND_TRIP))
def test_bench_gguf_layouts_of_other_families(
    family: str, ftype: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The benchmark files of the OLMoE and DeepSeek-V2/V3 presets (bench/gguf_models.py, laid
    out as llama.cpp's converter writes them: OLMoE's all-heads q/k norms, MLA's split k_b / v_b,
    V3's correction bias) read back with the preset's fields, experts in their blocks, and the
    kernels give the dequantised fp32 reference's tokens."""
    hf, fields = _ROUND_TRIP[family]
    monkeypatch.setattr(env, "MOEFLOW_CACHE_DIR", str(tmp_path))
    path = bench_gguf(f"tiny-{family}", hf, ftype, num_layers=2)
    fast = LLM(model=str(path), device="cpu", max_model_len=128, kv_cache_tokens=512)
    cfg = fast.loaded.model_config.hf
    assert {k: cfg[k] for k in fields} == {k: hf[k] for k in fields}
    experts = [m for m in fast.loaded.model.modules() if isinstance(m, FusedExperts)]
    assert experts and all(m.quantized is not None for m in experts)
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=2, ignore_eos=True)
    prompts = [list(range(3, 30)), [7]]
    fast_out = fast.generate(prompts, params)
    del fast
    monkeypatch.setattr(cpu_ext, "ops", lambda: None)
    monkeypatch.setattr(cpu_ext, "available", lambda: False)
    ref = LLM(
        model=str(path), device="cpu", dtype="float32", max_model_len=128, kv_cache_tokens=512
    )
    for a, b in zip(ref.generate(prompts, params), fast_out, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs is not None and b.logprobs is not None
        for la, lb in zip(a.logprobs, b.logprobs, strict=True):
            assert abs(la.logprob - lb.logprob) < 1e-3
