"""Contract suite for sources: every storage answers read(since, until, series) with the same rows.

Each variant stores the same long frame (conftest.long_frame) its own way: long or wide, aware, naive
local or ISO text timestamps, one file, a hive directory, a glob, SQLite, PostgreSQL. The raw rows a
source returns are run through forecastd.frames.validate and compared with the frame filtered in pandas.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from conftest import NASTY_ID, SERIES, START
from forecastd import frames
from forecastd.config import config_from_dict
from forecastd.errors import ConfigError, DataError, SinkError, SourceError
from forecastd.frames import Grid, validate
from forecastd.sinks import open_sink
from forecastd.sources import COLUMNS, MemorySource, ParquetSource, Source, SqlSource, open_source
from forecastd.sources import parquet as parquet_module
from forecastd.sources.mapping import text_scan, text_within

ZONE = "Europe/Berlin"
H = pd.Timedelta(hours=1)


# -- how each variant stores the frame ----------------------------------------------------------------


def _local(ts: pd.Series) -> pd.Series:
    return ts.dt.tz_convert(ZONE).dt.tz_localize(None)


def _wide(frame: pd.DataFrame, time_name: str = "date") -> pd.DataFrame:
    wide = frame.pivot(index="ts", columns="series_id", values="value").reset_index()
    wide.columns.name = None
    return wide.rename(columns={"ts": time_name})


def _sqlite_rows(path: Path, rows: list[tuple], ts_type: str = "TEXT") -> str:
    with sqlite3.connect(path) as conn:
        conn.execute(f"CREATE TABLE readings (sensor TEXT, stamp {ts_type}, reading REAL)")
        conn.executemany("INSERT INTO readings VALUES (?, ?, ?)", rows)
    return f"sqlite:///{path}"


def _mixed_iso(t: pd.Timestamp, i: int) -> str:
    """Four shapes of one instant, as real SQLite tables collect them from different writers."""
    return [
        f"{t:%Y-%m-%dT%H:%M:%S}Z",
        t.tz_convert(ZONE).isoformat(),  # '2024-03-31T03:00:00+02:00'
        f"{t:%Y-%m-%d %H:%M:%S}.000000",  # SQLAlchemy's DateTime on SQLite
        f"{t:%Y-%m-%d %H:%M}",
    ][i % 4]


def memory_aware(frame, tmp_path, request):
    return MemorySource(frame.assign(ts=frame["ts"].dt.tz_convert(ZONE))), "UTC"


def memory_naive(frame, tmp_path, request):
    return MemorySource(frame.assign(ts=_local(frame["ts"])), timezone=ZONE), ZONE


def memory_text(frame, tmp_path, request):
    text = [_mixed_iso(t, i) for i, t in enumerate(frame["ts"])]
    return MemorySource(frame.assign(ts=pd.Series(text, dtype=object))), "UTC"


def parquet_aware(frame, tmp_path, request):
    table = pa.table({
        "sensor": pa.array(frame["series_id"], pa.string()),
        "time": pa.array(frame["ts"]).cast(pa.timestamp("ms", tz=ZONE)),
        "reading": pa.array(frame["value"]),
    })
    pq.write_table(table, tmp_path / "readings.parquet")
    src = ParquetSource(tmp_path / "readings.parquet", series_column="sensor", time_column="time", value_column="reading")
    return src, "UTC"


def parquet_naive(frame, tmp_path, request):
    out = pd.DataFrame({"sensor": frame["series_id"], "time": _local(frame["ts"]).dt.as_unit("us"), "reading": frame["value"]})
    out.to_parquet(tmp_path / "readings.parquet")
    src = ParquetSource(tmp_path / "readings.parquet", series_column="sensor", time_column="time",
                        value_column="reading", timezone=ZONE)
    return src, ZONE


def parquet_text(frame, tmp_path, request):
    out = frame.assign(ts=_local(frame["ts"]).dt.strftime("%Y-%m-%d %H:%M:%S"))
    out.to_parquet(tmp_path / "readings.parquet")
    return ParquetSource(tmp_path / "readings.parquet", timezone=ZONE), ZONE


def parquet_wide(frame, tmp_path, request):
    wide = _wide(frame)
    wide["note"] = "not a series"  # text columns are never series
    wide.to_parquet(tmp_path / "wide.parquet")
    return ParquetSource(tmp_path / "wide.parquet", layout="wide", time_column="date"), "UTC"


def parquet_dir(frame, tmp_path, request):
    # Hive partitions by series: the series column comes from the directory names.
    pq.write_to_dataset(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "ds", partition_cols=["series_id"])
    return ParquetSource(tmp_path / "ds"), "UTC"


def parquet_glob(frame, tmp_path, request):
    (tmp_path / "parts").mkdir()
    for i, (_, part) in enumerate(frame.groupby("series_id")):
        part.to_parquet(tmp_path / "parts" / f"part-{i}.parquet", index=False)
    (tmp_path / "parts" / "notes.txt").write_text("not parquet, not matched")
    return ParquetSource(str(tmp_path / "parts" / "*.parquet")), "UTC"


def sqlite_pandas(frame, tmp_path, request):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    frame.assign(ts=frame["ts"].dt.tz_localize(None)).to_sql("readings", engine, index=False)
    engine.dispose()
    return SqlSource(f"sqlite:///{tmp_path / 'db.sqlite'}", "readings"), "UTC"


def sqlite_mixed_text(frame, tmp_path, request):
    rows = [(s, _mixed_iso(t, i), v) for i, (s, t, v) in enumerate(frame.itertuples(index=False))]
    url = _sqlite_rows(tmp_path / "db.sqlite", rows, ts_type="DATETIME")
    return SqlSource(url, "readings", series_column="sensor", time_column="stamp", value_column="reading"), "UTC"


def sqlite_naive_text(frame, tmp_path, request):
    local = _local(frame["ts"])
    rows = [(s, f"{t:%Y-%m-%dT%H:%M:%S}", v) for s, t, v in zip(frame["series_id"], local, frame["value"])]
    url = _sqlite_rows(tmp_path / "db.sqlite", rows)
    return SqlSource(url, "readings", series_column="sensor", time_column="stamp", value_column="reading",
                     timezone=ZONE), ZONE


def sqlite_wide(frame, tmp_path, request):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    _wide(frame).assign(date=lambda d: d["date"].dt.tz_localize(None)).to_sql("wide", engine, index=False)
    engine.dispose()
    return SqlSource(f"sqlite:///{tmp_path / 'db.sqlite'}", "wide", layout="wide", time_column="date"), "UTC"


def _pg_write(request, frame: pd.DataFrame, name: str, types: dict[str, sa.types.TypeEngine], **kwargs) -> SqlSource:
    """Store `frame` as a new table in the test's schema; the source shares the engine (one connect)."""
    url = request.getfixturevalue("pg_url")
    engine = sa.create_engine(url)
    request.addfinalizer(engine.dispose)  # before the schema is dropped: finalizers run last-in first-out
    table = sa.Table(name, sa.MetaData(), *(sa.Column(c, types.get(c, sa.Float())) for c in frame.columns))
    records = frame.astype(object).where(frame.notna(), None).to_dict("records")
    with engine.begin() as conn:
        table.create(conn)
        conn.execute(table.insert(), records)
    return SqlSource(url, name, engine=engine, **kwargs)


