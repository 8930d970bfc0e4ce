import datetime as dt

import numpy as np
import pandas as pd
import pytest

from forecastd.errors import DataError
from forecastd.frames import Grid, infer_freq, validate

G = Grid("1h")


def _raw(ids, ts, values):
    return pd.DataFrame({"series_id": ids, "ts": ts, "value": values})


def test_nan_and_inf_become_missing_points_and_are_counted():
    f, r = validate(_raw(["a"] * 3, pd.date_range("2024-01-01", periods=3, freq="h", tz="UTC"),
                         [1.0, np.nan, np.inf]), grid=G)
    assert len(f) == 3 and f["value"].isna().sum() == 2
    assert r.by_reason() == {"NaN kept as missing": 1, "inf kept as missing": 1}


def test_duplicates_follow_the_rule_and_are_counted():
    ts = pd.to_datetime(["2024-01-01 00:00", "2024-01-01 00:00", "2024-01-01 01:00"], utc=True)
    for rule, expected in [("last", 2.0), ("first", 1.0), ("mean", 1.5)]:
        f, r = validate(_raw(["a"] * 3, ts, [1.0, 2.0, 5.0]), grid=G, duplicates=rule)
        assert f["value"].tolist() == [expected, 5.0]
        assert r.total() == 1


def test_out_of_order_rows_are_sorted_and_counted():
    ts = pd.to_datetime(["2024-01-01 02:00", "2024-01-01 00:00", "2024-01-01 01:00"], utc=True)
    f, r = validate(_raw(["a"] * 3, ts, [3.0, 1.0, 2.0]), grid=G)
    assert f["value"].tolist() == [1.0, 2.0, 3.0]
    assert r.by_reason()["reordered"] == 2


def test_mixed_naive_and_aware_timestamps_take_the_configured_zone():
    ts = [dt.datetime(2024, 1, 1, 1, 0), pd.Timestamp("2024-01-01 01:00", tz="UTC"), "2024-01-01 03:00"]
    f, r = validate(_raw(["a", "b", "c"], pd.Series(ts, dtype=object), [1.0, 2.0, 3.0]), grid=G,
                    timezone="Europe/Berlin")
    got = dict(zip(f["series_id"], f["ts"].dt.hour))
    assert got == {"a": 0, "b": 1, "c": 2}  # Berlin is UTC+1 in January
    assert r.total() == 0


def test_bad_timestamps_and_null_ids_are_rejected_and_counted():
    f, r = validate(_raw(["a", None, "a"], pd.Series(["2024-01-01", "2024-01-01", "not a time"], dtype=object),
                         [1.0, 2.0, 3.0]), grid=G)
    assert len(f) == 1
    assert r.by_reason() == {"rejected: null series_id": 1, "rejected: bad timestamp": 1}


def test_off_grid_timestamps_are_snapped():
    f, r = validate(_raw(["a"], pd.to_datetime(["2024-01-01 00:29"], utc=True), [1.0]), grid=G)
    assert f["ts"].iloc[0] == pd.Timestamp("2024-01-01 00:00", tz="UTC")
    assert r.by_reason() == {"snapped to grid": 1}


def test_late_and_future_rows_are_counted_not_lost():
    ts = pd.date_range("2024-01-01", periods=5, freq="h", tz="UTC")
    f, r = validate(_raw(["a"] * 5, ts, np.arange(5.0)), grid=G,
                    watermarks={"a": ts[1]}, now=ts[2])
    assert f["ts"].tolist() == [ts[2], ts[3]]  # one step of clock skew is tolerated
    assert r.by_reason() == {"late (at or before the watermark), rejected": 2,
                             "future-stamped, deferred to a later read": 1}


