"""llama.cpp's own `llama-batched-bench`, the multi-stream peer of `moeflow bench --workload
moe-cpu`: found (MOEFLOW_LLAMA_CPP_BIN, or the cached build) or built once from
llama-cpp-python's vendored llama.cpp source (pip's sdist, cmake from PyPI), with the CPU
variant chosen by the instruction sets that run here and AMX off (a CPU that lists AMX under a
hypervisor may fault on it). Run in a subprocess, so a crash of the peer is a note, not the
end of the bench."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from moeflow import env
from moeflow.kernels import cpu_ext

logger = logging.getLogger("moeflow")

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendored llama.cpp is built
BATCHED_BENCH = "llama-batched-bench"
PERPLEXITY = "llama-perplexity"  # the KL-divergence peer of `--workload quality`


@dataclass(slots=True)
class PeerRun:
    """llama-batched-bench's figures per stream count (its last pass at each); `note` says why
    some are missing."""

    prefill_tok_s: dict[int, float] = field(default_factory=dict)
    decode_tok_s: dict[int, float] = field(default_factory=dict)
    peak_rss_bytes: int | None = None
    wall_s: float | None = None
    note: str = ""
    passes: dict[int, list[dict[str, float]]] = field(default_factory=dict)  # every pass, in order


def _build_dir() -> Path:
    isa = cpu_ext.isa() or "avx2"
    return Path(env.MOEFLOW_CACHE_DIR) / "llama.cpp" / f"{LLAMA_CPP_PYTHON}-{isa}"


def find_batched_bench() -> Path | None:
    """The llama-batched-bench binary: MOEFLOW_LLAMA_CPP_BIN's, else the cached build's."""
    return find_tool(BATCHED_BENCH)


def find_tool(name: str) -> Path | None:
    """The llama.cpp binary `name`: MOEFLOW_LLAMA_CPP_BIN's, else the cached build's."""
    folder = env.MOEFLOW_LLAMA_CPP_BIN
    candidates = [Path(folder) / name] if folder else []
    candidates.append(_build_dir() / "bin" / name)
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def cmake_flags(isa: str | None) -> list[str]:
    """llama.cpp's CPU build options for moeflow's instruction-set variant `isa` (the one the
    child-process probe found to run here): never native (-march=native would take AMX)."""
    flags = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DGGML_NATIVE=OFF",
        "-DLLAMA_CURL=OFF",
        "-DGGML_AVX=ON",
        "-DGGML_AVX2=ON",
        "-DGGML_FMA=ON",
        "-DGGML_F16C=ON",
        "-DGGML_AMX_TILE=OFF",
        "-DGGML_AMX_INT8=OFF",
        "-DGGML_AMX_BF16=OFF",
    ]
    avx512 = "ON" if isa == "avx512" else "OFF"
    flags += [f"-DGGML_AVX512={avx512}", f"-DGGML_AVX512_VNNI={avx512}"]
    return flags


def build_batched_bench(jobs: int | None = None) -> Path:
    """Download llama-cpp-python's sdist, build its vendored llama-batched-bench (~10 minutes on
    2 cores) into the cache and return the binary. Raises RuntimeError with the failing step."""
    out = _build_dir()
    cmake = shutil.which("cmake") or shutil.which("cmake", path=os.path.dirname(sys.executable))
    if cmake is None:
        raise RuntimeError("cmake not found (pip install cmake)")
    with tempfile.TemporaryDirectory(prefix="moeflow-llama-") as tmp:
        _run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp],
            "download the llama-cpp-python sdist",
        )  # fmt: skip
        sdist = _one(Path(tmp).glob("llama_cpp_python-*.tar.gz"), "the downloaded sdist")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = _one(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"), "vendor/llama.cpp")
        build = Path(tmp) / "build"
        _run([cmake, "-S", str(src), "-B", str(build), *cmake_flags(cpu_ext.isa())], "configure")
        jobs_arg = str(jobs or os.cpu_count() or 1)
        _run([cmake, "--build", str(build), "--target", BATCHED_BENCH, "-j", jobs_arg], "build")
        binary = _one(build.rglob(BATCHED_BENCH), f"the built {BATCHED_BENCH}")
        (out / "bin").mkdir(parents=True, exist_ok=True)
        shutil.copy2(binary, out / "bin" / BATCHED_BENCH)
    return out / "bin" / BATCHED_BENCH


def _one(found: Iterator[Path], what: str) -> Path:
    path = next(found, None)
    if path is None:
        raise RuntimeError(f"{what} not found")
    return path


def _run(cmd: list[str], what: str) -> None:
    logger.info("llama.cpp peer: %s", what)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"could not {what}: " + " | ".join(tail))


def run_batched_bench(
    binary: Path,
    model: str,
    prompt_len: int,
    decode_tokens: int,
    streams: list[int],
    threads: int,
    timeout_s: float = 3600.0,
    passes: int = 1,
) -> PeerRun:
    """llama-batched-bench on `model`: for each stream count S, S prompts of `prompt_len` tokens
    prefilled (not shared), then `decode_tokens` steps of S tokens, `passes` times in a row (the
    last pass's figures kept). Its peak RSS comes from the kernel's accounting of the child
    (wait4)."""
    ctx = max(streams) * (prompt_len + decode_tokens) + 64
    npl = [s for s in streams for _ in range(max(1, passes))]
    cmd = [
        str(binary), "-m", model, "-c", str(ctx), "-b", "2048", "-ub", "512",
        "-npp", str(prompt_len), "-ntg", str(decode_tokens),
        "-npl", ",".join(map(str, npl)), "-t", str(threads), "--output-format", "jsonl",
    ]  # fmt: skip
    run = PeerRun()
    try:
        stdout, status, rss, wall = _run_measured(cmd, timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        run.note = f"failed: {type(e).__name__}: {e}"
        return run
    run.peak_rss_bytes, run.wall_s = rss, wall
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        pl = int(row["pl"])
        run.prefill_tok_s[pl] = float(row["speed_pp"])  # a later pass replaces an earlier one
        run.decode_tok_s[pl] = float(row["speed_tg"])
        run.passes.setdefault(pl, []).append(
            {"prefill_tok_s": float(row["speed_pp"]), "decode_tok_s": float(row["speed_tg"])}
        )
    if status != 0:
        sig = -status if status < 0 else None
        run.note = f"crashed (signal {sig})" if sig else f"exited with status {status}"
    return run


def _run_measured(cmd: list[str], timeout_s: float) -> tuple[str, int, int, float]:
    """(stdout, exit status (negative: signal), peak RSS bytes, wall seconds) of `cmd`, killed
    after `timeout_s` (then TimeoutExpired)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL)
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        if wall >= timeout_s:
            raise subprocess.TimeoutExpired(cmd, timeout_s)
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    return text, proc.returncode, usage.ru_maxrss * 1024, wall
