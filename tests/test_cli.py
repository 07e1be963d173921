"""The `moeflow` command as a user runs it: a real answer from the embedded model, and one clear
error line (never a traceback) for each kind of bad argument."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moeflow import env
from moeflow.cli import main
from tests.helpers.tokenizer_files import write_tiny_tokenizer


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MOEFLOW_LOG_LEVEL": "WARNING"}
    return subprocess.run(
        [sys.executable, "-m", "moeflow", *args],
        capture_output=True,
        text=True,
        timeout=300,
        input=stdin,
        env=env,
    )


def assert_one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("moeflow: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_chat_answers_paris() -> None:
    proc = run_cli("chat", "What is the capital of France?")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_interactive_chat_keeps_the_conversation() -> None:
    proc = run_cli(
        "chat", "--max-tokens", "24", stdin="What is the capital of France?\nAnd of Italy?\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert proc.stdout.count("> ") >= 2


def test_generate_raw_completion() -> None:
    proc = run_cli("generate", "--prompt", "The capital of France is", "--max-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_missing_model_file() -> None:
    assert_one_error_line(run_cli("chat", "hi", "--model", "/nonexistent/m.gguf"), "does not exist")


def test_exact_cpu_activations_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """--exact-cpu-activations turns the int8 default off here and for the processes started
    (set before the model loads: a missing file still fails after it)."""
    monkeypatch.setattr(env, "MOEFLOW_CPU_INT8", True)
    monkeypatch.setenv("MOEFLOW_CPU_INT8", "1")
    argv = ["chat", "hi", "--exact-cpu-activations", "--model", "/nonexistent/m.gguf"]
    assert main(argv) == 1
    assert env.MOEFLOW_CPU_INT8 is False and os.environ["MOEFLOW_CPU_INT8"] == "0"


def test_unknown_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["FooForCausalLM"],
                "model_type": "foo",
                "vocab_size": 320,
                "hidden_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
            }
        )
    )
    write_tiny_tokenizer(tmp_path)
    proc = run_cli("chat", "hi", "--model", str(tmp_path))
    assert_one_error_line(proc, "FooForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM")


def test_malformed_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    assert_one_error_line(run_cli("chat", "hi", "--model", str(bad)), str(bad))


def test_malformed_safetensors(tmp_path: Path, tiny_checkpoints: dict[str, Path]) -> None:
    src = tiny_checkpoints["llama"]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    good = (src / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(good[: len(good) // 2])  # truncated
    assert_one_error_line(run_cli("chat", "hi", "--model", str(tmp_path)), "model.safetensors")


def test_prompt_longer_than_context() -> None:
    proc = run_cli("generate", "--prompt", "word " * 100, "--max-model-len", "32")
    assert_one_error_line(proc, "32")


@pytest.mark.parametrize("bad", [["--temperature", "-1"], ["--top-p", "0"]])
def test_bad_sampling_arguments(bad: list[str]) -> None:
    assert_one_error_line(run_cli("generate", "--prompt", "hi", *bad), bad[0][2:].replace("-", "_"))


def test_serve_with_a_missing_model_exits_before_binding() -> None:
    assert_one_error_line(run_cli("serve", "--model", "/nonexistent"), "does not exist")


def test_serve_with_too_little_memory_exits_with_the_numbers() -> None:
    """The memory plan stops it before loading (engine/kv_cache.py plan_kv_cache would too)."""
    proc = run_cli("serve", "--kv-cache-tokens", str(10**10), "--port", "1")
    assert_one_error_line(proc, "does not fit in memory", "KV cache", "GiB", "is available")
