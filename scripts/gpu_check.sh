#!/usr/bin/env bash
# The GPU machine's check, in one call: the `gpu`-marked tests, then `moeflow bench --workload
# suite` on random-weight presets of real shapes. Each stage runs under its own time limit so a
# hang in one still leaves the others' output. Logs and JSON land in $OUT (the device tool's
# folder; /tmp/moeflow-gpu-check elsewhere).
#
#   bash scripts/gpu_check.sh [tests|nvml|profile|qwen3|deepseek|olmoe|hf|tune ...]   (default: tests qwen3 deepseek)
#
# The next run's plan (docs/BENCHMARKS.md, "moeflow on a GPU"): tests qwen3 deepseek profile, then
# `TUNE_TOKENS=1,16,64 TUNE_S=500 bash scripts/gpu_check.sh tune` alone (the whole search took
# over 330 s for its first token count; the table is written after each count)
#
# A GPU machine with torch and Triton but not moeflow's other dependencies takes them as
# wheels in .whl/ (installed here with --no-deps into /tmp/site), downloaded beforehand on a
# machine with network for that machine's Python, e.g. for CPython 3.12:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux_2_31_x86_64 -d .whl \
#     fastapi starlette pydantic pydantic_core annotated-types typing-inspection \
#     typing_extensions uvicorn llguidance openai jiter distro sniffio jsonschema \
#     jsonschema-specifications referencing rpds-py gguf
set -u
OUT=${OUT:-/tmp/moeflow-gpu-check}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
stages=${*:-tests qwen3 deepseek}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

suite() {  # NAME SECONDS ARGS...
    local name=$1 secs=$2
    shift 2
    echo "=== suite $name (limit ${secs}s)"
    timeout "$secs" python3 -m moeflow bench --workload suite --json "$OUT/suite-$name.json" "$@" \
        2>&1 | tee "$OUT/suite-$name.log"
    echo "=== suite $name: exit ${PIPESTATUS[0]}"
}

for stage in $stages; do
    case $stage in
    tests)
        echo "=== gpu tests (limit ${TESTS_S:-170}s)"
        per_test=()
        python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 100)
        timeout "${TESTS_S:-170}" python3 -m pytest -p no:cacheprovider -o addopts="" -q -rfE \
            "${per_test[@]}" --durations 12 -m gpu \
            tests/kernels/test_elementwise_triton.py tests/kernels/test_attention_triton.py \
            tests/kernels/test_fused_moe_triton.py tests/kernels/test_mla_triton.py \
            tests/engine/test_cuda_graph.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -60
        echo "=== gpu tests: exit ${PIPESTATUS[0]}"
        ;;
    qwen3)
        suite qwen3 "${QWEN3_S:-170}" --model preset:qwen3-30b-a3b --compare none \
            --batch-sizes 1,16,64 --prefill-shapes 1x2048,8x2048 --num-requests 200 \
            --plot "$OUT/suite-qwen3.png"
        ;;
    deepseek)
        suite deepseek "${DEEPSEEK_S:-100}" --model preset:deepseek-v2-lite --compare none \
            --batch-sizes 1,16,64 --prefill-shapes 1x2048 --num-requests 0
        ;;
    olmoe)
        suite olmoe "${OLMOE_S:-90}" --model preset:olmoe-1b-7b --compare none \
            --batch-sizes 1,16,64 --prefill-shapes 1x2048 --num-requests 0
        ;;
    hf)
        suite hf "${HF_S:-200}" --model preset:olmoe-1b-7b --compare hf \
            --batch-sizes 1,16 --prefill-shapes 1x2048 --num-requests 0 --decode-tokens 64
        ;;
    nvml)  # what one read of the GPU's energy counter costs (engine/cost.py SampledMeter)
        python3 - <<'PY' 2>&1 | tee "$OUT/nvml.txt"
import statistics, time, torch
from moeflow.engine.cost import NvmlMeter
meter = NvmlMeter("GPU-" + str(torch.cuda.get_device_properties(0).uuid))
times = []
for _ in range(50):
    t = time.perf_counter()
    meter.read_uj()
    times.append(time.perf_counter() - t)
print(f"NVML energy read: median {1e3 * statistics.median(times):.3f} ms, "
      f"min {1e3 * min(times):.3f} ms, max {1e3 * max(times):.3f} ms over 50 reads")
PY
        ;;
    profile)  # the kernels of a decode step at batch 1 and 16, eager and graphs
        for b in 1 16; do
            timeout "${PROFILE_S:-120}" python3 scripts/gpu_profile.py qwen3-30b-a3b 8 "$b" 2>&1 \
                | tee "$OUT/profile-bs$b.txt" | grep "^==="
        done
        ;;
    tune)
        echo "=== moe-tune (limit ${TUNE_S:-150}s)"
        tune_tokens=()
        [ -n "${TUNE_TOKENS:-}" ] && tune_tokens=(--tune-tokens "$TUNE_TOKENS")
        timeout "${TUNE_S:-150}" python3 -m moeflow bench --workload moe-tune \
            --model preset:qwen3-30b-a3b ${tune_tokens[@]+"${tune_tokens[@]}"} \
            --tune-output "$OUT/fused_moe_table.json" 2>&1 | tee "$OUT/moe-tune.log" | tail -30
        ;;
    *) echo "unknown stage $stage" ;;
    esac
done
