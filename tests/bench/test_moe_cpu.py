"""`moeflow bench --workload moe-cpu` on a tiny random qwen3moe GGUF: moeflow's side in its own
process, the llama.cpp peer through a stand-in `llama-batched-bench` (a script printing its
JSONL rows, or crashing), the report and the JSON. No timing asserts."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from moeflow import env
from moeflow.bench.gguf_models import bench_gguf
from moeflow.bench.llama_cpp_tools import cmake_flags, run_batched_bench
from moeflow.bench.moe_cpu import WARM_UP_SECONDS
from moeflow.cli import main
from moeflow.kernels import cpu_ext
from tests.helpers.gguf import TINY_QWEN3_MOE

pytestmark = pytest.mark.skipif(
    not cpu_ext.available(), reason=f"CPU kernels: {cpu_ext.unavailable_reason()}"
)

_ROWS = [
    {"pl": 1, "speed_pp": 100.0, "speed_tg": 10.0},
    {"pl": 2, "speed_pp": 150.0, "speed_tg": 16.0},
]


def _fake_bench(folder: Path, body: str) -> Path:
    """A stand-in llama-batched-bench: a shell script with `body`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "llama-batched-bench"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_cmake_flags_never_native_never_amx() -> None:
    for isa in ("avx2", "avx512", None):
        flags = cmake_flags(isa)
        assert "-DGGML_NATIVE=OFF" in flags
        assert all(f"-DGGML_AMX_{k}=OFF" in flags for k in ("TILE", "INT8", "BF16"))
        assert ("-DGGML_AVX512=ON" in flags) == (isa == "avx512")


def test_peer_rows_and_crash_are_reported(tmp_path: Path) -> None:
    rows = "\n".join(f"echo '{json.dumps(r)}'" for r in _ROWS)
    ok = run_batched_bench(_fake_bench(tmp_path / "ok", rows), "m.gguf", 8, 4, [1, 2], 2)
    assert ok.decode_tok_s == {1: 10.0, 2: 16.0} and ok.prefill_tok_s == {1: 100.0, 2: 150.0}
    assert ok.note == "" and ok.peak_rss_bytes is not None and ok.peak_rss_bytes > 0
    # One row, then a segfault (llama-cpp-python's fate on a CPU listing AMX): kept, and said.
    crash = _fake_bench(tmp_path / "crash", f"echo '{json.dumps(_ROWS[0])}'\nkill -SEGV $$")
    run = run_batched_bench(crash, "m.gguf", 8, 4, [1, 2], 2)
    assert run.decode_tok_s == {1: 10.0}
    assert run.note == "crashed (signal 11)"
    missing = run_batched_bench(tmp_path / "nope", "m.gguf", 8, 4, [1], 2)
    assert missing.note.startswith("failed: FileNotFoundError")


def test_peer_passes_repeat_each_stream_count_and_keep_the_last(tmp_path: Path) -> None:
    """Two passes: the stand-in is asked for each stream count twice in a row (its -npl echoed
    back) and the second row of each is the one reported; every row stays in `passes`."""
    body = (
        'while [ "$1" != "-npl" ]; do shift; done\n'
        'echo "$2" > "$(dirname "$0")/npl"\n'
        'p=100; for pl in $(echo "$2" | tr , " "); do p=$((p + 1)); '
        'echo "{\\"pl\\": $pl, \\"speed_pp\\": $p, \\"speed_tg\\": 1}"; done'
    )
    bench = _fake_bench(tmp_path / "two", body)
    run = run_batched_bench(bench, "m.gguf", 8, 4, [1, 4], 2, passes=2)
    assert (tmp_path / "two" / "npl").read_text().strip() == "1,1,4,4"
    assert run.prefill_tok_s == {1: 102.0, 4: 104.0}
    assert [p["prefill_tok_s"] for p in run.passes[1]] == [101.0, 102.0]


