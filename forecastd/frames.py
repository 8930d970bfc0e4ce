"""The long-frame contract: `series_id` (str), `ts` (UTC), `value` (float), validated once.

Sources hand over whatever the user's storage holds, with columns already mapped to these names; this
module turns it into the one frame every later stage trusts. Each repair follows a stated rule and is
counted per series and reason in a `FrameReport`; nothing is dropped without being counted.

Rules:
- `series_id` null: row rejected ("null series_id"). An id holding a NUL character: row rejected ("NUL
  character in series_id"; no SQL database stores one in text). Any other id is kept verbatim as a string.
- `ts` null, unparseable or outside 1677-09-21..2262-04-11 (what nanoseconds hold; '9999-12-31' marks
  "no end" in many exports): row rejected ("bad timestamp"). Naive timestamps take the configured zone;
  aware ones are converted to UTC. Mixed naive/aware columns are handled row by row.
- `value` non-numeric, NaN or ±inf: kept as a missing point ("nan as missing", "inf as missing");
  the model sees a missing flag there, never the number.
- Off-grid timestamps are snapped to the nearest grid point ("snapped to grid").
- Several rows on one grid point: resolved by the configured rule ("duplicate").
- Rows at or before the series' watermark: rejected as "late" (they were already processed).
- Rows more than one step after `now`: deferred ("future"), not lost: the watermark never passes them,
  so the next read after their time comes picks them up.
- Out-of-order rows are sorted ("reordered").
"""

from __future__ import annotations

import datetime as dt
import logging
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

from forecastd.errors import DataError
from forecastd.timestamps import utc_instant

__all__ = [
    "COLUMNS",
    "FORECAST_COLUMNS",
    "FORECAST_KEY",
    "ANOMALY_COLUMNS",
    "ANOMALY_KEY",
    "FrameReport",
    "Grid",
    "infer_freq",
    "validate",
    "empty_frame",
]

log = logging.getLogger(__name__)

COLUMNS = ("series_id", "ts", "value")

# Output contracts (documented in README; stable once released). Timestamps are UTC, model_version an int.
FORECAST_COLUMNS = {
    "series_id": "object",
    "issued_at": "datetime64[ns, UTC]",  # timestamp of the last observed point
    "step": "int64",  # 1..horizon
    "target_ts": "datetime64[ns, UTC]",
    "mean": "float64",
    "lower": "float64",
    "upper": "float64",
    "model_version": "int64",
}
FORECAST_KEY = ("series_id", "issued_at", "step")
ANOMALY_COLUMNS = {
    "series_id": "object",
    "ts": "datetime64[ns, UTC]",
    "value": "float64",
    "expected": "float64",  # one-step-ahead mean issued at the previous grid step
    "lower": "float64",
    "upper": "float64",
    "score": "float64",  # in [0, 1], higher = more anomalous
    "is_anomaly": "bool",
    "model_version": "int64",
}
ANOMALY_KEY = ("series_id", "ts")


def empty_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "series_id": pd.Series([], dtype=object),
            "ts": pd.Series([], dtype="datetime64[ns, UTC]"),
            "value": pd.Series([], dtype="float64"),
        }
    )


# A row at or before its series' watermark: processed already, or arrived too late to be.
LATE = "late (at or before the watermark), rejected"
MAX_ID_BYTES = 1000  # series ids longer than this in UTF-8 are rejected, see validate


@dataclass
class FrameReport:
    """Counts of every repair and rejection, per (series_id, reason)."""

    counts: Counter = field(default_factory=Counter)

    def add(self, series: pd.Series | str, reason: str, n: int = 1) -> None:
        if isinstance(series, str):
            self.counts[(series, reason)] += n
            return
        for sid, k in series.value_counts().items():
            self.counts[(str(sid), reason)] += int(k)

    def total(self, reason: str | None = None) -> int:
        return sum(n for (_, r), n in self.counts.items() if reason is None or r == reason)

    def by_reason(self) -> dict[str, int]:
        out: Counter = Counter()
        for (_, r), n in self.counts.items():
            out[r] += n
        return dict(out)

    def merge(self, other: FrameReport) -> None:
        self.counts.update(other.counts)

    def log(self) -> None:
        for (sid, reason), n in sorted(self.counts.items()):
            log.warning("series %r: %d row(s) %s", sid, n, reason)


