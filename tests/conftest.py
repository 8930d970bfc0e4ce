"""Shared fixtures: small sample frames and a throwaway PostgreSQL schema.

PostgreSQL tests use the server at 127.0.0.1:5432 (trust auth, database `test`) and skip with a clear
message where it is absent. Each test gets its own schema, dropped afterwards, so tests never see each
other's tables and can run in any order.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import pytest

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_DB = "test"
PG_USER = "postgres"

# An id that would break any SQL built by string formatting; every contract suite carries it.
NASTY_ID = "'; DROP TABLE x;--"
SERIES = ("a", "b", NASTY_ID)
# 24 hourly points across the 2024 spring-forward in Europe/Berlin (01:00 UTC on 31 March), so naive
# local storage has a jump the bound conversion must get right.
START = pd.Timestamp("2024-03-30 18:00", tz="UTC")
POINTS = 24


@pytest.fixture
def long_frame() -> pd.DataFrame:
    """The canonical long frame: series_id (object), ts (datetime64[ns, UTC]), value (float64)."""
    ts = pd.date_range(START, periods=POINTS, freq="h").as_unit("ns")
    return pd.DataFrame(
        {
            "series_id": np.repeat(np.asarray(SERIES, dtype=object), POINTS),
            "ts": np.tile(ts, len(SERIES)),
            "value": np.concatenate([100.0 * i + np.arange(POINTS) for i in range(len(SERIES))]),
        }
    ).astype({"series_id": object, "ts": "datetime64[ns, UTC]"})


@pytest.fixture
def make_forecasts() -> Callable[..., pd.DataFrame]:
    """Forecast rows: every series x issue time x step 1..horizon, values shifted by `offset`."""

    def make(
        series: Sequence[str] = SERIES,
        issued: Sequence[pd.Timestamp] | pd.DatetimeIndex = pd.date_range(START, periods=4, freq="h"),
        horizon: int = 3,
        offset: float = 0.0,
        version: int = 1,
    ) -> pd.DataFrame:
        rows = [(s, t, k) for s in series for t in issued for k in range(1, horizon + 1)]
        frame = pd.DataFrame(rows, columns=["series_id", "issued_at", "step"])
        frame["series_id"] = frame["series_id"].astype(object)
        frame["issued_at"] = pd.to_datetime(frame["issued_at"], utc=True).dt.as_unit("ns")
        frame["step"] = frame["step"].astype("int64")
        frame["target_ts"] = frame["issued_at"] + pd.to_timedelta(frame["step"], unit="h")
        frame["mean"] = np.arange(len(frame), dtype="float64") + offset
        frame["lower"] = frame["mean"] - 1.0
        frame["upper"] = frame["mean"] + 1.0
        frame["model_version"] = np.int64(version)
        return frame

    return make


@pytest.fixture
def make_anomalies() -> Callable[..., pd.DataFrame]:
    """Anomaly rows: every series x point, values shifted by `offset`; every fifth point flagged."""

    def make(
        series: Sequence[str] = SERIES,
        ts: Sequence[pd.Timestamp] | pd.DatetimeIndex = pd.date_range(START, periods=6, freq="h"),
        offset: float = 0.0,
        version: int = 1,
    ) -> pd.DataFrame:
        rows = [(s, t) for s in series for t in ts]
        frame = pd.DataFrame(rows, columns=["series_id", "ts"])
        frame["series_id"] = frame["series_id"].astype(object)
        frame["ts"] = pd.to_datetime(frame["ts"], utc=True).dt.as_unit("ns")
        n = len(frame)
        frame["value"] = np.arange(n, dtype="float64") + offset
        frame["expected"] = frame["value"] - 0.5
        frame["lower"] = frame["expected"] - 2.0
        frame["upper"] = frame["expected"] + 2.0
        frame["score"] = (np.arange(n) % 10) / 10.0
        frame["is_anomaly"] = (np.arange(n) % 5) == 0
        frame["model_version"] = np.int64(version)
        return frame

    return make


def pg_base_url() -> str:
    return f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{PG_DB}"


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The server's base URL, or a skip naming why it cannot be reached (checked once a session)."""
    try:
        import psycopg

        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=PG_DB, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # ImportError, refused, auth: every reason is a skip, with the reason
        pytest.skip(f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT}: {' '.join(str(exc).split())}")
    return pg_base_url()


@pytest.fixture
def pg_schema(pg_server: str) -> Iterator[str]:
    """A fresh, empty schema, dropped with everything in it after the test."""
    import psycopg

    name = f"forecastd_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=PG_DB, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')  # generated name, not user input
    try:
        yield name
    finally:
        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=PG_DB, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '10s'")  # a leaked transaction fails the test, never hangs it
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def pg_url(pg_schema: str) -> str:
    """A URL whose unqualified tables live in the fresh `pg_schema` (it leads the search_path)."""
    return f"{pg_base_url()}?options=-csearch_path%3D{pg_schema}"
