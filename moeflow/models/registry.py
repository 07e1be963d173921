"""Architecture name (HF `architectures[0]`) -> model class, found by scanning this package for
modules that end with `ENTRY_CLASSES`. A family file that fails to import fails loudly."""

from __future__ import annotations

import functools
import importlib
import pkgutil

from torch import nn

import moeflow.models
from moeflow.errors import UnsupportedArchitectureError


@functools.cache
def _registry() -> dict[str, type[nn.Module]]:
    found: dict[str, type[nn.Module]] = {}
    for info in pkgutil.iter_modules(moeflow.models.__path__):
        if info.name == "registry":
            continue
        module = importlib.import_module(f"moeflow.models.{info.name}")
        for cls in getattr(module, "ENTRY_CLASSES", []):
            found[cls.__name__] = cls
    return found


def supported_architectures() -> list[str]:
    return sorted(_registry())


def get_model_class(architecture: str) -> type[nn.Module]:
    try:
        return _registry()[architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {architecture!r}; supported: "
            + ", ".join(supported_architectures())
        ) from None
