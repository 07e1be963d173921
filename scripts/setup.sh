#!/usr/bin/env bash
# Creates .venv (once) and installs moeflow into it with its test tools. Idempotent.
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
.venv/bin/pip install -q -e ".[test]"
# Build the CPU kernels now (cached per source hash), not inside the first command that needs
# them; a machine that cannot build them still runs, on the plain-torch path.
.venv/bin/python -m moeflow.kernels.cpu_ext
