"""glibc malloc settings for processes that move large buffers between many threads.

gRPC hands each 4 MiB chunk to whichever worker thread serves the call. glibc gives
threads their own heaps (arenas) and, after the first large block is freed, raises its
mmap threshold so later 4 MiB blocks come from those heaps, where freed memory stays
mapped: the coordinator's peak then grows with the number of institutions uploading at
once. A fixed 1 MiB threshold (large blocks are mmapped and returned on free) and two
arenas keep it flat: measured with benchmarks/round_overhead.py at 50M parameters x 8
institutions, 1,417 MiB -> 999 MiB peak RSS for the same round.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger("fedcollab")

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_malloc(*, mmap_threshold: int = 1 << 20, arenas: int = 2) -> bool:
    """Applies the settings on Linux with glibc; elsewhere does nothing. True if applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # musl and others: no mallopt
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_ARENA_MAX, arenas))
    if not ok:
        log.debug("mallopt refused the memory settings; running with the defaults")
    return ok
