"""Handing the allocator's free memory back to the operating system.

XLA:CPU and NumPy allocate and free tens of MiB per train step. glibc's malloc (and tcmalloc)
keep freed memory for reuse instead of returning it, so a process's resident memory (RSS) drifts
up with fragmentation while the memory in use stays flat: on the tiny SFT config, RSS read ~930
to 1,190 MiB between evaluations while `malloc_trim(0)` brought it back to ~590 MiB every time
(bench/soak.py, docs/performance.md). Keeping the freed memory is what makes steps fast on these
machines (faulting pages back in is slow), so the train loop releases it only at its rare
moments — after a checkpoint save or a held-out evaluation (`train.release_memory`).
"""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def _release_functions() -> tuple:
    """The C functions that return free memory to the OS in this process (may be empty)."""
    if not sys.platform.startswith("linux"):
        return ()
    try:
        process = ctypes.CDLL(None)  # the symbols already loaded: libc, a preloaded allocator
    except OSError:
        return ()
    found = []
    # tcmalloc (LD_PRELOAD=libtcmalloc_minimal.so.4, as the benchmarks use) keeps its own caches.
    release = getattr(process, "MallocExtension_ReleaseFreeMemory", None)
    if release is not None:
        release.restype = None
        release.argtypes = []
        found.append(lambda: release())
    trim = getattr(process, "malloc_trim", None)  # glibc; absent on musl
    if trim is not None:
        trim.restype = ctypes.c_int
        trim.argtypes = [ctypes.c_size_t]
        found.append(lambda: trim(0))
    return tuple(found)


def release_free_memory() -> bool:
    """Return the allocator's free memory to the OS (glibc `malloc_trim(0)`, tcmalloc's
    `MallocExtension_ReleaseFreeMemory`); False where neither exists (e.g. macOS)."""
    functions = _release_functions()
    for release in functions:
        release()
    return bool(functions)