def test_rows_read_again_or_not_due_count_no_other_repair():
    """A tick reads rows at or before a watermark again (and future ones until their time): their NaNs,
    snaps and duplicates were counted at every read, multiplying warnings by the number of reads."""
    ts = pd.DatetimeIndex(["2024-01-01 00:10", "2024-01-01 01:00", "2024-01-01 01:00", "2024-01-01 02:00",
                           "2024-01-01 03:10", "2024-01-01 09:00"], tz="UTC")
    values = [np.nan, 1.0, 2.0, np.nan, 4.0, np.nan]
    f, r = validate(_raw(["a"] * 6, ts, values), grid=G, watermarks={"a": ts[2]}, now=ts[4])
    assert f["ts"].tolist() == [ts[3], pd.Timestamp("2024-01-01 03:00", tz="UTC")]
    assert r.by_reason() == {"late (at or before the watermark), rejected": 3,
                             "future-stamped, deferred to a later read": 1,
                             "NaN kept as missing": 1, "snapped to grid": 1}


def test_hostile_series_ids_are_kept_verbatim():
    f, _ = validate(_raw(["'; DROP TABLE x;--"], pd.to_datetime(["2024-01-01"], utc=True), [1.0]), grid=G)
    assert f["series_id"].iloc[0] == "'; DROP TABLE x;--"


def test_missing_column_is_a_clear_error():
    with pytest.raises(DataError, match="value"):
        validate(pd.DataFrame({"series_id": ["a"], "ts": [pd.Timestamp("2024-01-01", tz="UTC")]}), grid=G)


def test_empty_input_gives_an_empty_contract_frame():
    f, r = validate(_raw([], [], []), grid=G)
    assert f.empty and list(f.columns) == ["series_id", "ts", "value"] and r.total() == 0


def test_infer_freq():
    ts = pd.date_range("2024-01-01", periods=10, freq="5min", tz="UTC")
    assert pd.tseries.frequencies.to_offset(infer_freq(_raw(["a"] * 10, ts, np.zeros(10)))) == pd.Timedelta("5min")
    months = pd.date_range("1949-01-01", periods=24, freq="MS", tz="UTC")
    assert infer_freq(_raw(["a"] * 24, months, np.zeros(24))) == "MS"
    with pytest.raises(DataError, match="freq"):
        infer_freq(_raw(["a"], ts[:1], [0.0]))


def test_irregular_timestamps_get_the_round_step_nearest_their_median_and_a_warning(caplog):
    rng = np.random.default_rng(0)
    start = pd.Timestamp("2024-01-01", tz="UTC")
    # Event-driven: a point every 10 minutes on average, at any second. The most common step is a few
    # seconds long, by chance; a grid of it would be mostly empty steps.
    events = start + pd.to_timedelta(np.cumsum(rng.exponential(600, 500).astype(int) + 1), unit="s")
    with caplog.at_level("WARNING", logger="forecastd.frames"):
        assert infer_freq(_raw(["a"] * 500, events, np.zeros(500))) == "10min"  # median step 7 min 59 s
    assert "irregular" in caplog.text and "[data] freq" in caplog.text
    # Ragged but regular (NAB's traffic files): the sampling interval is most steps, and it wins.
    caplog.clear()
    steps = np.where(rng.random(300) < 0.6, 300, rng.integers(1, 900, 300))
    ragged = start + pd.to_timedelta(np.cumsum(steps), unit="s")
    with caplog.at_level("WARNING", logger="forecastd.frames"):
        assert infer_freq(_raw(["a"] * 300, ragged, np.zeros(300))) == "5min"
    assert caplog.text == ""


def test_monthly_grid_roundtrip():
    g = Grid("MS")
    ts = pd.DatetimeIndex(["1949-01-01", "1949-02-01", "1960-12-01"], tz="UTC")
    assert (g.ts(g.index(ts)) == ts).all()
    assert np.diff(g.index(ts))[0] == 1


def test_unsupported_frequency_is_refused():
    with pytest.raises(DataError, match="not supported"):
        Grid("W")


