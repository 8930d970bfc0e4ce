"""Contract suite for sinks: every storage upserts, reads back the contract dtypes, and filters alike.

Then the storage-specific guarantees: the Parquet layout, pruning and atomic rewrite of partitions;
the SQL table checks, dialects, batching and one transaction per write.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sqlite3
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from conftest import NASTY_ID, SERIES, START
from forecastd.config import config_from_dict
from forecastd.errors import SinkError
from forecastd.files import TMP_SUFFIX
from forecastd.frames import ANOMALY_COLUMNS, ANOMALY_KEY, FORECAST_COLUMNS, FORECAST_KEY
from forecastd.sinks import MemorySink, ParquetSink, Sink, SqlSink, open_sink
from forecastd.sinks import parquet as parquet_module
from forecastd.sinks import sql as sql_module
from forecastd.sinks.parquet import LOCK_DIR, PART_FILE
from forecastd.sinks.schema import SPECS, empty

H = pd.Timedelta(hours=1)
CONTRACT = {"forecasts": (FORECAST_COLUMNS, FORECAST_KEY, "issued_at"), "anomalies": (ANOMALY_COLUMNS, ANOMALY_KEY, "ts")}
KINDS = ["memory", "parquet_day", "parquet_hour", "parquet_month", "sqlite", "postgresql"]


def build(kind: str, tmp_path: Path, request) -> Sink:
    if kind == "memory":
        return MemorySink()
    if kind.startswith("parquet"):
        return ParquetSink(tmp_path / "out", partition=kind.split("_")[1])
    if kind == "sqlite":
        return SqlSink(f"sqlite:///{tmp_path / 'out.db'}")
    return SqlSink(request.getfixturevalue("pg_url"))


@pytest.fixture(params=[
    pytest.param(kind, id=kind, marks=[pytest.mark.postgres] if kind == "postgresql" else []) for kind in KINDS
])
def sink(request, tmp_path) -> Sink:
    s = build(request.param, tmp_path, request)
    yield s
    if isinstance(s, SqlSink):
        s.engine.dispose()


def canonical(frame: pd.DataFrame, table: str) -> pd.DataFrame:
    columns, key, _ = CONTRACT[table]
    return frame.astype(columns).sort_values(list(key), ignore_index=True)


def assert_contract(frame: pd.DataFrame, table: str) -> None:
    columns, key, _ = CONTRACT[table]
    assert {c: str(t) for c, t in frame.dtypes.items()} == dict(columns)
    assert frame.index.equals(pd.RangeIndex(len(frame)))
    assert frame.equals(frame.sort_values(list(key), ignore_index=True))


# -- the contract ---------------------------------------------------------------------------------------


def test_round_trip_with_contract_dtypes(sink, make_forecasts, make_anomalies):
    assert isinstance(sink, Sink)
    fc, an = make_forecasts(), make_anomalies()
    sink.write(fc.sample(frac=1.0, random_state=0), an.sample(frac=1.0, random_state=0))  # order is not the key's
    for table, frame in (("forecasts", fc), ("anomalies", an)):
        got = sink.read(table)
        assert_contract(got, table)
        pd.testing.assert_frame_equal(got, canonical(frame, table))


def test_write_twice_equals_once(sink, make_forecasts, make_anomalies):
    fc, an = make_forecasts(), make_anomalies()
    sink.write(fc, an)
    once = {t: sink.read(t) for t in CONTRACT}
    sink.write(fc, an)
    for t in CONTRACT:
        pd.testing.assert_frame_equal(sink.read(t), once[t])


def test_existing_keys_are_replaced(sink, make_forecasts, make_anomalies):
    issued = pd.date_range(START, periods=4, freq="h")
    sink.write(make_forecasts(issued=issued), make_anomalies())
    # Overlaps one issue time (new values, new model) and adds three more across the day boundary,
    # so several partitions are merged or created.
    later = pd.date_range(START + 2 * H, periods=4, freq="3h")
    new_fc = make_forecasts(issued=later, offset=1000.0, version=2)
    new_an = make_anomalies(series=["a"], offset=500.0, version=2)
    sink.write(new_fc, new_an)

    old_fc = make_forecasts(issued=issued)
    kept = old_fc[~old_fc["issued_at"].isin(later)]
    pd.testing.assert_frame_equal(sink.read("forecasts"), canonical(pd.concat([kept, new_fc]), "forecasts"))
    old_an = make_anomalies()
    want_an = pd.concat([old_an[old_an["series_id"] != "a"], new_an])
    pd.testing.assert_frame_equal(sink.read("anomalies"), canonical(want_an, "anomalies"))


def test_read_filters(sink, make_forecasts, make_anomalies):
    fc, an = make_forecasts(), make_anomalies()
    sink.write(fc, an)
    since, until = START + H, START + 3 * H
    for table, frame in (("forecasts", fc), ("anomalies", an)):
        time = CONTRACT[table][2]
        got = sink.read(table, series=["a", NASTY_ID], since=since, until=until)
        want = frame[frame["series_id"].isin(["a", NASTY_ID]) & (frame[time] > since) & (frame[time] <= until)]
        assert 0 < len(want) < len(frame)
        pd.testing.assert_frame_equal(got, canonical(want, table))
        assert sink.read(table, series=["nobody"]).empty
        assert sink.read(table, since=START + 1000 * H).empty
        # The bound is an instant, whatever zone it is written in.
        tokyo = since.tz_convert("Asia/Tokyo")
        pd.testing.assert_frame_equal(sink.read(table, since=tokyo), sink.read(table, since=since))


def test_empty_writes_and_reads(sink, make_forecasts, make_anomalies):
    sink.write(make_forecasts().iloc[:0], make_anomalies().iloc[:0])
    for table in CONTRACT:
        got = sink.read(table)
        assert got.empty
        assert_contract(got, table)
    sink.write(make_forecasts(), make_anomalies().iloc[:0])  # either frame may be empty
    assert len(sink.read("forecasts")) == len(make_forecasts())
    assert sink.read("anomalies").empty


def test_duplicate_keys_in_one_write_keep_the_last(sink, make_forecasts, make_anomalies):
    fc = make_forecasts()
    twice = pd.concat([fc, fc.assign(mean=fc["mean"] + 7.0)], ignore_index=True)
    sink.write(twice, make_anomalies())
    pd.testing.assert_frame_equal(sink.read("forecasts"), canonical(fc.assign(mean=fc["mean"] + 7.0), "forecasts"))


def test_non_utc_input_comes_back_utc(sink, make_forecasts, make_anomalies):
    fc, an = make_forecasts(), make_anomalies()
    shifted = fc.assign(issued_at=fc["issued_at"].dt.tz_convert("America/New_York"),
                        target_ts=fc["target_ts"].dt.tz_convert("Asia/Kolkata"))
    sink.write(shifted, an)
    pd.testing.assert_frame_equal(sink.read("forecasts"), canonical(fc, "forecasts"))


def test_bad_frames_and_tables_are_refused(sink, make_forecasts, make_anomalies):
    with pytest.raises(SinkError, match=r"missing \['model_version'\]"):
        sink.write(make_forecasts().drop(columns="model_version"), make_anomalies())
    with pytest.raises(SinkError, match=r"unexpected \['extra'\]"):
        sink.write(make_forecasts(), make_anomalies().assign(extra=1))
    with pytest.raises(SinkError, match="unknown output table 'states'"):
        sink.read("states")


def test_open_sink_from_config(tmp_path, make_forecasts, make_anomalies):
    source = {"path": "in.parquet"}
    parquet = open_sink(config_from_dict({"source": source, "sink": {"path": "out", "partition": "month"}},
                                         base_dir=tmp_path))
    assert isinstance(parquet, ParquetSink) and parquet.path == tmp_path / "out" and parquet.partition == "month"
    sql = open_sink(config_from_dict(
        {"source": source, "sink": {"kind": "sql", "url": "sqlite:///rel.db", "forecasts_table": "fc", "anomalies_table": "an"}},
        base_dir=tmp_path,
    ))
    assert isinstance(sql, SqlSink)
    sql.write(make_forecasts(), make_anomalies())
    with sqlite3.connect(tmp_path / "rel.db") as conn:
        assert conn.execute("SELECT count(*) FROM fc").fetchone()[0] == len(make_forecasts())
    sql.engine.dispose()


# -- Parquet ----------------------------------------------------------------------------------------


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("grain, forecast_files", [
    ("day", ["date=2024-03-30/part-0.parquet", "date=2024-03-31/part-0.parquet"]),
    ("hour", ["date=2024-03-30/hour=22/part-0.parquet", "date=2024-03-31/hour=01/part-0.parquet"]),
    ("month", ["month=2024-03/part-0.parquet"]),
])
def test_parquet_layout_is_hive_and_readable_by_others(tmp_path, grain, forecast_files, make_forecasts, make_anomalies):
    sink = ParquetSink(tmp_path, partition=grain)
    fc = make_forecasts(issued=[START + 4 * H, START + 7 * H])
    sink.write(fc, make_anomalies(ts=[START]))
    assert _files(tmp_path / "forecasts") == forecast_files
    # Anyone's reader sees the datasets: pandas, and pyarrow with hive partitions.
    by_pandas = pd.read_parquet(tmp_path / "forecasts")
    assert len(by_pandas) == len(fc) and set(FORECAST_COLUMNS) <= set(by_pandas.columns)
    by_arrow = ds.dataset(tmp_path / "anomalies", format="parquet", partitioning="hive").to_table()
    assert by_arrow.num_rows == len(SERIES)
    # Files hold exactly the contract columns; the partition key is only in the path.
    assert pq.read_schema(tmp_path / "forecasts" / forecast_files[0]).names == list(FORECAST_COLUMNS)


def test_parquet_appends_new_points_and_merges_only_the_files_a_replay_touches(tmp_path, make_forecasts,
                                                                              make_anomalies):
    sink = ParquetSink(tmp_path)
    sink.write(make_forecasts(issued=[START, START + 10 * H]), make_anomalies())
    day1 = tmp_path / "forecasts" / "date=2024-03-30"
    day2 = tmp_path / "forecasts" / "date=2024-03-31"
    before1, before2 = os.stat(day1 / PART_FILE), os.stat(day2 / PART_FILE)
    tick = make_forecasts(issued=[START + 11 * H])
    sink.write(tick, make_anomalies().iloc[:0])
    # A tick's new points are a new file: neither day's existing file is read or rewritten.
    for path, before in ((day1 / PART_FILE, before1), (day2 / PART_FILE, before2)):
        after = os.stat(path)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert _files(day2) == ["part-0.parquet", "part-1.parquet"]
    # A replay of the tick with other values: merged with the one file it shares keys with.
    sink.write(tick.assign(mean=-5.0), make_anomalies().iloc[:0])
    assert _files(day2) == ["part-0.parquet", "part-2.parquet"]
    assert os.stat(day2 / PART_FILE).st_ino == before2.st_ino
    assert not list(tmp_path.rglob(f"*{TMP_SUFFIX}"))
    got = sink.read("forecasts")
    assert len(got) == 3 * len(SERIES) * 3 and not got.duplicated(["series_id", "issued_at", "step"]).any()
    assert (got.loc[got["issued_at"] == START + 11 * H, "mean"] == -5.0).all()
    assert (got.loc[got["issued_at"] != START + 11 * H, "mean"] >= 0).all()


def test_parquet_ticks_keep_few_files_and_rewrite_each_row_a_few_times(tmp_path, make_anomalies, monkeypatch):
    # Half a day of 5-minute ticks into one partition. Rewriting the partition at every tick wrote 144 x 72
    # ticks' rows; tiered merges write each row a handful of times and keep a few files.
    written = []
    real = parquet_module.pq.write_table
    monkeypatch.setattr(parquet_module.pq, "write_table", lambda table, where, **kw: (
        written.append(table.num_rows), real(table, where, **kw))[1])
    sink = ParquetSink(tmp_path)
    ticks, series = 144, [f"s{i}" for i in range(20)]
    for i in range(ticks):
        ts = START.floor("D") + pd.Timedelta(minutes=5 * i)
        sink.write(empty(SPECS["forecasts"]), make_anomalies().iloc[:0].pipe(lambda _: pd.DataFrame({
            "series_id": np.array(series, dtype=object), "ts": pd.DatetimeIndex([ts] * len(series)).as_unit("ns"),
            "value": np.full(len(series), float(i)), "expected": 0.0, "lower": -1.0, "upper": 1.0, "score": 0.0,
            "is_anomaly": False, "model_version": np.int64(1)})))
    files = _files(tmp_path / "anomalies")
    assert len(files) <= 12, files
    assert sum(written) <= 6 * ticks * len(series), sum(written) / (ticks * len(series))
    got = sink.read("anomalies")
    assert len(got) == ticks * len(series) and (got.groupby("series_id")["value"].sum() == sum(range(ticks))).all()


def test_parquet_files_past_the_merge_size_are_left_alone(tmp_path, monkeypatch):
    # A busy day's top tiers made one tick merge four files of 3.6M rows (30 s); merges stop at a size.
    monkeypatch.setattr(parquet_module, "_MERGE_ROWS", 64)
    written = []
    real = parquet_module.pq.write_table
    monkeypatch.setattr(parquet_module.pq, "write_table", lambda table, where, **kw: (
        written.append(table.num_rows), real(table, where, **kw))[1])
    sink = ParquetSink(tmp_path)
    for i in range(100):
        ts = pd.DatetimeIndex([START.floor("D") + pd.Timedelta(minutes=5 * i)] * 5).as_unit("ns")
        sink.write(empty(SPECS["forecasts"]), pd.DataFrame({
            "series_id": np.array([f"s{k}" for k in range(5)], dtype=object), "ts": ts, "value": 1.0,
            "expected": 0.0, "lower": -1.0, "upper": 1.0, "score": 0.0, "is_anomaly": False,
            "model_version": np.int64(1)}))
    assert max(written) < 4 * 64  # no merge took in a file of 64 rows or more
    assert len(sink.read("anomalies")) == 500


def test_parquet_footer_cache_holds_only_live_files_of_recent_partitions(tmp_path, make_anomalies):
    # A daemon keeps one sink for months: cached footers of merged-away files and old days would pile up.
    sink = ParquetSink(tmp_path)
    for day in range(12):
        for i in range(10):
            ts = pd.DatetimeIndex([START.floor("D") + pd.Timedelta(days=day, minutes=5 * i)] * 2).as_unit("ns")
            sink.write(empty(SPECS["forecasts"]), pd.DataFrame({
                "series_id": np.array(["a", "b"], dtype=object), "ts": ts, "value": 1.0, "expected": 0.0,
                "lower": -1.0, "upper": 1.0, "score": 0.0, "is_anomaly": False, "model_version": np.int64(1)}))
    assert len(sink._footers) == parquet_module._CACHED_PARTITIONS
    for directory, files in sink._footers.items():
        assert set(files) <= set(directory.glob("*.parquet"))
    assert len(sink.read("anomalies")) == 12 * 10 * 2


def test_parquet_rows_left_twice_by_a_merge_cut_short_read_once_newest_first(tmp_path, make_forecasts,
                                                                             make_anomalies):
    sink = ParquetSink(tmp_path)
    sink.write(make_forecasts(issued=[START]), make_anomalies().iloc[:0])
    day = tmp_path / "forecasts" / "date=2024-03-30"
    # As if a merge wrote part-1 (the same keys, new values) and the process died before deleting part-0.
    old = pq.read_table(day / PART_FILE)
    newer = old.set_column(old.schema.get_field_index("mean"), "mean", pa.array(np.full(old.num_rows, 7.0)))
    pq.write_table(newer.replace_schema_metadata(old.schema.metadata), day / "part-1.parquet")
    got = sink.read("forecasts")
    assert len(got) == old.num_rows and (got["mean"] == 7.0).all()
    # The next write that meets those keys merges both files, the newer winning.
    sink.write(make_forecasts(issued=[START], series=["a"], offset=100.0), make_anomalies().iloc[:0])
    assert _files(day) == ["part-2.parquet"]
    got = sink.read("forecasts")
    assert len(got) == old.num_rows
    assert (got.loc[got["series_id"] == "a", "mean"] >= 100).all() and (got.loc[got["series_id"] != "a", "mean"] == 7.0).all()


def test_parquet_merge_cut_short_is_finished_by_the_next_writer(tmp_path, make_forecasts, make_anomalies,
                                                               monkeypatch):
    """A crash after a merge's rename left its inputs beside it until a write met their keys again, so
    any other reader of the directory (pyarrow, DuckDB, Spark) read those rows twice."""
    sink = ParquetSink(tmp_path)
    sink.write(make_forecasts(issued=[START]), make_anomalies().iloc[:0])
    day = tmp_path / "forecasts" / "date=2024-03-30"

    def die(self, missing_ok=False):
        raise KeyboardInterrupt("killed")  # the process dies between the rename and the deletion

    monkeypatch.setattr(parquet_module.Path, "unlink", die)
    with pytest.raises(KeyboardInterrupt):
        sink.write(make_forecasts(issued=[START], offset=5.0), make_anomalies().iloc[:0])  # a replay: merges
    monkeypatch.undo()
    assert _files(day) == ["part-0.parquet", "part-1.parquet"]
    assert (tmp_path / ".locks" / "forecasts" / "date=2024-03-30.merge").exists()
    n = len(SERIES) * 3  # one issue time, three steps
    assert pq.read_table(day).num_rows == 2 * n
    (day / f".part-7.parquet.123{TMP_SUFFIX}").write_bytes(b"PAR1 half a file")  # a write cut short
    # A new process writes elsewhere (another day): it finishes the merge first, and sweeps.
    ParquetSink(tmp_path).write(make_forecasts(issued=[START + 10 * H]), make_anomalies().iloc[:0])
    assert _files(day) == ["part-1.parquet"] and not list((tmp_path / ".locks").rglob("*.merge"))
    assert not list(tmp_path.rglob(f"*{TMP_SUFFIX}"))
    got = pq.read_table(day).to_pandas()
    assert len(got) == n and (got["mean"] >= 5.0).all()


def test_parquet_failed_write_keeps_the_old_partition(tmp_path, make_forecasts, make_anomalies, monkeypatch):
    sink = ParquetSink(tmp_path)
    sink.write(make_forecasts(), make_anomalies())
    before = sink.read("forecasts")

    def crash(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(parquet_module.pq, "write_table", crash)
    with pytest.raises(SinkError, match="disk full"):
        sink.write(make_forecasts(offset=99.0), make_anomalies())
    monkeypatch.undo()
    pd.testing.assert_frame_equal(sink.read("forecasts"), before)
    assert not list(tmp_path.rglob(f"*{TMP_SUFFIX}"))


def test_parquet_reads_prune_partitions(tmp_path, make_forecasts, make_anomalies):
    sink = ParquetSink(tmp_path)
    sink.write(make_forecasts(issued=[START, START + 10 * H]), make_anomalies())
    # Damage the first day's file: a read that prunes that partition never opens it.
    (tmp_path / "forecasts" / "date=2024-03-30" / PART_FILE).write_bytes(b"not parquet")
    assert len(sink.read("forecasts", since=pd.Timestamp("2024-03-31", tz="UTC"))) == len(SERIES) * 3
    with pytest.raises(SinkError, match="cannot read the forecasts dataset"):
        sink.read("forecasts")


def test_parquet_merges_and_removes_foreign_part_files(tmp_path, make_forecasts, make_anomalies):
    sink = ParquetSink(tmp_path)
    fc = make_forecasts(issued=[START])
    part = tmp_path / "forecasts" / "date=2024-03-30"
    part.mkdir(parents=True)
    foreign = fc[fc["series_id"] == "a"].assign(mean=-1.0)
    pq.write_table(pa.Table.from_pandas(foreign, preserve_index=False), part / "part-from-elsewhere.parquet")
    other = make_forecasts(issued=[START + H], series=["b"])
    sink.write(other, make_anomalies().iloc[:0])
    assert _files(part) == [PART_FILE]
    pd.testing.assert_frame_equal(sink.read("forecasts"), canonical(pd.concat([foreign, other]), "forecasts"))


def test_parquet_refuses_another_partition_grain(tmp_path, make_forecasts, make_anomalies):
    ParquetSink(tmp_path, partition="day").write(make_forecasts(), make_anomalies())
    with pytest.raises(SinkError, match=r"partitioned by 'day' but \[sink\] partition = 'hour'"):
        ParquetSink(tmp_path, partition="hour").write(make_forecasts(), make_anomalies())


def _upsert_rounds(path: str, writer: str, rounds: int, rows: int, barrier) -> None:
    """One writer process: `rounds` upserts of `rows` new anomaly rows each, all into one day's partition."""
    sink = ParquetSink(path)
    no_forecasts = empty(SPECS["forecasts"])
    barrier.wait(timeout=60)  # both have imported everything, so their writes overlap from the first
    for r in range(rounds):
        ts = pd.date_range(START + pd.Timedelta(seconds=r * rows), periods=rows, freq="s").as_unit("ns")
        value = np.arange(rows, dtype="float64")
        sink.write(no_forecasts, pd.DataFrame({
            "series_id": np.full(rows, writer, dtype=object), "ts": ts, "value": value, "expected": value,
            "lower": value - 1.0, "upper": value + 1.0, "score": np.zeros(rows), "is_anomaly": np.zeros(rows, bool),
            "model_version": np.ones(rows, dtype="int64"),
        }))


