"""`--quantize` on an HF MoE folder: the routed experts become ggml blocks (quantised expert by
expert as they load, never held whole in floats) run by the grouped CPU kernel, beside the
quantised dense layers; the router stays float. The reference is the float model with every
quantised weight replaced by its blocks dequantised, on the plain-torch path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.kernels import cpu_ext
from moeflow.kernels.quant_gemm import dequantize_ref
from moeflow.layers.fused_experts import FusedExperts
from moeflow.layers.linear import Linear
from moeflow.layers.moe import MoE
from moeflow.loading.loader import load_model
from moeflow.loading.quantize import quantize_linears
from moeflow.loading.source import HFFolder
from moeflow.weights.ggml_quants import QUANTIZE_TYPES, GGMLType
from tests.helpers.checkpoints import make_tiny_checkpoint
from tests.helpers.parity import hf_model, prefill_logits, prompts_of_lengths

pytestmark = pytest.mark.skipif(
    not cpu_ext.available(), reason=f"CPU kernels: {cpu_ext.unavailable_reason()}"
)

# Two MoE families whose expert rows are whole Q4_K super-blocks (H = I = 256), 2 layers.
WIDE = {"hidden_size": 256, "num_hidden_layers": 2}
FAMILIES = {
    "qwen3_moe": {**WIDE, "moe_intermediate_size": 256, "head_dim": 64},
    "mixtral": {**WIDE, "intermediate_size": 256},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantize_moe")
    made = {fam: make_tiny_checkpoint(fam, root / fam, **cfg) for fam, cfg in FAMILIES.items()}
    # the default tiny width (H = 64, I = 32): q4_k falls back to q4_0 for every row
    made["qwen2_moe"] = make_tiny_checkpoint("qwen2_moe", root / "qwen2_moe")
    return made


def _llm(path: Path, quantize: str | None) -> LLM:
    return LLM(
        model=str(path),
        dtype="float32",
        device="cpu",
        max_model_len=256,
        kv_cache_tokens=1024,
        quantize=quantize,
    )


def _experts(model: torch.nn.Module) -> list[FusedExperts]:
    return [m for m in model.modules() if isinstance(m, FusedExperts)]


def _dequantized_reference(path: Path, quantized: LLM) -> LLM:
    """The float model with each of `quantized`'s quantised weights (linear layers and experts)
    replaced by its blocks dequantised, run without the compiled kernels on those layers."""
    ref = _llm(path, None)
    pairs = zip(ref.loaded.model.modules(), quantized.loaded.model.modules(), strict=True)
    with torch.no_grad():
        for r, q in pairs:
            if isinstance(q, Linear) and q.qtype is not None:
                assert isinstance(r, Linear)
                r.weight.copy_(dequantize_ref(q.weight, q.qtype, q.in_features))
            elif isinstance(q, FusedExperts) and q.quantized is not None:
                assert isinstance(r, FusedExperts)
                w13, w2 = q.quantized.dequantize(torch.arange(q.num_experts), torch.float32)
                r.w13.copy_(w13)
                r.w2.copy_(w2)
    return ref


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_k"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_experts_quantized_on_load(
    family: str, kind: str, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = checkpoints[family]
    with monkeypatch.context() as patch:  # quantised as they load: float experts never exist
        patch.setattr(FusedExperts, "materialize", _never_materialized)
        llm = _llm(path, kind)
    qtype = int(QUANTIZE_TYPES[kind])
    experts = _experts(llm.loaded.model)
    assert len(experts) == 2
    for m in experts:
        params = dict(m.named_parameters())
        assert set(params) == {"gate_proj", "up_proj", "down_proj"}  # no float w13 / w2
        assert all(p.dtype == torch.uint8 for p in params.values())
        assert params["gate_proj"].logical_shape == (8, 256, 256)  # type: ignore[attr-defined]
        q = m.quantized
        assert q is not None and (q.gate_type, q.up_type, q.down_type) == (qtype,) * 3
    for moe in (m for m in llm.loaded.model.modules() if isinstance(m, MoE)):
        assert moe.gate.weight.dtype == torch.float32  # the router stays float
    linears = [m for m in llm.loaded.model.modules() if isinstance(m, Linear)]
    assert linears and all(m.qtype == qtype for m in linears)

    # The same logits as the float path over the blocks dequantised (prefill: many pairs per
    # expert; a short prompt: the decode-sized GEMVs), up to fp32 rounding in another order
    # (mixtral q4_0 measured 1.4e-4 at one logit of 960 once the kernels' build stopped fusing
    # a * b + c into FMAs: -ffp-contract=off).
    ref = _dequantized_reference(path, llm)
    for ids in prompts_of_lengths(11, [40, 3]):
        torch.testing.assert_close(
            prefill_logits(llm, ids), prefill_logits(ref, ids), rtol=1e-4, atol=2e-4
        )


def _never_materialized(self: FusedExperts) -> None:
    raise AssertionError("float experts allocated under --quantize")


@pytest.mark.parametrize("kind", ["q8_0", "q4_k"])
def test_loaded_experts_convert_to_the_same_blocks(kind: str, checkpoints: dict[str, Path]) -> None:
    """Float experts already loaded (stacked tensors, random weights) converted after the load
    give the blocks that quantising each expert as it loads gives."""
    path = checkpoints["qwen3_moe"]
    on_load = load_model(HFFolder(str(path)), "cpu", torch.float32, quantize=kind)
    after = load_model(HFFolder(str(path)), "cpu", torch.float32)
    assert all(m.quantized is None for m in _experts(after.model))
    assert quantize_linears(after.model, kind, "cpu") > 0
    for a, b in zip(_experts(on_load.model), _experts(after.model), strict=True):
        assert a.quantized is not None and b.quantized is not None
        for x, y in zip(
            (a.quantized.gate, a.quantized.up, a.quantized.down),
            (b.quantized.gate, b.quantized.up, b.quantized.down),
            strict=True,
        ):
            assert torch.equal(x, y)
        assert not hasattr(b, "w13") and not hasattr(b, "w2")  # the float copy is freed


def test_q8_0_stays_near_hf(checkpoints: dict[str, Path]) -> None:
    """q8_0 is near-lossless: prefill logits within 6 % (relative L2) of transformers' float
    model. NOTE: not greedy tokens: these random weights amplify the 0.5 % weight error ~6x,
    enough to flip a near tie within 10 tokens on one of three prompts; q4_0 / q4_k land at
    ~45 %, so the bound still separates 8 bits from 4."""
    path = checkpoints["qwen3_moe"]
    hf = hf_model(path)
    llm = _llm(path, "q8_0")
    for ids in prompts_of_lengths(3, [7, 33]):
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        ours = prefill_logits(llm, ids)
        assert ((ours - ref).norm() / ref.norm()).item() < 0.06


def test_q4_k_falls_back_to_q4_0(checkpoints: dict[str, Path]) -> None:
    """Qwen2-MoE at the tiny width (H = 64, I = 32: no whole 256-weight super-blocks): q4_k
    writes q4_0 for experts, shared expert and dense layers alike; the shared expert's gate and
    the routers stay as the logits of the float path over the dequantised blocks say."""
    path = checkpoints["qwen2_moe"]
    llm = _llm(path, "q4_k")
    q4_0 = int(GGMLType.Q4_0)
    experts = _experts(llm.loaded.model)
    assert experts and all(
        m.quantized is not None and m.quantized.gate_type == m.quantized.down_type == q4_0
        for m in experts
    )
    ref = _dequantized_reference(path, llm)
    ids = prompts_of_lengths(5, [30])[0]
    torch.testing.assert_close(
        prefill_logits(llm, ids), prefill_logits(ref, ids), rtol=1e-4, atol=1e-4
    )


def test_experts_the_kernel_does_not_run_stay_float(tmp_path: Path) -> None:
    """Experts of I = 48 (not whole 32-weight blocks) stay float; the rest is quantised."""
    path = make_tiny_checkpoint("qwen3_moe", tmp_path / "q", moe_intermediate_size=48)
    loaded = load_model(HFFolder(str(path)), "cpu", torch.float32, quantize="q8_0")
    experts = _experts(loaded.model)
    assert experts and all(m.quantized is None and m.w13.dtype == torch.float32 for m in experts)
    linears = [m for m in loaded.model.modules() if isinstance(m, Linear)]
    assert all(m.qtype == int(GGMLType.Q8_0) for m in linears)


def test_dense_q4_k_decodes_like_its_reference(tmp_path: Path) -> None:
    """A dense llama in q4_k (every row whole super-blocks) through the engine, fused CPU decode
    step included: the greedy tokens and logprobs of the float model over the dequantised
    blocks."""
    path = make_tiny_checkpoint("llama", tmp_path / "llama", hidden_size=256, intermediate_size=512)
    llm = _llm(path, "q4_k")
    linears = [m for m in llm.loaded.model.modules() if isinstance(m, Linear)]
    assert linears and all(m.qtype == int(GGMLType.Q4_K) for m in linears)
    ref = _dequantized_reference(path, llm)
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=3, ignore_eos=True)
    prompts = prompts_of_lengths(7, [37, 10])
    for a, b in zip(ref.generate(prompts, params), llm.generate(prompts, params), strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs is not None and b.logprobs is not None
        for la, lb in zip(a.logprobs, b.logprobs, strict=True):
            assert abs(la.logprob - lb.logprob) < 1e-3
    stack = llm.engine.runner.decode_stack
    assert stack.unfit_reason is None and stack._stack is not None  # decode ran fused
