"""The shipped sample data: rebuildable from its generator, and holding exactly what its README says."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
FILES = ("series.parquet", "airline.parquet", "sensors_wide.parquet", "series.sqlite", "anomalies.json")


def _load_generator():
    # sample_data/ is not a package (it ships data, not code), so load the script by path.
    spec = importlib.util.spec_from_file_location("sample_data_generate", SAMPLE / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _sql(path: Path, table: str) -> pd.DataFrame:
    with sqlite3.connect(path) as con:
        return pd.read_sql_query(f"SELECT series_id, ts, value FROM {table} ORDER BY rowid", con)


def _window(frame: pd.DataFrame, sid: str, start: str, end: str) -> pd.Series:
    s = frame[frame["series_id"] == sid].set_index("ts")["value"]
    return s[pd.Timestamp(start):pd.Timestamp(end)]


@pytest.fixture(scope="module")
def series() -> pd.DataFrame:
    return pd.read_parquet(SAMPLE / "series.parquet")


@pytest.fixture(scope="module")
def anomalies() -> list[dict]:
    return json.loads((SAMPLE / "anomalies.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    gen.write(out)
    return out


@pytest.mark.parametrize("name", ["series.parquet", "airline.parquet", "sensors_wide.parquet"])
def test_rebuild_gives_the_committed_parquet_frames(rebuilt: Path, name: str) -> None:
    pd.testing.assert_frame_equal(pd.read_parquet(rebuilt / name), pd.read_parquet(SAMPLE / name))


@pytest.mark.parametrize("table", ["readings", "airline"])
def test_rebuild_gives_the_committed_sqlite_tables(rebuilt: Path, table: str) -> None:
    pd.testing.assert_frame_equal(_sql(rebuilt / "series.sqlite", table), _sql(SAMPLE / "series.sqlite", table))


def test_rebuild_gives_the_committed_anomalies(rebuilt: Path, anomalies: list[dict]) -> None:
    assert json.loads((rebuilt / "anomalies.json").read_text(encoding="utf-8")) == anomalies


@pytest.mark.parametrize("name", FILES)
def test_files_are_small(name: str) -> None:
    assert (SAMPLE / name).stat().st_size < 1_000_000


def test_long_parquet_holds_the_hourly_series_on_one_grid(series: pd.DataFrame) -> None:
    assert list(series.columns) == ["series_id", "ts", "value"]
    assert str(series["ts"].dtype) == "datetime64[ns, UTC]"
    assert series["value"].dtype == np.float64
    assert sorted(series["series_id"].unique()) == sorted(gen.HOURLY_SERIES)  # no monthly airline here
    spans = series.groupby("series_id")["ts"].agg(["min", "max"])
    assert (spans["min"] == pd.Timestamp("2024-01-02 00:00", tz="UTC")).all()
    assert (spans["max"] == pd.Timestamp("2024-03-31 23:00", tz="UTC")).all()
    for sid, g in series.groupby("series_id"):
        steps = g["ts"].diff().dropna()
        assert g["ts"].is_monotonic_increasing and g["ts"].is_unique, sid
        assert (steps == pd.Timedelta(hours=1)).sum() >= len(g) - 2, sid  # hourly, but for the one gap
        assert (g["ts"].dt.minute == 0).all(), sid
    counts = series.groupby("series_id").size()
    assert counts.drop("sensor-flow-1").eq(2160).all()
    assert counts["sensor-flow-1"] == 2150


def test_gap_rows_are_absent(series: pd.DataFrame) -> None:
    sid, start, end = gen.GAP
    ts = series.loc[series["series_id"] == sid, "ts"]
    assert not ts.between(start, end).any()
    assert (ts == start - pd.Timedelta(hours=1)).any() and (ts == end + pd.Timedelta(hours=1)).any()
    assert (end - start) == pd.Timedelta(hours=9)  # ten hourly rows, bounds inclusive
    sql = _sql(SAMPLE / "series.sqlite", "readings")
    sql_ts = sql.loc[sql["series_id"] == sid, "ts"]
    assert not sql_ts.between(start.strftime("%Y-%m-%d %H:%M:%S"), end.strftime("%Y-%m-%d %H:%M:%S")).any()


def test_nans_are_where_documented_and_nowhere_else(series: pd.DataFrame) -> None:
    sid, stamps = gen.NAN_TIMESTAMPS
    nan_rows = series[series["value"].isna()]
    assert set(nan_rows["series_id"]) == {sid}
    assert sorted(nan_rows["ts"]) == sorted(stamps)
    sql = _sql(SAMPLE / "series.sqlite", "readings")
    assert sql["value"].isna().sum() == len(stamps)  # NULL in SQLite
    assert set(sql.loc[sql["value"].isna(), "series_id"]) == {sid}


def test_sqlite_matches_the_long_parquet(series: pd.DataFrame) -> None:
    sql = _sql(SAMPLE / "series.sqlite", "readings")
    assert sql["ts"].str.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d").all()
    sql["ts"] = pd.to_datetime(sql["ts"], utc=True).dt.as_unit("ns")
    key = ["series_id", "ts"]
    left = sql.sort_values(key).reset_index(drop=True)
    right = series.sort_values(key).reset_index(drop=True).astype({"series_id": object})
    pd.testing.assert_frame_equal(left.astype({"series_id": object}), right)


def test_wide_file_is_the_sensors_pivoted(series: pd.DataFrame) -> None:
    wide = pd.read_parquet(SAMPLE / "sensors_wide.parquet")
    assert list(wide.columns) == ["ts", *gen.SENSORS]
    assert len(wide) == 2160 and wide["ts"].is_unique
    long = wide.melt(id_vars="ts", var_name="series_id", value_name="value")
    sensors = series[series["series_id"].isin(gen.SENSORS)]
    merged = long.merge(sensors, on=["series_id", "ts"], how="left", suffixes=("_wide", "_long"))
    both = merged["value_long"].notna()
    np.testing.assert_array_equal(merged.loc[both, "value_wide"], merged.loc[both, "value_long"])
    # Where the long frame has no row (the gap) the wide file can only say NaN.
    assert merged.loc[merged["value_wide"].isna() & merged["value_long"].isna()].shape[0] == 10 + 5


def test_anomalies_json_matches_the_generator(anomalies: list[dict]) -> None:
    assert len(anomalies) == len(gen.ANOMALIES)
    for record in anomalies:
        assert set(record) >= {"series_id", "start", "end", "kind"}
        assert record["series_id"] in gen.SENSORS
        assert record["kind"] in {"spike", "level_shift", "stuck"}
        assert pd.Timestamp(record["start"]).tzinfo is not None
        assert pd.Timestamp(record["start"]) <= pd.Timestamp(record["end"])


def test_anomalies_are_at_the_stated_timestamps(series: pd.DataFrame, anomalies: list[dict]) -> None:
    one_hour = pd.Timedelta(hours=1)
    for a in anomalies:
        start, end = pd.Timestamp(a["start"]), pd.Timestamp(a["end"])
        s = series[series["series_id"] == a["series_id"]].set_index("ts")["value"]
        hit = s[start:end]
        assert len(hit) == (end - start) // one_hour + 1, a
        if a["kind"] == "spike":
            # Hourly change is small next to the magnitude, so the neighbours stand in for the clean value.
            baseline = (s[start - one_hour] + s[end + one_hour]) / 2
            assert (np.sign(hit - baseline) == np.sign(a["magnitude"])).all(), a
            assert ((hit - baseline).abs() > 0.6 * abs(a["magnitude"])).all(), a
        elif a["kind"] == "stuck":
            assert hit.nunique() == 1 and hit.iloc[0] == s[start - one_hour], a
            assert s[end + one_hour] != hit.iloc[0], a
            # Elsewhere rounding repeats a reading now and then, but never three times in a row.
            rest = s.drop(s[start - one_hour:end].index)
            same = rest.eq(rest.shift())
            assert not (same & same.shift(fill_value=False)).any(), a
        elif a["kind"] == "level_shift":
            week = pd.Timedelta(days=7)
            jump = s[start:start + week].mean() - s[start - week:start - one_hour].mean()
            assert abs(jump - a["magnitude"]) < 0.25 * abs(a["magnitude"]), (a, jump)


def test_sensors_have_no_undocumented_outliers(series: pd.DataFrame, anomalies: list[dict]) -> None:
    # So a detection test can count any flag away from the documented windows as a false positive.
    for sid in gen.SENSORS:
        s = series[series["series_id"] == sid].set_index("ts")["value"].asfreq("h")
        residual = s - (s.shift(1) + s.shift(-1)) / 2
        mad = 1.4826 * np.nanmedian(np.abs(residual - np.nanmedian(residual)))
        outliers = residual.index[(residual / mad).abs() > 8]
        allowed = pd.DatetimeIndex([], tz="UTC")
        for a in anomalies:
            if a["series_id"] == sid:
                allowed = allowed.union(pd.date_range(pd.Timestamp(a["start"]) - pd.Timedelta(hours=1),
                                                      pd.Timestamp(a["end"]) + pd.Timedelta(hours=1), freq="h"))
        assert outliers.isin(allowed).all(), (sid, list(outliers[~outliers.isin(allowed)]))


def test_price_is_positive_with_volatility_bursts(series: pd.DataFrame) -> None:
    price = series.loc[series["series_id"] == "price-1", "value"].to_numpy()
    assert (price > 0).all()
    ret = np.diff(np.log(price))
    daily_vol = pd.Series(ret).rolling(24).std().dropna()
    assert daily_vol.max() > 3 * daily_vol.median()  # calm and turbulent regimes both present


def test_airline_is_monthly_with_multiplicative_seasonality() -> None:
    air = pd.read_parquet(SAMPLE / "airline.parquet")
    assert set(air["series_id"]) == {gen.AIRLINE_ID}
    assert str(air["ts"].dtype) == "datetime64[ns, UTC]"
    expected = pd.date_range("1949-01-01", periods=144, freq="MS", tz="UTC")
    assert (pd.DatetimeIndex(air["ts"]) == expected).all()
    value = air["value"].to_numpy().reshape(12, 12)  # year x month
    assert (value > 0).all() and (value == np.round(value)).all()
    assert (value[:, 6] > value[:, 10]).all()  # July above November every year
    swing = value.max(axis=1) - value.min(axis=1)
    assert swing[-1] > 2.5 * swing[0]  # the seasonal swing grows with the level
    assert value[-1].mean() > 2.5 * value[0].mean()
    assert len(_sql(SAMPLE / "series.sqlite", "airline")) == 144
