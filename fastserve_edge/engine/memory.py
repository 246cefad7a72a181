"""How this process hands memory back: the allocator policy for running a model.

glibc serves a large block (>= 128 KiB) as its own mapping, but raises that threshold to
the size of every such block freed (up to 32 MiB) and its trim threshold to twice that.
After the first prefill, prefill's activations (tens of MiB per layer on a 1B model) come
from the heap and stay resident after they are freed: ~50-80 MiB of peak RSS that holds
nothing. A fixed threshold keeps large blocks as mappings, unmapped when freed. Small
blocks, all that a decode step allocates, are unaffected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from functools import cache

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
LARGE_BLOCK = 128 << 10  # glibc's own default, kept fixed: mmap/munmap cost microseconds, prefill's layers milliseconds


@cache
def release_large_frees() -> bool:
    """Set the fixed thresholds once per process; False where the C library has no mallopt."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt, their own policy
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * LARGE_BLOCK))
