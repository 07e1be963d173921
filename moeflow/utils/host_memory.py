"""The C allocator's habits under a CPU engine.

glibc's malloc serves large blocks (128 KB and up, the bound rising to 32 MB as it adapts) from
mmap and unmaps them when freed, and gives the top of its heap back to the kernel past a
threshold. An engine step allocates the same large buffers again and again (activations, the
expert kernel's gathered rows), so each step took fresh pages from the kernel, faulted in and
zeroed one by one: on the 2-core virtual machines of docs/BENCHMARKS.md, a 512-token prefill of
Qwen3-30B-A3B's first 4 layers ran 815-837 tok/s that way and 938-951 with the memory kept.
`keep_freed_memory()` makes freed memory stay with the process for the next step (no mmap for
malloc, no trimming): the resident memory stays at its high-water mark, as a caching allocator's
would."""

from __future__ import annotations

import ctypes
import logging
import sys

from moeflow import env

logger = logging.getLogger("moeflow")

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied = False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (M_MMAP_MAX 0: large blocks come from
    the heap, not from mmap; M_TRIM_THRESHOLD at its maximum: the heap is never trimmed). Once
    per process; False where it does not apply (not Linux, a C library without mallopt or one
    that refuses the settings, MOEFLOW_KEEP_FREED_MEMORY=0)."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or not env.MOEFLOW_KEEP_FREED_MEMORY:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    logger.debug("malloc keeps freed memory: %s", _applied)
    return _applied