def test_parquet_writers_in_two_processes_lose_no_rows(tmp_path):
    # The daemon ticking while a cron backfill covers today: two processes read-merge-rename the same
    # partition. Without the partition lock one renames a merge that lacks the other's latest rows (seen:
    # 175 and 205 of 400 rows lost), or its merge reads a file torn by the other's rename (a child's OSError).
    rounds, rows = 80, 5
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(2)
    writers = {name: spawn.Process(target=_upsert_rounds, args=(str(tmp_path), name, rounds, rows, barrier))
               for name in ("daemon", "backfill")}
    for proc in writers.values():
        proc.start()
    for proc in writers.values():
        proc.join(120)
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert {name: proc.exitcode for name, proc in writers.items()} == {"daemon": 0, "backfill": 0}
    got = ParquetSink(tmp_path).read("anomalies")
    want = pd.date_range(START, periods=rounds * rows, freq="s").as_unit("ns")
    for name in writers:
        mine = pd.DatetimeIndex(got.loc[got["series_id"] == name, "ts"]).sort_values()
        assert len(mine) == len(want), f"{len(want) - len(mine)} of {name}'s rows were lost"
        assert (mine == want).all()
    # The lock files stay out of the dataset, so its readers and the layout check never meet them.
    files = _files(tmp_path / "anomalies")
    assert files and all(re.fullmatch(r"date=2024-03-30/part-\d+\.parquet", f) for f in files), files
    assert _files(tmp_path / LOCK_DIR) == ["anomalies/date=2024-03-30.lock"]