@pytest.mark.parametrize("isa", list(cpu_ext.ISAS))
def test_int8_mac_rate(isa: str) -> None:
    """The prefill roofline's int8 rate: a positive rate from a short run; vpdpbusd alone only
    in the AVX-512 build."""
    ops = cpu_ext.ops_for(isa)
    if ops is None:
        pytest.skip(f"this CPU cannot run the {isa} build")
    assert ops.int8_mac_rate(1, 1000) > 0
    if isa == "avx512":
        assert ops.int8_mac_rate(2, 1000, True) > 0
    else:
        with pytest.raises(RuntimeError, match="AVX-512 build only"):
            ops.int8_mac_rate(1, 1000, True)


def test_moe_cpu_workload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(env, "MOEFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(env, "MOEFLOW_CPU_INT8", True)  # the bench's default: int8 activations
    monkeypatch.setenv("MOEFLOW_CPU_INT8", "1")
    model = bench_gguf("tiny-qwen3-moe", TINY_QWEN3_MOE, "q8_0", num_layers=2)
    rows = "\n".join(f"echo '{json.dumps(r)}'" for r in _ROWS)
    _fake_bench(tmp_path / "bin", rows)
    monkeypatch.setattr(env, "MOEFLOW_LLAMA_CPP_BIN", str(tmp_path / "bin"))
    out = tmp_path / "r.json"
    argv = ["bench", "--workload", "moe-cpu", "--model", str(model), "--streams", "1,2"]
    argv += ["--prompt-len", "8", "--decode-tokens", "4", "--threads", "1", "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "llama.cpp (llama-batched-bench)" in text and "roofline" in text
    assert "page cache: the file is read (twice) before each engine's run" in text
    report = json.loads(out.read_text())
    mf = report["moeflow"]
    assert "error" not in mf
    assert mf["load_s"] > 0 and mf["peak_rss_bytes"] >= mf["rss_after_load_bytes"] > 0
    runs = mf["runs"]
    assert set(runs) == {"1", "2"}
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in runs.values())
    # One-stream passes warm the engine for WARM_UP_SECONDS before anything is measured.
    assert mf["warm_up_s"] >= WARM_UP_SECONDS
    # Two passes of each stream count (the default); the last one's figures are the run's.
    assert report["spec"]["passes"] == 2
    for r in runs.values():
        assert len(r["passes"]) == 2
        assert r["prefill_tok_s"] == r["passes"][-1]["prefill_tok_s"]
    # One stream decodes one token per step: exactly top-k (4) experts of 16 per layer.
    assert runs["1"]["experts_touched_per_step"] == 4.0
    assert 4.0 <= runs["2"]["experts_touched_per_step"] <= 8.0
    # The experts are held as the file's blocks: their bytes are the file's expert tensors'.
    assert mf["weights"]["experts"] == 2 * 16 * 3 * 256 * 256 * 34 // 32  # Q8_0: 34 B / 32
    assert report["llama_cpp"]["decode_tok_s"] == {"1": 10.0, "2": 16.0}
    # The prefill roofline: the multiply-adds of a prompt token from the file's shapes (2
    # layers; q, k, v, o; the router; 4 of 16 experts' gate, up, down; causal attention over 8
    # positions, keys and values of 4 heads; the LM head once per 8-token prompt).
    compute = report["prefill_compute"]
    h = TINY_QWEN3_MOE
    hd = h["head_dim"]
    attn = h["hidden_size"] * hd * (2 * h["num_attention_heads"] + 2 * h["num_key_value_heads"])
    experts = 3 * h["hidden_size"] * h["moe_intermediate_size"] * h["num_experts_per_tok"]
    router = h["hidden_size"] * h["num_experts"]
    scores = h["num_attention_heads"] * 2 * hd * (8 + 1) / 2
    head = h["vocab_size"] * h["hidden_size"] / 8
    assert compute["macs_per_token"] == 2 * (attn + experts + router + scores) + head
    assert compute["roofline_tok_s"] == compute["macs_per_s"]["tile"] / compute["macs_per_token"]
    assert "roofline pp = that rate" in text
    assert os.path.getsize(model) == report["file_bytes"]
