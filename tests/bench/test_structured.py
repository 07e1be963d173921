"""`moeflow bench --workload json-schema` on a tiny HF checkpoint with tiny settings: it runs
both decodes and reports both rates and their ratio (no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeflow.bench.structured import run_structured
from moeflow.cli import build_parser
from tests.helpers.checkpoints import make_tiny_checkpoint


def test_json_schema_workload_reports_both_rates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_tiny_checkpoint("llama", tmp_path / "m")
    out = tmp_path / "bench.json"
    args = build_parser().parse_args(
        ["bench", "--workload", "json-schema", "--model", str(model), "--dtype", "float32",
         "--device", "cpu", "--concurrency", "2", "--decode-tokens", "6", "--json", str(out)]
    )  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert run_structured(args) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert report["free_decode_tok_s"] > 0 and report["json_schema_decode_tok_s"] > 0
    assert report["ratio"] == report["json_schema_decode_tok_s"] / report["free_decode_tok_s"]
    assert report["settings"] == {"concurrency": 2, "decode_tokens": 6}
    assert "ratio:" in capsys.readouterr().out
