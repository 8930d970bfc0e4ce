"""In-memory sink for tests: the same upsert and read semantics as the storage sinks, in pandas."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from forecastd.sinks.schema import SPECS, TableName, conform, empty, select, spec_for
from forecastd.sources.mapping import utc_bound

__all__ = ["MemorySink"]


class MemorySink:
    """Holds the forecasts and anomalies tables as frames; `tables` is there for tests to inspect."""

    def __init__(self) -> None:
        self.tables: dict[str, pd.DataFrame] = {name: empty(spec) for name, spec in SPECS.items()}
        self.writes = 0  # write() calls, for tests of retry and replay

    def __repr__(self) -> str:
        return f"MemorySink({', '.join(f'{k}={len(v)}' for k, v in self.tables.items())})"

    def write(self, forecasts: pd.DataFrame, anomalies: pd.DataFrame) -> None:
        new = {"forecasts": conform(forecasts, SPECS["forecasts"]),
               "anomalies": conform(anomalies, SPECS["anomalies"])}
        for name, frame in new.items():
            if frame.empty:
                continue
            merged = pd.concat([self.tables[name], frame], ignore_index=True) if len(self.tables[name]) else frame
            self.tables[name] = conform(merged, SPECS[name])  # the later row of a key wins
        self.writes += 1

    def read(
        self,
        table: TableName,
        series: Sequence[str] | None = None,
        since: pd.Timestamp | None = None,
        until: pd.Timestamp | None = None,
    ) -> pd.DataFrame:
        spec = spec_for(table)
        return select(self.tables[table], spec, series, utc_bound(since, "since"), utc_bound(until, "until")).copy()
