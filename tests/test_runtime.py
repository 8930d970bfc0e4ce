"""Process settings: glibc malloc keeps a tick's large blocks in the heap instead of fresh pages, and
full garbage collections skip what the daemon loaded at start.

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
