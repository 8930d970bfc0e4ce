"""Parquet source: one file, a directory dataset (hive partitions welcome) or a glob of files.

Filters are pushed into pyarrow.dataset, so row groups and partitions outside the bounds are skipped by
their statistics instead of being read and thrown away. The dataset is discovered again on every call:
a streaming source gains files between ticks.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from forecastd.errors import SourceError
from forecastd.sources.mapping import (
    COLUMNS,
    ColumnMap,
    SAMPLES,
    empty_raw,
    iso_sample,
    local_naive,
    melt,
    mixed_shapes,
    mixed_warning,
    text_offsets,
    text_scan,
    text_within,
    utc_bound,
)

__all__ = ["ParquetSource"]

log = logging.getLogger(__name__)


class ParquetSource:
    """Reads the long frame from Parquet; see forecastd.sources.Source for the contract."""

    def __init__(
        self,
        path: str | Path,
        *,
        layout: Literal["long", "wide"] = "long",
        series_column: str = "series_id",
        time_column: str = "ts",
        value_column: str = "value",
        value_columns: Sequence[str] = (),
        timezone: str = "UTC",
    ) -> None:
        self.path = str(path)
        self.columns = ColumnMap(layout, series_column, time_column, value_column, tuple(value_columns), timezone)
        self._mixed = False  # whether time text was seen both with offsets and without (`mixed_shapes`)
        self._schemas_checked: set[str] = set()  # files whose columns `_name_missing` has looked at

    def __repr__(self) -> str:
        return f"ParquetSource({self.path!r}, layout={self.columns.layout!r})"

    def read(
        self,
        since: pd.Timestamp | None = None,
        until: pd.Timestamp | None = None,
        series: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        since, until = utc_bound(since, "since"), utc_bound(until, "until")
        dataset = self._dataset()
        cm = self.columns
        cm.check(dataset.schema.names, self._where())
        kind = dataset.schema.field(cm.time_column).type
        # One stored time text per read, for the text bounds and the mixed-shape check alike.
        sample = self._sample(dataset, cm.time_column) if pa.types.is_string(kind) or pa.types.is_large_string(kind) \
            else None
        where, text = self._time_filter(dataset, since, until, sample)
        if cm.layout == "wide":
            value_columns = cm.wide_columns(self._numeric(dataset), series)
            if not value_columns:
                return empty_raw()
            table = self._scan(dataset, [cm.time_column, *value_columns], where)
            if self._newly_mixed(sample, table.column(0)) and text:
                return self.read(since, until, series)  # again, scanning as wide as both shapes need
            if text:
                table = table.filter(text_within(table.column(0), since, until, cm.timezone))
            return melt(table.to_pandas(), value_columns)
        if series is not None:
            where = _and(where, self._series_filter(dataset, series))
        table = self._scan(dataset, [cm.series_column, cm.time_column, cm.value_column], where)
        if any(c.null_count for c in table.columns):
            self._name_missing(dataset)
        if self._newly_mixed(sample, table.column(1)) and text:
            return self.read(since, until, series)  # again, scanning as wide as both shapes need
        if text:
            table = table.filter(text_within(table.column(1), since, until, cm.timezone))
        ids = table.column(0)
        if pa.types.is_dictionary(ids.type):  # only the rows kept are decoded
            table = table.set_column(0, cm.series_column, ids.cast(ids.type.value_type))
        elif pa.types.is_integer(ids.type) and ids.null_count:
            # pandas would make integer ids with a null float, and series 7 would become "7.0" for this
            # read alone: strings now, as `series_ids` names them.
            table = table.set_column(0, cm.series_column, ids.cast(pa.string()))
        frame = table.rename_columns(list(COLUMNS)).to_pandas()
        log.debug("read %d rows from %s", len(frame), self.path)
        return frame

    def series_ids(self) -> list[str]:
        dataset = self._dataset()
        cm = self.columns
        cm.check(dataset.schema.names, self._where())
        if cm.layout == "wide":
            return cm.wide_columns(self._numeric(dataset), None)
        column = self._scan(dataset, [cm.series_column], None).column(0)
        if pa.types.is_dictionary(column.type):
            # Each chunk's distinct codes, looked up in its dictionary: no string of the column is decoded.
            values = [v for c in column.chunks for v in c.dictionary.take(pc.unique(c.indices.drop_null())).to_pylist()]
        else:
            values = pc.unique(column).to_pylist()
        return sorted({str(v) for v in values if v is not None})

    # -- discovery ---------------------------------------------------------------------------------

    def _where(self) -> str:
        return f"parquet source {self.path!r}"

    def _dataset(self) -> ds.Dataset:
        path = self.path
        try:
            if _has_magic(path):
                files = sorted(os.path.abspath(f) for f in glob.glob(path, recursive=True) if os.path.isfile(f))
                if not files:
                    raise SourceError(
                        f"parquet source glob {path!r} matches no files; check [source] path (relative paths "
                        "resolve against the config file's directory)"
                    )
                # Hive keys in the directories below the glob's fixed prefix still become columns.
                return self._discover(files, _fixed_prefix(path))
            if not os.path.exists(path):
                raise SourceError(
                    f"parquet source {path!r} does not exist; set [source] path to a Parquet file, a directory "
                    "dataset or a glob such as \"data/*.parquet\" (relative paths resolve against the config "
                    "file's directory)"
                )
            return self._discover(path, None)
        except (pa.ArrowException, OSError) as exc:
            raise SourceError(f"cannot open parquet source {path!r}: {exc}; check that it holds Parquet files") from exc

    def _discover(self, source: str | list[str], base: str | None) -> ds.Dataset:
        dataset = ds.dataset(source, format=self._format(), partitioning="hive", partition_base_dir=base)
        # pyarrow types a hive key by its values: series_id=007, =0012 and =12 became the integers 7, 12
        # and 12, so two ids changed and two series merged. Keys are text, as the directory names spell
        # them. Only keys found in the paths have values; where there are none, the schema is the files'.
        keys = [f for f, values in zip(dataset.partitioning.schema, dataset.partitioning.dictionaries)
                if values is not None]
        if not all(pa.types.is_string(f.type) for f in keys):
            # Discovered again, this time with the keys' types given: a second listing of the directory
            # (50 ms for 1,000 partitions, against 460 ms to read them).
            schema = pa.schema([(f.name, pa.string()) for f in keys])
            text = ds.HivePartitioning.discover(infer_dictionary=False, schema=schema)
            dataset = ds.dataset(source, format=self._format(), partitioning=text, partition_base_dir=base)
        return self._widen(dataset)

    def _widen(self, dataset: ds.Dataset) -> ds.Dataset:
        """The dataset with its value columns read as float64. Its schema is the first file's, and a later
        file's floats would not cast to the first one's integers ("Float value 10.01 was truncated"): a
        writer whose values happened to be whole once stopped every read of the directory."""
        cm = self.columns
        names = [cm.value_column] if cm.layout == "long" else [f.name for f in dataset.schema if f.name != cm.time_column]
        schema = original = dataset.schema
        for name in names:
            i = schema.get_field_index(name)
            if i >= 0 and (pa.types.is_integer(schema.field(i).type) or pa.types.is_decimal(schema.field(i).type)):
                schema = schema.set(i, schema.field(i).with_type(pa.float64()))
        if schema is original:
            return dataset
        # The same fragments under the wider schema: no second listing of the directory.
        return ds.FileSystemDataset(list(dataset.get_fragments()), schema, dataset.format, dataset.filesystem)

    def _format(self) -> ds.ParquetFileFormat:
        # Series ids are read as dictionary codes (text columns only; Parquet stores them that way):
        # listing the ids of 2M rows and filtering them then touch 10k strings, not 2M.
        series = [self.columns.series_column] if self.columns.layout == "long" else []
        return ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=series))

    def _scan(self, dataset: ds.Dataset, columns: list[str], where: ds.Expression | None) -> pa.Table:
        try:
            return dataset.to_table(columns=columns, filter=where)
        except (pa.ArrowException, OSError) as exc:
            raise SourceError(f"cannot read parquet source {self.path!r}: {exc}; {_READ_FIX}") from exc

    def _numeric(self, dataset: ds.Dataset) -> list[str]:
        # Partition keys such as year=2024 are numeric too, but they are not series: only columns
        # stored in the files count. One file's footer says which those are.
        fragment = next(iter(dataset.get_fragments()), None)
        stored = set(fragment.physical_schema.names) if fragment is not None else set()
        return [
            f.name for f in dataset.schema
            if (pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_decimal(f.type))
            and f.name in stored
        ]

    def _name_missing(self, dataset: ds.Dataset) -> None:
        """Warn, once per file, of files that lack a configured column. The dataset's schema is one file's,
        and a file without the value column (written as "val", say) reads as missing values: counted by
        validation, but without this its cause would be named nowhere. Only looked at when a read found
        nulls, and each file once, as it costs a footer read."""
        required = self.columns.required()  # stored column -> the [source] key that maps it
        for fragment in dataset.get_fragments():
            if fragment.path in self._schemas_checked:
                continue
            self._schemas_checked.add(fragment.path)
            try:
                stored = fragment.physical_schema.names
                has = set(stored) | set(ds.get_partition_keys(fragment.partition_expression))
            except (pa.ArrowException, OSError):
                continue  # unreadable: the scan's own error names it
            missing = [name for name in required if name not in has]
            if missing:
                log.warning(
                    "%s: file %s has no column %s (its columns: %s); its rows read with that column missing and are "
                    "counted as repairs. Rename the column in that file, or set [source] %s if every file uses "
                    "another name", self._where(), fragment.path, ", ".join(repr(m) for m in missing),
                    ", ".join(sorted(stored)), " / ".join(required[m] for m in missing))

    # -- filters -----------------------------------------------------------------------------------

    def _series_filter(self, dataset: ds.Dataset, series: Sequence[str]) -> ds.Expression:
        field = ds.field(self.columns.series_column)
        kind = dataset.schema.field(self.columns.series_column).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            return field.isin(pa.array([str(s) for s in series], type=kind))
        # Integer (or other) ids: compare as text, the way validation turns them into series ids.
        return field.cast(pa.string()).isin(pa.array([str(s) for s in series], type=pa.string()))

    def _time_filter(
        self, dataset: ds.Dataset, since: pd.Timestamp | None, until: pd.Timestamp | None, sample: object
    ) -> tuple[ds.Expression | None, bool]:
        """The filter to push down, and whether it is the coarse one of text times (`text_within` then
        filters the rows read exactly). `sample`: a stored time text (`_sample`) where the column is text."""
        if since is None and until is None:
            return None, False
        name = self.columns.time_column
        kind = dataset.schema.field(name).type
        field = ds.field(name)
        where = None
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            if sample is None:  # no timestamps at all: nothing can match a bound
                return ds.scalar(False), False
            low, high = text_scan(since, until, self.columns.timezone, text_offsets(sample, self._where()) or self._mixed)
            if low is not None:
                where = _and(where, field >= pa.scalar(low, type=kind))
            if high is not None:
                where = _and(where, field < pa.scalar(high, type=kind))
            return where, True
        if since is not None:
            where = _and(where, field > self._scalar(kind, since))
        if until is not None:
            where = _and(where, field <= self._scalar(kind, until))
        return where, False

    def _scalar(self, kind: pa.DataType, bound: pd.Timestamp) -> pa.Scalar:
        zone = self.columns.timezone
        if pa.types.is_timestamp(kind):
            # Same type as the column (unit and zone), or Arrow refuses the comparison. An aware column
            # is compared as instants; a naive one as wall-clock time in the configured zone.
            if kind.tz is not None:
                exact = pa.scalar(bound.as_unit("ns").value, type=pa.timestamp("ns", tz="UTC"))
            else:
                exact = pa.scalar(local_naive(bound, zone).as_unit("ns").value, type=pa.timestamp("ns"))
            return exact.cast(kind, safe=False)  # truncates to the column's unit, which is exact
        if pa.types.is_date(kind):
            return pa.scalar(local_naive(bound, zone).date(), type=kind)
        raise SourceError(
            f"time column {self.columns.time_column!r} in {self._where()} has type {kind}; forecastd needs "
            "timestamps, dates or ISO-8601 text there; set [source] time_column to such a column"
        )

    def _newly_mixed(self, sample: object, times: pa.ChunkedArray) -> bool:
        """Whether these time texts show the column to mix text with offsets and text without, for the
        first time (logged once); from then on every read scans as wide as both need."""
        if self._mixed or not len(times):
            return False
        pair = mixed_shapes(sample, times)
        if pair is None:
            return False
        self._mixed = True
        log.warning("%s", mixed_warning(self._where(), self.columns.time_column, pair))
        return True

    def _sample(self, dataset: ds.Dataset, name: str) -> str | None:
        try:
            values = dataset.head(SAMPLES, columns=[name], filter=ds.field(name).is_valid()).column(0).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise SourceError(f"cannot read parquet source {self.path!r}: {exc}; {_READ_FIX}") from exc
        return iso_sample(values)


_READ_FIX = ("a file written in place may be read half-written: writers should write a temporary name outside "
             "the pattern and rename it; move a corrupt file, or one whose columns disagree with the others', out "
             "of [source] path")


def _and(a: ds.Expression | None, b: ds.Expression) -> ds.Expression:
    return b if a is None else a & b


def _fixed_prefix(pattern: str) -> str:
    """The directory part of a glob before its first wildcard: the base the hive keys hang from."""
    fixed: list[str] = []
    for part in Path(os.path.abspath(pattern)).parts[:-1]:
        if _has_magic(part):
            break
        fixed.append(part)
    return str(Path(*fixed))


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")
