"""How the user's columns and time type map onto the raw long frame and onto UTC bounds.

Every source shares these rules, so a Parquet file, an SQL table and an in-memory frame holding the same
data answer the same `read(since, until, series)` with the same rows:

- `since` is exclusive and `until` inclusive; both are tz-aware and compared as instants.
- Naive timestamp columns are in the configured zone: the bound is converted to that zone and its zone
  dropped, so the filter runs on the column as stored (an index or Parquet statistics stay usable).
  In the hour a daylight-saving change repeats, naive local times are ambiguous; `frames.validate`
  rejects those rows anyway, so the filter does not try to order them.
- A bound is truncated to the column's precision (seconds, milliseconds, dates). Truncation is exact for
  values stored at that precision: v > since  <=>  v > floor(since), and v <= until  <=>  v <= floor(until).
- ISO-8601 text orders like time only among values of one shape and one UTC offset, and a zone's text
  changes offset at every DST change: '2024-10-27T04:00+01:00' sorts before '2024-10-27T03:30+02:00', an
  hour and a half earlier. So a text column is filtered coarsely where it is stored (`text_scan`, which
  an index or Parquet statistics can still use) and exactly once read, on the parsed times
  (`text_within`).
- Rows with a null or unparseable timestamp come back only from unbounded reads, where validation counts
  and rejects them; a bounded read cannot place them in time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from forecastd.config import SourceConfig
from forecastd.errors import SourceError

__all__ = [
    "COLUMNS",
    "ColumnMap",
    "utc_bound",
    "local_naive",
    "text_offsets",
    "text_scan",
    "text_within",
    "has_offset",
    "melt",
    "empty_raw",
]

# The raw frame's columns. They equal forecastd.frames.COLUMNS (a test checks it); sources do not import
# frames because frames is the stage after them.
COLUMNS = ("series_id", "ts", "value")


@dataclass(frozen=True)
class ColumnMap:
    """The [source] keys that say which stored columns become `series_id`, `ts` and `value`."""

    layout: Literal["long", "wide"] = "long"
    series_column: str = "series_id"
    time_column: str = "ts"
    value_column: str = "value"
    value_columns: tuple[str, ...] = ()
    timezone: str = "UTC"

    @classmethod
    def from_config(cls, s: SourceConfig) -> ColumnMap:
        return cls(s.layout, s.series_column, s.time_column, s.value_column, tuple(s.value_columns), s.timezone)

    def required(self) -> dict[str, str]:
        """Stored column name -> the [source] key that maps it."""
        if self.layout == "long":
            return {self.series_column: "series_column", self.time_column: "time_column",
                    self.value_column: "value_column"}
        out = {self.time_column: "time_column"}
        out.update({c: "value_columns" for c in self.value_columns})
        return out

    def check(self, available: Sequence[str], where: str, also: Mapping[str, str] | None = None) -> None:
        """SourceError naming the first mapped column `where` lacks, the columns it has, and the key to fix.
        `also`: further columns a source reads, by the key that maps them (SQL's order_column)."""
        have = set(available)
        for column, key in {**self.required(), **(also or {})}.items():
            if column not in have:
                listing = ", ".join(repr(c) for c in available) or "none"
                raise SourceError(
                    f"column {column!r} (mapped by [source] {key}) not found in {where}; its columns are: "
                    f"{listing}; set [source] {key} to one of them"
                )

    def wide_columns(self, numeric: Sequence[str], series: Sequence[str] | None) -> list[str]:
        """The series columns of a wide table, limited to `series` when given."""
        columns = list(self.value_columns) if self.value_columns else [c for c in numeric if c != self.time_column]
        if series is not None:
            wanted = set(series)
            columns = [c for c in columns if c in wanted]
        return columns


def utc_bound(value: pd.Timestamp | None, name: str) -> pd.Timestamp | None:
    """A read bound as a UTC Timestamp; a naive one is a caller bug (which zone did it mean?)."""
    if value is None:
        return None
    ts = pd.Timestamp(value)
    if ts.tzinfo is None:
        raise ValueError(f"{name}={value!r} is naive; pass a tz-aware timestamp, e.g. pd.Timestamp(..., tz='UTC')")
    return ts.tz_convert("UTC")


def local_naive(bound: pd.Timestamp, zone: str) -> pd.Timestamp:
    """A UTC bound as the wall-clock time of `zone`, without zone: comparable with a naive column."""
    return bound.tz_convert(zone).tz_localize(None)


# ISO-8601 text as stored by pandas, SQLAlchemy, sqlite3 and most hand-written CSV conversions.
_ISO = re.compile(
    r"^\s*(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:(?P<sep>[T ])(?P<hm>\d{2}:\d{2})(?P<sec>:\d{2})?(?P<frac>\.\d+)?)?"
    r"\s*(?P<tz>Z|[+-]\d{2}(?::?\d{2})?)?\s*$"
)


SAMPLES = 100  # stored time texts looked at for one that stands for the column's shape
SHAPE_CHECKS = 20_000  # the most rows of one read whose time text `mixed_shapes` looks at


def iso_sample(values: Sequence) -> object:
    """The first ISO-8601 text among some stored time values, else the first of them as stored (which the
    caller's checks then name): one bad row stored first stopped every bounded read of the source."""
    stored = [v for v in values if v is not None]
    return next((v for v in stored if isinstance(v, str) and _ISO.match(v)), stored[0] if stored else None)


def has_offset(sample: str) -> bool:
    """Whether ISO-8601 text carries its own UTC offset ('Z', '+02:00'); else it is naive local time."""
    m = _ISO.match(sample)
    return bool(m and m.group("tz"))


def text_offsets(sample: str, where: str) -> bool:
    """Whether a column's time text carries UTC offsets, judged by one stored value; SourceError naming the
    fix where that value is not ISO-8601."""
    if _ISO.match(sample) is None:
        raise SourceError(
            f"time values in {where} are text that is not ISO-8601 (e.g. {sample!r}); store them as "
            "'YYYY-MM-DD HH:MM:SS' text or as a timestamp column so reads can filter by time"
        )
    return has_offset(sample)


# Text with a UTC offset spells its instant on a clock up to this far ahead or behind: zones use -12:00
# to +14:00, and SQLite reads offsets up to ±14:59.
_MAX_OFFSET = timedelta(hours=15)


def text_scan(
    since: pd.Timestamp | None, until: pd.Timestamp | None, zone: str, offsets: bool
) -> tuple[str | None, str | None]:
    """Text bounds `low <= v < high` that hold every ISO-8601 time in (since, until], whatever its shape.

    `low` is the date-hour of `since` on the text's clock, "2024-10-27 02": at or below every shape of a
    later time (' ' with a later hour, 'T' on the same date, or a later date). Text with offsets spells
    its instant on a clock up to _MAX_OFFSET ahead or behind, so for it `low` is that much earlier. Naive
    text spells wall time in `zone`, so for it a tick scans the rows of one hour, not of 15 (on minute
    data from 10,000 series, 600,000 rows against 9 million); a stored sample of the column says which
    kind its text is. `high` is the date two days after `until`. Rows the bounds let through outside
    (since, until] are for `text_within` to drop.
    """
    clock = "UTC" if offsets else zone
    low = high = None
    if since is not None:
        low = f"{local_naive(since, clock) - (_MAX_OFFSET if offsets else timedelta(0)):%Y-%m-%d %H}"
    if until is not None:
        high = f"{local_naive(until, clock) + timedelta(days=2):%Y-%m-%d}"
    return low, high


# An offset after a time: the text pandas reads as aware. The time is required, or the day of
# '2024-10-27' would read as an offset of -27 hours.
_OFFSET_SUFFIX = r"[T ]\d{2}(?::?\d{2}){0,2}(?:\.\d+)?\s*(?:Z|[+-]\d{2}(?::?\d{2})?)\s*$"


def text_within(
    values: pa.Array | pa.ChunkedArray, since: pd.Timestamp | None, until: pd.Timestamp | None, zone: str
) -> np.ndarray:
    """Which ISO-8601 time texts lie in (since, until], as a boolean mask.

    Text with an offset is compared as the instant it names; naive text as wall-clock time in `zone`,
    like a naive timestamp column. Null or unparseable text lies in no bounded range (see the module
    docstring).
    """
    offset = pc.fill_null(pc.match_substring_regex(values, _OFFSET_SUFFIX), False)
    offset = offset.to_numpy(zero_copy_only=False)
    # Aware text becomes its instant, naive text its wall time as if that were UTC: each row is then
    # compared with the bound on its own clock.
    t = pd.to_datetime(values.to_pandas(), format="ISO8601", utc=True, errors="coerce")
    keep = np.ones(len(t), dtype=bool)
    if since is not None:
        wall = local_naive(since, zone).tz_localize("UTC")
        keep &= np.where(offset, (t > since).to_numpy(), (t > wall).to_numpy())
    if until is not None:
        wall = local_naive(until, zone).tz_localize("UTC")
        keep &= np.where(offset, (t <= until).to_numpy(), (t <= wall).to_numpy())
    return keep


def mixed_shapes(sample: object, values: pa.Array | pa.ChunkedArray) -> tuple[str, str] | None:
    """An ISO-8601 time text with a UTC offset and one without, where the stored `sample` and the `values`
    a read brought back hold both; else None. A read bounded in time judges text by the sample's shape
    (`text_scan`), so a column that mixes the two must be scanned as if all of it had offsets."""
    if not isinstance(sample, str) or not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        return None
    if len(values) > SHAPE_CHECKS:  # a whole-table read: evenly spaced rows stand for it
        values = values.take(pa.array(np.linspace(0, len(values) - 1, SHAPE_CHECKS).astype(np.int64)))
    texts = pa.chunked_array([pa.array([sample], type=values.type), *getattr(values, "chunks", [values])])
    texts = pc.drop_null(texts)
    iso = pc.match_substring_regex(texts, _ISO.pattern).to_numpy(zero_copy_only=False)
    offset = pc.match_substring_regex(texts, _OFFSET_SUFFIX).to_numpy(zero_copy_only=False)
    naive = iso & ~offset
    if not (naive.any() and offset.any()):
        return None
    return texts[int(offset.argmax())].as_py(), texts[int(naive.argmax())].as_py()


def mixed_warning(where: str, column: str, pair: tuple[str, str]) -> str:
    return (f"time column {column!r} of {where} mixes text with a UTC offset and text without (e.g. {pair[0]!r} "
            f"and {pair[1]!r}); reads now scan 15 more hours of rows to place both, and a read made before this "
            "one may have missed rows of the other kind: store every time in one shape, all with an offset "
            "such as 'Z' or all without")


def empty_raw() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=object) for c in COLUMNS})


def melt(frame: pd.DataFrame, series_ids: Sequence[str]) -> pd.DataFrame:
    """Wide -> long: `frame` holds the time column first, then one column per id in `series_ids`.

    Columns are taken by position, not by name (nor with DataFrame.melt), so a series column may be
    named 'ts' or 'value' without clashing with the output names. Missing cells stay as NaN rows:
    validation counts them as missing points.
    """
    if not series_ids or frame.empty:
        return empty_raw()
    n, k = len(frame), len(series_ids)
    return pd.DataFrame(
        {
            "series_id": np.repeat(np.asarray(list(series_ids), dtype=object), n),
            "ts": pd.concat([frame.iloc[:, 0]] * k, ignore_index=True),
            "value": pd.concat([frame.iloc[:, i + 1] for i in range(k)], ignore_index=True),
        }
    )
