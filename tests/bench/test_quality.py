"""`moeflow bench --workload quality` end to end on a tiny random qwen3moe GGUF and a short text:
the exact path's KL to the fp32 reference is ~0, the int8 path's is not; the llama.cpp peer is
skipped cleanly without a binary; its log is parsed; the F32 copy holds the dequantised
weights. No timing asserts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeflow import env
from moeflow.bench.gguf_models import bench_gguf
from moeflow.bench.quality import TEXT, parse_kld_log, write_f32_gguf
from moeflow.cli import main
from moeflow.kernels import cpu_ext
from moeflow.weights.ggml_quants import GGMLType
from moeflow.weights.gguf import GGUFReader
from tests.helpers.gguf import TINY_QWEN3_MOE

pytestmark = pytest.mark.skipif(
    not cpu_ext.available(), reason=f"CPU kernels: {cpu_ext.unavailable_reason()}"
)


def test_quality_workload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(env, "MOEFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(env, "MOEFLOW_LLAMA_CPP_BIN", str(tmp_path / "no-bin"))
    model = bench_gguf("tiny-qwen3-moe", TINY_QWEN3_MOE, "q8_0", num_layers=2)
    text = tmp_path / "text.txt"
    text.write_text(TEXT.read_text(encoding="utf-8")[:120], encoding="utf-8")  # byte tokens
    out = tmp_path / "q.json"
    argv = ["bench", "--workload", "quality", "--model", str(model), "--text", str(text)]
    argv += ["--chunk-len", "32", "--threads", "1", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "moeflow int8 (fast path)" in printed and "skipped: no llama-perplexity" in printed
    report = json.loads(out.read_text())
    runs = report["moeflow"]
    assert all("error" not in r for r in runs.values())
    # 120 tokens: 3 chunks of 32, 15 scored tokens each (positions 16 .. 30).
    assert all(r["num_scored"] == 45 for r in runs.values())
    assert runs["reference"]["kl_mean"] == 0.0
    assert runs["exact"]["kl_max"] < 1e-4
    assert runs["exact"]["top1_agree_pct"] == 100.0
    assert runs["int8"]["kl_mean"] > 0.0
    assert 0.0 <= runs["int8"]["top1_agree_pct"] <= 100.0
    assert runs["int8"]["kl_p99"] <= runs["int8"]["kl_max"]
    for r in runs.values():  # random weights: about uniform over the 2048 tokens
        assert abs(r["nll_mean"] - torch.log(torch.tensor(2048.0)).item()) < 1.0
    assert report["llama_cpp"]["note"].startswith("skipped: no llama-perplexity")


def test_f32_copy_holds_the_dequantised_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(env, "MOEFLOW_CACHE_DIR", str(tmp_path))
    model = bench_gguf("tiny-qwen3-moe", TINY_QWEN3_MOE, "q4_k_m", num_layers=1)
    f32 = tmp_path / "f32.gguf"
    write_f32_gguf(model, f32)
    with GGUFReader(model) as q, GGUFReader(f32) as f:
        assert set(f.tensors) == set(q.tensors)
        assert {t.ggml_type for t in f.tensors.values()} == {int(GGMLType.F32)}
        for name in q.tensors:
            assert torch.equal(f.load(name, torch.float32), q.load(name, torch.float32))
        assert f.metadata["general.file_type"] == 0
        meta = {k: v for k, v in q.metadata.items() if k != "general.file_type"}
        assert all(f.metadata[k] == v for k, v in meta.items())


def test_parse_kld_log() -> None:
    log = """
====== Perplexity statistics ======
Mean PPL(Q)                   :  12.500000 ±   0.400000
Mean PPL(base)                :  12.000000 ±   0.380000
====== KL divergence statistics ======
Mean    KLD:   0.012345 ±   0.000500
Maximum KLD:   0.900000
99.9%   KLD:   0.500000
99.0%   KLD:   0.100000
Median  KLD:   0.005000
====== Token probability statistics ======
Same top p: 95.123 ± 0.500 %
"""
    got = parse_kld_log(log)
    assert got["kl_mean"] == 0.012345 and got["kl_p99"] == 0.1 and got["kl_max"] == 0.9
    assert got["top1_agree_pct"] == 95.123
    assert got["ppl"] == 12.5 and got["ppl_base"] == 12.0
    assert parse_kld_log("segfault") == {}
