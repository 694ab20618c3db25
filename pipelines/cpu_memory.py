"""Keep freed memory for reuse on Linux (glibc), instead of handing it back to the system at once.

glibc's malloc gives blocks of a few MB or more their own mapping and unmaps them when freed, and trims
the heap whenever its free top passes twice that size. A CPU loop that makes the same large activations
again and again (the audio code search decodes thousands of candidate windows) then pays, for every
tensor, for fresh zeroed pages from the kernel: BENCHMARKS.md measured over half of the search's time in
system calls. Raising both thresholds keeps those blocks in the heap, as `MALLOC_MMAP_THRESHOLD_` and
`MALLOC_TRIM_THRESHOLD_` would; a user who sets either variable keeps their own choice.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers, from glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its sliding threshold on 64-bit; bigger blocks are still mapped
TRIM_THRESHOLD = 1 << 30  # free heap kept before trimming: bounds what the process holds on to


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; whether they were set (False off glibc, or
    where the user's environment already chose them)."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in
                                                   ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