@pytest.mark.parametrize("freq", ["1D", "D", "2D"])
def test_daily_grids_are_supported(freq):
    g = Grid(freq)
    ts = pd.DatetimeIndex(pd.date_range("2024-01-02", periods=5, freq=freq, tz="UTC"))  # on the epoch-anchored grid
    steps = g.index(ts)
    assert np.all(np.diff(steps) == 1)
    assert (g.ts(steps) == ts).all()
    assert g.step_ns == pd.tseries.frequencies.to_offset(freq).n * 86_400 * 10**9


@pytest.mark.parametrize("ts", [[1704067200, 1704070800], [1704067200.0, 1704070800.0]])
def test_epoch_numbers_are_refused_with_the_fix(ts):
    """pandas reads numbers as nanoseconds after 1970: every point would merge on one grid step."""
    raw = pd.DataFrame({"series_id": ["a", "a"], "ts": ts, "value": [1.0, 2.0]})
    with pytest.raises(DataError, match=r"time column holds numbers \(e.g. 1704067200.*unixepoch"):
        validate(raw, grid=Grid("1h"))
    with pytest.raises(DataError, match="time column holds numbers"):
        infer_freq(raw)


def test_a_number_among_timestamp_text_is_a_bad_timestamp():
    raw = pd.DataFrame({"series_id": ["a"] * 3, "ts": pd.Series(["2024-01-01 00:00", 1704070800, "2024-01-01 02:00"],
                                                                 dtype=object), "value": [1.0, 2.0, 3.0]})
    frame, report = validate(raw, grid=Grid("1h"))
    assert frame["value"].tolist() == [1.0, 3.0] and report.total("rejected: bad timestamp") == 1


# -- whole-day steps anchored at local midnight ------------------------------------------------------

def _local_midnights(zone: str, start: str, days: int) -> pd.DatetimeIndex:
    return pd.date_range(start, periods=days, freq="D", tz=zone).tz_convert("UTC").as_unit("ns")


def test_daily_rows_at_auckland_midnight_keep_their_days_across_dst():
    """NZ summer time began 2024-09-29: at +12/+13 hours local midnight is 12:00 or 11:00 UTC, and on a
    grid of UTC midnights the 29th and 30th met on one step (one value dropped as a duplicate)."""
    zone = "Pacific/Auckland"
    naive = pd.date_range("2024-09-20", periods=20, freq="D").strftime("%Y-%m-%d %H:%M:%S")  # naive text
    frame, report = validate(_raw(["a"] * 20, naive, np.arange(20.0)), grid=Grid("1D", zone), timezone=zone)
    assert report.total() == 0  # no row snapped, none a duplicate
    assert frame["value"].tolist() == list(range(20))
    assert (pd.DatetimeIndex(frame["ts"]) == _local_midnights(zone, "2024-09-20", 20)).all()
    assert np.all(np.diff(Grid("1D", zone).index(frame["ts"])) == 1)


def test_daily_rows_at_berlin_midnight_are_not_counted_as_snapped():
    zone = "Europe/Berlin"
    ts = _local_midnights(zone, "2024-03-25", 14)  # summer time began on the 31st
    frame, report = validate(_raw(["a"] * 14, ts, np.arange(14.0)), grid=Grid("1D", zone))
    assert report.total() == 0
    assert (pd.DatetimeIndex(frame["ts"]) == ts).all()


@pytest.mark.parametrize("zone", ["Pacific/Auckland", "Europe/Berlin", "America/Santiago", "America/Havana",
                                  "Asia/Beirut", "Asia/Kolkata"])
