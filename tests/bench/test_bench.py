"""`moeflow info` and `moeflow bench` on a tiny HF checkpoint: counts and JSON keys, no timing
asserts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeflow.api import LLM
from moeflow.bench.default import run_bench
from moeflow.bench.report import count_parameters, decode_weight_bytes, model_info
from moeflow.cli import build_parser
from moeflow.config import EngineArgs
from moeflow.engine.factory import plan
from tests.helpers.checkpoints import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("bench") / "m")


def test_model_info_counts(tiny_llama: Path) -> None:
    llm = LLM(model=str(tiny_llama), dtype="float32", device="cpu", kv_cache_tokens=1024)
    model, cfg = llm.loaded.model, llm.loaded.model_config
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    counts = count_parameters(model, cfg)
    assert counts.total == sum(unique.values())
    assert counts.weight_bytes == 4 * counts.total
    assert sum(counts.per_layer) == counts.attention + counts.mlp + 2 * 64 * 3  # + 2 norms/layer
    assert counts.active_per_token == counts.total  # dense
    assert not counts.is_tied and counts.lm_head == counts.embedding == 320 * 64
    # Untied: the input embedding is read one row per step, the LM head in full.
    assert decode_weight_bytes(counts) == 4 * (counts.total - counts.embedding + 64)

    args = EngineArgs(model=str(tiny_llama), dtype="float32", device="cpu", kv_cache_tokens=1024)
    text = model_info(plan(args))  # from the headers: the loaded model's counts
    kv_per_token = 2 * 3 * 2 * 16 * 4  # K and V x layers x kv_heads x head_dim x fp32
    assert f"{counts.total:,}" in text
    assert f"({kv_per_token} B)" in text
    assert f"{llm.config.num_kv_blocks} blocks x {llm.config.block_size}" in text
    assert "LlamaForCausalLM" in text


def test_run_bench_writes_json(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = build_parser().parse_args(
        [
            "bench",
            "--model",
            str(tiny_llama),
            "--compare",
            "none",
            "--prompt-len",
            "16",
            "--decode-tokens",
            "4",
            "--dtype",
            "float32",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    threads = torch.get_num_threads()
    try:
        assert run_bench(args) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert {"command", "versions", "machine", "settings", "model", "results", "ratios"} <= set(
        report
    )
    for key in ("bandwidth_bytes_per_s", "bytes_per_decode_step", "roofline_tok_s"):
        assert report[key] > 0
    mf = report["results"]["moeflow"]
    for key in ("load_s", "prefill_tok_s", "decode_tok_s", "ms_per_token"):
        assert mf[key] > 0
    assert report["settings"]["prompt_len"] == 16
    assert report["model"]["kv_bytes_per_token"] == 2 * 3 * 2 * 16 * 4
    assert report["results"].keys() == {"moeflow"}


def test_missing_bench_extra_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A peer named on the command line, or the plot, without the `bench` extra installed: an
    error naming the command that installs it, before any work; `auto` skips it with a note."""
    import importlib.util

    from moeflow.bench import peers
    from moeflow.bench.common import parse_compare
    from moeflow.cli import main

    real = importlib.util.find_spec
    absent = {"llama_cpp", "matplotlib"}
    monkeypatch.setattr(
        peers.importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name)
    )
    with pytest.raises(ValueError, match=r"llama_cpp, not installed .*moeflow\[bench\]"):
        parse_compare("llama-cpp")
    assert parse_compare("auto") == ["llama-cpp", "hf"]
    assert "moeflow[bench]" in (peers.skip_reason("llama-cpp", "m.gguf") or "")
    argv = ["bench", "--workload", "suite", "--model", "preset:qwen3-30b-a3b", "--compare", "none"]
    assert main([*argv, "--plot", "x.png"]) == 1
    assert "--plot needs matplotlib" in capsys.readouterr().err
