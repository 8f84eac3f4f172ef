"""The C heap's setting for a process that handles video frames (glibc only; elsewhere nothing).

glibc serves a freed large block (a frame, a batch of crops: megabytes) back from its heap and
raises its mmap threshold to that block's size, so the next frames' arrays come from the heap
too and the heap fragments: a job's resident memory crept by about 0.1 MB a frame over a
1080p clip ten times its length (+150 MB over 1,050 frames; returned by ``malloc_trim``, so
free but held). A fixed threshold of 1 MiB keeps every array of a megabyte or more in its own
mapping, given back to the system when freed: the same job then levels off about 180 MB lower
(``bench.throughput --repeat``), at the same speed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h)
MMAP_THRESHOLD = 1 << 20
_done = False


def settle() -> bool:
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD`` (once per process; forked children
    inherit it). False where the C library is not glibc."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # musl, or no mallopt
        _done = False
    return _done