@pytest.mark.parametrize("freq", ["1D", "7D"])
def test_local_day_grid_round_trips(zone, freq):
    g = Grid(freq, zone)
    steps = np.arange(2700, 3100) if freq == "7D" else np.arange(19000, 20500)  # 2022-2026
    times = g.ts(steps)
    assert (g.index(times) == steps).all()
    assert (g.ns(steps) == times.asi8).all()
    assert (g.ts(g.index(times)) == times).all()
    # Santiago and Beirut skip midnight when summer time begins: that day starts at 01:00. Havana repeats
    # it when summer time ends: the day starts at the first of the two.
    local = times.tz_convert(zone)
    assert set(local.hour) <= {0, 1} and local.minute.max() == 0
    if zone in ("America/Santiago", "Asia/Beirut") and freq == "1D":
        assert 1 in set(local.hour)
    if zone == "America/Havana" and freq == "1D":
        day = g.ts(g.index(pd.DatetimeIndex([pd.Timestamp("2024-11-03 06:00", tz=zone)])))[0]
        assert day == pd.Timestamp("2024-11-03 04:00", tz="UTC")  # 00:00 CDT, not 00:00 CST an hour later
    # Off-grid times go to the nearest local midnight of the grid.
    day = g.index(times[:1] + pd.Timedelta(hours=11))
    assert day[0] == steps[0]


