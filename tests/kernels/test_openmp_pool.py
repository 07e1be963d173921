"""cpu_ext.release_openmp_pool: the calling thread's OpenMP workers exit (so that an engine
thread's team is the only one libgomp manages), and torch ops afterwards still run in parallel
and compute the same; AsyncEngine.start calls it, so a served engine's team is the only one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moeflow.kernels import cpu_ext


def _num_threads() -> int:
    return len(os.listdir("/proc/self/task"))


_RELEASE = """
import os, time, torch
from moeflow.kernels import cpu_ext
def num_threads():
    return len(os.listdir("/proc/self/task"))
torch.set_num_threads(2)
x = torch.randn(512, 512)
expected = x @ x  # runs an OpenMP region: the main thread's team has a worker
before = num_threads()
assert cpu_ext.release_openmp_pool()
deadline = time.monotonic() + 10
while num_threads() >= before and time.monotonic() < deadline:
    time.sleep(0.01)
after = num_threads()
torch.testing.assert_close(x @ x, expected, rtol=0, atol=0)  # the pool comes back
print(before, after)
"""


@pytest.mark.skipif(
    cpu_ext._loaded_openmp_runtime() is None, reason="torch did not load libgomp here"
)
def test_release_frees_the_callers_workers() -> None:
    """In a clean process (an engine started earlier in this one may have released the pool
    already): the workers exit, and torch ops afterwards compute the same."""
    proc = subprocess.run(
        [sys.executable, "-c", _RELEASE], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = map(int, proc.stdout.split())
    assert after < before


_SERVED = """
import asyncio, os, sys, time, torch
from moeflow import LLM, SamplingParams
from moeflow.engine.async_engine import AsyncEngine
torch.set_num_threads(2)
before = set(os.listdir("/proc/self/task"))
x = torch.randn(512, 512)
x @ x
pool = set(os.listdir("/proc/self/task")) - before  # the main thread's OpenMP workers
llm = LLM(sys.argv[1], dtype="float32", device="cpu", max_model_len=64)
engine = AsyncEngine(llm.engine)
engine.start()
async def main():
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    async for _ in await engine.generate([1, 2, 3], params, "r"):
        pass
    await engine.drain(5)
asyncio.run(main())
deadline = time.monotonic() + 10
while pool & set(os.listdir("/proc/self/task")) and time.monotonic() < deadline:
    time.sleep(0.01)
print(len(pool), len(pool & set(os.listdir("/proc/self/task"))))
"""


@pytest.mark.skipif(
    cpu_ext._loaded_openmp_runtime() is None, reason="torch did not load libgomp here"
)
def test_a_started_engine_leaves_the_loading_threads_team_none(
    tiny_checkpoints: dict[str, Path],
) -> None:
    """In a clean process: the main thread's workers (made by a torch op, as loading does) are
    gone once the engine thread has served a request, so its team is libgomp's only one."""
    proc = subprocess.run(
        [sys.executable, "-c", _SERVED, str(tiny_checkpoints["llama"])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    made, alive = map(int, proc.stdout.split())
    assert made == 1  # two threads: the main thread and one worker
    assert alive == 0
