"""glibc malloc settings for processes that move large buffers between many threads.

gRPC hands each 4 MiB chunk to whichever worker thread serves the call. glibc gives
threads their own heaps (arenas) and, after the first large block is freed, raises its
mmap threshold so later 4 MiB blocks come from those heaps, where freed memory stays
mapped: the coordinator's peak then grows with the number of institutions uploading at
once. A fixed 1 MiB threshold (large blocks are mmapped and returned on free) and two
arenas keep it flat. Measured with benchmarks/scale_1b.py at 50M parameters, memory
above the serving process from 4 to 16 institutions: 0.37 -> 0.55 GiB with these
settings, 0.51 -> 1.07 GiB with glibc's (two arenas alone do not help: 1 arena gave
0.52 -> 1.21). The price is page faults on every fresh chunk buffer: a 50M x 4 round
takes about 13 s instead of 9-10 s (benchmarks/round_overhead.py). Set
FEDCOLLAB_MALLOC_DEFAULTS=1 to keep glibc's settings where time matters more.
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


def tune_malloc(*, mmap_threshold: int = 1 << 20, arenas: int = 2) -> bool:
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