# -- SQL --------------------------------------------------------------------------------------------


def sql_sink(backend: str, tmp_path: Path, request, **kwargs) -> SqlSink:
    url = f"sqlite:///{tmp_path / 'out.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    return SqlSink(url, **kwargs)


def _backends():
    return [pytest.param("sqlite"), pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.mark.parametrize("backend", _backends())
def test_sql_existing_table_with_missing_column(backend, tmp_path, request, make_forecasts, make_anomalies):
    sink = sql_sink(backend, tmp_path, request)
    with sink.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE forecasts (series_id TEXT, issued_at TIMESTAMP, step BIGINT, "
                             "PRIMARY KEY (series_id, issued_at, step))"))
    # Missing columns are reported before mistyped ones: adding them is the first fix.
    with pytest.raises(SinkError, match=r"table 'forecasts' exists but has no column 'target_ts'; add it .*"
                                        r"or set \[sink\] forecasts_table to a new table name"):
        sink.write(make_forecasts(), make_anomalies())
    sink.engine.dispose()


@pytest.mark.parametrize("backend", _backends())
def test_sql_existing_table_without_unique_key(backend, tmp_path, request, make_forecasts, make_anomalies):
    sink = sql_sink(backend, tmp_path, request, anomalies_table="an")
    ts_type = "DATETIME" if backend == "sqlite" else "TIMESTAMPTZ"
    cols = ", ".join(f"{c} {t}" for c, t in [
        ("series_id", "TEXT"), ("ts", ts_type), ("value", "DOUBLE PRECISION"),
        ("expected", "DOUBLE PRECISION"), ("lower", "DOUBLE PRECISION"), ("upper", "DOUBLE PRECISION"),
        ("score", "DOUBLE PRECISION"), ("is_anomaly", "BOOLEAN"), ("model_version", "BIGINT")])
    with sink.engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE an ({cols})"))
    with pytest.raises(SinkError, match=r"table 'an' has no primary key or unique constraint on series_id, ts"):
        sink.write(make_forecasts().iloc[:0], make_anomalies())
    sink.engine.dispose()


