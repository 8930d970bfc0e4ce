"""Process settings: glibc malloc keeps a tick's large blocks in the heap instead of fresh pages, full
garbage collections skip what the daemon loaded at start, and numpy's BLAS runs on one thread.

Each check runs in a fresh interpreter, so the settings it makes or leaves never reach this process.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="needs glibc 2.33+ (mallinfo2) to observe the heap",
)

# Allocates an 8 MB block and prints whether it came from mmap (the default for blocks this size)
# and whether the heap kept it after free (the tuned behaviour).
PROBE = textwrap.dedent("""
    import ctypes, sys
    from forecastd.runtime import tune_malloc

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Info
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    tuned = tune_malloc() if sys.argv[1] == "tune" else None
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(8 << 20)
    mapped = libc.mallinfo2().hblkhd - before >= 8 << 20
    libc.free(p)
    kept = libc.mallinfo2().fordblks >= 8 << 20
    print(tuned, mapped, kept)
""")


def _probe(mode: str, **env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    environ.pop("LD_PRELOAD", None)
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60,
                          env={**environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@glibc
def test_tuned_heap_reuses_large_blocks_instead_of_mapping_fresh_pages():
    assert _probe("plain") == ["None", "True", "False"]  # glibc's defaults: an 8 MB block is mmapped
    assert _probe("tune") == ["True", "False", "True"]


@glibc
def test_a_users_own_malloc_settings_are_left_alone():
    assert _probe("tune", MALLOC_TRIM_THRESHOLD_="1048576")[0] == "False"
    assert _probe("tune", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536")[0] == "False"


# Builds 100,000 linked objects as a loaded program holds them, then counts what a full collection walks
# (gc.get_objects(2): the oldest generation, where long-lived objects end up) before and after the freeze,
# and checks that garbage made before it is collected, not frozen, and garbage made after it still is.
FREEZE = textwrap.dedent("""
    import gc, weakref
    from forecastd.runtime import freeze_heap

    class Node:
        pass

    held = [Node() for _ in range(100_000)]
    for a, b in zip(held, held[1:]):
        a.next = b
    gc.collect()
    before = len(gc.get_objects(2))
    old = Node(); old.me = old  # a cycle that is garbage before the freeze
    old_ref = weakref.ref(old); del old
    frozen = freeze_heap()
    after = len(gc.get_objects(2))
    new = Node(); new.me = new  # and one made after it
    new_ref = weakref.ref(new); del new
    gc.collect()
    print(before, frozen, after, old_ref() is None, new_ref() is None)
""")


def test_freeze_heap_takes_what_is_loaded_out_of_full_collections():
    done = subprocess.run([sys.executable, "-c", FREEZE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    before, frozen, after, old_freed, new_freed = done.stdout.split()
    assert int(before) > 100_000 and int(frozen) >= int(before) and int(after) < 1000
    assert old_freed == "True" and new_freed == "True"


# Runs a CLI command in a fresh interpreter, then reports the thread count of every BLAS numpy loaded
# (threadpoolctl reads it from the library itself).
BLAS_PROBE = textwrap.dedent("""
    import sys
    import numpy
    from typer.testing import CliRunner
    from threadpoolctl import threadpool_info
    from forecastd.cli import app

    done = CliRunner().invoke(app, ["init", sys.argv[1]])
    assert done.exit_code == 0, done.output
    print(*sorted({lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}))
""")


def _blas_threads(tmp_path, **env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", BLAS_PROBE, str(tmp_path / "forecastd.toml")], capture_output=True,
                          text=True, timeout=120, env={**environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU: every BLAS runs on one thread anyway")
def test_the_cli_runs_numpys_blas_on_one_thread_unless_the_user_chose(tmp_path):
    assert _blas_threads(tmp_path) == ["1"]
    (tmp_path / "forecastd.toml").unlink()
    # A count the user set for their BLAS stands (OpenBLAS reads it when numpy loads it).
    assert _blas_threads(tmp_path, OPENBLAS_NUM_THREADS="2") == ["2"]


# numba's `cache=True` needs a writable directory when each module that compiles is imported; here
# none is: the package's __pycache__ is a file and the user cache sits under a file. Without the
# fallback the import fails ("cannot cache function ...: no locator available").
NUMBA_IMPORT = textwrap.dedent("""
    import os
    import forecastd.anomaly, forecastd.models, forecastd.streaming, forecastd.windowing
    print(os.environ.get("NUMBA_CACHE_DIR"))
""")


def test_numba_caches_in_a_private_temp_dir_when_nothing_else_is_writable(tmp_path):
    import shutil
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "forecastd"
    shutil.copytree(package, tmp_path / "pkg" / "forecastd", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "pkg" / "forecastd" / "__pycache__").write_text("not a directory")
    (tmp_path / "blocker").write_text("a file, so nothing can be made below it")
    (tmp_path / "tmp").mkdir()
    environ = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "PYTHONPATH")}
    environ.update(PYTHONPATH=str(tmp_path / "pkg"), XDG_CACHE_HOME=str(tmp_path / "blocker" / "cache"),
                   HOME=str(tmp_path / "blocker"), TMPDIR=str(tmp_path / "tmp"), PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run([sys.executable, "-c", NUMBA_IMPORT], capture_output=True, text=True, timeout=300,
                          env=environ, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    fallback = tmp_path / "tmp" / f"forecastd-numba-{os.getuid()}"
    assert done.stdout.split() == [str(fallback)]
    assert f"caching it in {fallback} instead" in done.stderr and "XDG_CACHE_HOME" in done.stderr
    assert fallback.stat().st_mode & 0o777 == 0o700


def test_numba_cache_fallback_leaves_a_writable_cache_alone(tmp_path, monkeypatch):
    from forecastd.runtime import ensure_numba_cache

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "blocker").write_text("")
    unwritable = tmp_path / "blocker" / "x"
    # The package's __pycache__, the user cache, or a NUMBA_CACHE_DIR of the user's: any one will do.
    assert ensure_numba_cache({"HOME": str(unwritable)}, tmp_path / "pkg") is None
    assert ensure_numba_cache({"XDG_CACHE_HOME": str(tmp_path / "cache")}, unwritable) is None
    environ = {"NUMBA_CACHE_DIR": str(tmp_path / "mine"), "XDG_CACHE_HOME": str(unwritable)}
    assert ensure_numba_cache(environ, unwritable) is None and environ["NUMBA_CACHE_DIR"] == str(tmp_path / "mine")

    # An unwritable NUMBA_CACHE_DIR falls back too; and a directory under that name that someone else
    # could write (cached code is loaded from it) is not used.
    environ = {"NUMBA_CACHE_DIR": str(unwritable), "XDG_CACHE_HOME": str(unwritable)}
    fallback = tmp_path / "tmp" / f"forecastd-numba-{os.getuid()}"
    assert ensure_numba_cache(environ, unwritable) == environ["NUMBA_CACHE_DIR"] == str(fallback)
    fallback.chmod(0o777)
    environ = {"XDG_CACHE_HOME": str(unwritable)}
    other = ensure_numba_cache(environ, unwritable)
    assert other is not None and other != str(fallback) and os.stat(other).st_mode & 0o777 == 0o700
