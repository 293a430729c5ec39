"""glibc malloc settings for a long-running worker: large buffers back to the OS when freed.

glibc serves an allocation above its mmap threshold (128 KiB at start) with its own mmap, unmapped on
free. Each time such a block is freed, glibc raises the threshold to that block's size (up to
32 MiB), so from then on the broker's fetch responses and produce buffers (hundreds of KiB to a few
MiB each, several per second) come from the heap instead. Freed there, they leave holes that later
small allocations pin, and the heap only grows: after a 10-minute soak the worker's RSS was 41 MiB
above a run with the threshold held at 128 KiB (278 against 237 MiB), with Python's own heap and
RocksDB's caches flat (docs/benchmark.md). Setting the threshold explicitly turns the adjustment
off. It costs some CPU (large buffers are mapped, faulted in and unmapped each time): about 4 % per
record on the bench's (c) stage. `INGEST_MALLOC_MMAP_THRESHOLD_KIB=0` leaves glibc's own behaviour.

Same effect as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in the environment, but it holds
however the worker is started. A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD_BYTES = 128 * 1024  # free memory at the top of the heap above this goes back


def hold_thresholds(mmap_threshold_bytes: int) -> bool:
    """Fix glibc's mmap threshold (128 KiB is its own starting value) and trim threshold; returns
    whether it did (glibc only, and a threshold above 0)."""
    if mmap_threshold_bytes <= 0:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    held = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold_bytes)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not held:
        log.warning("mallopt refused the thresholds; the worker's heap may fragment over time")
    return held
