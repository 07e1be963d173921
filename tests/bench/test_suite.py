"""`moeflow bench --workload suite` on a shrunken preset on CPU: every workload runs, the
figures it derives (experts touched, bytes per step, FLOPs) follow from the model, the JSON and
the PNG are written. No timing asserts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeflow.api import LLM
from moeflow.bench import suite
from moeflow.bench.report import count_parameters, decode_weight_bytes
from moeflow.cli import main

TINY_QWEN3_MOE = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "vocab_size": 512,
}


def test_suite_runs_every_workload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(suite, "THROUGHPUT_INPUT", (8, 24))
    monkeypatch.setattr(suite, "THROUGHPUT_OUTPUT", (2, 6))
    out, png = tmp_path / "suite.json", tmp_path / "suite.png"
    rc = main(
        [
            "bench",
            "--workload=suite",
            "--model=preset:qwen3-30b-a3b",
            f"--hf-overrides={json.dumps(TINY_QWEN3_MOE)}",
            "--device=cpu",
            "--batch-sizes=1,3",
            "--prefill-shapes=2x16",
            "--decode-tokens=3",
            "--num-requests=4",
            "--compare=hf",
            f"--json={out}",
            f"--plot={png}",
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    mf, hf = report["results"]
    assert mf["name"] == "moeflow" and hf["name"] == "hf", hf["note"]
    one, three = mf["decode"]
    # One token per step touches exactly top-k experts in each layer; three touch 4..12.
    assert one["experts_touched_per_layer"] == 4.0
    assert 4.0 <= three["experts_touched_per_layer"] <= 12.0
    assert three["bytes_per_step"] > one["bytes_per_step"] > 0
    assert one["mbu"] is None  # no datasheet peak for a CPU
    assert 0 < one["host_overhead_share"] < 1 and one["gpu_idle_share"] is None
    assert 0 < one["host_us_per_step"] < 1e6 * one["ms_per_step"] / 1000
    assert one["mbu_measured"] > 0 and one["tok_s"] > 0
    (prefill,) = mf["prefill"]
    assert (prefill["seqs"], prefill["seq_len"]) == (2, 16) and prefill["flops"] > 0
    t = mf["throughput"]
    assert t["output_tokens"] >= 4 * 2 and 4 * 8 <= t["input_tokens"] <= 4 * 24
    assert [d["batch"] for d in hf["decode"]] == [1, 3] and hf["prefill"][0]["tok_s"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_suite_times_the_idle_gap_without_overlap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the overlap schedule on (a GPU's default; forced here), the smallest batch runs
    again without it, and both runs decode the same number of steps."""
    monkeypatch.setattr(suite, "LLM", lambda *a, **k: LLM(*a, **{**k, "overlap_schedule": True}))
    out = tmp_path / "suite.json"
    args = [
        "bench",
        "--workload=suite",
        "--model=preset:qwen3-30b-a3b",
        f"--hf-overrides={json.dumps(TINY_QWEN3_MOE)}",
        "--device=cpu",
        "--batch-sizes=2,3",
        "--prefill-shapes=1x8",
        "--decode-tokens=4",
        "--num-requests=0",
        f"--json={out}",
    ]
    assert main(args) == 0
    mf = json.loads(out.read_text())["results"][0]
    assert [(d["batch"], d["overlap"]) for d in mf["decode"]] == [(2, True), (3, True)]
    (plain,) = mf["decode_without_overlap"]
    assert plain["batch"] == 2 and not plain["overlap"]
    assert plain["experts_touched_per_layer"] == pytest.approx(
        mf["decode"][0]["experts_touched_per_layer"], abs=8.0
    )
    assert plain["tok_s"] > 0 and 0 < plain["host_overhead_share"] < 1


@pytest.fixture(scope="module")
def tiny_preset() -> LLM:
    return LLM(
        "preset:qwen3-30b-a3b",
        dtype="float32",
        device="cpu",
        hf_overrides=TINY_QWEN3_MOE,
        max_model_len=256,
        kv_cache_tokens=256,
    )


def test_batch_one_bytes_match_the_info_estimate(tiny_preset: LLM) -> None:
    """At batch 1 (top-k experts per layer) the suite's byte count is `moeflow info`'s."""
    llm = tiny_preset
    model = llm.loaded.model
    counts = count_parameters(model, llm.loaded.model_config)
    expert_bytes = sum(4 * m.expert_bytes() for m in llm.engine.moe_layers())
    assert suite.weight_bytes_read(counts, 1, expert_bytes) == decode_weight_bytes(counts)


def test_prefill_flops_by_hand(tiny_preset: LLM) -> None:
    llm = tiny_preset
    cfg = llm.loaded.model_config
    counts = count_parameters(llm.loaded.model, cfg)
    body = counts.active_per_token - counts.embedding - counts.lm_head
    # 2 layers x 4 heads x (16 + 16) dims x 2 FLOPs x (8 * 9 / 2) causal pairs, for 3 prompts
    attn = 2 * 4 * 32 * 2 * 36 * 3
    want = 2 * body * 24 + 2 * counts.lm_head * 3 + attn
    assert suite.prefill_flops(counts, cfg, 3, 8) == pytest.approx(want)


def test_suite_rejects_a_checkpoint_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match="preset"):
        suite.run_suite(_args(model="some/folder"))
    with pytest.raises(ValueError, match="NxL"):
        suite._shape("8by2048")  # noqa: SLF001
    with pytest.raises(ValueError, match="positive"):
        suite._int_list("1,0")  # noqa: SLF001


def _args(**kw: object) -> object:
    from moeflow.cli import build_parser

    args = build_parser().parse_args(["bench", "--workload=suite"])
    for k, v in kw.items():
        setattr(args, k, v)
    return args
