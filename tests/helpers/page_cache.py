"""The page cache's view of a file (Linux): drop its cached pages, and see which of them are
resident (mincore over a mapping of our own, which reads nothing). With read-ahead off on the
reader's mapping, a page is resident after a load only if the load touched it: what a test
needs to see which bytes of a memory-mapped checkpoint a load read."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value

PAGE = mmap.PAGESIZE


def evict(path: Path) -> None:
    """Ask the kernel to drop the file's cached pages (written back first: dirty pages stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_pages(path: Path) -> list[bool]:
    """Whether each page of the file is in the page cache now."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            raise OSError(ctypes.get_errno(), f"mmap of {path}")
        try:
            vec = (ctypes.c_ubyte * ((size + PAGE - 1) // PAGE))()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path}")
            return [bool(v & 1) for v in vec]
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def interior_pages(start: int, end: int) -> range:
    """The pages wholly inside bytes [start, end) (a page shared with a neighbour's bytes says
    nothing about which of the two was read)."""
    return range((start + PAGE - 1) // PAGE, end // PAGE)


def file_pages_reclaimed() -> int | None:
    """File pages the kernel has reclaimed since boot, machine-wide (/proc/vmstat's
    pgsteal_file; None where it is not kept). A page a load read can leave the page cache
    before it is looked at only through reclaim: where this count moved, residency after a load
    does not show what the load read."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == "pgsteal_file":
                    return int(value)
    except OSError:
        return None
    return None
