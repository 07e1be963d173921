"""Every MOEFLOW_* environment variable, typed, with its default, and where the Hugging Face cache
is (HF_HUB_CACHE, HF_HOME). Nothing else reads os.environ."""

from __future__ import annotations

import os


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return default if raw is None or raw == "" else int(raw)


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    return default if raw is None or raw == "" else raw.lower() in ("1", "true", "yes", "on")


# Threads torch uses on CPU (0: torch's own default).
MOEFLOW_NUM_THREADS: int = _int("MOEFLOW_NUM_THREADS", 0)
# Show a progress bar while loading weights (only when stderr is a terminal either way).
MOEFLOW_PROGRESS: bool = _bool("MOEFLOW_PROGRESS", True)
# Load a model even when its memory plan says it does not fit (loading/memory_plan.py); the
# shortfall is then logged as a warning instead of failing before the load.
MOEFLOW_SKIP_MEMORY_CHECK: bool = _bool("MOEFLOW_SKIP_MEMORY_CHECK", False)
# Log level of the `moeflow` logger (default: INFO for `moeflow serve`, which logs one line per
# request, WARNING for the other commands).
MOEFLOW_LOG_LEVEL: str = os.environ.get("MOEFLOW_LOG_LEVEL", "")
# The API key `moeflow serve` requires when --api-key is not given (vLLM's VLLM_API_KEY).
MOEFLOW_API_KEY: str = os.environ.get("MOEFLOW_API_KEY", "")
# Use the compiled CPU kernels (kernels/csrc) where the CPU supports them; 0 forces plain torch.
MOEFLOW_CPU_KERNELS: bool = _bool("MOEFLOW_CPU_KERNELS", True)
# Where compiled kernels are cached.
MOEFLOW_CACHE_DIR: str = os.environ.get("MOEFLOW_CACHE_DIR") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "moeflow"
)
# 1 (the default): the CPU kernels over quantised weights (GEMVs, the int8 GEMMs of prefill,
# the grouped MoE kernel) quantise activations to int8 per 32 values (per 256 for the K-quants),
# as llama.cpp does: its numerics, 1.6-1.7x the fp32 path's prefill and decode on the default
# model, a mean KL from the fp32 reference below llama.cpp's own (docs/BENCHMARKS.md). 0 (or
# --exact-cpu-activations) keeps them fp32: greedy output then equals the dequantised fp32
# reference's (the parity tests' path; `make run` shows that answer).
MOEFLOW_CPU_INT8: bool = _bool("MOEFLOW_CPU_INT8", True)
# 1 (the default): on a CPU whose kernels use AVX-512 VNNI, with int8 activations, Q4_K weights
# (MoE experts and linear layers) are repacked on load, 16 rows side by side
# (kernels/csrc/q4k_r16.h; llama.cpp repacks its weights likewise): their bytes are then read
# from the process's own memory, not from the file's mapping, and loading reads them all. 0 (or
# --no-repack) keeps them as the file stores them.
MOEFLOW_CPU_REPACK: bool = _bool("MOEFLOW_CPU_REPACK", True)
# A CPU engine tells glibc's malloc to keep freed memory for the next step instead of returning
# it to the kernel (utils/host_memory.py); 0 leaves malloc as it is.
MOEFLOW_KEEP_FREED_MEMORY: bool = _bool("MOEFLOW_KEEP_FREED_MEMORY", True)
# Use the Triton kernels on CUDA tensors; 0 forces the plain-torch references.
MOEFLOW_TRITON: bool = _bool("MOEFLOW_TRITON", True)
# Run the Triton kernels on CPU tensors too; only meaningful under TRITON_INTERPRET=1 (tests).
MOEFLOW_TRITON_ON_CPU: bool = _bool("MOEFLOW_TRITON_ON_CPU", False)
# Triton's own switch for its numpy interpreter (read here, set by the tests on CPU machines).
TRITON_INTERPRET: bool = _bool("TRITON_INTERPRET", False)
# The instruction set of the CPU kernels: avx512 | avx2 (default: the best the CPU runs).
MOEFLOW_CPU_ISA: str = os.environ.get("MOEFLOW_CPU_ISA", "")
# The folder holding llama.cpp's `llama-batched-bench` for `moeflow bench --workload moe-cpu`
# (default: the build cached under MOEFLOW_CACHE_DIR, made on first use).
MOEFLOW_LLAMA_CPP_BIN: str = os.environ.get("MOEFLOW_LLAMA_CPP_BIN", "")


# Ray: the cluster to join (Ray's own variable; unset: a local cluster is started).
RAY_ADDRESS: str = os.environ.get("RAY_ADDRESS", "")
# Ray: the placement group's strategy for the ranks' bundles (one per rank, rank 0's on this
# process's node): PACK (default, vLLM's) | SPREAD | STRICT_PACK | STRICT_SPREAD (every rank on
# its own node).
MOEFLOW_RAY_PLACEMENT: str = os.environ.get("MOEFLOW_RAY_PLACEMENT", "PACK")


def torchrun_rank() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) when torchrun (or another launcher of torch.distributed) started this
    process, read at each call; None otherwise."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None or world is None or "MASTER_ADDR" not in os.environ:
        return None
    return int(rank), int(world)


def hf_hub_cache() -> str:
    """The local Hugging Face hub cache, found as huggingface_hub finds it: HF_HUB_CACHE, else
    HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub (~/.cache when unset). Read at each call
    (loading/source.py resolves `org/name` model names there; nothing is ever downloaded)."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return os.path.expanduser(cache)
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface",
    )
    return os.path.join(os.path.expanduser(home), "hub")
