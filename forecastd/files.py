"""Atomic, checksummed file writes: temp file in the same directory, fsync, rename, fsync the directory.

A reader (or a restarted daemon) sees the old file or the new one, never a half-written one. Temp files
carry a recognisable suffix so a crash's leftovers can be swept at start. Writers that read a file,
change it and rename the result over it serialise with `exclusive_lock`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows; see exclusive_lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["TMP_SUFFIX", "atomic_write", "fsync_dir", "atomic_write_bytes", "exclusive_lock", "sha256_file",
           "sha256_bytes", "sweep_temp_files"]

log = logging.getLogger(__name__)

TMP_SUFFIX = ".forecastd-tmp"


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` to fill a temp file beside `path`, then move it over `path` durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp creates 0600; outputs are meant to be read by other users like any written file.
        os.chmod(tmp, 0o644)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive flock on the file `path` (created, with its parents, if missing) for the block.

    Waits as long as another process (or another open of the file in this one) holds it: every caller
    holds it for one short read-change-rename, so a wait ends unless a holder is stuck, and failing a
    write after an arbitrary timeout would only turn a slow disk into a failed tick. A wait that has to
    block is logged at INFO first, naming the file, so a stuck holder shows in the log.

    The kernel drops the lock when its holder dies, however it dies, so a crash never leaves it stale.
    The file is never deleted: a waiter could then hold a lock on an unlinked file while a newcomer
    locks a fresh one, and both would go ahead. Raises OSError when the file cannot be opened.

    Where fcntl is missing (Windows) this locks nothing and the block runs unprotected, as before the
    lock existed: writers in two processes there must be kept apart by the operator.
    """
    if fcntl is None:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s: another writer holds it", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sweep_temp_files(root: str | Path) -> list[Path]:
    """Delete temp files a crashed writer left under `root`; returns what was removed."""
    root = Path(root)
    if not root.exists():
        return []
    removed = []
    for p in root.rglob(f"*{TMP_SUFFIX}"):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed
