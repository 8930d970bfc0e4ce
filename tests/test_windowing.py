import numpy as np
import pandas as pd
import pytest

from forecastd.frames import Grid
from forecastd.windowing import (
    Track, calendar, encode, n_features, robust_scale, series_steps, split_at_gaps, targets, training_rows,
)

ALPHAS = (0.5, 0.1, 0.02)


def _encode(values, scale=1.0, track=None):
    values = np.asarray(values, dtype=float)[None]
    ts = (np.arange(values.shape[1]) * 3_600_000_000_000)[None]
    return encode(values, ts, track or Track.fresh(1, len(ALPHAS)), np.array([scale]), ALPHAS, 6.0)


def test_features_are_level_invariant():
    rng = np.random.default_rng(0)
    v = np.cumsum(rng.normal(size=300))
    x1, o1, _ = _encode(v)
    x2, o2, _ = _encode(v + 1000.0)
    np.testing.assert_allclose(x1, x2, atol=1e-4)
    np.testing.assert_allclose(o2 - o1, 1000.0)


def test_missing_steps_hold_the_last_value_and_set_the_flag():
    x, origin, track = _encode([1.0, np.nan, np.nan, 4.0])
    A = len(ALPHAS)
    assert list(x[0, :, 1 + A]) == [0.0, 1.0, 1.0, 0.0]
    assert list(origin[0]) == [1.0, 1.0, 1.0, 4.0]
    assert x[0, 1, 0] == 0.0 and x[0, 3, 0] == pytest.approx(3.0)
    assert track.last[0] == 4.0


def test_spikes_are_clipped_so_levels_barely_move():
    x, _, track = _encode([0.0] * 50 + [1e6] + [0.0] * 5)
    assert np.abs(x).max() <= 6.0 + 1e-6
    # A million-unit spike moves the slowest level by at most alpha * clip * scale.
    assert abs(track.levels[0, -1]) <= 0.02 * 6.0 + 1e-9


def test_encoding_in_two_blocks_equals_one_block():
    v = np.sin(np.arange(100) / 3.0)
    x, o, t = _encode(v)
    xa, oa, ta = _encode(v[:37])
    xb, ob, tb = encode(v[None, 37:], (np.arange(37, 100) * 3_600_000_000_000)[None], ta, np.array([1.0]), ALPHAS, 6.0)
    np.testing.assert_allclose(np.concatenate([xa, xb], 1), x)
    np.testing.assert_allclose(tb.levels, t.levels)


def test_a_one_step_block_of_many_series_encodes_as_a_longer_blocks_first_step():
    """A tick (T = 1) takes a compiled path of its own: each series' features, origin and track after the
    step as the general path gives them, whether the series share their time or not, and the caller's
    track untouched. A missing value, a series not started yet and a spike are among the rows."""
    hour = 3_600_000_000_000
    rng = np.random.default_rng(3)
    values = 50 + np.cumsum(rng.normal(size=(6, 2)), axis=1)
    values[1, 0], values[3, 0] = np.nan, 1e6
    track = Track(50 + rng.normal(size=6), 50 + rng.normal(size=(6, len(ALPHAS))))
    track.last[4], track.levels[4] = np.nan, np.nan  # never observed before this step
    scale = rng.uniform(0.5, 2.0, size=6)
    start = 1_700_000_000_000_000_000 + hour * np.array([0, 0, 0, 5, 5, 29])  # shared, then apart
    ts = start[:, None] + hour * np.arange(2)
    before = (track.last.copy(), track.levels.copy())
    x1, o1, t1 = encode(values[:, :1], ts[:, :1], track, scale, ALPHAS, 6.0)
    x2, o2, _ = encode(values, ts, track, scale, ALPHAS, 6.0)
    np.testing.assert_array_equal(x1[:, :, : 2 + len(ALPHAS)], x2[:, :1, : 2 + len(ALPHAS)])
    np.testing.assert_allclose(x1[:, :, 2 + len(ALPHAS) :], x2[:, :1, 2 + len(ALPHAS) :], rtol=0, atol=1.2e-7)
    np.testing.assert_array_equal(o1, o2[:, :1])
    assert not np.array_equal(x1[0, 0, -6:], x1[3, 0, -6:])  # each row's own time
    x3, o3, _ = encode(values[:, 1:], ts[:, 1:], t1, scale, ALPHAS, 6.0)  # the track after the tick carries on
    np.testing.assert_array_equal(x3[:, :, : 2 + len(ALPHAS)], x2[:, 1:, : 2 + len(ALPHAS)])
    np.testing.assert_array_equal(o3, o2[:, 1:])
    np.testing.assert_array_equal(track.last, before[0])
    np.testing.assert_array_equal(track.levels, before[1])
    # One time for every series (a [1, 1] block of times), as the general path's calendar takes it.
    shared = encode(values[:3, :1], ts[:1, :1], Track(track.last[:3], track.levels[:3]), scale[:3], ALPHAS, 6.0)[0]
    np.testing.assert_array_equal(shared, x1[:3])


