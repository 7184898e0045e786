"""glibc malloc settings for processes that move large buffers between many threads.

gRPC hands each 4 MiB chunk to whichever worker thread serves the call. glibc gives
threads their own heaps (arenas) and raises its mmap threshold as large blocks are
freed (up to 32 MiB), so buffers of every size end up in per-thread heaps where freed
memory stays mapped: the coordinator's peak then grows with the number of institutions
uploading at once. Two arenas and a fixed 8 MiB threshold (chunk buffers are reused
from the heap; anything larger is mmapped and returned on free) keep it close to flat.
Measured with benchmarks/scale_1b.py at 50M parameters, memory above the serving
process from 4 to 16 institutions, and a 50M x 4 round (benchmarks/round_overhead.py):
  glibc's settings         0.51 -> 1.07 GiB   9.4-9.9 s
  1 arena                  0.52 -> 1.21 GiB
  2 arenas, 1 MiB mmaps    0.37 -> 0.55 GiB   13.5-14.6 s (a page fault per 4 KiB of every chunk)
  2 arenas, 8 MiB (these)  0.42 -> 0.68 GiB   10.1-11.0 s
Set FEDCOLLAB_MALLOC_DEFAULTS=1 to keep glibc's settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger("fedcollab")

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_malloc(*, mmap_threshold: int = 8 << 20, arenas: int = 2) -> bool:
    """Applies the settings on Linux with glibc; elsewhere does nothing. True if applied."""
    if not sys.platform.startswith("linux") or os.environ.get("FEDCOLLAB_MALLOC_DEFAULTS"):
        return False  # FEDCOLLAB_MALLOC_DEFAULTS=1 keeps glibc's own settings
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # musl and others: no mallopt
    ok = bool(mallopt(_M_ARENA_MAX, arenas))
    if mmap_threshold:
        ok = ok and bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
    if not ok:
        log.debug("mallopt refused the memory settings; running with the defaults")
    return ok
