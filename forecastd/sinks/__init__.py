"""Sinks: where forecasts and anomalies go (Parquet datasets, SQL tables, or memory for tests).

A sink has two verbs. `write(forecasts, anomalies)` upserts both frames on their unique keys
(FORECAST_KEY and ANOMALY_KEY in forecastd.frames): writing the same rows again changes nothing and a
row with an existing key replaces the old one, so a replay after a crash leaves no gap and no
duplicate. It is durable when it returns. `read(table, series, since, until)` returns rows with the
contract dtypes, sorted by key; the time filter (`since` exclusive, `until` inclusive, tz-aware) is on
`issued_at` for forecasts and `ts` for anomalies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import pandas as pd

from forecastd.config import Config
from forecastd.errors import SinkError
from forecastd.sinks.memory import MemorySink
from forecastd.sinks.parquet import ParquetSink
from forecastd.sinks.schema import SPECS, TableName, TableSpec
from forecastd.sinks.sql import SqlSink
from forecastd.sources.sql import resolve_url

__all__ = ["Sink", "open_sink", "MemorySink", "ParquetSink", "SqlSink", "TableName", "TableSpec", "SPECS"]


@runtime_checkable
class Sink(Protocol):
    def write(self, forecasts: pd.DataFrame, anomalies: pd.DataFrame) -> None:
        """Upsert both frames (either may be empty); durable on return."""
        ...

    def read(
        self,
        table: TableName,
        series: Sequence[str] | None = None,
        since: pd.Timestamp | None = None,
        until: pd.Timestamp | None = None,
    ) -> pd.DataFrame:
        """Rows of `table` ("forecasts" or "anomalies") with the contract dtypes, sorted by key."""
        ...


def open_sink(config: Config) -> Sink:
    """The sink config.sink describes, relative paths resolved against the config file."""
    k = config.sink
    if k.kind == "parquet":
        assert k.path is not None  # config validation requires it
        return ParquetSink(config.resolve(k.path), partition=k.partition)
    assert k.url is not None  # config validation requires it
    return SqlSink(
        resolve_url(k.url, config, error=SinkError, section="sink"),
        db_schema=k.db_schema,
        forecasts_table=k.forecasts_table,
        anomalies_table=k.anomalies_table,
        lock_timeout=k.lock_timeout,
    )
