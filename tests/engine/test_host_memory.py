"""utils/host_memory.py: a CPU engine makes glibc's malloc keep freed memory (no mmap for large
blocks, no trimming), checked where it shows: a 64 MB block then comes from the heap."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moeflow.api import LLM
from moeflow.engine import factory

_PROBE = """
import sys, torch
from moeflow.utils.host_memory import keep_freed_memory
applied = keep_freed_memory()
block = torch.empty(64 << 20, dtype=torch.uint8)
ptr = block.data_ptr()
heap = False
for line in open("/proc/self/maps"):
    if line.rstrip().endswith("[heap]"):
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        heap = heap or start <= ptr < end
print(applied, heap)
"""


def _probe(keep: str) -> str:
    env = {**os.environ, "MOEFLOW_KEEP_FREED_MEMORY": keep}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True
    )
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_kept_on_the_heap() -> None:
    assert _probe("1") == "True True"  # a large block from the heap: freed, it stays there
    assert _probe("0") == "False False"  # malloc as it was: a large block is its own mapping


def test_a_cpu_engine_keeps_freed_memory(
    smollm2_gguf: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(factory, "keep_freed_memory", lambda: calls.append("kept"))
    LLM(smollm2_gguf, device="cpu", max_model_len=64, kv_cache_tokens=128)
    assert calls == ["kept"]
