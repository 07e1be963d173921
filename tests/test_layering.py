"""The import rules of STYLE.md §2.1, read from every module's imports with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "moeflow"

# Modules that import nothing from moeflow but other leaf modules.
LEAF = (
    "moeflow.config",
    "moeflow.sampling_params",
    "moeflow.errors",
    "moeflow.env",
    "moeflow.context",
    "moeflow.utils",
    "moeflow.loading.presets",
    "moeflow.tokenizer",  # the package: tokenizer, chat_template, detokenize, reasoning
    "moeflow.weights",
    "moeflow.distributed",
    "moeflow.server.protocol",
    "moeflow.server.wire",
    "moeflow.server.metrics",
)

# package prefix -> what it may import from moeflow (besides leaf modules and itself)
ALLOWED: dict[str, tuple[str, ...]] = {
    "moeflow.kernels": (),
    "moeflow.layers": ("moeflow.kernels",),
    "moeflow.models": ("moeflow.layers",),
    # loading builds models from files: it may use the layers (quantize_linears)
    "moeflow.loading": (
        "moeflow.models.registry",
        "moeflow.models.base",
        "moeflow.layers",
        "moeflow.kernels",
    ),
    # the engine never imports layers, nor loading (which does): it is handed a built model...
    "moeflow.engine": ("moeflow.models.registry", "moeflow.models.base", "moeflow.kernels"),
    # ...by its factory, the one module of the engine that loads
    "moeflow.engine.factory": ("moeflow.engine", "moeflow.loading"),
    "moeflow.api": ("moeflow.engine", "moeflow.loading"),
    "moeflow.server": (
        "moeflow.engine.async_engine",
        "moeflow.engine.output_processor",
        "moeflow.engine.llm_engine",
        "moeflow.engine.request",
        "moeflow.engine.cost",
    ),
    "moeflow.bench": (
        "moeflow.api",
        "moeflow.engine",
        "moeflow.loading",
        "moeflow.models",
        "moeflow.kernels",
    ),
    # prefill/decode disaggregation: a connector the engine calls, and a router over HTTP
    "moeflow.disagg": ("moeflow.engine",),
    "moeflow.cli": (
        "moeflow.api",
        "moeflow.engine.factory",
        "moeflow.server",
        "moeflow.bench",
        "moeflow.disagg",
    ),
    "moeflow.__main__": ("moeflow.cli",),
    "moeflow": ("moeflow.api",),  # the package __init__ re-exports
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{a.name}" for a in node.names)
    return names


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _rule_for(module: str) -> tuple[str, tuple[str, ...]]:
    if any(_under(module, leaf) for leaf in LEAF):
        return "leaf", ()
    best = max((p for p in ALLOWED if _under(module, p)), key=len)
    return best, ALLOWED[best]


def _is_module(name: str) -> bool:
    rel = name.split(".")[1:]
    base = ROOT.joinpath(*rel)
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def test_every_module_follows_the_layering_rules() -> None:
    violations: list[str] = []
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_name(path)
        owner, allowed = _rule_for(module)
        for name in _imports(path):
            if name == "moeflow" or not _under(name, "moeflow") or not _is_module(name):
                continue  # third-party, or `from moeflow.x import Symbol`'s symbol part
            if any(_under(name, leaf) for leaf in LEAF):
                continue
            if owner != "leaf" and owner != "moeflow" and _under(name, owner):
                continue  # within its own package
            if not any(_under(name, a) for a in allowed):
                violations.append(f"{module} imports {name}")
    assert not violations, "\n".join(violations)


def test_server_never_imports_torch_and_models_name_no_device() -> None:
    for path in [*(ROOT / "server").rglob("*.py"), ROOT / "disagg" / "router.py"]:
        assert not any(_under(n, "torch") for n in _imports(path)), path
    for path in (ROOT / "models").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "cuda" not in text and "torch.device" not in text, path
        assert not any(_under(n, "moeflow.kernels") for n in _imports(path)), path


def test_nothing_imports_bench_or_cli_but_the_cli() -> None:
    for path in ROOT.rglob("*.py"):
        module = _module_name(path)
        if _under(module, "moeflow.bench") or module in ("moeflow.cli", "moeflow.__main__"):
            continue
        for name in _imports(path):
            assert not _under(name, "moeflow.bench"), f"{module} imports {name}"
            assert not _under(name, "moeflow.cli"), f"{module} imports {name}"


def test_the_checker_catches_a_violation(tmp_path: Path) -> None:
    """The rules are not vacuous: a models/ file importing a kernel is flagged."""
    owner, allowed = _rule_for("moeflow.models.llama")
    assert owner == "moeflow.models"
    assert not any(_under("moeflow.kernels.attention", a) for a in allowed)
    assert _rule_for("moeflow.weights.gguf")[0] == "leaf"
    assert _rule_for("moeflow.tokenizer.detokenize")[0] == "leaf"  # a leaf package's modules
    # the engine core reaches neither the layers nor the loader that imports them
    for module in ("moeflow.engine.llm_engine", "moeflow.engine.factory"):
        _, allowed = _rule_for(module)
        assert not any(_under("moeflow.layers.linear", a) for a in allowed), module
    _, allowed = _rule_for("moeflow.engine.llm_engine")
    assert not any(_under("moeflow.loading.loader", a) for a in allowed)