@pytest.mark.postgres
def test_postgresql_timestamp_without_zone_is_refused(pg_url, make_forecasts, make_anomalies):
    sink = SqlSink(pg_url)
    with sink.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE forecasts (series_id TEXT, issued_at TIMESTAMP, step BIGINT, "
                             "target_ts TIMESTAMPTZ, mean FLOAT8, lower FLOAT8, upper FLOAT8, model_version BIGINT, "
                             "PRIMARY KEY (series_id, issued_at, step))"))
    with pytest.raises(SinkError, match=r"column 'issued_at' of table 'forecasts' has type TIMESTAMP.*TIMESTAMP WITH TIME ZONE"):
        sink.write(make_forecasts(), make_anomalies())
    sink.engine.dispose()


def _decode_copy(stream: bytes, spec) -> pd.DataFrame:
    """PostgreSQL's binary COPY format read back by hand, the spec's columns in order."""
    import struct

    assert stream[:19] == b"PGCOPY\n\xff\r\n\x00" + bytes(8) and stream[-2:] == b"\xff\xff"
    at, rows = 19, []
    while at < len(stream) - 2:
        (count,), at = struct.unpack_from(">h", stream, at), at + 2
        assert count == len(spec.columns)
        row = []
        for dtype in spec.columns.values():
            (size,), at = struct.unpack_from(">i", stream, at), at + 4
            raw, at = (None if size < 0 else stream[at : at + size]), at + max(size, 0)
            if raw is None:
                row.append(pd.NaT if dtype.startswith("datetime64") else float("nan"))
            elif dtype == "object":
                row.append(raw.decode())
            elif dtype.startswith("datetime64"):
                row.append(pd.Timestamp("2000-01-01", tz="UTC") + pd.Timedelta(microseconds=struct.unpack(">q", raw)[0]))
            else:
                row.append(struct.unpack({"float64": ">d", "int64": ">q", "bool": ">?"}[dtype], raw)[0])
        rows.append(row)
    return pd.DataFrame(rows, columns=list(spec.columns))


