"""glibc's mmap threshold held: a large buffer is still mmapped (and returned on free) after a larger
one was freed, where glibc would otherwise have raised the threshold and served it from the heap."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import ctypes, sys
from ingest_stream.malloc import hold_thresholds

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "held":
    assert hold_thresholds(128 << 10)
else:
    assert not hold_thresholds(0)  # INGEST_MALLOC_MMAP_THRESHOLD_KIB=0: glibc's own
big = bytearray(4 << 20)  # mmapped at glibc's starting threshold; freeing it raises the threshold
del big
before = libc.mallinfo2().hblkhd
medium = bytearray(512 << 10)
print(libc.mallinfo2().hblkhd - before)
"""


def _mmapped_bytes_of_a_medium_buffer(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's defaults
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env=env, cwd=Path(__file__).resolve().parents[2])
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_held_thresholds_keep_large_buffers_mmapped_after_a_larger_free() -> None:
    assert _mmapped_bytes_of_a_medium_buffer("held") >= 512 << 10
    # glibc's default (and a threshold of 0), for contrast: the freed 4 MiB block moved the
    # threshold past 512 KiB
    assert _mmapped_bytes_of_a_medium_buffer("default") == 0
