"""Sources: where the raw long frame comes from (Parquet, SQL, or memory for tests).

A source has two verbs. `read(since, until, series)` returns the raw rows, mapped to the columns
`series_id, ts, value` (and melted for a wide layout) but not validated: `forecastd.frames.validate` does
that once for every source. `series_ids()` lists the series cheaply. Bounds are tz-aware instants,
`since` exclusive and `until` inclusive, and every filter is pushed down to the storage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import pandas as pd

from forecastd.config import Config
from forecastd.sources.mapping import COLUMNS, ColumnMap
from forecastd.sources.memory import MemorySource
from forecastd.sources.parquet import ParquetSource
from forecastd.sources.sql import SqlSource, resolve_url

__all__ = ["Source", "open_source", "MemorySource", "ParquetSource", "SqlSource", "ColumnMap", "COLUMNS"]


@runtime_checkable
class Source(Protocol):
    def read(
        self,
        since: pd.Timestamp | None = None,
        until: pd.Timestamp | None = None,
        series: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """Rows with `since < ts <= until` of the given series (all when None), columns series_id, ts, value."""
        ...

    def series_ids(self) -> list[str]:
        """The distinct series ids, sorted."""
        ...


def open_source(config: Config) -> Source:
    """The source config.source describes, relative paths resolved against the config file."""
    s = config.source
    columns = {
        "layout": s.layout,
        "series_column": s.series_column,
        "time_column": s.time_column,
        "value_column": s.value_column,
        "value_columns": s.value_columns,
        "timezone": s.timezone,
    }
    if s.kind == "parquet":
        assert s.path is not None  # config validation requires it
        return ParquetSource(config.resolve(s.path), **columns)
    assert s.url is not None and s.table is not None  # config validation requires them
    return SqlSource(resolve_url(s.url, config), s.table, db_schema=s.db_schema, order_column=s.order_column,
                     lock_timeout=s.lock_timeout, **columns)

