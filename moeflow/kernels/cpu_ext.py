"""The compiled CPU kernels (csrc/*.cpp): built with torch's C++ extension tooling the first
time they are needed (scripts/setup.sh builds them at install), cached per source hash, torch
version and compiler flags, and loaded from the cache afterwards.

The sources are compiled once per instruction set (ISA): "avx2" (AVX2 + FMA + F16C) and
"avx512" (AVX-512 F/BW/VL/DQ + VNNI: the int8 products use vpdpbusd / vpdpwssd, with results
identical to AVX2's). The best ISA the CPU lists is chosen when the kernels load, but only
after a child process has loaded and run it: a CPU may list an extension that the OS or a
hypervisor does not let run (a fault there kills the child, not this process). The verdict is
cached beside the build. MOEFLOW_CPU_ISA forces one.

`ops()` returns the module, or None where the kernels cannot run (not x86-64 with AVX2/FMA/F16C,
no C++ compiler, MOEFLOW_CPU_KERNELS=0): callers then take their plain-torch path. A failed
build is logged once with the compiler's message, never raised. `release_openmp_pool()` keeps
an engine thread's OpenMP team spinning at barriers (its docstring says why)."""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

from moeflow import env

logger = logging.getLogger("moeflow")

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = (_CSRC / "cpu_ops.cpp",)
_HEADERS = tuple(sorted(_CSRC.glob("*.h")))  # every header there, so a new one needs no listing
# -ffp-contract=off: GCC fuses a * b + c into one FMA in C++ even under -std=c++17 (its ISO mode
# turns contraction off for C only), and where it fuses depends on the code around: the kernels'
# claims that a row's result does not depend on the kernel that ran it hold only without it.
_BASE_CFLAGS = ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"]
# ISA -> (compiler flags, CPU flags /proc/cpuinfo must list), best first.
ISAS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "avx512": (
        (
            "-mavx2",
            "-mfma",
            "-mf16c",
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512dq",
            "-mavx512vnni",
        ),
        ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"),
    ),
    "avx2": (("-mavx2", "-mfma", "-mf16c"), ("avx2", "fma", "f16c")),
}
_PROBE_TIMEOUT_S = 120


def ops() -> ModuleType | None:
    """The kernel module of the best usable ISA, or None when the CPU fast path is unavailable
    here."""
    return _load()


def ops_for(isa: str) -> ModuleType | None:
    """The kernel module built for `isa`, or None when this CPU lacks it or it cannot be built
    (tests run every kernel on each ISA the machine has)."""
    if isa not in ISAS:
        raise ValueError(f"unknown ISA {isa!r}; choose one of {', '.join(ISAS)}")
    if _missing_cpu_flags(ISAS[isa][1]):
        return None
    try:
        return _build(isa)
    except Exception as e:  # a missing compiler, ninja, headers
        logger.warning("moeflow: building the %s CPU kernels failed: %s", isa, e)
        return None