def test_postgresql_binary_copy_stream_holds_every_row_and_value(make_anomalies):
    """Ids of several lengths (and bytes), NaN, times before 2000 and finer than a microsecond, in chunks:
    every row comes back once, each value as written (NaN as NULL, times floored to microseconds)."""
    from forecastd.sinks import pgbinary
    from forecastd.sinks.schema import SPECS, conform

    ids = ["a", "bb", NASTY_ID, "zürich-7", "ccc"]
    an = conform(make_anomalies(series=ids, ts=pd.date_range("1999-12-31 22:00:00.0000015", periods=5, freq="h",
                                                                 tz="UTC")), SPECS["anomalies"])
    an.loc[::3, "expected"] = float("nan")
    an.loc[1::4, "is_anomaly"] = True
    spec = SPECS["anomalies"]
    stream = b"".join(pgbinary.copy_chunks(spec, an, batch=7))
    got = _decode_copy(stream, spec).sort_values(["series_id", "ts"], ignore_index=True)
    want = an.assign(ts=an["ts"].dt.floor("us")).sort_values(["series_id", "ts"], ignore_index=True)
    pd.testing.assert_frame_equal(got, want[list(spec.columns)], check_dtype=False)
    assert b"".join(pgbinary.copy_chunks(spec, an.iloc[:0], batch=7)) == pgbinary.HEADER + pgbinary.TRAILER


@pytest.mark.postgres
def test_postgresql_table_of_other_compatible_types_is_written_through_a_cast(pg_url, make_forecasts, make_anomalies,
                                                                              monkeypatch):
    """An existing table with varchar, integer and numeric columns gets no binary COPY of forecastd's own
    types (the server would misread them): its rows are staged and cast, and read back as written."""
    sink = SqlSink(pg_url)
    with sink.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE forecasts (series_id VARCHAR(64), issued_at TIMESTAMPTZ, step INTEGER, "
                             "target_ts TIMESTAMPTZ, mean FLOAT8, lower FLOAT8, upper FLOAT8, model_version INTEGER, "
                             "PRIMARY KEY (issued_at, series_id, step))"))
    targets: list[str] = []
    copy = SqlSink._copy
    monkeypatch.setattr(SqlSink, "_copy", lambda self, conn, spec, frame, target: (
        targets.append(repr(target)), copy(self, conn, spec, frame, target))[1])
    fc = make_forecasts(issued=pd.date_range(START, periods=3, freq="h"))
    sink.write(fc, make_anomalies())
    assert len(targets) == 2 and "forecastd_stage_" in targets[0]  # forecasts staged; the new anomalies table not
    assert "forecastd_stage_" not in targets[1]
    pd.testing.assert_frame_equal(sink.read("forecasts"), canonical(fc, "forecasts"))
    sink.engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("flag_type", ["INTEGER", "SMALLINT"])
