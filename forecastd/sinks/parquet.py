"""Parquet sink: two hive-partitioned directory datasets, `forecasts/` and `anomalies/`.

Layout under the sink path (partition = "day"; "hour" adds a level, "month" replaces it):

    forecasts/date=2024-01-31/part-0.parquet      partitioned by issued_at
    anomalies/date=2024-01-31/part-0.parquet      partitioned by ts

so pandas, pyarrow, DuckDB or Spark read either directory as one table and prune partitions by date.
Files hold exactly the contract columns; the partition key lives only in the directory name.

Upsert, per partition a write touches, without rewriting what the write does not change: a tick adds
a few points to a day whose partition may already hold millions of rows, and rewriting the whole
partition every tick made a day's writing quadratic (a 2,000-series daemon ticking a simulated day in
minutes: 2.8 GB of forecasts, a tick's write growing past a second and the process past 4 GB). Each
partition holds numbered part files, `part-<n>.parquet`, whose keys never overlap; each file's footer
records, per series, the first and last time it holds. A write whose rows lie, series by series, outside
every file's ranges (every tick's new points) is one new file with the next number. Rows that may share
a key with a file (a replay after a crash, a backfill over written dates) are merged with those files
only: read, old rows whose key is in the new rows dropped, one new file written, the merged files
deleted. Every file is written with forecastd.files.atomic_write (temp file beside it, fsync, rename,
fsync the directory), so a reader never sees half a file. Then files are compacted in tiers, as a
log-structured merge does: whenever `_FANOUT` files hold rows of the same order of magnitude (in powers
of `_FANOUT`) they are merged into one, up to files of `_MERGE_ROWS` rows, so a partition keeps a few
files per million rows and a row is rewritten a few times, not once per tick.

A crash between writing a merge and deleting its inputs leaves rows in two files; the higher number is
the newer, and both `read` and the next merge of those files keep its rows. Other readers of the
directories would see those rows twice, so a merge first records its inputs in an intent file beside the
partition's lock (`.locks/forecasts/date=2024-01-31.merge`, removed once they are deleted), and the
first write of any sink on the path deletes what an interrupted merge left of them, and the temp files
of writes a crash cut short. Part files from another
writer or an older layout (no ranges in the footer) are merged into the first write to their partition.

Two writer processes (the daemon ticking while a cron `forecastd backfill` runs over the same dates)
take turns on a partition: each read-merge-rename holds an exclusive flock on the partition's lock file,

    .locks/forecasts/date=2024-01-31.lock         (beside the datasets, never inside them)

Without it a writer could rename a merge made from contents read before the other's rename, and the
other's rows would be gone after its watermark had moved past them. A lock wait blocks (see
forecastd.files.exclusive_lock: it is logged, and a holder keeps it for one partition's merge). Where
fcntl is missing (Windows) nothing is locked and two writers must not share a sink path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from forecastd.errors import SinkError
from forecastd.files import TMP_SUFFIX, atomic_write, atomic_write_bytes, exclusive_lock, fsync_dir, sweep_temp_files
from forecastd.sinks.schema import SPECS, TableName, TableSpec, conform, empty, spec_for
from forecastd.sources.mapping import utc_bound

__all__ = ["ParquetSink", "LOCK_DIR", "PART_FILE", "partition_dirs"]

log = logging.getLogger(__name__)

PART_FILE = "part-0.parquet"  # the first file of a partition
_PART = re.compile(r"part-(\d+)\.parquet")
_RANGES = b"forecastd.series_ranges"  # footer key: per series, the first and last time in the file (ns)
_FANOUT = 4  # files of one size tier merged into one
# Files this large are not merged again: merging the top tiers of a busy day (four 3.6M-row files)
# held a tick for 30 s, so a merge now reads and writes at most _FANOUT such files' worth.
_MERGE_ROWS = _FANOUT ** 10  # 1,048,576
_CACHED_PARTITIONS = 8  # partitions whose footers a sink keeps between writes

# Lock files live outside forecasts/ and anomalies/ so that no reader of a dataset (ours, pyarrow,
# Spark, a glob) ever meets them and _grain_of sees only partitions; the dot hides the directory from
# readers of the sink path itself (pyarrow and glob skip dot names).
LOCK_DIR = ".locks"

Grain = Literal["day", "hour", "month"]

# numpy datetime unit each grain truncates timestamps to, and the hive keys it produces.
_UNIT = {"day": "D", "hour": "h", "month": "M"}
_KEYS = {"day": ("date",), "hour": ("date", "hour"), "month": ("month",)}

_ARROW = {
    "object": pa.string(),
    "datetime64[ns, UTC]": pa.timestamp("ns", tz="UTC"),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
}


def _arrow_schema(spec: TableSpec) -> pa.Schema:
    return pa.schema([(c, _ARROW[d]) for c, d in spec.columns.items()])


def _dictionary(spec: TableSpec) -> list[str]:
    """Columns worth dictionary encoding: ids, times, steps and versions repeat; forecast values rarely
    do, and trying a dictionary on them first doubled the time to write a tick's partition."""
    return [c for c, d in spec.columns.items() if d != "float64"]