def available() -> bool:
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why `ops()` is None (None when it is not)."""
    _load()
    return _reason[0]


def isa() -> str | None:
    """The ISA `ops()` was built for (None when the kernels are unavailable)."""
    _load()
    return _chosen[0]


_reason: list[str | None] = [None]
_chosen: list[str | None] = [None]


def build_dir(isa: str = "avx2") -> Path:
    flags = (*_BASE_CFLAGS, *ISAS[isa][0])
    # NOTE: the key holds everything torch writes into the folder's build.ninja, since torch
    # rebuilds a folder whose build.ninja changed: the sources are copied into the folder (so
    # checkouts of the same sources share one build), and torch's headers are named by path.
    key = hashlib.sha256(
        b"".join(f.name.encode() + f.read_bytes() for f in (*_SOURCES, *_HEADERS))
        + str(_torch_include()).encode()
        + " ".join(flags).encode()
        + torch.__version__.encode()
    ).hexdigest()[:16]
    return (
        Path(env.MOEFLOW_CACHE_DIR)
        / "cpu_ops"
        / f"{key}-{isa}-py{sys.version_info[0]}{sys.version_info[1]}"
    )


@functools.lru_cache(maxsize=1)
def _load() -> ModuleType | None:
    if not env.MOEFLOW_CPU_KERNELS:
        _reason[0] = "disabled by MOEFLOW_CPU_KERNELS=0"
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _reason[0] = f"the kernels need x86-64 (this is {platform.machine()})"
        return None
    forced = env.MOEFLOW_CPU_ISA
    if forced and forced not in ISAS:
        _reason[0] = f"unknown MOEFLOW_CPU_ISA {forced!r}; choose one of {', '.join(ISAS)}"
        return None
    candidates = [forced] if forced else list(ISAS)
    reasons = []
    for name in candidates:
        missing = _missing_cpu_flags(ISAS[name][1])
        if missing:
            reasons.append(f"{name}: this CPU lacks {', '.join(missing)}")
            continue
        try:
            module = _build(name)
        except Exception as e:  # a missing compiler, ninja, headers: fall back, say why once
            reasons.append(f"{name}: building the CPU kernels failed: {e}")
            continue
        if name != "avx2" and not forced and not _runs_in_child(name):
            reasons.append(f"{name}: listed by the CPU but faults when run")
            continue
        _chosen[0] = name
        return module
    _reason[0] = "; ".join(reasons)
    logger.warning(
        "moeflow: CPU kernels unavailable (%s); using the plain-torch CPU path", _reason[0]
    )
    return None


@functools.cache
def _build(isa: str) -> ModuleType:
    from torch.utils import cpp_extension

    # torch's builder runs `ninja` from PATH; the one pip installed sits beside python.
    bin_dir = os.path.dirname(sys.executable)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    directory = build_dir(isa)
    directory.mkdir(parents=True, exist_ok=True)
    # One builder at a time through an flock, which the kernel drops when its holder dies; so
    # torch's own lock file, when present here, was left by a killed build (torch would wait on
    # it forever) and is removed.
    with open(directory.parent / f"{directory.name}.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (directory / "lock").unlink(missing_ok=True)
        src = directory / "src"
        src.mkdir(exist_ok=True)
        for f in (*_SOURCES, *_HEADERS):
            if not (src / f.name).is_file():  # rewriting would renew the mtime ninja compares
                (src / f"{f.name}.part").write_bytes(f.read_bytes())
                (src / f"{f.name}.part").replace(src / f.name)
        module = cpp_extension.load(
            name=f"moeflow_cpu_ops_{isa}",
            sources=[str(src / s.name) for s in _SOURCES],
            extra_cflags=[*_BASE_CFLAGS, *ISAS[isa][0]],
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=False,
        )
    assert isinstance(module, ModuleType)
    return module


def _torch_include() -> Path:
    """Where torch's C++ headers are, as torch's builder names them (by the path torch was
    imported from)."""
    return Path(torch.__file__).parent / "include"


def release_openmp_pool() -> bool:
    """Free the calling thread's OpenMP worker threads (OpenMP 5's omp_pause_resource_all, soft)
    in the OpenMP runtime torch loaded; True when it did, False where that runtime is not
    libgomp or lacks the call.

    NOTE: libgomp spin-waits at a barrier only while it manages no more threads than there are
    CPUs; past that it spins ~100 times, then sleeps in futex. A thread that ran torch ops (the
    main thread, loading the model) keeps its team's workers, so an engine thread stepping with
    every core puts libgomp past that count, and each barrier of the fused decode step (a few
    per layer) costs a sleep and a wake-up: measured ~150 voluntary context switches per token
    and thread on the default model, where the same step on the main thread has none. Called
    by the thread that loaded, before the engine thread's first step, this makes the engine's
    team the only one, as it is offline. The pool comes back if the caller runs torch ops again.
    NOTE: spinning wins only on cores the engine has to itself: on an oversubscribed machine
    (load ~10 on 2 cores) a spinning thread burns its share while its partner is descheduled
    (libgomp's default 300,000 polls, ~5 ms here: 64 served tokens took 220 s instead of 8 s),
    so `moeflow serve` bounds the spin (cli.SERVE_GOMP_SPINCOUNT)."""
    path = _loaded_openmp_runtime()
    if path is None:
        return False
    try:
        pause = ctypes.CDLL(path).omp_pause_resource_all  # the loaded copy: same soname
    except (OSError, AttributeError):
        return False
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause(_OMP_PAUSE_SOFT) == 0


_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t


def _loaded_openmp_runtime() -> str | None:
    """The path of the libgomp this process has loaded (torch's), from /proc/self/maps."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if os.path.basename(path).startswith("libgomp"):
                    return path
    except OSError:
        pass
    return None


def _runs_in_child(isa: str) -> bool:
    """Whether a child process can load the `isa` build and run its int8 kernels (cached per
    build and CPU)."""
    cpu = hashlib.sha256(" ".join(sorted(_cpu_flags())).encode()).hexdigest()[:12]
    verdict = build_dir(isa) / f"runs-{cpu}"
    if verdict.is_file():
        return verdict.read_text() == "ok"
    code = f"from moeflow.kernels import cpu_ext; cpu_ext._smoke_test({isa!r})"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            timeout=_PROBE_TIMEOUT_S,
            env={**os.environ, "MOEFLOW_CPU_ISA": isa},
        )
        ok = proc.returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    if not ok:
        logger.warning("moeflow: the %s CPU kernels fail in a child process; not using them", isa)
    verdict.write_text("ok" if ok else "fails")
    return ok


def _smoke_test(isa: str) -> None:
    """Run the `isa` build's int8 products once (the child of _runs_in_child)."""
    module = _build(isa)
    x = torch.randn(2, 256)
    w = torch.randint(0, 256, (8, 144), dtype=torch.uint8)  # Q4_K rows of 256 weights
    w[:, :4] = 0  # zero scales: finite results
    module.qgemm_i8(x, w, 12)
    module.qgemm_i8(x, torch.zeros(8, 34 * 8, dtype=torch.uint8), 8)  # Q8_0


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _missing_cpu_flags(required: tuple[str, ...]) -> list[str]:
    flags = _cpu_flags()
    return [f for f in required if f not in flags]


def main() -> int:
    """`python -m moeflow.kernels.cpu_ext`: build (or find) the kernels and say where."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if ops() is None:
        print(f"moeflow CPU kernels unavailable: {unavailable_reason()}")
        return 0
    chosen = isa()
    assert chosen is not None
    print(f"moeflow CPU kernels ready ({chosen}) in {build_dir(chosen)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