def test_postgresql_integer_flag_column_takes_the_flags(pg_url, make_forecasts, make_anomalies, flag_type):
    """The table check accepts an integer is_anomaly column (SQLite stores flags so), but PostgreSQL
    assigns no boolean to it without a cast: every write failed, new rows and upserts alike."""
    sink = SqlSink(pg_url)
    with sink.engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE anomalies (series_id TEXT, ts TIMESTAMPTZ, value FLOAT8, expected FLOAT8, "
                             f"lower FLOAT8, upper FLOAT8, score FLOAT8, is_anomaly {flag_type}, model_version BIGINT, "
                             "PRIMARY KEY (ts, series_id))"))
    an = make_anomalies()
    an["is_anomaly"] = np.arange(len(an)) % 2 == 0
    sink.write(make_forecasts(), an)
    sink.write(make_forecasts(), an)  # again: the upsert path
    with sink.engine.connect() as conn:
        flags = conn.execute(sa.text("SELECT is_anomaly FROM anomalies ORDER BY ts, series_id")).scalars().all()
    assert sorted(flags) == sorted(an["is_anomaly"].astype(int).tolist()) and len(flags) == len(an)
    sink.engine.dispose()


@pytest.mark.postgres
def test_postgresql_schema_and_quoted_names(pg_server, pg_schema, make_forecasts, make_anomalies):
    sink = SqlSink(pg_server, db_schema=pg_schema, forecasts_table='fc"; DROP TABLE x;--', anomalies_table="Anomalies")
    sink.write(make_forecasts(), make_anomalies())
    sink.write(make_forecasts(), make_anomalies())
    assert len(sink.read("forecasts", series=[NASTY_ID])) == len(make_forecasts(series=[NASTY_ID]))
    names = sa.inspect(sink.engine).get_table_names(schema=pg_schema)
    assert sorted(names) == sorted(['fc"; DROP TABLE x;--', "Anomalies"])
    sink.engine.dispose()
    with pytest.raises(SinkError, match=r"schema 'nowhere' does not exist.*\[sink\] db_schema"):
        SqlSink(pg_server, db_schema="nowhere").write(make_forecasts(), make_anomalies())


@pytest.mark.parametrize("backend", _backends())
def test_sql_write_is_one_transaction(backend, tmp_path, request, make_forecasts, make_anomalies):
    """A failure in the anomalies upsert leaves no forecasts behind either."""
    sink = sql_sink(backend, tmp_path, request)
    ts_type = "DATETIME" if backend == "sqlite" else "TIMESTAMPTZ"
    with sink.engine.begin() as conn:
        conn.execute(sa.text(
            f"CREATE TABLE anomalies (series_id TEXT NOT NULL, ts {ts_type} NOT NULL, "
            "value FLOAT, expected FLOAT, lower FLOAT, upper FLOAT, score FLOAT CHECK (score <= 1), "
            "is_anomaly BOOLEAN, model_version BIGINT, PRIMARY KEY (series_id, ts))"))
    with pytest.raises(SinkError, match="rolled back"):
        sink.write(make_forecasts(), make_anomalies().assign(score=2.0))
    assert sink.read("forecasts").empty
    sink.write(make_forecasts(), make_anomalies())  # and it recovers
    assert len(sink.read("forecasts")) == len(make_forecasts())
    sink.engine.dispose()


@pytest.mark.parametrize("backend", _backends())
def test_sql_batches(backend, tmp_path, request, make_forecasts, make_anomalies, monkeypatch):
    """SQLite: BATCH_ROWS rows at a time (cut to whole statements), as upserts of SQLITE_VARIABLES //
    columns rows each (run by executemany) and one upsert of the rest. PostgreSQL: new tables' rows are
    COPYed straight in (on the driver's cursor, unseen by these events), with no INSERT at all."""
    monkeypatch.setattr(sql_module, "BATCH_ROWS", 7)
    monkeypatch.setattr(sql_module, "SQLITE_VARIABLES", 27)  # 3 forecast rows (8 columns), 3 anomaly rows (9)
    sink = sql_sink(backend, tmp_path, request)
    statements = []
    sa.event.listen(sink.engine, "before_cursor_execute",
                    lambda conn, cursor, statement, params, context, many: statements.append((statement, many)))
    fc = make_forecasts(issued=pd.date_range(START, periods=10, freq="h"))
    sink.write(fc, make_anomalies())
    upserts = [(s, many) for s, many in statements if "ON CONFLICT" in s]
    if backend == "sqlite":
        def expected(rows: int) -> list[tuple[int, bool]]:  # (rows a statement, executemany) per run
            out = []
            for start in range(0, rows, 6):  # 7 rows cut to whole statements of 3
                batch = min(6, rows - start)
                out += [(3, batch >= 6)] * (batch >= 3) + [(batch % 3, False)] * (batch % 3 > 0)
            return out
        got = [(s.count("), (") + 1, many) for s, many in upserts]
        assert got == expected(len(fc)) + expected(len(make_anomalies()))
    else:  # new tables: COPY alone (see test_postgresql_copies_what_is_new_and_upserts_a_replay)
        assert not [s for s, _ in statements if s.startswith("INSERT")]
    assert all(NASTY_ID not in s for s, _ in statements)
    pd.testing.assert_frame_equal(sink.read("forecasts"), canonical(fc, "forecasts"))
    sink.engine.dispose()