def test_a_utc_daily_grid_and_sub_day_grids_are_the_epoch_anchored_grid_as_before():
    assert Grid("1D") == Grid("1D", "UTC") and Grid("1D").zone == "UTC" and Grid("1D").regular
    assert not Grid("1D", "Europe/Berlin").regular and not Grid("MS").regular
    # Hours and minutes count elapsed time: no zone moves them (Kolkata's half hour would).
    assert Grid("1h", "Asia/Kolkata") == Grid("1h") and Grid("5min", "Pacific/Auckland").regular
    g = Grid("1D")
    times = (pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(np.arange(0, 10**6, 997), "s")).as_unit("ns")
    day = 86_400 * 10**9
    assert (g.index(times) == (times.asi8 + day // 2) // day).all()
    assert (g.ns(np.arange(19000, 19010)) == np.arange(19000, 19010) * day).all()
    assert (g.wall_ns(np.arange(19000, 19010)) == g.ns(np.arange(19000, 19010))).all()


@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York"])
@pytest.mark.parametrize("freq", ["1D", "2D"])
def test_local_midnights_keep_the_steps_of_the_utc_grid_within_twelve_hours(zone, freq):
    """Watermarks are grid steps: a model retrained after the upgrade carries on where the old one stopped."""
    g = Grid(freq, zone)
    days = g.step_ns // (86_400 * 10**9)
    times = g.ts(np.arange(19000 // days, 20500 // days))  # 2022-2026, local midnights
    assert (g.index(times) == Grid(freq).index(times)).all()
    # and the calendar features see the same local date at hour 0 as they did on the UTC grid
    steps = g.index(times)
    assert (g.wall_ns(steps) == Grid(freq).ns(steps)).all()


def test_an_unknown_zone_for_daily_steps_is_refused():
    with pytest.raises(DataError, match="Mars/Olympus"):
        Grid("1D", "Mars/Olympus")


@pytest.mark.parametrize("grid", [Grid("1h"), Grid("5min"), Grid("1D"), Grid("1D", "Europe/Berlin"),
                                  Grid("1D", "Pacific/Auckland"), Grid("7D", "America/New_York")])
def test_last_instant_is_the_end_of_the_step(grid):
    steps = grid.index(pd.DatetimeIndex(["2024-03-09 12:00", "2024-03-31 00:00", "2024-09-28 23:00"], tz="UTC"))
    last = grid.last_instant(steps)
    assert (grid.index(last) == steps).all()
    assert (grid.index(last + pd.Timedelta(1, unit="ns")) == steps + 1).all()


@pytest.mark.parametrize("kind", ["text", "aware", "naive", "datetime"])
def test_times_nanoseconds_cannot_hold_are_bad_timestamps_and_the_rest_go_on(kind):
    """'9999-12-31' (an "end of time" in many exports) raised OutOfBoundsDatetime, failing every series."""
    stamps = ["2024-01-01 00:00", "9999-12-31 00:00", "0001-01-01 00:00", "2024-01-01 01:00"]
    if kind == "text":
        ts = pd.Series(stamps, dtype=object)
    elif kind == "datetime":
        ts = pd.Series([dt.datetime.fromisoformat(s) for s in stamps], dtype=object)
    else:
        ts = pd.Series(pd.to_datetime(stamps, format="ISO8601").as_unit("s"))
        ts = ts.dt.tz_localize("Europe/Berlin") if kind == "aware" else ts
    f, r = validate(_raw(["a", "b", "b", "a"], ts, [1.0, 2.0, 3.0, 4.0]), grid=G, timezone="Europe/Berlin")
    assert f["value"].tolist() == [1.0, 4.0] and str(f["ts"].dtype) == "datetime64[ns, UTC]"
    assert r.counts == {("b", "rejected: bad timestamp"): 2}
    assert infer_freq(_raw(["a", "b", "b", "a"], ts, [1.0, 2.0, 3.0, 4.0])) == "h"


def test_series_ids_too_long_for_a_database_index_are_rejected_and_counted():
    """A 3,000-character id failed a PostgreSQL sink's write of every series (its primary key's btree
    takes about 2,700 bytes): ids over MAX_ID_BYTES in UTF-8 are rejected, the others kept."""
    from forecastd.frames import MAX_ID_BYTES

    ascii_ok, ascii_long = "a" * MAX_ID_BYTES, "b" * 3000
    wide = "\U0001f600" * (MAX_ID_BYTES // 4 + 1)  # 251 characters, 1,004 bytes
    ids = [ascii_ok, ascii_long, wide, "h", ascii_long, "b\x00c"]
    ts = pd.to_datetime(["2024-01-01 00:00"] * 6, utc=True)
    f, r = validate(_raw(ids, ts, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), grid=G)
    assert sorted(f["series_id"]) == sorted([ascii_ok, "h"])
    assert r.counts == {(ascii_long, f"rejected: series_id longer than {MAX_ID_BYTES} bytes"): 2,
                        (wide, f"rejected: series_id longer than {MAX_ID_BYTES} bytes"): 1,
                        ("b\x00c", "rejected: NUL character in series_id"): 1}


def test_series_ids_with_a_nul_are_rejected_and_named(caplog):
    """PostgreSQL text cannot hold NUL: one such id failed the sink's write for every series of the batch."""
    ts = pd.to_datetime(["2024-01-01 00:00", "2024-01-01 01:00", "2024-01-01 00:00"], utc=True)
    f, r = validate(_raw(["a", "b\x00c", "b\x00c"], ts, [1.0, 2.0, 3.0]), grid=G)
    assert f["series_id"].tolist() == ["a"] and f["value"].tolist() == [1.0]
    assert r.counts == {("b\x00c", "rejected: NUL character in series_id"): 2}
    with caplog.at_level("WARNING", logger="forecastd.frames"):
        r.log()
    assert "'b\\x00c': 2 row(s) rejected: NUL character in series_id" in caplog.text


def test_text_times_other_than_iso_8601_are_bad_timestamps_not_guesses():
    """Day-first text was read month first, row by row: '01/03/2024 05:00' became January 3rd, and the
    series was trained on scrambled data with nothing said. Only ISO-8601 text is read."""
    ts = pd.Series(["2024-03-01 05:00", "01/03/2024 05:00", "13/03/2024 05:00", "Mar 1 2024", "2024-03-01T06:00Z"])
    f, r = validate(_raw(["a", "b", "b", "b", "a"], ts, [1.0, 2.0, 3.0, 4.0, 5.0]), grid=G)
    assert f["series_id"].tolist() == ["a", "a"]
    assert f["ts"].tolist() == [pd.Timestamp("2024-03-01 05:00", tz="UTC"), pd.Timestamp("2024-03-01 06:00", tz="UTC")]
    assert r.counts == {("b", "rejected: bad timestamp"): 3}
