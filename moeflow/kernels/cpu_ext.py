"""The compiled CPU kernels (csrc/cpu_ops.cpp): built with torch's C++ extension tooling the
first time they are needed (scripts/setup.sh builds them at install), cached per source hash,
torch version and compiler flags, and loaded from the cache afterwards.

`ops()` returns the module, or None where the kernels cannot run (not x86-64 with AVX2/FMA/F16C,
no C++ compiler, MOEFLOW_CPU_KERNELS=0): callers then take their plain-torch path. A failed
build is logged once with the compiler's message, never raised."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
from pathlib import Path
from types import ModuleType

import torch

from moeflow import env

logger = logging.getLogger("moeflow")

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = (_CSRC / "cpu_ops.cpp", _CSRC / "moe.cpp")
_HEADERS = (_CSRC / "cpu_common.h",)
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-std=c++17"]
_REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")


def ops() -> ModuleType | None:
    """The kernel module, or None when the CPU fast path is unavailable here."""
    return _load()


def available() -> bool:
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why `ops()` is None (None when it is not)."""
    _load()
    return _reason[0]


_reason: list[str | None] = [None]


def build_dir() -> Path:
    key = hashlib.sha256(
        b"".join(f.read_bytes() for f in (*_SOURCES, *_HEADERS))
        + " ".join(_CFLAGS).encode()
        + torch.__version__.encode()
    ).hexdigest()[:16]
    return (
        Path(env.MOEFLOW_CACHE_DIR)
        / "cpu_ops"
        / f"{key}-py{sys.version_info[0]}{sys.version_info[1]}"
    )


@functools.lru_cache(maxsize=1)
def _load() -> ModuleType | None:
    if not env.MOEFLOW_CPU_KERNELS:
        _reason[0] = "disabled by MOEFLOW_CPU_KERNELS=0"
        return None
    missing = _missing_cpu_flags()
    if missing:
        _reason[0] = f"this CPU lacks {', '.join(missing)}"
        return None
    try:
        from torch.utils import cpp_extension

        # torch's builder runs `ninja` from PATH; the one pip installed sits beside python.
        bin_dir = os.path.dirname(sys.executable)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        module = cpp_extension.load(
            name="moeflow_cpu_ops",
            sources=[str(s) for s in _SOURCES],
            extra_cflags=_CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=False,
        )
        assert isinstance(module, ModuleType)
        return module
    except Exception as e:  # a missing compiler, ninja, headers: fall back, say why once
        _reason[0] = f"building the CPU kernels failed: {e}"
        logger.warning("moeflow: %s; using the plain-torch CPU path", _reason[0])
        return None


def _missing_cpu_flags() -> list[str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return [f"x86-64 (this is {platform.machine()})"]
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ["a readable /proc/cpuinfo"]
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in _REQUIRED_CPU_FLAGS if f not in flags]
    return list(_REQUIRED_CPU_FLAGS)


def main() -> int:
    """`python -m moeflow.kernels.cpu_ext`: build (or find) the kernels and say where."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if ops() is None:
        print(f"moeflow CPU kernels unavailable: {unavailable_reason()}")
        return 0
    print(f"moeflow CPU kernels ready in {build_dir()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