@pytest.mark.parametrize("backend", _backends())
def test_sql_large_batch_round_trip_and_overwrite(backend, tmp_path, request, make_forecasts, make_anomalies):
    """A tick-sized write (many batches), read back exactly; a replay changes nothing; new values for
    the same keys replace the old ones, NaN stays NULL, and no key is duplicated."""
    sink = sql_sink(backend, tmp_path, request)
    series = [f"s{i:04d}" for i in range(400)] + [NASTY_ID]
    fc = make_forecasts(series=series, issued=pd.date_range(START, periods=3, freq="h"), horizon=24)
    an = make_anomalies(series=series, ts=pd.date_range(START, periods=3, freq="h"))
    fc.loc[::97, "lower"] = float("nan")
    an.loc[::13, "expected"] = float("nan")
    assert len(fc) > 2 * sql_module.BATCH_ROWS
    sink.write(fc, an)
    sink.write(fc, an)
    pd.testing.assert_frame_equal(sink.read("forecasts"), canonical(fc, "forecasts"))
    pd.testing.assert_frame_equal(sink.read("anomalies"), canonical(an, "anomalies"))
    with sink.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM forecasts WHERE lower IS NULL")).scalar() == \
            fc["lower"].isna().sum()

    newer_fc = make_forecasts(series=series, issued=pd.date_range(START + H, periods=3, freq="h"), horizon=24,
                              offset=0.5, version=2)
    newer_an = make_anomalies(series=series, ts=pd.date_range(START + H, periods=3, freq="h"), offset=0.5, version=2)
    sink.write(newer_fc, newer_an)
    want_fc = pd.concat([fc, newer_fc]).drop_duplicates(list(FORECAST_KEY), keep="last")
    want_an = pd.concat([an, newer_an]).drop_duplicates(list(ANOMALY_KEY), keep="last")
    got_fc, got_an = sink.read("forecasts"), sink.read("anomalies")
    pd.testing.assert_frame_equal(got_fc, canonical(want_fc, "forecasts"))
    pd.testing.assert_frame_equal(got_an, canonical(want_an, "anomalies"))
    assert set(got_fc["model_version"]) == {1, 2} and not got_fc.duplicated(list(FORECAST_KEY)).any()
    sink.engine.dispose()


@pytest.mark.postgres
def test_postgresql_copies_what_is_new_and_upserts_a_replay(pg_url, make_forecasts, make_anomalies, monkeypatch):
    """Rows later than everything in a time-keyed table are COPYed straight into it; a replay, rows
    overlapping the table's times, or a key another writer added after the check are staged and upserted."""
    sink = SqlSink(pg_url)
    events: list[str] = []
    sa.event.listen(sink.engine, "before_cursor_execute", lambda conn, cursor, statement, params, context, many:
                    events.extend(["upsert" if "ON CONFLICT" in statement else "insert"] * statement.startswith("INSERT")))
    copy = SqlSink._copy

    def spy(self, conn, spec, frame, target):
        if "forecastd_stage_" not in repr(target):
            events.append("copy")  # straight into the output table
        return copy(self, conn, spec, frame, target)

    monkeypatch.setattr(SqlSink, "_copy", spy)

    def writes() -> list[str]:
        got = events[:]
        events.clear()
        return got

    early = pd.date_range(START, periods=2, freq="h")
    late = pd.date_range(START + 2 * H, periods=2, freq="h")
    sink.write(make_forecasts(issued=early), make_anomalies(ts=early))
    assert writes() == ["copy", "copy"]
    sink.write(make_forecasts(issued=late), make_anomalies(ts=late))  # after everything there
    assert writes() == ["copy", "copy"]
    sink.write(make_forecasts(issued=late, offset=1), make_anomalies(ts=late))  # a replay, with a new value
    assert writes() == ["upsert", "upsert"]
    both = early.append(late)
    want = pd.concat([make_forecasts(issued=early), make_forecasts(issued=late, offset=1)])
    pd.testing.assert_frame_equal(sink.read("forecasts"), canonical(want, "forecasts"))
    # Another writer's keys landing between the check and the COPY: the COPY fails inside its savepoint
    # and the same rows are upserted, in the same transaction.
    monkeypatch.setattr(SqlSink, "_all_new", lambda *args: True)
    sink.write(make_forecasts(issued=both, offset=2), make_anomalies(ts=both).iloc[:0])
    assert writes() == ["copy", "upsert"]
    pd.testing.assert_frame_equal(sink.read("forecasts"), canonical(make_forecasts(issued=both, offset=2), "forecasts"))
    sink.engine.dispose()


def test_postgresql_session_time_zone_does_not_shift_instants(pg_url, make_forecasts, make_anomalies):
    """Times go in as instants, COPYed straight in (new rows) or staged and upserted (a replay); the
    session's TimeZone must not reinterpret them."""
    sink = SqlSink(f"{pg_url}%20-cTimeZone%3DAsia/Kolkata")
    fc, an = make_forecasts(offset=1), make_anomalies()
    sink.write(fc, an)
    pd.testing.assert_frame_equal(sink.read("forecasts"), canonical(fc, "forecasts"))
    fc = make_forecasts()
    sink.write(fc, an)  # the same keys: staged, then upserted
    pd.testing.assert_frame_equal(sink.read("forecasts"), canonical(fc, "forecasts"))
    pd.testing.assert_frame_equal(sink.read("anomalies"), canonical(an, "anomalies"))
    with sink.engine.connect() as conn:
        assert conn.execute(sa.text("SHOW TimeZone")).scalar() == "Asia/Kolkata"
        first = conn.execute(sa.text("SELECT min(ts) AT TIME ZONE 'UTC' FROM anomalies")).scalar()
    assert pd.Timestamp(first, tz="UTC") == an["ts"].min()
    sink.engine.dispose()


@pytest.mark.parametrize("backend", _backends())
def test_sql_tables_are_keyed_time_first(backend, tmp_path, request, make_forecasts, make_anomalies):
    """New tables index the key time first, so each tick's rows go to the end of the index."""
    sink = sql_sink(backend, tmp_path, request)
    fc, an = make_forecasts(), make_anomalies()
    sink.write(fc, an)
    inspector = sa.inspect(sink.engine)
    assert inspector.get_pk_constraint("forecasts")["constrained_columns"] == ["issued_at", "series_id", "step"]
    assert inspector.get_pk_constraint("anomalies")["constrained_columns"] == ["ts", "series_id"]
    if backend == "sqlite":  # the key's B-tree holds the rows: no second tree for a rowid
        with sqlite3.connect(tmp_path / "out.db") as conn, pytest.raises(sqlite3.OperationalError, match="rowid"):
            conn.execute("SELECT rowid FROM forecasts")
    # Rows of several issue times and series, written out of order, upsert and read back by key.
    sink.write(fc.iloc[::-1].assign(mean=fc["mean"].iloc[::-1] + 1), an.iloc[::-1])
    pd.testing.assert_frame_equal(sink.read("forecasts"), canonical(fc.assign(mean=fc["mean"] + 1), "forecasts"))
    pd.testing.assert_frame_equal(sink.read("anomalies"), canonical(an, "anomalies"))
    sink.engine.dispose()


