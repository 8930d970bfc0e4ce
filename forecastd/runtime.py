"""Process-wide settings for a long-running forecastd process: malloc's thresholds, the garbage
collector's view of the objects that live as long as the process, numpy's BLAS threads, and where numba
caches its code.

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

A tick of up to a few hundred series runs its matrix products through numpy's BLAS (`Forecaster.tick_arrays`):
100 x 64 by 64 x 192, some 2.5 MFLOP, which one core does in 27 us, every time. Split over both cores of
a 2-core VM, OpenBLAS took either 21-22 us or 48-51 us, from one process to the next and within one (12
fresh processes without torch: 7 of 24 timings fast); beside torch's OpenMP workers (a retrain, a tick of
thousands of series) the slow mode was the rule. A product that small gains little from a second thread
and loses most when that thread waits for its core, so the CLI keeps numpy's BLAS on one thread
(`single_thread_blas`); torch's own BLAS, linked into torch, keeps its threads for training. (Where numpy
and torch load one shared MKL, as some conda builds do, the limit reaches torch's CPU training too; setting
`MKL_NUM_THREADS` leaves both alone.)

The step-by-step loops are compiled by numba with `cache=True`, and numba looks for a writable cache
directory when each module that defines them is imported: `$NUMBA_CACHE_DIR`, the package's own
`__pycache__`, then `$XDG_CACHE_HOME/numba` (or `~/.cache/numba`). Where none is writable (a read-only
install run by a user without a home, as `systemd-run -p DynamicUser=yes` without a cache directory
does) the import fails with "cannot cache function ...: no locator available". `ensure_numba_cache`,
run when the package is imported, points numba at a private temporary directory instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import stat
import sys
import tempfile
from collections.abc import Mapping, MutableMapping
from pathlib import Path

__all__ = ["tune_malloc", "freeze_heap", "single_thread_blas", "ensure_numba_cache"]

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


BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


def single_thread_blas(environ: Mapping[str, str] = os.environ) -> bool:
    """Run numpy's BLAS on one thread for the rest of this process; True when one was found and set.

    Left as it is where the user has chosen a thread count for it (any of `BLAS_THREAD_VARIABLES`).
    """
    chosen = sorted(k for k in BLAS_THREAD_VARIABLES if k in environ)
    if chosen:
        log.debug("numpy's BLAS threads left as configured (%s set)", ", ".join(chosen))
        return False
    import numpy  # noqa: F401  (loads the BLAS the limit applies to)
    from threadpoolctl import ThreadpoolController

    blas = ThreadpoolController().select(user_api="blas")
    blas.limit(limits=1)
    names = sorted({lib["internal_api"] for lib in blas.info()})
    log.debug("numpy's BLAS on one thread (%s)", ", ".join(names) or "none loaded")
    return bool(names)


def ensure_numba_cache(environ: MutableMapping[str, str] = os.environ,
                       package_dir: Path = Path(__file__).resolve().parent) -> str | None:
    """Set NUMBA_CACHE_DIR in `environ` to a private temporary directory when numba would find no
    writable cache directory for this package's modules; returns that directory, else None.

    Call it before numba is imported: numba reads the variable once, at its own import (an already
    imported numba is pointed there too).
    """
    chosen = environ.get("NUMBA_CACHE_DIR")
    xdg = environ.get("XDG_CACHE_HOME")  # as numba's appdirs reads it: set but empty means the working directory
    user = Path(xdg if xdg is not None else Path(environ.get("HOME") or "~").expanduser() / ".cache") / "numba"
    candidates = [Path(chosen)] if chosen else []
    if any(_writable(p) for p in (*candidates, package_dir / "__pycache__", user)):
        return None
    try:
        fallback = _private_temp_dir()
    except OSError as exc:
        log.warning("numba has no writable cache directory (%s, %s, %s) and no temporary directory is usable "
                    "(%s); set NUMBA_CACHE_DIR or XDG_CACHE_HOME to a writable directory",
                    chosen or "NUMBA_CACHE_DIR unset", package_dir / "__pycache__", user, exc)
        return None
    environ["NUMBA_CACHE_DIR"] = fallback
    numba_config = sys.modules.get("numba.core.config")
    if numba_config is not None:
        numba_config.CACHE_DIR = fallback
    # A warning, not debug: the cache in a temporary directory may not outlive the process (PrivateTmp=),
    # so each start compiles again, seconds the operator can save by giving the process a cache.
    log.warning("numba cannot cache compiled code in %s or %s%s; caching it in %s instead. Set XDG_CACHE_HOME "
                "(or NUMBA_CACHE_DIR) to a writable directory, e.g. systemd's CacheDirectory=, to keep it",
                package_dir / "__pycache__", user, f" or NUMBA_CACHE_DIR={chosen}" if chosen else "", fallback)
    return fallback


def _writable(directory: Path) -> bool:
    """numba's own test of a cache directory: create it, then a file in it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError:
        return False
    return True


def _private_temp_dir() -> str:
    """A directory under the temp dir that only this user can write, reused by later runs when it is
    still ours; cached code is loaded from it, so one that another user could have planted is refused."""
    uid = os.getuid()
    path = os.path.join(tempfile.gettempdir(), f"forecastd-numba-{uid}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        return tempfile.mkdtemp(prefix="forecastd-numba-")
    return path
