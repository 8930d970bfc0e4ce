"""In-memory source for tests and notebooks: the same read semantics as the storage sources, in pandas."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from forecastd.errors import SourceError
from forecastd.timestamps import utc_instant
from forecastd.sources.mapping import COLUMNS, local_naive, utc_bound

__all__ = ["MemorySource"]


class MemorySource:
    """Serves a raw long frame (`series_id`, `ts`, `value`) held in memory.

    `ts` may be tz-aware, naive (then in `timezone`) or text; filters compare instants the way the
    storage sources do, so a test written against this source holds for them too.
    """

    def __init__(self, frame: pd.DataFrame, *, timezone: str = "UTC") -> None:
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise SourceError(
                f"in-memory source frame lacks column(s) {missing}; it needs exactly {list(COLUMNS)}"
            )
        self.frame = frame[list(COLUMNS)].reset_index(drop=True)
        self.timezone = timezone

    def __repr__(self) -> str:
        return f"MemorySource({len(self.frame)} rows)"

    def read(
        self,
        since: pd.Timestamp | None = None,
        until: pd.Timestamp | None = None,
        series: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        since, until = utc_bound(since, "since"), utc_bound(until, "until")
        frame = self.frame
        keep = pd.Series(True, index=frame.index)
        if series is not None:
            keep &= frame["series_id"].astype(str).isin([str(s) for s in series])
        ts = frame["ts"]
        if since is not None or until is not None:
            if pd.api.types.is_datetime64_dtype(ts.dtype):  # naive: wall-clock time in the configured zone
                since = local_naive(since, self.timezone) if since is not None else None
                until = local_naive(until, self.timezone) if until is not None else None
            elif not isinstance(ts.dtype, pd.DatetimeTZDtype):
                ts = self._parse(ts)
            # Comparisons with NaT are False, so rows without a usable time drop out of bounded reads.
            if since is not None:
                keep &= ts > since
            if until is not None:
                keep &= ts <= until
        return frame[keep.to_numpy()].reset_index(drop=True).copy()

    def series_ids(self) -> list[str]:
        return sorted({str(v) for v in self.frame["series_id"].dropna()})

    def _parse(self, ts: pd.Series) -> pd.Series:
        """Text or mixed timestamps as UTC instants, row by row (test data is small)."""
        values = [utc_instant(v, self.timezone) for v in ts.tolist()]
        return pd.Series(pd.to_datetime(values, utc=True), index=ts.index)