_DAY_NS = 86_400 * 10**9


@dataclass(frozen=True)
class Grid:
    """A regular time grid: maps timestamps to integer step numbers and back.

    Fixed steps ("5min", "1h") are anchored at the Unix epoch in UTC; month starts ("MS") count months.
    Steps of whole days ("1D", "7D") are anchored at midnight in `zone`: step i is the local midnight
    i x n days after 1970-01-01 there, so daily data stamped at local midnight sits on the grid through
    DST changes. In UTC that is the epoch-anchored grid, as before. Working in integer steps keeps gap
    arithmetic exact and free of pandas in the hot path.
    """

    freq: str
    # The zone whose midnights whole-day steps fall on; read as "UTC" for any other step (see __post_init__).
    zone: str = "UTC"

    def __post_init__(self) -> None:
        offset = pd.tseries.frequencies.to_offset(self.freq)
        # pandas 3 made Day a calendar offset rather than a Tick; on a UTC grid a day is 24 hours.
        if not isinstance(offset, (pd.offsets.Tick, pd.offsets.Day, pd.offsets.MonthBegin)):
            raise DataError(
                f"frequency {self.freq!r} is not supported; use a fixed step such as '5min', '1h', '1D' "
                "or month starts 'MS'"
            )
        # Sub-day steps stay on the UTC epoch whatever the zone: they count elapsed time, and anchoring
        # them locally would move every step of a half-hour zone (Asia/Kolkata) off the whole hours and
        # make DST days a step short or long. Month starts stay in UTC as before.
        whole_days = not isinstance(offset, pd.offsets.MonthBegin) and self.step_ns % _DAY_NS == 0
        if not whole_days or self.zone == "UTC":
            object.__setattr__(self, "zone", "UTC")  # one spelling, so equal grids compare equal
            return
        try:
            ZoneInfo(self.zone)
        except (ValueError, KeyError):  # ZoneInfoNotFoundError is a KeyError
            raise DataError(f"time zone {self.zone!r} is not known; use e.g. \"UTC\" or \"Europe/Berlin\"") from None

    # Cached: parsing the frequency string took a tenth of a single-series tick. (cached_property
    # writes the instance __dict__ directly, so it works on a frozen dataclass.)
    @cached_property
    def _offset(self) -> pd.DateOffset:
        return pd.tseries.frequencies.to_offset(self.freq)

    @cached_property
    def monthly(self) -> bool:
        return isinstance(self._offset, pd.offsets.MonthBegin)

    @cached_property
    def regular(self) -> bool:
        """Step i is at i x step_ns after the epoch in UTC; otherwise times go through `ns` (months, and
        local days, whose UTC length changes with DST)."""
        return not self.monthly and self.zone == "UTC"

    @cached_property
    def step_ns(self) -> int:
        """Nominal step in nanoseconds (a month counts as 30.44 days, a local day as 24 hours)."""
        if self.monthly:
            return int(30.436875 * 86400e9) * self._offset.n
        return int(self._offset.nanos)

    def index(self, ts: pd.Series | pd.DatetimeIndex) -> np.ndarray:
        """Nearest grid step of each UTC timestamp, as int64."""
        ts = pd.DatetimeIndex(ts)
        if self.monthly:
            n = self._offset.n
            months = (ts.year.to_numpy() - 1970) * 12 + ts.month.to_numpy() - 1
            month_start = pd.DatetimeIndex(ts.tz_convert(None).to_period("M").start_time).tz_localize("UTC")
            # Past mid-month rounds up, so a month-end stamp lands on the next month start.
            frac = (ts - month_start) / pd.Timedelta(days=1) / ts.days_in_month.to_numpy()
            months = months + (np.asarray(frac) >= 0.5)
            return np.floor_divide(months + n // 2, n).astype(np.int64) if n > 1 else months.astype(np.int64)
        step = self.step_ns
        if self.zone != "UTC":
            # Local wall-clock time (the instant plus its UTC offset, vectorised by pandas), then the
            # fixed-step rounding: the nearest local midnight of the grid. Within 12 hours of UTC a local
            # midnight stamp gets the step the UTC grid gave it, so steps (watermarks) carry over.
            ts = ts.tz_localize("UTC") if ts.tz is None else ts
            ns = ts.tz_convert(self.zone).tz_localize(None).as_unit("ns").asi8
        else:
            ns = ts.as_unit("ns").asi8
        return np.floor_divide(ns + step // 2, step)

    def ns(self, index: np.ndarray) -> np.ndarray:
        """UTC nanoseconds of integer grid steps (int64), without building pandas objects when regular."""
        index = np.asarray(index, dtype=np.int64)
        if not self.regular:
            return self.ts(index).asi8
        return index * self.step_ns

    def wall_ns(self, index: np.ndarray) -> np.ndarray:
        """Grid steps on the local clock, as nanoseconds after 1970-01-01 00:00 on it: what calendar
        features read, so a local day is that date at hour 0 (as the UTC grid gave it), not the UTC
        instant of its midnight, whose hour and weekday would shift with the zone and DST."""
        index = np.asarray(index, dtype=np.int64)
        return self.ts(index).asi8 if self.monthly else index * self.step_ns

    def last_instant(self, index: np.ndarray) -> pd.DatetimeIndex:
        """The latest UTC instant that `index` maps to each step: where a read past a processed step
        starts. Reading from the step's own time instead brought back every point stamped in the step's
        later half (hourly data at :10) and counted it as late at every tick. Month starts keep the step's
        time: their halves differ in length from month to month."""
        index = np.asarray(index, dtype=np.int64)
        if self.monthly:
            return self.ts(index)
        step = self.step_ns
        last = index * step + step - step // 2 - 1  # floor((ns + step // 2) / step) == index up to here
        if self.zone == "UTC":
            return pd.DatetimeIndex(last, tz="UTC").as_unit("ns")
        # On the local clock; a wall time that a DST change skips takes the instant before the gap, so a
        # read may start early (rows it re-reads are rejected as late), never late.
        return self._from_wall(last, "shift_backward")

    def _from_wall(self, wall_ns: np.ndarray, nonexistent: str) -> pd.DatetimeIndex:
        """UTC instants of times on the zone's clock (ns after 1970-01-01 00:00 on it). A time that occurs
        twice is the first of the two (True: the DST one); one that a DST jump skips is moved as
        `nonexistent` says."""
        wall = pd.DatetimeIndex(wall_ns).as_unit("ns")
        return wall.tz_localize(self.zone, ambiguous=np.ones(len(wall), dtype=bool),
                                nonexistent=nonexistent).tz_convert("UTC").as_unit("ns")

    def ts(self, index: np.ndarray) -> pd.DatetimeIndex:
        """UTC timestamps of integer grid steps."""
        index = np.asarray(index, dtype=np.int64)
        if self.monthly:
            months = index * self._offset.n
            years = 1970 + months // 12
            return pd.DatetimeIndex(
                pd.to_datetime({"year": years, "month": months % 12 + 1, "day": np.ones_like(months)}),
            ).tz_localize("UTC").as_unit("ns")
        if self.zone != "UTC":
            # A midnight that a DST jump skips (America/Santiago, Asia/Beirut) is the first instant after
            # the gap; one that occurs twice (America/Havana) is the first of the two.
            return self._from_wall(index * self.step_ns, "shift_forward")
        return pd.DatetimeIndex(index * self.step_ns, tz="UTC").as_unit("ns")


# Below this share of all steps the most common one is chance, not a sampling interval: event-driven
# data (a point when something happens) has steps of every length. NAB's most ragged file, speed_6005,
# steps 5 minutes 73% of the time; every other file 99.7% or more.
_IRREGULAR_SHARE = 0.25
# Steps a grid takes for irregular data: the one nearest the median step on a log scale.
_ROUND_STEPS = tuple(pd.Timedelta(s) for s in (
    "1s", "2s", "5s", "10s", "15s", "30s", "1min", "2min", "5min", "10min", "15min", "30min",
    "1h", "2h", "3h", "6h", "12h", "1D", "7D"))


def infer_freq(frame: pd.DataFrame, timezone: str = "UTC") -> str:
    """The most common step between consecutive points, over all series, as a pandas alias.

    Takes a raw mapped frame (timestamps in any form the validator accepts). Where no step is common
    (under a quarter of all steps), the timestamps are irregular and the most common step may be seconds
    in data that arrives every few minutes, which would make a grid of mostly empty steps: the grid then
    takes the round step nearest the median step instead, with a warning that names [data] freq.
    """
    if frame.empty:
        raise DataError("cannot infer the data frequency from an empty source; set [data] freq, e.g. \"1h\"")
    frame = pd.DataFrame({"series_id": frame["series_id"].astype(str), "ts": _to_utc(frame["ts"], timezone)})
    ordered = frame.dropna().sort_values(["series_id", "ts"])
    same = ordered["series_id"].to_numpy()[1:] == ordered["series_id"].to_numpy()[:-1]
    diffs = np.diff(ordered["ts"].astype("int64").to_numpy())[same]
    diffs = diffs[diffs > 0]
    if diffs.size == 0:
        raise DataError(
            "cannot infer the data frequency: no series has two distinct timestamps; set [data] freq, e.g. \"1h\""
        )
    values, counts = np.unique(diffs, return_counts=True)
    step = pd.Timedelta(int(values[np.argmax(counts)]), unit="ns")
    share = counts.max() / diffs.size
    if share < _IRREGULAR_SHARE:
        median = pd.Timedelta(int(np.median(diffs)), unit="ns")
        common = step
        step = min(_ROUND_STEPS, key=lambda s: abs(np.log(s / median)))
        log.warning("timestamps are irregular: the most common step, %s, is %.1f%% of all steps; the grid takes "
                    "%s, the round step nearest the median step (%s): points between grid steps are snapped "
                    "to them and points that meet on one are resolved by [data] duplicates. Set [data] freq "
                    "to choose the step", _span(common), 100 * share, _span(step), _span(median))
    if pd.Timedelta(days=28) <= step <= pd.Timedelta(days=31):
        return "MS"
    return pd.tseries.frequencies.to_offset(step).freqstr


def _span(step: pd.Timedelta) -> str:
    return str(step).removeprefix("0 days ")


# The instants datetime64[ns] holds, the unit every later stage computes in.
_NS_FIRST, _NS_LAST = pd.Timestamp.min.tz_localize("UTC"), pd.Timestamp.max.tz_localize("UTC")


def _in_ns(ts: pd.Series) -> pd.Series:
    """UTC timestamps of any unit as nanoseconds; those outside the nanosecond range become NaT (bad
    timestamps): one '9999-12-31' failed the conversion, and with it the read of every series."""
    outside = (ts < _NS_FIRST) | (ts > _NS_LAST)
    if outside.any():
        ts = ts.mask(outside)
    return ts.dt.as_unit("ns")


def _instants(values: list, tz: ZoneInfo) -> pd.DatetimeIndex:
    """Timestamps of any form as UTC nanoseconds, row by row (`utc_instant`), NaT outside the range."""
    out = [utc_instant(v, tz) for v in values]
    out = [t if t is pd.NaT or _NS_FIRST <= t <= _NS_LAST else pd.NaT for t in out]
    return pd.DatetimeIndex(out, tz="UTC").as_unit("ns") if out else pd.DatetimeIndex([], tz="UTC")


def _to_utc(col: pd.Series, zone: str) -> pd.Series:
    """Timestamps to datetime64[ns, UTC]; naive ones take `zone`; unparseable ones become NaT."""
    if col.dtype.kind in "iuf" and col.notna().any():
        # pandas reads a number as nanoseconds since 1970: epoch seconds would all land in January 1970
        # and then merge on the grid, counted as duplicates, instead of failing.
        raise DataError(
            f"the time column holds numbers (e.g. {col.dropna().iloc[0].item()!r}), not timestamps; forecastd reads "
            "timestamps, dates or ISO-8601 text: store the times as such, or point [source] time_column at a "
            "view that converts them (e.g. to_timestamp(col) in PostgreSQL, datetime(col, 'unixepoch') in SQLite)"
        )
    if isinstance(col.dtype, pd.DatetimeTZDtype):
        return _in_ns(col.dt.tz_convert("UTC"))
    if pd.api.types.is_datetime64_dtype(col.dtype):
        return _in_ns(col.dt.tz_localize(zone, ambiguous="NaT", nonexistent="NaT").dt.tz_convert("UTC"))
    tz = ZoneInfo(zone)
    # Fast path: one vectorised parse; values it could not place (unparseable, or of the other kind in
    # a mixed naive/aware column) are parsed row by row, so dirty rows cost time only for themselves.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parsed = pd.to_datetime(col, format="ISO8601", errors="coerce")
        except (ValueError, TypeError):
            parsed = None
    numbers = [w for w in caught if "integer or float" in str(w.message)]
    for w in caught:
        if w not in numbers:
            warnings.warn(w.message, w.category, stacklevel=2)
    if numbers:
        # Numbers among the text: pandas 3 parses them to NaT here, and its next major release will read
        # them as epochs. Row by row, where a number is a bad timestamp (`utc_instant`).
        parsed = None
    if parsed is not None and (isinstance(parsed.dtype, pd.DatetimeTZDtype)
                               or pd.api.types.is_datetime64_dtype(parsed.dtype)):
        out = _to_utc(parsed, zone)
        redo = out.isna() & col.notna()
        if redo.any():
            out = out.copy()
            out[redo] = _instants(col[redo].tolist(), tz)
        return out
    return pd.Series(_instants(col.tolist(), tz), index=col.index)


def validate(
    raw: pd.DataFrame,
    *,
    grid: Grid,
    timezone: str = "UTC",
    duplicates: str = "last",
    watermarks: Mapping[str, pd.Timestamp] | pd.Series | None = None,
    now: dt.datetime | pd.Timestamp | None = None,
    report: FrameReport | None = None,
    counted_until: pd.Timestamp | None = None,
    seen_through: Mapping[str, pd.Timestamp] | pd.Series | None = None,
) -> tuple[pd.DataFrame, FrameReport]:
    """Turn a raw mapped frame into the long-frame contract on `grid`, counting every repair.

    counted_until: a row whose series id is rejected (null, NUL, too long) at or before this time was met
    by an earlier read (a tick's, up to the newest watermark) and is dropped without a count: it has no
    series, so no watermark to drop it by, and each tick counted it again.

    seen_through: per series, a time up to which its rows were counted by the read that processed them
    (another model's stream): kept and repaired, since a warm-up reads them again, but not counted again.
    A promotion's first tick counted every repair of the warm-up's rows once more."""
    report = report if report is not None else FrameReport()
    missing = [c for c in COLUMNS if c not in raw.columns]
    if missing:
        raise DataError(
            f"source frame lacks column(s) {missing}; map them in [source] (series_column, time_column, value_column)"
        )
    if raw.empty:
        return empty_frame(), report

    sid = raw["series_id"]
    null = sid.isna().to_numpy()
    ids = sid[~null].astype(str)
    # PostgreSQL text cannot hold NUL, and one such id failed the sink's write of every series in the
    # batch; stripping it instead could merge the series into another.
    nul = ids.str.contains("\x00", regex=False).to_numpy(dtype=bool)
    # An id too long for a database index (PostgreSQL's btree takes ~2,700 bytes a key) failed the sink's
    # write of every series; the byte lengths are measured only where the characters could exceed it.
    chars = ids.str.len().to_numpy()
    long = np.zeros_like(nul)
    if chars.size and chars.max() > MAX_ID_BYTES // 4:
        maybe = chars > MAX_ID_BYTES // 4
        long[maybe] = [len(i.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES for i in ids[maybe]]
        long &= ~nul
    if counted_until is not None and (null.any() or nul.any() or long.any()):
        rejected = null.copy()
        rejected[~null] = nul | long
        ts = _to_utc(raw["ts"][rejected], timezone)
        again = np.zeros_like(null)
        again[rejected] = (ts.notna() & (ts <= counted_until)).to_numpy(dtype=bool)
        null_new, nul_new, long_new = null & ~again, nul & ~again[~null], long & ~again[~null]
    else:
        null_new, nul_new, long_new = null, nul, long
    if null_new.any():
        report.add("<null>", "rejected: null series_id", int(null_new.sum()))
    if nul_new.any():
        report.add(ids[nul_new], "rejected: NUL character in series_id")
    if long_new.any():
        report.add(ids[long_new], f"rejected: series_id longer than {MAX_ID_BYTES} bytes")
    keep = ~null
    drop = nul | long
    if drop.any():
        ids = ids[~drop]
        keep[keep] = ~drop
    frame = pd.DataFrame(
        {
            "series_id": ids.astype(object),
            "ts": _to_utc(raw["ts"][keep], timezone),
            "value": pd.to_numeric(raw["value"][keep], errors="coerce").astype("float64"),
        }
    )

    bad_ts = frame["ts"].isna()
    if bad_ts.any():
        report.add(frame.loc[bad_ts, "series_id"], "rejected: bad timestamp")
        frame = frame[~bad_ts]

    step = grid.index(frame["ts"])
    snapped_ts = grid.ts(step)
    off = snapped_ts.as_unit("ns").asi8 != pd.DatetimeIndex(frame["ts"]).as_unit("ns").asi8
    frame = frame.assign(ts=pd.Series(snapped_ts, index=frame.index))

    # Rows processed already or not due yet are set aside before any repair is counted: a tick reads
    # such rows again (from the oldest watermark; future ones until their time), and counting their NaNs,
    # snaps and duplicates at every read multiplied the warnings by the number of reads.
    if watermarks is not None and len(watermarks):
        wm = frame["series_id"].map(watermarks)
        late = (wm.notna() & (frame["ts"] <= wm)).to_numpy(dtype=bool)
        if late.any():
            report.add(frame.loc[late, "series_id"], LATE)
            frame, off = frame[~late], off[~late]
    if now is not None:
        limit = pd.Timestamp(now).tz_convert("UTC") if pd.Timestamp(now).tzinfo else pd.Timestamp(now, tz="UTC")
        future = (frame["ts"] > limit + pd.Timedelta(grid.step_ns, unit="ns")).to_numpy(dtype=bool)
        if future.any():
            report.add(frame.loc[future, "series_id"], "future-stamped, deferred to a later read")
            frame, off = frame[~future], off[~future]

    counted = np.ones(len(frame), dtype=bool)  # rows whose repairs count (`seen_through`)
    if seen_through is not None and len(seen_through):
        through = frame["series_id"].map(seen_through)
        counted = ~(through.notna() & (frame["ts"] <= through)).to_numpy(dtype=bool)

    def count(mask: np.ndarray | pd.Series, reason: str) -> None:
        mask = np.asarray(mask, dtype=bool) & counted
        if mask.any():
            report.add(frame.loc[mask, "series_id"], reason)

    raw_values = raw.loc[frame.index, "value"]
    nonnum = frame["value"].isna() & raw_values.notna() & ~raw_values.apply(lambda v: isinstance(v, float))
    count(nonnum, "non-numeric value kept as missing")
    count(frame["value"].isna() & ~nonnum, "NaN kept as missing")
    inf = np.isinf(frame["value"].to_numpy())
    count(inf, "inf kept as missing")
    if inf.any():
        frame.loc[inf, "value"] = np.nan
    count(off, "snapped to grid")

    # Out of order means a row earlier in the source than a row before it of the same series.
    keys = frame["ts"].astype("int64")
    prev_max = keys.groupby(frame["series_id"]).cummax().groupby(frame["series_id"]).shift()
    count(keys < prev_max, "reordered")
    frame = frame.assign(_counted=counted).sort_values(["series_id", "ts"], kind="stable")
    counted = frame.pop("_counted").to_numpy()

    dup = frame.duplicated(["series_id", "ts"], keep=False).to_numpy()
    if dup.any():
        told = dup & counted
        ndup = frame[told].groupby("series_id").size() - frame[told].groupby("series_id")["ts"].nunique()
        for s, n in ndup.items():
            report.add(str(s), f"duplicate timestamp resolved by {duplicates!r}", int(n))
        if duplicates == "mean":
            frame = frame.groupby(["series_id", "ts"], as_index=False, sort=True)["value"].mean()
        else:
            frame = frame.drop_duplicates(["series_id", "ts"], keep=duplicates)

    frame = frame.reset_index(drop=True)
    frame["ts"] = frame["ts"].astype("datetime64[ns, UTC]")
    return frame[list(COLUMNS)], report
