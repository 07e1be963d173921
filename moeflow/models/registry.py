"""Architecture name (HF `architectures[0]`) -> model class, found by scanning this package for
modules that end with `ENTRY_CLASSES`. A family file that fails to import fails loudly."""

from __future__ import annotations

import functools
import importlib
import pkgutil

import moeflow.models
from moeflow.errors import UnsupportedArchitectureError
from moeflow.models.base import CausalLM


@functools.cache
def _registry() -> dict[str, type[CausalLM]]:
    found: dict[str, type[CausalLM]] = {}
    for info in pkgutil.iter_modules(moeflow.models.__path__):
        if info.name in ("registry", "base"):
            continue
        module = importlib.import_module(f"moeflow.models.{info.name}")
        for cls in getattr(module, "ENTRY_CLASSES", []):
            found[cls.__name__] = cls
    return found


def supported_architectures() -> list[str]:
    return sorted(_registry())


def get_model_class(architecture: str) -> type[CausalLM]:
    try:
        return _registry()[architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {architecture!r}; supported: "
            + ", ".join(supported_architectures())
        ) from None
