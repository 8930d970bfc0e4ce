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
- Rows with a null or unparseable timestamp come back only from unbounded reads, where validation counts
  and rejects them; a bounded read cannot place them in time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta, timezone
from typing import Literal

import numpy as np
import pandas as pd

from forecastd.config import SourceConfig
from forecastd.errors import SourceError

__all__ = [
    "COLUMNS",
    "ColumnMap",
    "utc_bound",
    "local_naive",
    "text_bound",
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

    def check(self, available: Sequence[str], where: str) -> None:
        """SourceError naming the first mapped column `where` lacks, the columns it has, and the key to fix."""
        have = set(available)
        for column, key in self.required().items():
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


def has_offset(sample: str) -> bool:
    """Whether ISO-8601 text carries its own UTC offset ('Z', '+02:00'); else it is naive local time."""
    m = _ISO.match(sample)
    return bool(m and m.group("tz"))


def text_bound(sample: str, bound: pd.Timestamp, zone: str, where: str) -> str:
    """`bound` rendered in the same ISO-8601 shape as `sample`, so text comparison orders like time.

    Fixed-width ISO-8601 text sorts lexicographically in time order as long as every value shares one
    shape (separator, precision, offset); this renders the bound in the shape of a stored value.
    """
    m = _ISO.match(sample)
    if m is None:
        raise SourceError(
            f"time values in {where} are text that is not ISO-8601 (e.g. {sample!r}); store them as "
            "'YYYY-MM-DD HH:MM:SS' text or as a timestamp column so reads can filter by time"
        )
    tz = m.group("tz")
    if tz:
        t = bound.tz_convert(_fixed_offset(tz)).tz_localize(None)
    else:
        t = local_naive(bound, zone)
    out = f"{t:%Y-%m-%d}"
    if m.group("hm"):
        out += f"{m.group('sep')}{t:%H:%M}"
        if m.group("sec"):
            out += f":{t:%S}"
            if m.group("frac"):
                digits = len(m.group("frac")) - 1
                out += "." + f"{t.microsecond:06d}{t.nanosecond:03d}"[:digits].ljust(digits, "0")
    if tz:
        out += tz
    return out


def _fixed_offset(tz: str) -> timezone:
    if tz == "Z":
        return timezone.utc
    sign = -1 if tz[0] == "-" else 1
    digits = tz[1:].replace(":", "")
    hours, minutes = int(digits[:2]), int(digits[2:4] or 0)
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


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