@pytest.mark.parametrize("backend", _backends())
def test_sql_table_keyed_series_first_is_still_written(backend, tmp_path, request, make_forecasts, make_anomalies):
    """A table made by an older forecastd (key series first) keeps working: upserts match the key's columns."""
    sink = sql_sink(backend, tmp_path, request)
    ts_type = "DATETIME" if backend == "sqlite" else "TIMESTAMPTZ"
    cols = ", ".join(f"{c} {t}" for c, t in [
        ("series_id", "TEXT NOT NULL"), ("issued_at", f"{ts_type} NOT NULL"), ("step", "BIGINT NOT NULL"),
        ("target_ts", ts_type), ("mean", "DOUBLE PRECISION"), ("lower", "DOUBLE PRECISION"),
        ("upper", "DOUBLE PRECISION"), ("model_version", "BIGINT")])
    with sink.engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE forecasts ({cols}, PRIMARY KEY (series_id, issued_at, step))"))
    fc = make_forecasts()
    sink.write(fc, make_anomalies().iloc[:0])
    sink.write(fc.assign(mean=fc["mean"] + 1), make_anomalies().iloc[:0])
    pd.testing.assert_frame_equal(sink.read("forecasts"), canonical(fc.assign(mean=fc["mean"] + 1), "forecasts"))
    assert sa.inspect(sink.engine).get_pk_constraint("forecasts")["constrained_columns"] == [
        "series_id", "issued_at", "step"]
    sink.engine.dispose()


def test_sqlite_stores_utc_text(tmp_path, make_forecasts, make_anomalies):
    sink = SqlSink(f"sqlite:///{tmp_path / 'out.db'}")
    fc = make_forecasts(issued=[START])
    sink.write(fc.assign(issued_at=fc["issued_at"].dt.tz_convert("Europe/Berlin")), make_anomalies().iloc[:0])
    with sqlite3.connect(tmp_path / "out.db") as conn:
        stored = {r[0] for r in conn.execute("SELECT issued_at FROM forecasts")}
    assert stored == {"2024-03-30 18:00:00.000000"}
    sink.engine.dispose()


def test_sqlite_keys_written_through_sqlalchemy_binding_are_replaced(tmp_path, make_forecasts, make_anomalies):
    """Tables written by SQLAlchemy's own DateTime binding (older forecastd) hold the same key text."""
    sink = SqlSink(f"sqlite:///{tmp_path / 'out.db'}")
    issued = pd.DatetimeIndex([START, START + pd.Timedelta(microseconds=1234567)])
    an = make_anomalies(ts=issued)
    sink.write(make_forecasts().iloc[:0], an.iloc[:1])  # creates the tables
    table = sa.Table("anomalies", sa.MetaData(), autoload_with=sink.engine)
    with sink.engine.begin() as conn:
        conn.execute(sa.delete(table))
        conn.execute(sa.insert(table), [{**r, "ts": r["ts"].tz_localize(None).to_pydatetime()}
                                        for r in an.to_dict("records")])
    sink.write(make_forecasts().iloc[:0], an.assign(value=an["value"] + 1))
    pd.testing.assert_frame_equal(sink.read("anomalies"), canonical(an.assign(value=an["value"] + 1), "anomalies"))
    sink.engine.dispose()


def test_unsupported_dialect():
    with pytest.raises(SinkError, match=r"'mysql' dialect.*use one of postgresql, sqlite"):
        SqlSink("mysql+pymysql://user@localhost/db")


def test_unreachable_sink_database(make_forecasts, make_anomalies):
    sink = SqlSink("postgresql+psycopg://postgres@127.0.0.1:1/test")
    with pytest.raises(SinkError, match=r"cannot connect to the database.*check \[sink\] url"):
        sink.write(make_forecasts(), make_anomalies())


@pytest.mark.parametrize("backend", _backends())
def test_a_write_another_session_locks_out_fails_after_lock_timeout_and_succeeds_once_released(
        backend, tmp_path, request, make_forecasts, make_anomalies):
    sink = sql_sink(backend, tmp_path, request, lock_timeout=0.5)
    sink.write(make_forecasts(), make_anomalies())  # the tables exist
    blocker = sa.create_engine(sink.engine.url).connect()
    blocker.begin()
    if backend == "sqlite":
        blocker.exec_driver_sql("DELETE FROM anomalies WHERE 1 = 0")  # takes the database's write lock
    else:
        # Should the write wait regardless, the server ends the blocker: the test fails, never hangs.
        blocker.exec_driver_sql("SET idle_in_transaction_session_timeout = '5s'")
        blocker.exec_driver_sql("LOCK TABLE forecasts IN ACCESS EXCLUSIVE MODE")
    later = make_forecasts(version=2)
    t0 = time.monotonic()
    with pytest.raises(SinkError, match=r"failed and was rolled back: .*another session held a lock on the table "
                                        r"past \[sink\] lock_timeout"):
        sink.write(later, make_anomalies(version=2))
    waited = time.monotonic() - t0
    assert 0.4 < waited < 3, waited  # SQLite's own busy timeout would be 5 s
    blocker.rollback()
    blocker.close()
    sink.write(later, make_anomalies(version=2))
    assert set(sink.read("forecasts")["model_version"]) == {2}
    sink.engine.dispose()


@pytest.mark.postgres
def test_postgresql_connections_take_the_lock_timeout_and_zero_keeps_the_servers(pg_url):
    for seconds, shown in ((5.0, "5s"), (90, "90s"), (0.25, "250ms"), (0, "0")):
        sink = SqlSink(pg_url, lock_timeout=seconds)
        with sink.engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == shown
            # the session setting leaves the connection as SQLAlchemy expects it: inside a transaction
            conn.exec_driver_sql("CREATE TEMPORARY TABLE t (x int)")
            conn.rollback()
            assert conn.exec_driver_sql("SELECT count(*) FROM pg_tables WHERE tablename = 't'").scalar() == 0
        sink.engine.dispose()