def test_calendar_is_periodic_per_day_and_week():
    day = 86_400_000_000_000
    c = calendar(np.array([0, day, 7 * day]))
    np.testing.assert_allclose(c[0, [0, 3]], c[1, [0, 3]], atol=1e-6)  # hour of day repeats daily
    np.testing.assert_allclose(c[0, [1, 4]], c[2, [1, 4]], atol=1e-6)  # day of week repeats weekly
    assert c.shape == (3, 6)
    assert n_features(3) == 11


def test_calendar_of_a_block_is_each_rows_own_whether_or_not_rows_share_their_times():
    hour = 3_600_000_000_000
    row = 1_700_000_000_000_000_000 + hour * np.arange(5)
    shared = np.tile(row, (4, 1))  # series on one grid, advancing together
    apart = shared + hour * np.arange(4)[:, None]  # each series at its own times
    for ts in (shared, apart):
        out = np.zeros((4, 5, 8), dtype=np.float32)
        calendar(ts, out=out[:, :, 2:])  # a view, as encode passes the feature block's columns
        for i in range(4):
            np.testing.assert_array_equal(out[i, :, 2:], calendar(ts[i]))
        assert (out[:, :, :2] == 0).all()
    assert not np.array_equal(calendar(apart)[0], calendar(apart)[1])


def test_calendar_of_one_time_is_the_vectorised_terms():
    """A single time (every tick) takes a scalar path: the same terms to float32 round-off, before 1970 too."""
    ts = np.random.default_rng(0).integers(-2 * 10**18, 3 * 10**18, size=2000)
    one_by_one = np.stack([calendar(ts[i : i + 1])[0] for i in range(ts.size)])
    np.testing.assert_allclose(one_by_one, calendar(ts), rtol=0, atol=1.2e-7)
    assert calendar(np.array([[ts[0]]])).shape == (1, 1, 6)


def test_robust_scale_handles_constant_spiky_and_tiny_series():
    assert robust_scale(np.full(50, 5.0)) == pytest.approx(5e-3)
    assert robust_scale(np.zeros(10)) == 1.0
    assert robust_scale(np.array([3.0])) == pytest.approx(3e-3)
    assert robust_scale(np.array([])) == 1.0
    rw = np.cumsum(np.random.default_rng(1).normal(size=5000))
    spiky = rw.copy()
    spiky[::500] += 1000
    assert robust_scale(spiky) == pytest.approx(robust_scale(rw), rel=0.1)


