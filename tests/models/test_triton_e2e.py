"""End to end through the Triton kernels: tiny models of each attention/MoE kind decode with
every op on its Triton path (interpreted on CPU; compiled on a GPU) and give the torch reference
path's greedy tokens and log-probs. The decode steps go through the padded static batches of
the CUDA-graph runner under the overlap schedule, as they do on a GPU."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from moeflow import env
from moeflow.api import LLM
from moeflow.kernels import cpu_ext
from moeflow.sampling_params import SamplingParams
from tests.helpers.checkpoints import make_deepseek_checkpoint, make_tiny_checkpoint
from tests.helpers.devices import TRITON_DEVICE, needs_triton
from tests.helpers.engine import assert_same_outputs

pytest.importorskip("triton")
from moeflow.kernels.triton import attention, elementwise, fused_moe, mla  # noqa: E402

pytestmark = needs_triton

PROMPTS = [[5, 9, 13, 2, 7, 81, 30], [40, 41], [100, 3, 3, 3, 3, 60, 61, 62, 63, 64, 65, 66]]
# family -> the Triton launchers its forward must call
LAUNCHERS: dict[str, list[tuple[Any, str]]] = {
    "llama": [
        (attention, "extend_attention_triton"),
        (attention, "decode_attention_triton"),
        (elementwise, "rms_norm_triton"),
        (elementwise, "rotary_triton_"),
        (elementwise, "silu_and_mul_triton"),
    ],
    "mistral": [(attention, "extend_attention_triton"), (attention, "decode_attention_triton")],
    # prefill: 21 tokens x top-2 = 42 pairs take the grouped GEMMs; decode the small-batch path
    "qwen3_moe": [
        (attention, "decode_attention_triton"),
        (elementwise, "rms_norm_triton"),
        (fused_moe, "fused_moe_triton"),
        (fused_moe, "fused_moe_small_batch_triton"),
    ],
    "deepseek_v2": [
        (mla, "mla_prefill_triton"),
        (mla, "mla_decode_triton"),
        (elementwise, "rotary_triton_"),
        (fused_moe, "fused_moe_small_batch_triton"),
    ],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e")
    return {
        "llama": make_tiny_checkpoint("llama", root / "llama", seed=11),
        # a window shorter than the longest context, so the windowed kernels mask
        "mistral": make_tiny_checkpoint("mistral", root / "mistral", seed=12, sliding_window=8),
        "qwen3_moe": make_tiny_checkpoint("qwen3_moe", root / "qwen3_moe", seed=13),
        "deepseek_v2": make_deepseek_checkpoint("v2", root / "v2", seed=14),
    }


def _decode(path: str, graphs: bool) -> list[tuple[list[int], list[float]]]:
    """`graphs`: the GPU's way (graph batches, overlap schedule), else plain eager steps."""
    llm = LLM(
        path,
        dtype="float32",
        device=TRITON_DEVICE,
        max_model_len=64,
        max_num_seqs=4,
        enforce_eager=not graphs,
        overlap_schedule=graphs,
    )
    if graphs and llm.engine.runner.graphs is None:  # CPU: padded static batches, run eagerly
        c = llm.config
        llm.engine.runner.make_graph_runner(c.max_num_seqs, c.max_model_len, c.sink_block)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)
    outs = llm.generate([list(p) for p in PROMPTS], params)
    return [(o.token_ids, [lp.logprob for lp in o.logprobs or []]) for o in outs]


@pytest.mark.parametrize("family", sorted(LAUNCHERS))
def test_triton_paths_match_the_reference(
    family: str, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(checkpoints[family])
    monkeypatch.setattr(cpu_ext, "ops", lambda: None)  # the CPU kernels would come first
    monkeypatch.setattr(env, "MOEFLOW_TRITON", False)
    want = _decode(path, graphs=False)

    monkeypatch.setattr(env, "MOEFLOW_TRITON", True)
    monkeypatch.setattr(env, "MOEFLOW_TRITON_ON_CPU", True)
    calls: Counter[str] = Counter()
    for module, name in LAUNCHERS[family]:
        monkeypatch.setattr(module, name, _counted(getattr(module, name), name, calls))
    got = _decode(path, graphs=True)

    assert set(calls) == {name for _, name in LAUNCHERS[family]}, calls
    assert_same_outputs(got, want, atol=2e-4)


def _counted(fn: Callable[..., Any], name: str, calls: Counter[str]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        return fn(*args, **kwargs)

    return wrapper