def postgresql_aware(frame, tmp_path, request):
    source = _pg_write(request, frame.assign(ts=frame["ts"].dt.tz_convert(ZONE)), "readings",
                       {"series_id": sa.Text(), "ts": sa.DateTime(timezone=True)})
    return source, "UTC"


def postgresql_naive(frame, tmp_path, request):
    source = _pg_write(request, frame.assign(ts=_local(frame["ts"])), "readings",
                       {"series_id": sa.Text(), "ts": sa.DateTime(timezone=False)}, timezone=ZONE)
    return source, ZONE


def postgresql_text(frame, tmp_path, request):
    text = frame["ts"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    source = _pg_write(request, frame.assign(ts=text), "readings", {"series_id": sa.Text(), "ts": sa.Text()})
    return source, "UTC"


def postgresql_wide(frame, tmp_path, request):
    source = _pg_write(request, _wide(frame), "wide", {"date": sa.DateTime(timezone=True)},
                       layout="wide", time_column="date")
    return source, "UTC"


VARIANTS: dict[str, Callable] = {f.__name__: f for f in [
    memory_aware, memory_naive, memory_text,
    parquet_aware, parquet_naive, parquet_text, parquet_wide, parquet_dir, parquet_glob,
    sqlite_pandas, sqlite_mixed_text, sqlite_naive_text, sqlite_wide,
    postgresql_aware, postgresql_naive, postgresql_text, postgresql_wide,
]}


@pytest.fixture(params=[
    pytest.param(name, id=name, marks=[pytest.mark.postgres] if name.startswith("postgresql") else [])
    for name in VARIANTS
])
def stored(request, long_frame, tmp_path) -> tuple[Source, str]:
    return VARIANTS[request.param](long_frame, tmp_path, request)


def canon(raw: pd.DataFrame, zone: str) -> pd.DataFrame:
    """The raw rows as validated long frame; nothing may be rejected or repaired but ordering."""
    assert list(raw.columns) == list(COLUMNS)
    frame, report = validate(raw, grid=Grid("1h"), timezone=zone)
    assert set(report.by_reason()) <= {"reordered"}, report.counts
    return frame


def expected(frame: pd.DataFrame, since=None, until=None, series=None) -> pd.DataFrame:
    keep = pd.Series(True, index=frame.index)
    if since is not None:
        keep &= frame["ts"] > since
    if until is not None:
        keep &= frame["ts"] <= until
    if series is not None:
        keep &= frame["series_id"].isin(series)
    return frame[keep].sort_values(["series_id", "ts"], kind="stable").reset_index(drop=True)


# -- the contract ---------------------------------------------------------------------------------------


def test_read_everything(stored, long_frame):
    source, zone = stored
    assert isinstance(source, Source)
    pd.testing.assert_frame_equal(canon(source.read(), zone), expected(long_frame))


WINDOWS = {
    # On data points: since is exclusive, until inclusive.
    "on-points": (START + 5 * H, START + 10 * H),
    # Across the Berlin spring-forward (01:00 UTC on 31 March): naive bounds must jump with it.
    "across-dst": (pd.Timestamp("2024-03-31 00:00", tz="UTC"), pd.Timestamp("2024-03-31 03:00", tz="UTC")),
    # Between points, written in another zone: the bound is an instant, whatever its zone.
    "between-points": (pd.Timestamp("2024-03-31 01:30", tz="America/New_York"), None),
    "until-only": (None, START + 2 * H),
}


@pytest.mark.parametrize("window", list(WINDOWS), ids=list(WINDOWS))
def test_since_until(stored, long_frame, window):
    source, zone = stored
    since, until = WINDOWS[window]
    got = canon(source.read(since=since, until=until), zone)
    want = expected(long_frame, since, until)
    assert 0 < len(want) < len(long_frame)
    pd.testing.assert_frame_equal(got, want)


def test_series_filter(stored, long_frame):
    source, zone = stored
    since = START + 20 * H
    got = canon(source.read(since=since, series=["a", NASTY_ID]), zone)
    pd.testing.assert_frame_equal(got, expected(long_frame, since=since, series=["a", NASTY_ID]))
    assert source.read(series=["no such series"]).empty
    assert list(source.read(series=[]).columns) == list(COLUMNS)


def test_series_ids_and_edges(stored):
    source, _ = stored
    assert source.series_ids() == sorted(SERIES)
    raw = source.read(since=START + 100 * H)
    assert raw.empty and list(raw.columns) == list(COLUMNS)
    with pytest.raises(ValueError, match="tz-aware"):
        source.read(since=pd.Timestamp("2024-03-31 00:00"))


def test_raw_columns_match_frames_contract():
    assert COLUMNS == frames.COLUMNS


# -- SQL: text timestamps, bound parameters, errors ------------------------------------------------------


def test_sqlite_text_shapes_that_plain_text_comparison_gets_wrong(tmp_path):
    """'T' sorts after ' ' and offsets shift the instant: a string compare would drop or repeat rows."""
    since = pd.Timestamp("2024-03-31 00:00", tz="UTC")
    rows = [
        ("s", "2024-03-31T00:00:00+01:00", 1.0),  # 23:00 UTC the day before: excluded
        ("s", "2024-03-31T00:00:00Z", 2.0),  # exactly since: excluded
        ("s", "2024-03-31 00:00:00.001", 3.0),  # a millisecond later: included
        ("s", "2024-03-31 00:30", 4.0),  # included, though '2024-03-31 00:30' < '2024-03-31T...'
        ("s", "2024-03-31T02:30:00+02:00", 5.0),  # 00:30 UTC: included
        ("s", "2024-03-30 23:59:59.999", 6.0),  # excluded
        ("s", "2024-03-30 09:31:00-14:59", 7.0),  # 00:30 UTC, written 15 hours behind: included
        ("s", "2024-03-30 09:00:00-14:59", 8.0),  # 23:59 UTC the day before: excluded
        ("s", "2024-03-31 14:30:00+14:30", 9.0),  # 00:00 UTC exactly: excluded
    ]
    source = SqlSource(_sqlite_rows(tmp_path / "t.db", rows), "readings", series_column="sensor",
                       time_column="stamp", value_column="reading")
    got = source.read(since=since)
    assert sorted(got["value"]) == [3.0, 4.0, 5.0, 7.0]
    assert sorted(source.read(until=since)["value"]) == [1.0, 2.0, 6.0, 8.0, 9.0]


@pytest.mark.parametrize("suffix, scanned_from", [("", "2024-03-31 05"), ("Z", "2024-03-30 14")])
def test_sqlite_text_scan_starts_offset_allowance_before_since(tmp_path, suffix, scanned_from):
    """Text with offsets may name an instant up to 15 hours ahead of itself, so the index range starts that
    much before `since`; naive text names its own wall time, so the range starts at `since`'s hour."""
    since = pd.Timestamp("2024-03-31 05:30", tz="UTC")
    stamps = ["2024-03-31 05:29:59.999", "2024-03-31 05:30:00", "2024-03-31T05:30:00.001", "2024-03-31 05:31",
              "2024-03-31T06:00:00", "2024-03-30 20:00:00"]
    rows = [("s", f"{t}{suffix}", float(i)) for i, t in enumerate(stamps)]
    source = SqlSource(_sqlite_rows(tmp_path / "t.db", rows), "readings", series_column="sensor",
                       time_column="stamp", value_column="reading")
    params: list = []
    sa.event.listen(source.engine, "before_cursor_execute",
                    lambda conn, cursor, statement, p, context, many: params.append(p))
    assert sorted(source.read(since=since)["value"]) == [2.0, 3.0, 4.0]
    assert scanned_from in params[-1]
    source.engine.dispose()


def test_sqlite_numeric_timestamps_are_refused(tmp_path):
    url = _sqlite_rows(tmp_path / "t.db", [("s", 1711843200, 1.0)], ts_type="INTEGER")
    source = SqlSource(url, "readings", series_column="sensor", time_column="stamp", value_column="reading")
    with pytest.raises(SourceError, match="holds numbers.*ISO-8601"):
        source.read(since=START)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_sql_filters_are_bound_parameters(backend, long_frame, tmp_path, request):
    if backend == "sqlite":
        source, _ = sqlite_pandas(long_frame, tmp_path, request)
    else:
        source, _ = postgresql_aware(long_frame, tmp_path, request)
    seen: list[tuple[str, object]] = []
    sa.event.listen(source.engine, "before_cursor_execute",
                    lambda conn, cursor, statement, params, context, many: seen.append((statement, params)))
    source.read(since=START + 5 * H, series=[NASTY_ID])
    statement, params = seen[-1]
    assert "WHERE" in statement and "DROP TABLE" not in statement
    assert NASTY_ID in (params.values() if isinstance(params, dict) else params)
    source.engine.dispose()


def test_sqlite_missing_table_lists_tables(tmp_path, long_frame, request):
    source, _ = sqlite_pandas(long_frame, tmp_path, request)
    bad = SqlSource(source.url, "readings; DROP TABLE readings;--")
    with pytest.raises(SourceError, match=r"does not exist; tables there are: 'readings'; set \[source\] table"):
        bad.read()
    assert len(source.read()) == len(long_frame)  # still there


@pytest.mark.postgres
def test_postgresql_missing_table_and_schema(pg_url, pg_schema, long_frame, tmp_path, request):
    source, _ = postgresql_aware(long_frame, tmp_path, request)
    with pytest.raises(SourceError, match=r"'nope'.*does not exist; tables there are: 'readings'"):
        SqlSource(pg_url, "nope").read()
    with pytest.raises(SourceError, match=r"schema 'no_such_schema' does not exist"):
        SqlSource(pg_url, "readings", db_schema="no_such_schema").series_ids()
    # The schema named in config reaches the same table through any search_path.
    from conftest import pg_base_url

    assert SqlSource(pg_base_url(), "readings", db_schema=pg_schema).series_ids() == sorted(SERIES)


@pytest.mark.postgres
def test_a_postgresql_read_another_session_locks_out_fails_after_lock_timeout(pg_url, long_frame, tmp_path, request):
    postgresql_aware(long_frame, tmp_path, request)
    source = SqlSource(pg_url, "readings", lock_timeout=0.5)
    request.addfinalizer(source.engine.dispose)
    assert source.series_ids() == sorted(SERIES)
    blocker = sa.create_engine(pg_url).connect()
    blocker.begin()
    # Should the read wait regardless, the server ends the blocker: the test fails, never hangs.
    blocker.exec_driver_sql("SET idle_in_transaction_session_timeout = '5s'")
    blocker.exec_driver_sql("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")  # what an ALTER TABLE takes
    with pytest.raises(SourceError, match=r"query on .* failed: .*lock timeout.* \(another session held a lock on "
                                          r"the table past \[source\] lock_timeout: end that session's transaction"):
        source.read()
    blocker.rollback()
    blocker.close()
    assert len(source.read()) == len(long_frame)


def test_lock_timeout_reaches_the_sql_source_and_sink_from_config(tmp_path):
    db = f"sqlite:///{tmp_path / 'x.db'}"

    def config(source: dict | None = None, sink: dict | None = None):
        return config_from_dict({"source": {"kind": "sql", "url": db, "table": "t", **(source or {})},
                                 "sink": {"kind": "sql", "url": db, **(sink or {})}}, tmp_path)

    defaults = config()
    assert defaults.source.lock_timeout == defaults.sink.lock_timeout == 5  # SQLite's driver's own
    chosen = config({"lock_timeout": 2.5}, {"lock_timeout": 0.75})
    source, sink = open_source(chosen), open_sink(chosen)
    # SQLite's busy timeout, as the driver was handed it
    for engine, seconds in ((source.engine, 2.5), (sink.engine, 0.75)):
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == seconds * 1000
        engine.dispose()
    for section in ("source", "sink"):
        with pytest.raises(ConfigError, match=rf"\[{section}\] lock_timeout = -1.0 must be 0 \(the database's "
                                              r"own\) or a number of seconds"):
            config(**{section: {"lock_timeout": -1}})


@pytest.mark.postgres
@pytest.mark.parametrize("kind", ["timestamptz", "timestamp", "date"])
def test_postgresql_infinite_times_are_bad_timestamps_not_a_failed_read(kind, request):
    """psycopg has no Python value for 'infinity' and failed the whole query on one such row."""
    url = request.getfixturevalue("pg_url")
    engine = sa.create_engine(url)
    request.addfinalizer(engine.dispose)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE readings (series_id text, ts {kind}, value float8)"))
        conn.execute(sa.text("INSERT INTO readings VALUES ('a', '2024-03-31', 1), ('a', 'infinity', 2), "
                             "('b', '-infinity', 3), ('b', '2024-04-01', 4)"))
    source = SqlSource(url, "readings", engine=engine)
    frame, report = validate(source.read(), grid=Grid("1D"))
    assert frame["value"].tolist() == [1.0, 4.0]
    assert report.counts == {("a", "rejected: bad timestamp"): 1, ("b", "rejected: bad timestamp"): 1}
    # A bounded read cannot place them in time: they stay out, as rows without a time do.
    noon = pd.Timestamp("2024-03-31 12:00", tz="UTC")
    assert source.read(since=noon)["value"].tolist() == [4.0]
    assert source.read(until=noon)["value"].tolist() == [1.0]


@pytest.mark.parametrize("key, value, message", [
    ("series_column", "sensor", r"column 'sensor' \(mapped by \[source\] series_column\) not found"),
    ("time_column", "when", r"column 'when' \(mapped by \[source\] time_column\)"),
    ("value_column", "reading", r"column 'reading' \(mapped by \[source\] value_column\)"),
])
@pytest.mark.parametrize("kind", ["parquet", "sqlite"])
def test_missing_column_names_key_and_columns(kind, key, value, message, long_frame, tmp_path, request):
    if kind == "parquet":
        long_frame.to_parquet(tmp_path / "x.parquet")
        source = ParquetSource(tmp_path / "x.parquet", **{key: value})
    else:
        url = sqlite_pandas(long_frame, tmp_path, request)[0].url
        source = SqlSource(url, "readings", **{key: value})
    with pytest.raises(SourceError, match=message + r".*its columns are: 'series_id', 'ts', 'value'"):
        source.read()


def test_wide_missing_value_column(long_frame, tmp_path):
    _wide(long_frame).to_parquet(tmp_path / "w.parquet")
    source = ParquetSource(tmp_path / "w.parquet", layout="wide", time_column="date", value_columns=["a", "zz"])
    with pytest.raises(SourceError, match=r"column 'zz' \(mapped by \[source\] value_columns\)"):
        source.read()


def test_wide_value_columns_pick_series(long_frame, tmp_path):
    _wide(long_frame).to_parquet(tmp_path / "w.parquet")
    source = ParquetSource(tmp_path / "w.parquet", layout="wide", time_column="date", value_columns=["b", "a"])
    assert source.series_ids() == ["b", "a"]
    got = canon(source.read(since=START + 20 * H, series=["a"]), "UTC")
    pd.testing.assert_frame_equal(got, expected(long_frame, since=START + 20 * H, series=["a"]))


def test_missing_parquet_path_and_glob(tmp_path):
    with pytest.raises(SourceError, match=r"does not exist; set \[source\] path"):
        ParquetSource(tmp_path / "missing.parquet").read()
    with pytest.raises(SourceError, match=r"matches no files; check \[source\] path"):
        ParquetSource(str(tmp_path / "nothing" / "*.parquet")).series_ids()


def test_parquet_filters_are_pushed_down(long_frame, tmp_path, monkeypatch):
    long_frame.to_parquet(tmp_path / "x.parquet")
    seen = []
    real = ParquetSource._scan

    def spy(self, dataset, columns, where):
        seen.append(str(where))
        return real(self, dataset, columns, where)

    monkeypatch.setattr(parquet_module.ParquetSource, "_scan", spy)
    ParquetSource(tmp_path / "x.parquet").read(since=START, series=["a"])
    assert "ts" in seen[-1] and "series_id" in seen[-1] and "is_in" in seen[-1]


def test_unreachable_database():
    source = SqlSource("postgresql+psycopg://postgres@127.0.0.1:1/test", "readings")
    with pytest.raises(SourceError, match=r"cannot connect to the database at .*127\.0\.0\.1:1.*check \[source\] url"):
        source.read()
    with pytest.raises(SourceError, match=r"SQLite database '/no/such/dir/x.db' does not exist; check \[source\] url"):
        SqlSource("sqlite:////no/such/dir/x.db", "readings").series_ids()
    assert not os.path.exists("/no/such/dir/x.db")
    with pytest.raises(SourceError, match="is not an SQLAlchemy URL"):
        SqlSource("not a url", "readings")


def test_text_scan_holds_every_shape_and_text_within_filters_exactly():
    since, until = pd.Timestamp("2024-10-27 02:00", tz="UTC"), pd.Timestamp("2024-10-27 05:00", tz="UTC")
    assert text_scan(since, until, ZONE, offsets=True) == ("2024-10-26 11", "2024-10-29")
    assert text_scan(since, None, ZONE, offsets=False) == ("2024-10-27 03", None)  # Berlin's wall clock
    values = pa.array([
        "2024-10-27T03:30:00+02:00",  # 01:30 UTC, sorts after the next: excluded
        "2024-10-27T03:00:00+01:00",  # 02:00 UTC, exactly since: excluded
        "2024-10-27T04:00:00+01:00",  # 03:00 UTC: included
        "2024-10-27 02:00:00.001Z",  # included
        "2024-10-27 03:00:01",  # naive, Berlin: 02:00:01 UTC: included
        "2024-10-27 03:00",  # naive, Berlin: 02:00 UTC: excluded
        "2024-10-27T06:00:00+01:00",  # 05:00 UTC, exactly until: included
        "2024-10-27T05:00:01Z",  # excluded
        "2024-10-28",  # naive midnight: excluded
        "garbage",  # no time: in no bounded range
        None,
    ])
    assert text_within(values, since, until, ZONE).tolist() == [False, False, True, True, True, False, True, False,
                                                                False, False, False]


def _dst_text() -> pd.DataFrame:
    """Hourly Berlin ISO text across the 2024 fall-back (01:00 UTC on 27 October): +02:00, then +01:00."""
    ts = pd.date_range("2024-10-26 22:00", "2024-10-27 05:00", freq="h", tz="UTC")
    return pd.DataFrame({"series_id": "s", "ts": [t.tz_convert(ZONE).isoformat() for t in ts],
                         "value": np.arange(len(ts), dtype=float)})


@pytest.mark.parametrize("backend", ["parquet", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_text_with_offsets_that_change_at_dst_is_filtered_by_instant(backend, tmp_path, request):
    """After fall-back, '2024-10-27T04:00:00+01:00' (03:00 UTC) sorts before a bound rendered at +02:00,
    '2024-10-27T04:00:00+02:00' (02:00 UTC): a text comparison dropped it, uncounted."""
    frame = _dst_text()
    if backend == "parquet":
        frame.to_parquet(tmp_path / "x.parquet")
        source = ParquetSource(tmp_path / "x.parquet")
    elif backend == "sqlite":
        url = _sqlite_rows(tmp_path / "t.db", list(frame.itertuples(index=False)))
        source = SqlSource(url, "readings", series_column="sensor", time_column="stamp", value_column="reading")
    else:
        source = _pg_write(request, frame, "readings", {"series_id": sa.Text(), "ts": sa.Text()})
    since = pd.Timestamp("2024-10-27 02:00", tz="UTC")
    assert source.read(since=since)["ts"].tolist() == [
        "2024-10-27T04:00:00+01:00", "2024-10-27T05:00:00+01:00", "2024-10-27T06:00:00+01:00"]
    got = source.read(since=pd.Timestamp("2024-10-26 23:00", tz="UTC"), until=since)["value"].tolist()
    # 00:00, 01:00 and 02:00 UTC, across the change; PostgreSQL orders text as text (+02:00 after +01:00)
    assert (sorted(got) if backend == "postgresql" else got) == [2.0, 3.0, 4.0]
    assert len(source.read()) == len(frame)


@pytest.mark.parametrize("backend", ["parquet", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_column_mixing_naive_and_offset_text_is_read_whole_and_named(backend, tmp_path, request, caplog):
    """One writer stores naive local text, another UTC text with 'Z'. Bounded reads judged the column by
    its first stored value's shape and silently lost the other writer's rows near the bounds (every other
    hourly tick in Europe/Berlin). Seen once, the mixture is logged and reads scan wide enough for both."""
    ts = pd.date_range("2024-03-01 00:00", periods=48, freq="h", tz="UTC")
    frame = pd.concat([
        pd.DataFrame({"series_id": "naive", "ts": ts.tz_convert(ZONE).strftime("%Y-%m-%d %H:%M:%S"),
                      "value": np.arange(48.0)}),
        pd.DataFrame({"series_id": "utc", "ts": ts.strftime("%Y-%m-%dT%H:%M:%SZ"), "value": np.arange(48.0)}),
    ], ignore_index=True)  # the naive rows first: the stored sample is naive
    if backend == "parquet":
        frame.to_parquet(tmp_path / "x.parquet")
        source = ParquetSource(tmp_path / "x.parquet", timezone=ZONE)
    elif backend == "sqlite":
        url = _sqlite_rows(tmp_path / "t.db", list(frame.itertuples(index=False)))
        source = SqlSource(url, "readings", series_column="sensor", time_column="stamp", value_column="reading",
                           timezone=ZONE)
    else:
        source = _pg_write(request, frame, "readings", {"series_id": sa.Text(), "ts": sa.Text()}, timezone=ZONE)
    with caplog.at_level("WARNING"):
        for h in (10, 11, 30):  # ticks of one hour each, the first read of the source among them
            got = source.read(since=ts[h - 1], until=ts[h])
            assert sorted(got["series_id"]) == ["naive", "utc"] and (got["value"] == h).all(), (h, got)
    assert caplog.text.count("mixes text with a UTC offset and text without") == 1


# -- open_source --------------------------------------------------------------------------------------


def test_open_source_resolves_relative_paths(long_frame, tmp_path):
    (tmp_path / "data").mkdir()
    long_frame.to_parquet(tmp_path / "data" / "x.parquet")
    config = config_from_dict(
        {"source": {"kind": "parquet", "path": "data/*.parquet"}, "sink": {"path": "out"}}, base_dir=tmp_path)
    source = open_source(config)
    assert isinstance(source, ParquetSource)
    assert source.series_ids() == sorted(SERIES)


def test_open_source_sql_wide_from_config(long_frame, tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'rel.db'}")
    _wide(long_frame, "Date Time").assign(**{"Date Time": lambda d: d["Date Time"].dt.tz_localize(None)}).to_sql(
        "ett", engine, index=False)
    engine.dispose()
    config = config_from_dict(
        {"source": {"kind": "sql", "url": "sqlite:///rel.db", "table": "ett", "layout": "wide",
                    "time_column": "Date Time", "value_columns": ["a", NASTY_ID]},
         "sink": {"path": "out"}},
        base_dir=tmp_path,
    )
    source = open_source(config)
    assert isinstance(source, SqlSource)
    assert source.series_ids() == ["a", NASTY_ID]
    got = canon(source.read(until=START + 3 * H), "UTC")
    pd.testing.assert_frame_equal(got, expected(long_frame, until=START + 3 * H, series=["a", NASTY_ID]))


def test_memory_source_requires_the_raw_columns():
    with pytest.raises(SourceError, match="lacks column"):
        MemorySource(pd.DataFrame({"series_id": ["a"], "value": [1.0]}))


def test_null_and_bad_timestamps_reach_validation_on_unbounded_reads(tmp_path):
    rows = [("s", "2024-03-31 00:00:00", 1.0), ("s", None, 2.0), ("s", "garbage", 3.0)]
    source = SqlSource(_sqlite_rows(tmp_path / "t.db", rows), "readings", series_column="sensor",
                       time_column="stamp", value_column="reading")
    raw = source.read()
    assert len(raw) == 3
    frame, report = validate(raw, grid=Grid("1h"))
    assert len(frame) == 1 and report.total("rejected: bad timestamp") == 2
    assert np.array_equal(source.read(since=START)["value"].to_numpy(), [1.0])


def test_epoch_numbers_fail_with_the_fix_on_unbounded_reads_too(tmp_path):
    """A bounded read refuses a numeric time column; the unbounded one of `train` and a first tick must
    not instead read the numbers as nanoseconds after 1970."""
    rows = [("s", 1711843200 + 3600 * k, float(k)) for k in range(3)]
    source = SqlSource(_sqlite_rows(tmp_path / "t.db", rows, ts_type="INTEGER"), "readings", series_column="sensor",
                       time_column="stamp", value_column="reading")
    with pytest.raises(SourceError, match="holds numbers"):
        source.read(since=START)
    with pytest.raises(DataError, match=r"holds numbers \(e.g. 1711843200\).*unixepoch"):
        validate(source.read(), grid=Grid("1h"))


@pytest.mark.parametrize("kind", ["parquet", "sqlite"])
def test_integer_series_ids_compare_as_text(kind, tmp_path):
    frame = pd.DataFrame({"sensor": [7, 7, 8], "ts": pd.date_range(START, periods=3, freq="h").tz_localize(None),
                          "value": [1.0, 2.0, 3.0]})
    if kind == "parquet":
        frame.to_parquet(tmp_path / "x.parquet")
        source = ParquetSource(tmp_path / "x.parquet", series_column="sensor")
    else:
        engine = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
        frame.to_sql("readings", engine, index=False)
        engine.dispose()
        source = SqlSource(f"sqlite:///{tmp_path / 'x.db'}", "readings", series_column="sensor")
    assert source.series_ids() == ["7", "8"]
    assert source.read(series=["7"])["value"].tolist() == [1.0, 2.0]


@pytest.mark.parametrize("kind", ["parquet", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_null_id_leaves_integer_ids_as_listed(kind, tmp_path, request):
    """One row without an id must not turn the other integer ids into floats ("7.0") for that read: the
    series would be new to the stream, with no state, until a read without the null."""
    frame = pd.DataFrame({"sensor": pd.array([7, None, 8], dtype="Int64"),
                          "ts": pd.date_range(START, periods=3, freq="h").tz_localize(None), "value": [1.0, 2.0, 3.0]})
    engine = None
    if kind == "parquet":
        frame.to_parquet(tmp_path / "x.parquet")
        source = ParquetSource(tmp_path / "x.parquet", series_column="sensor")
    else:
        url = f"sqlite:///{tmp_path / 'x.db'}" if kind == "sqlite" else request.getfixturevalue("pg_url")
        engine = sa.create_engine(url)
        request.addfinalizer(engine.dispose)
        frame.to_sql("readings", engine, index=False, dtype={"sensor": sa.BigInteger()})
        source = SqlSource(url, "readings", series_column="sensor", engine=engine)
    assert source.series_ids() == ["7", "8"]
    raw = source.read()
    assert raw["series_id"].tolist()[::2] == ["7", "8"] and pd.isna(raw["series_id"].iloc[1])
    got, report = validate(raw, grid=Grid("1h"))
    assert got["series_id"].tolist() == ["7", "8"] and report.total("rejected: null series_id") == 1
    assert source.read(since=START - H)["series_id"].tolist()[::2] == ["7", "8"]


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
@pytest.mark.parametrize("index", [None, "(sensor)", "(sensor, stamp)", "(stamp, sensor)", "(sensor) WHERE reading > 0",
                                   "USING hash (sensor)"])
@pytest.mark.parametrize("id_type", ["TEXT", "INTEGER"])
def test_series_listing_skips_through_an_index_that_starts_with_the_series(backend, index, id_type, tmp_path, request):
    """With an index led by the series column, ids are found one index seek each (a recursive CTE);
    without one, by DISTINCT. Both give every non-null id once, whatever the ids' type."""
    ids = [3, 10, 2, None, 10, 3, 7] if id_type == "INTEGER" else ["b", "a", None, "a", NASTY_ID, "b", "c"]
    rows = [(i, f"2024-03-31 0{k}:00:00", float(k)) for k, i in enumerate(ids)]
    create = f"CREATE TABLE readings (sensor {id_type}, stamp TEXT, reading REAL)"
    if backend == "sqlite":
        url, engine = _sqlite_rows(tmp_path / "t.db", []), None
        with sqlite3.connect(tmp_path / "t.db") as conn:
            conn.execute("DROP TABLE readings")
            conn.execute(create)
            if index and "hash" not in index:  # SQLite has b-trees only
                conn.execute(f"CREATE INDEX readings_ix ON readings {index}")
            conn.executemany("INSERT INTO readings VALUES (?, ?, ?)", rows)
    else:
        url = request.getfixturevalue("pg_url")
        engine = sa.create_engine(url)
        request.addfinalizer(engine.dispose)
        with engine.begin() as conn:
            conn.execute(sa.text(create.replace("REAL", "DOUBLE PRECISION")))
            if index:
                conn.execute(sa.text(f"CREATE INDEX readings_ix ON readings {index}"))
            conn.execute(sa.text("INSERT INTO readings VALUES (:a, :b, :c)"),
                         [{"a": a, "b": b, "c": c} for a, b, c in rows])
    source = SqlSource(url, "readings", series_column="sensor", time_column="stamp", value_column="reading",
                       engine=engine)
    statements: list[str] = []
    sa.event.listen(source.engine, "before_cursor_execute",
                    lambda conn, cursor, statement, params, context, many: statements.append(statement))
    assert source.series_ids() == sorted({str(i) for i in ids if i is not None})
    # A partial or hash index has no ordered seek over every row: each step of the skip scan scanned the table.
    skipped = index is not None and index.startswith("(sensor") and "WHERE" not in index
    assert ("RECURSIVE" in statements[-1]) == skipped and ("DISTINCT" in statements[-1]) != skipped
    if engine is None:
        source.engine.dispose()


def test_wide_default_skips_partition_keys(long_frame, tmp_path):
    wide = _wide(long_frame).assign(year=2024)
    pq.write_to_dataset(pa.Table.from_pandas(wide, preserve_index=False), tmp_path / "ds", partition_cols=["year"])
    source = ParquetSource(tmp_path / "ds", layout="wide", time_column="date")
    assert source.series_ids() == sorted(SERIES, key=list(_wide(long_frame).columns).index)
    pd.testing.assert_frame_equal(canon(source.read(), "UTC"), expected(long_frame))


@pytest.mark.parametrize("glob", [False, True])
def test_hive_partition_keys_keep_ids_as_spelled(glob, tmp_path):
    """pyarrow types partition keys by their values: 007, 0012 and 12 became 7, 12 and 12, two series
    renamed and two merged into one."""
    ids = ["007", "0012", "12"]
    frame = pd.DataFrame({"series_id": np.repeat(ids, 2), "year": "2024",
                          "ts": np.tile(pd.date_range(START, periods=2, freq="h"), 3), "value": np.arange(6.0)})
    pq.write_to_dataset(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "ds",
                        partition_cols=["year", "series_id"])
    source = ParquetSource(str(tmp_path / "ds" / "*" / "*" / "*.parquet") if glob else tmp_path / "ds")
    assert source.series_ids() == sorted(ids)
    assert source.read(series=["007"])["value"].tolist() == [0.0, 1.0]
    assert source.read(series=["7"]).empty
    got = source.read(since=START)
    assert got.groupby("series_id")["value"].apply(list).to_dict() == {"007": [1.0], "0012": [3.0], "12": [5.0]}


@pytest.mark.parametrize("url", ["postgresql+psycopg://u:hunter2@127.0.0.1:5432:99/test", "not a url at all"])
def test_unparseable_urls_are_source_and_sink_errors_without_the_password(url):
    from forecastd.sinks.sql import SqlSink
    from forecastd.sources.sql import SqlSource

    for make, error in ((lambda: SqlSource(url, table="t"), SourceError), (lambda: SqlSink(url), SinkError)):
        with pytest.raises(error, match="is not an SQLAlchemy URL") as caught:
            make()
        assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("kind", ["sqlite", "parquet"])
def test_a_bad_time_text_stored_first_does_not_stop_bounded_reads(kind, tmp_path):
    """The shape of a text time column was judged by its first stored value: a single day-first row
    stored first made every bounded read (ticks, backfills) of every series fail. The first ISO-8601
    value among the first few stands for the column now; the bad row is validate's to reject."""
    rows = [("bad", "31/12/2023 23:00", 1.0)] + [("s", f"2024-01-01 {h:02d}:00:00", float(h)) for h in range(6)]
    if kind == "sqlite":
        source = SqlSource(_sqlite_rows(tmp_path / "t.db", rows), "readings", series_column="sensor",
                           time_column="stamp", value_column="reading")
    else:
        pd.DataFrame(rows, columns=["sensor", "stamp", "reading"]).to_parquet(tmp_path / "t.parquet")
        source = ParquetSource(tmp_path / "t.parquet", series_column="sensor", time_column="stamp",
                               value_column="reading")
    got = source.read(since=pd.Timestamp("2024-01-01 02:00", tz="UTC"))
    assert sorted(got["value"]) == [3.0, 4.0, 5.0]
    everything = source.read()
    assert "bad" in set(everything["series_id"])  # a whole read brings it, for validate to count


@pytest.mark.parametrize("layout", ["long", "wide"])
def test_files_that_disagree_on_integer_or_float_values_are_read_alike(layout, tmp_path):
    """A directory's schema is its first file's: whole values stored as integers in the first file and
    floats in the next failed every read ("Float value 10.5 was truncated converting to int64")."""
    d = tmp_path / "data"
    d.mkdir()
    ts = pd.date_range("2024-01-01", periods=4, freq="h", tz="UTC")
    first = pd.DataFrame({"series_id": "a", "ts": ts[:2], "value": np.array([10, 11], dtype=np.int64)})
    later = pd.DataFrame({"series_id": "a", "ts": ts[2:], "value": [10.5, 11.5]})
    for name, part in (("0.parquet", first), ("1.parquet", later)):
        (part if layout == "long" else _wide(part, "ts")).to_parquet(d / name)
    source = (ParquetSource(d) if layout == "long" else
              ParquetSource(d, layout="wide", time_column="ts"))
    got = source.read().sort_values("ts")
    assert got["value"].tolist() == [10.0, 11.0, 10.5, 11.5]
    assert sorted(source.read(since=ts[1])["value"]) == [10.5, 11.5]


def test_a_corrupt_file_is_named_with_the_fix(tmp_path):
    """A half-written file stops the read: the message names the file and what the writer should do."""
    pd.DataFrame({"series_id": ["a"], "ts": pd.to_datetime(["2024-01-01"], utc=True), "value": [1.0]}).to_parquet(
        tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 half written")
    with pytest.raises(SourceError, match=r"b\.parquet.*write a temporary name .* and rename it"):
        ParquetSource(tmp_path).read()


def test_a_file_without_the_value_column_is_named_once(tmp_path, caplog):
    """A directory's schema is its first file's: a later file that calls its values "val" read as all
    missing, counted as NaNs with no word of why. Each such file is named once, with the fix; the files
    that have the column read as before."""
    d = tmp_path / "data"
    d.mkdir()
    ts = pd.date_range("2024-01-01", periods=3, freq="h", tz="UTC")
    pd.DataFrame({"series_id": "a", "ts": ts, "value": [1.0, np.nan, 3.0]}).to_parquet(d / "0.parquet")
    pd.DataFrame({"series_id": "b", "ts": ts, "val": [4.0, 5.0, 6.0]}).to_parquet(d / "1.parquet")
    source = ParquetSource(d)
    with caplog.at_level("WARNING"):
        got = source.read()
        source.read(since=ts[0])
    values = got.groupby("series_id")["value"].apply(lambda v: v.isna().sum()).to_dict()
    assert values == {"a": 1, "b": 3}
    named = [r.getMessage() for r in caplog.records if "has no column" in r.getMessage()]
    assert len(named) == 1
    assert "1.parquet has no column 'value'" in named[0] and "set [source] value_column" in named[0]
    assert "0.parquet" not in named[0]


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_sql_rows_come_in_time_order_and_order_column_says_which_duplicate_is_last(backend, tmp_path, request):
    """A table has no order: a parallel scan interleaves rows, and a correction written into space a VACUUM
    freed comes back before the row it corrects. Reads were taken in the table's order, so validate counted
    rows as "reordered" and duplicates = "last" could keep the stale value."""
    t0, t1 = "2024-01-01T00:00:00+00:00", "2024-01-01T01:00:00+00:00"
    # Stored in this order: the later time first, then the correction (id 2) before the original (id 1).
    frame = pd.DataFrame({"id": [3, 2, 1], "series_id": ["a", "a", "a"], "ts": [t1, t0, t0], "value": [5.0, 20.0, 10.0]})
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 't.db'}"
        with sqlite3.connect(tmp_path / "t.db") as conn:
            conn.execute("CREATE TABLE readings (id INTEGER, series_id TEXT, ts TEXT, value REAL)")
            conn.executemany("INSERT INTO readings VALUES (?, ?, ?, ?)", frame.itertuples(index=False))
        make = lambda **kw: SqlSource(url, "readings", **kw)  # noqa: E731
    else:
        frame["ts"] = pd.to_datetime(frame["ts"])
        first = _pg_write(request, frame, "readings", {"id": sa.Integer(), "series_id": sa.Text(),
                                                       "ts": sa.DateTime(timezone=True)})
        make = lambda **kw: SqlSource(first.url, "readings", engine=first.engine, **kw)  # noqa: E731
    grid = Grid("1h")
    for kwargs in ({}, {"order_column": "id"}):
        got, report = validate(make(**kwargs).read(), grid=grid)
        assert report.by_reason() == {"duplicate timestamp resolved by 'last'": 1}, kwargs
    assert got["value"].tolist() == [20.0, 5.0]  # id 2, the later write, is "last"
    with pytest.raises(SourceError, match=r"'seq' \(mapped by \[source\] order_column\) not found.*'id'"):
        make(order_column="seq").read()