def test_robust_scale_is_finite_and_positive_for_any_finite_values():
    """Differences of values near ±1.8e308 overflowed: an infinite unit made every feature inf/inf."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow on the way either
        for values in (np.resize([1.79e308, -1.79e308], 50), np.array([1.79e308, -1.79e308, 1e308] * 20),
                       np.full(20, 1.7e308), np.full(5, 5e-324), np.array([5e-324])):
            s = robust_scale(values)
            assert np.isfinite(s) and s > 0, values[:3]
            x, _, _ = _encode(values, scale=s)
            assert np.isfinite(x).all()
    rw = np.cumsum(np.random.default_rng(2).normal(size=500))
    assert robust_scale(rw * 2.0**1000) == robust_scale(rw) * 2.0**1000  # measured smaller, the same unit exactly


def test_targets_are_changes_from_origin_and_respect_the_limit():
    v = np.arange(10, dtype=float)
    y, m = targets(v, v, 1.0, 3, limit=8)
    assert y[0].tolist() == [1.0, 2.0, 3.0]
    assert m[5].tolist() == [True, True, False]  # step 8 is beyond the limit
    assert not m[7].any()
    v[2] = np.nan
    y, m = targets(v, np.nan_to_num(v), 1.0, 3)
    assert m[0].tolist() == [True, False, True]


def test_split_at_gaps_fills_short_gaps_and_cuts_long_ones():
    steps = np.array([0, 1, 3, 10, 11])
    segs = split_at_gaps(steps, np.arange(5.0), max_gap=2)
    assert [s for s, _ in segs] == [0, 10]
    np.testing.assert_array_equal(segs[0][1], [0.0, 1.0, np.nan, 2.0])


def test_training_rows_mask_burn_in_and_cover_every_target():
    T, S = 100, 32
    x = np.ones((T, 4), np.float32)
    y = np.ones((T, 2), np.float32)
    m = np.ones((T, 2), bool)
    rx, ry, rm, rw = training_rows([(x, y, m)], S, burn_in=4, offset=5)
    assert rx.shape[1] == S
    assert not rm[:, :4].any()
    # Padded to 105 steps -> 4 rows; real steps unmasked: 27 + 28 + 28 + 5 (the last row holds 9).
    assert rx.shape[0] == 4
    assert rm.sum() == (27 + 28 + 28 + 5) * 2


def test_series_steps_groups_and_orders():
    g = Grid("1h")
    f = pd.DataFrame({
        "series_id": ["b", "a", "a"],
        "ts": pd.to_datetime(["2024-01-01 02:00", "2024-01-01 01:00", "2024-01-01 00:00"], utc=True),
        "value": [3.0, 2.0, 1.0],
    })
    s = series_steps(f, g)
    assert list(s) == ["a", "b"]
    assert s["a"][1].tolist() == [1.0, 2.0]
    assert s["a"][0][1] - s["a"][0][0] == 1


def test_training_rows_carry_the_changes_before_each_row():
    T, S, W = 50, 16, 5
    x = np.zeros((T, 3), np.float32)
    x[:, 0] = np.arange(1, T + 1)  # feature 0: the scaled change
    y = np.ones((T, 2), np.float32)
    m = np.ones((T, 2), bool)
    rx, _, _, rw = training_rows([(x, y, m)], S, burn_in=2, offset=3, lookback=W)
    assert rw.shape == (rx.shape[0], W)
    # The series is front-padded by 3: row 0 starts before the series (a flat, all-zero past), row 1
    # starts at the series' step 13 and carries the changes of steps 8..12.
    np.testing.assert_array_equal(rw[0], np.zeros(W))
    np.testing.assert_array_equal(rw[1], [9, 10, 11, 12, 13])
    for r in range(1, rx.shape[0]):
        np.testing.assert_array_equal(rw[r], rx[r - 1, -W:, 0])


def test_auto_lookback_is_a_week_of_steps_within_bounds():
    from forecastd.frames import Grid
    from forecastd.windowing import resolve_lookback

    assert resolve_lookback("auto", Grid("1h").step_ns) == 168
    assert resolve_lookback("auto", Grid("30min").step_ns) == 336
    assert resolve_lookback("auto", Grid("5min").step_ns) == 336  # capped: the state stays small
    assert resolve_lookback("auto", Grid("1D").step_ns) == 24
    assert resolve_lookback("auto", Grid("MS").step_ns) == 24
    assert resolve_lookback(0, Grid("1h").step_ns) == 0
    assert resolve_lookback(50, Grid("5min").step_ns) == 50
    # A short history gets a shorter window, or none: its weights would fit noise.
    assert resolve_lookback("auto", Grid("1h").step_ns, history=8640) == 168
    assert resolve_lookback("auto", Grid("1h").step_ns, history=2000) == 40
    assert resolve_lookback("auto", Grid("5min").step_ns, history=604) == 0
    # ... and a window that cannot span a day (or the 336-step cap) is none at all.
    assert resolve_lookback("auto", Grid("5min").step_ns, history=12000) == 0  # 240 steps: 20 hours
    assert resolve_lookback("auto", Grid("5min").step_ns, history=14400) == 288
    assert resolve_lookback("auto", Grid("30min").step_ns, history=2000) == 0  # 40 steps: 20 hours
    assert resolve_lookback("auto", Grid("30min").step_ns, history=3000) == 60
    assert resolve_lookback("auto", Grid("1min").step_ns, history=16000) == 0
    assert resolve_lookback("auto", Grid("1min").step_ns, history=16800) == 336
    assert resolve_lookback("auto", Grid("1D").step_ns, history=1200) == 24
    assert resolve_lookback(96, Grid("5min").step_ns, history=604) == 96  # a stated number is kept


@pytest.mark.parametrize("value, ok", [("auto", True), (0, True), (96, True), ("week", False), (1.5, False),
                                       (-1, False)])
def test_lookback_config_takes_auto_or_steps(value, ok):
    from forecastd.config import config_from_dict
    from forecastd.errors import ConfigError

    raw = {"source": {"kind": "parquet", "path": "x.parquet"}, "sink": {"kind": "parquet", "path": "out"},
           "model": {"lookback": value}}
    if ok:
        assert config_from_dict(raw).model.lookback == value
    else:
        with pytest.raises(ConfigError, match=r"\[model\] lookback"):
            config_from_dict(raw)