def partition_dirs(times: pd.Series, grain: Grain) -> tuple[list[str], np.ndarray]:
    """The partition directories `times` fall in, and for each row the index of its directory.

    Vectorised: timestamps are truncated as numpy datetimes; only the few distinct partitions are
    formatted as text.
    """
    utc = pd.DatetimeIndex(times).tz_convert("UTC").tz_localize(None).to_numpy()
    truncated = utc.astype(f"datetime64[{_UNIT[grain]}]")
    unique, inverse = np.unique(truncated, return_inverse=True)
    dirs = []
    for value in unique:
        text = np.datetime_as_string(value, unit=_UNIT[grain])  # '2024-01-31', '2024-01-31T05', '2024-01'
        if grain == "hour":
            day, hour = text.split("T")
            dirs.append(f"date={day}/hour={hour}")
        else:
            dirs.append(f"{_KEYS[grain][0]}={text}")
    return dirs, inverse.reshape(-1)


class ParquetSink:
    """Writes and reads the output datasets under `path`; see forecastd.sinks.Sink for the contract."""

    def __init__(self, path: str | Path, *, partition: Grain = "day") -> None:
        if partition not in _UNIT:
            raise SinkError(f"[sink] partition = {partition!r} is not allowed; use 'day', 'hour' or 'month'")
        self.path = Path(path)
        self.partition: Grain = partition
        self._checked: set[str] = set()
        self._recovered = False
        # Per partition directory (the last few written), per file: its identity and footer. Entries of
        # files gone are dropped at each listing: a daemon's sink lives for months of merged-away files.
        self._footers: dict[Path, dict[Path, tuple[tuple[int, int, int], _Part]]] = {}

    def __repr__(self) -> str:
        return f"ParquetSink({str(self.path)!r}, partition={self.partition!r})"

    def write(self, forecasts: pd.DataFrame, anomalies: pd.DataFrame) -> None:
        # Both frames are checked before either is written.
        frames = [conform(forecasts, SPECS["forecasts"]), conform(anomalies, SPECS["anomalies"])]
        for spec, frame in zip((SPECS["forecasts"], SPECS["anomalies"]), frames):
            if not frame.empty:
                self._upsert(spec, frame)

    def read(
        self,
        table: TableName,
        series: Sequence[str] | None = None,
        since: pd.Timestamp | None = None,
        until: pd.Timestamp | None = None,
    ) -> pd.DataFrame:
        spec = spec_for(table)
        since, until = utc_bound(since, "since"), utc_bound(until, "until")
        root = self.path / spec.name
        if not root.is_dir():
            return empty(spec)
        self._check_layout(root)
        keys = _KEYS[self.partition]
        partitioning = ds.partitioning(pa.schema([(k, pa.string()) for k in keys]), flavor="hive")
        where = None
        if series is not None:
            where = _and(where, ds.field("series_id").isin(pa.array([str(s) for s in series], pa.string())))
        time = ds.field(spec.time)
        # The partition key prunes whole directories; the exact test on the column trims the edges.
        # ISO dates and months sort as text, so the key compares as a string.
        if since is not None:
            where = _and(where, (ds.field(keys[0]) >= self._key_text(since)) & (time > _ts(since)))
        if until is not None:
            where = _and(where, (ds.field(keys[0]) <= self._key_text(until)) & (time <= _ts(until)))
        try:
            schema = pa.schema(list(_arrow_schema(spec)) + [pa.field(k, pa.string()) for k in keys])
            dataset = ds.dataset(root, format="parquet", partitioning=partitioning, schema=schema)
            scanner = dataset.scanner(columns=list(spec.columns), filter=where)
            pieces = [(Path(b.fragment.path), b.record_batch) for b in scanner.scan_batches()]
        except (pa.ArrowException, OSError) as exc:
            raise SinkError(f"cannot read the {spec.name} dataset at {str(root)!r}: {exc}") from exc
        if not pieces:
            return empty(spec)
        table_ = pa.Table.from_batches([b for _, b in pieces], schema=scanner.projected_schema)
        frame = conform(table_.to_pandas(), spec)
        key = list(spec.key)
        if len({path for path, _ in pieces}) > 1 and frame.duplicated(key).any():
            # A merge cut short by a crash before it deleted its inputs: the higher-numbered file is newer.
            number = np.repeat([_number(path) for path, _ in pieces], [b.num_rows for _, b in pieces])
            frame = frame.iloc[np.argsort(number, kind="stable")].drop_duplicates(key, keep="last")
            frame = conform(frame.reset_index(drop=True), spec)
        return frame

    # -- writing -----------------------------------------------------------------------------------

    def _upsert(self, spec: TableSpec, frame: pd.DataFrame) -> None:
        if not self._recovered:
            self._recover()
        root = self.path / spec.name
        self._check_layout(root)
        dirs, which = partition_dirs(frame[spec.time], self.partition)
        order = np.argsort(which, kind="stable")
        bounds = np.searchsorted(which[order], np.arange(len(dirs) + 1))
        for i, rel in enumerate(dirs):
            rows = frame.iloc[order[bounds[i]:bounds[i + 1]]]
            self._write_partition(spec, rel, rows)
        log.debug("wrote %d %s rows into %d partition(s) under %s", len(frame), spec.name, len(dirs), root)

    def _write_partition(self, spec: TableSpec, rel: str, rows: pd.DataFrame) -> None:
        # One lock per partition, not per table: a backfill rewriting last month and the daemon writing
        # today never wait on each other. A writer holds one partition's lock at a time, so no two
        # writers can each hold one the other wants.
        lock = self._lock_file(spec.name, rel)
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(exclusive_lock(lock))
            except OSError as exc:
                raise SinkError(
                    f"cannot lock partition {rel!r} of {spec.name} with {str(lock)!r}: {exc}; check that "
                    "[sink] path is writable by this user"
                ) from exc
            self._finish_merge(lock.with_suffix(".merge"), self.path / spec.name / rel)
            self._merge_partition(spec, self.path / spec.name / rel, rows)

    def _recover(self) -> None:
        """Finish the merges a crash interrupted and delete the temp files a crashed write left, on every
        partition of the path (once per sink), each under its partition's lock: a writer that holds it
        is mid-write, and its temp file is renamed before the lock is ours."""
        self._recovered = True
        base = self.path / LOCK_DIR
        for intent in sorted(base.glob("*/**/*.merge")) if base.is_dir() else ():
            table, *rel = intent.relative_to(base).parts
            with exclusive_lock(intent.with_suffix(".lock")):
                self._finish_merge(intent, self.path / table / Path(*rel).with_suffix(""))
        for name in SPECS:
            root = self.path / name
            for directory in sorted({p.parent for p in root.rglob(f"*{TMP_SUFFIX}")} if root.is_dir() else ()):
                with exclusive_lock(self._lock_file(name, directory.relative_to(root))):
                    for p in sweep_temp_files(directory):
                        log.warning("removed leftover temp file %s (from an interrupted write)", p)

    def _lock_file(self, table: str, rel: str | Path) -> Path:
        """The lock of partition `rel` of `table`; an interrupted merge's intent file sits beside it."""
        return self.path / LOCK_DIR / table / f"{rel}.lock"

    def _finish_merge(self, intent: Path, directory: Path) -> None:
        """Under the partition's lock: delete the inputs an interrupted merge left beside its output."""
        try:
            note = json.loads(intent.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise SinkError(f"cannot read {str(intent)!r} ({exc}); if no forecastd process is writing, the "
                            "file can be deleted") from exc
        if (directory / note["output"]).exists():  # renamed into place: the inputs are redundant
            left = [directory / name for name in note["inputs"] if (directory / name).exists()]
            for path in left:
                path.unlink()
            if left:
                fsync_dir(directory)
                log.warning("removed %d part file(s) of %s that an interrupted merge left behind", len(left),
                            directory)
        intent.unlink()  # else the merge never got as far as its rename: its inputs are the data

    def _merge_partition(self, spec: TableSpec, directory: Path, rows: pd.DataFrame) -> None:
        parts = self._parts(directory)
        ranges = _series_ranges(rows, spec.time)
        clash = [p for p in parts if p.ranges is None or _overlaps(p.ranges, ranges)]
        parts = [p for p in parts if p not in clash]
        # Alone, the new rows keep their ranges (dropping a repeated key moves no first or last time).
        parts.append(self._write_part(spec, directory, _next_number(parts + clash), clash, rows,
                                      None if clash else ranges))
        # Tiered compaction: merge the first tier holding _FANOUT files, until none does.
        while True:
            tiers: dict[int, list[_Part]] = {}
            for p in parts:
                if p.rows < _MERGE_ROWS:
                    tiers.setdefault(_tier(p.rows), []).append(p)
            full = next((group for _, group in sorted(tiers.items()) if len(group) >= _FANOUT), None)
            if full is None:
                return
            parts = [p for p in parts if p not in full]
            parts.append(self._write_part(spec, directory, _next_number(parts + full), full, None))

    def _write_part(self, spec: TableSpec, directory: Path, number: int, merged: list[_Part],
                    rows: pd.DataFrame | None, ranges: pd.DataFrame | None = None) -> _Part:
        """Write part file `number` holding the rows of the `merged` files and `rows` (the newest last,
        which win a shared key), then delete the merged files. Returns the new file's entry. `ranges`:
        the written rows' series ranges, where the caller has them."""
        frames = [] if rows is None else [rows]
        if merged:
            try:
                old = pa.concat_tables(
                    [pq.read_table(p.path, columns=list(spec.columns), partitioning=None) for p in merged],
                    promote_options="permissive",
                ).to_pandas()
            except (pa.ArrowException, OSError) as exc:
                raise _unreadable(directory, exc) from exc
            frames.insert(0, conform(old, spec))
        key = list(spec.key)
        rows = pd.concat(frames, ignore_index=True).drop_duplicates(key, keep="last")
        rows = rows.sort_values(key, kind="stable", ignore_index=True)
        if ranges is None:
            ranges = _series_ranges(rows, spec.time)
        meta = {_RANGES: json.dumps({"series": ranges.index.tolist(), "first": ranges["first"].tolist(),
                                     "last": ranges["last"].tolist()}).encode()}
        table = pa.Table.from_pandas(rows, schema=_arrow_schema(spec), preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
        path = directory / f"part-{number}.parquet"
        _make_dirs(directory)
        intent = self._lock_file(spec.name, directory.relative_to(self.path / spec.name)).with_suffix(".merge")
        try:
            if merged:
                atomic_write_bytes(intent, json.dumps({"output": path.name, "inputs": [
                    p.path.name for p in merged if p.path != path]}).encode())
            dictionary = _dictionary(spec)
            atomic_write(path, lambda tmp: pq.write_table(table, tmp, use_dictionary=dictionary))
        except (pa.ArrowException, OSError) as exc:
            raise SinkError(
                f"cannot write partition {str(directory)!r}: {exc}; check free space and permissions"
            ) from exc
        for p in merged:
            if p.path != path:
                p.path.unlink(missing_ok=True)
        if merged:
            fsync_dir(directory)
            intent.unlink(missing_ok=True)
        return _Part(path, number, len(rows), ranges)

    def _parts(self, directory: Path) -> list[_Part]:
        """The partition's part files, oldest first, with their row counts and series ranges (from the
        footers, cached by file identity: a tick would otherwise reread every footer of the partition)."""
        if not directory.is_dir():
            return []
        parts = []
        known = self._footers.pop(directory, {})
        seen = self._footers[directory] = {}  # re-inserted: the most recently written partition is last
        while len(self._footers) > _CACHED_PARTITIONS:
            del self._footers[next(iter(self._footers))]
        for f in directory.glob("*.parquet"):
            st = f.stat()
            ident = (st.st_ino, st.st_mtime_ns, st.st_size)
            hit = known.get(f)
            if hit is None or hit[0] != ident:
                try:
                    meta = pq.read_metadata(f)
                except (pa.ArrowException, OSError) as exc:
                    raise _unreadable(directory, exc) from exc
                hit = (ident, _Part(f, _number(f), meta.num_rows, _footer_ranges(meta)))
            seen[f] = hit
            parts.append(hit[1])
        return sorted(parts, key=lambda p: p.number)

    # -- layout ------------------------------------------------------------------------------------

    def _key_text(self, bound: pd.Timestamp) -> str:
        utc = bound.tz_convert("UTC")
        return f"{utc:%Y-%m}" if self.partition == "month" else f"{utc:%Y-%m-%d}"

    def _check_layout(self, root: Path) -> None:
        """Refuse a dataset written with another partition grain: rows would land twice under two keys."""
        if root.name in self._checked or not root.is_dir():
            return
        found = _grain_of(root)
        if found is not None and found != self.partition:
            raise SinkError(
                f"the {root.name} dataset at {str(root)!r} is partitioned by {found!r} but [sink] partition = "
                f"{self.partition!r}; set partition = {found!r} or point [sink] path at a new directory"
            )
        self._checked.add(root.name)


def _grain_of(root: Path) -> Grain | None:
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith((".", "_")):
            continue
        if entry.name.startswith("month="):
            return "month"
        if entry.name.startswith("date="):
            inner = [e.name for e in os.scandir(entry.path) if not e.name.startswith((".", "_"))]
            return "hour" if any(n.startswith("hour=") for n in inner) else "day"
    return None


def _ts(bound: pd.Timestamp) -> pa.Scalar:
    return pa.scalar(bound.as_unit("ns").value, type=pa.timestamp("ns", tz="UTC"))


def _and(a: ds.Expression | None, b: ds.Expression) -> ds.Expression:
    return b if a is None else a & b


def _make_dirs(directory: Path) -> None:
    """mkdir -p that also fsyncs each parent that gained an entry, so a new partition survives a crash."""
    missing = []
    p = directory
    while not p.exists():
        missing.append(p)
        p = p.parent
    directory.mkdir(parents=True, exist_ok=True)
    for d in reversed(missing):
        fsync_dir(d.parent)


def _unreadable(directory: Path, exc: Exception) -> SinkError:
    return SinkError(
        f"cannot read existing partition {str(directory)!r} to merge into it: {exc}; move the damaged file "
        "away (the sink rewrites the partition) or point [sink] path elsewhere"
    )


class _Part(NamedTuple):
    path: Path
    number: int  # from the name; -1 for a file not named part-<n>.parquet (older than any numbered one)
    rows: int
    ranges: pd.DataFrame | None  # index series_id; first, last int64 ns; None: unknown (foreign file)


def _number(path: Path) -> int:
    m = _PART.fullmatch(path.name)
    return int(m.group(1)) if m else -1


def _next_number(parts: list[_Part]) -> int:
    return max((p.number for p in parts), default=-1) + 1


def _tier(rows: int) -> int:
    # No floor tier: a floor would merge every small file into one growing file, quadratic again.
    return int(math.log(max(rows, 1), _FANOUT))


def _series_ranges(rows: pd.DataFrame, time: str) -> pd.DataFrame:
    ns = pd.DatetimeIndex(rows[time]).as_unit("ns").asi8
    grouped = pd.DataFrame({"series_id": rows["series_id"].to_numpy(), "t": ns}).groupby("series_id", sort=True)["t"]
    return pd.DataFrame({"first": grouped.min(), "last": grouped.max()})


def _footer_ranges(meta: pq.FileMetaData) -> pd.DataFrame | None:
    raw = (meta.metadata or {}).get(_RANGES)
    if raw is None:
        return None
    d = json.loads(raw)
    return pd.DataFrame({"first": np.asarray(d["first"], dtype=np.int64), "last": np.asarray(d["last"], dtype=np.int64)},
                        index=pd.Index(d["series"], dtype=object, name="series_id"))


def _overlaps(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Whether some series' time range in `a` meets its range in `b`: only then can they share a key."""
    both = a.add_suffix("_a").join(b.add_suffix("_b"), how="inner")
    return bool(((both["first_a"] <= both["last_b"]) & (both["first_b"] <= both["last_a"])).any())
