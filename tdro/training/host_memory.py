"""Keep freed host memory for reuse: glibc's malloc unmaps large freed blocks, so each CPU step faults them back in.

With glibc's defaults a training step of two CNN encoders at batch 128 takes 4–7.8k minor page faults and
8–19 ms of kernel time (of a 35–50 ms step on 2 threads): activations and gradients of a few MB are mapped
and unmapped every step. tcmalloc and jemalloc avoid it, but only through LD_PRELOAD; ``mallopt`` does the
same from inside the process. ``bench/host_memory.py`` prints the faults and step times both ways.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
# blocks above the mmap threshold still come from, and go back to, the OS; glibc versions that cap the
# threshold at 32 MB (HEAP_MAX_SIZE / 2 on 64-bit) refuse the first value
MMAP_THRESHOLDS = (256 << 20, 32 << 20)
TRIM_THRESHOLD = 1 << 30  # free memory kept at the top of the heap before any is given back
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks for reuse instead of unmapping them (process-wide, once); whether it does now.

    Off Linux, with another C library, or when the user tunes malloc through its MALLOC_* variables,
    nothing changes. The process keeps up to its peak of freed memory mapped, as tcmalloc would.
    """
    if sys.platform != "linux" or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    if not any(mallopt(M_MMAP_THRESHOLD, threshold) == 1 for threshold in MMAP_THRESHOLDS):
        return False
    return mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
