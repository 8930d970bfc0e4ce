"""Process-wide settings for a long-running forecastd process: malloc's thresholds, and the garbage
collector's view of the objects that live as long as the process.

glibc's malloc serves every block over its mmap threshold with fresh pages from the kernel and gives
the top of the heap back once more than its trim threshold lies free there. A tick allocates and frees
the same few large arrays every time (10,000 series: the hidden state, the gates and the carried window
are 2.5–7 MB each), so with the defaults each of them is zero-filled page by page again on every tick:
at 10,000 series that was 40% of the recurrent step (12.6 ms against 7.0 ms with the settings below).
Raising the two thresholds keeps freed blocks in the heap for the next tick to reuse. The cost is
memory held after a peak: up to the trim threshold of free heap, plus what fragmentation keeps.

Python's collector walks every tracked object at each full (generation 2) collection. After importing
torch, pandas and SQLAlchemy that is some 260,000 objects and 170-190 ms, and a 10,000-series tick
allocates enough to set one off every few ticks: a 300 ms stall in one tick of six in speed.py's
end-to-end run. The daemon freezes what it holds once it has started (`gc.freeze`), so later
collections walk only what ticks create.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import sys

__all__ = ["tune_malloc", "freeze_heap"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's upper limit for this setting on 64-bit systems
TRIM_THRESHOLD = 256 * 2**20

_done: bool | None = None


def tune_malloc() -> bool:
    """Raise glibc malloc's mmap and trim thresholds for this process; True when they are set.

    Nothing changes where the user has chosen: any MALLOC_*_ variable, GLIBC_TUNABLES or an LD_PRELOAD
    (jemalloc, tcmalloc) in the environment, or a C library other than glibc. Idempotent.
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    chosen = [k for k in os.environ if (k.startswith("MALLOC_") and k.endswith("_")) or k in ("GLIBC_TUNABLES",
                                                                                           "LD_PRELOAD")]
    if not sys.platform.startswith("linux") or chosen:
        if chosen:
            log.debug("malloc left as configured (%s set)", ", ".join(sorted(chosen)))
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt to speak of)
        return _done
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("malloc thresholds: mmap %d, trim %d (%s)", MMAP_THRESHOLD, TRIM_THRESHOLD,
              "set" if _done else "refused")
    return _done


def freeze_heap() -> int:
    """Collect, then move every object alive now into the collector's permanent generation, which
    later collections skip; returns how many. For a long-running process once its modules, model and
    connections are loaded: they live as long as it does, so walking them again finds nothing to free.
    Collecting first keeps today's garbage from being frozen with them."""
    gc.collect()
    gc.freeze()
    count = gc.get_freeze_count()
    log.debug("%d objects frozen out of the garbage collector's full collections", count)
    return count
