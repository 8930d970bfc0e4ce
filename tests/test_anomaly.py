import itertools

import numpy as np
import pytest

from forecastd.anomaly import NOVELTY_MIN_SURPRISE, AnomalyTrack, cooldown, final, likelihood, novel, score, surprise


def _run(values, expected, spread, short=10, long=2000):
    raw = surprise(np.asarray(values, float)[None], np.asarray(expected, float)[None], np.asarray(spread, float)[None])
    return score(raw, AnomalyTrack.fresh(1), short, long)


def test_surprise_is_minus_log10_two_sided_tail():
    s = surprise(np.array([0.0, 1.959964, 10.0, np.nan]), np.zeros(4), np.ones(4))
    assert s[0] == 0.0
    assert abs(s[1] - -np.log10(0.05)) < 1e-4
    assert s[2] > 20  # accurate far into the tail, no overflow to inf
    assert np.isnan(s[3])


def test_the_least_surprised_judge_counts_and_missing_judges_are_skipped():
    v = np.array([[3.0, 3.0, np.nan]])
    judges = np.array([[[0.0, np.nan, 0.0]], [[2.0, np.nan, 0.0]]])  # J = 2 forecasts of each point
    out = surprise(v, judges, np.ones_like(judges))
    np.testing.assert_array_equal(out[0, :1], surprise(np.array([3.0]), np.array([2.0]), np.array([1.0])))
    assert np.isnan(out[0, 1]) and np.isnan(out[0, 2])  # no judge, no value


def test_a_spike_after_calm_is_flagged_and_calm_is_not():
    rng = np.random.default_rng(0)
    n = 600
    v = rng.normal(size=n)
    v[500] = 12.0
    scores, _ = _run(v, np.zeros(n), np.ones(n))
    assert scores[0, 500] >= 0.5
    assert (scores[0, 100:500] < 0.5).all()


def test_noisy_series_does_not_alarm_all_day():
    """Badly calibrated spread (3x too narrow): raw surprise is high everywhere, likelihood stays calm."""
    rng = np.random.default_rng(1)
    n = 2000
    v = rng.normal(scale=3.0, size=n)
    scores, _ = _run(v, np.zeros(n), np.ones(n))
    raw = surprise(v, np.zeros(n), np.ones(n))
    assert (raw[200:] > 4).mean() > 0.05  # a raw tail threshold would fire hundreds of times
    assert (scores[0, 200:] >= 0.5).mean() < 0.01


def test_missing_points_leave_the_track_alone_and_score_nan():
    v = np.array([0.1, np.nan, 0.2])
    s, t = _run(v, np.zeros(3), np.ones(3))
    assert np.isnan(s[0, 1]) and not np.isnan(s[0, 0])
    assert t.count[0] == 2


@pytest.mark.parametrize("empirical_tail", [False, True])
def test_scoring_in_blocks_equals_scoring_at_once(empirical_tail):
    rng = np.random.default_rng(2)
    v = rng.normal(size=(3, 300))
    v[:, ::37] *= 6.0  # some excursions, so the empirical tail has counts to carry between blocks
    raw = surprise(v, np.zeros_like(v), np.ones_like(v))
    a, ta = likelihood(raw, AnomalyTrack.fresh(3), 10, 100, empirical_tail)
    b1, t1 = likelihood(raw[:, :120], AnomalyTrack.fresh(3), 10, 100, empirical_tail)
    b2, t2 = likelihood(raw[:, 120:], t1, 10, 100, empirical_tail)
    np.testing.assert_allclose(np.concatenate([b1, b2], 1), a)
    np.testing.assert_allclose(t2.var, ta.var)
    np.testing.assert_allclose(t2.exceed, ta.exceed)
    assert (ta.exceed[:, 0] > 0).all()


def _drift(n=3000, start=2000, z=1.8, seed=3):
    """Noise, then from `start` on every point |z| sigma out: each one mildly unusual (one in 14), none
    rare, as when a daily pattern stops and the series sits where it should not."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=n)
    v[start:] = z * np.sign(rng.normal(size=n - start))
    return surprise(v[None], np.zeros((1, n)), np.ones((1, n)))


def test_the_slow_channel_flags_a_run_of_mildly_unusual_points_the_fast_one_cannot():
    raw = _drift()
    kw = dict(raw_cap=2.0, gate=True, scale="soft", empirical_tail=True)
    fast, _ = score(raw, AnomalyTrack.fresh(1), 10, 2000, **kw)
    both, track = score(raw, AnomalyTrack.fresh(1), 10, 2000, slow_window=100, slow_cap=1.0, **kw)
    assert fast[0, 2000:].max() < 0.2  # gated by each point's own rarity: one in 14 is no alarm
    # Within a slow window of the change the slow channel stands above anything plain noise scored
    # before it (0.33 here, the fast channel's), and it never lowers a score.
    assert both[0, 2000:2100].max() > 0.45
    assert both[0, 100:2000].max() < 0.35
    assert (both >= fast).all()
    assert track.count[0] == 3000 and track.slow_short[0] > 0.5


def test_the_slow_channel_scores_in_blocks_as_at_once():
    raw = np.concatenate([_drift(seed=s) for s in (4, 5)])  # two series
    kw = dict(raw_cap=2.0, gate=True, scale="soft", empirical_tail=True, slow_window=100, slow_cap=1.0)
    a, ta = score(raw, AnomalyTrack.fresh(2), 10, 2000, **kw)
    b1, t1 = score(raw[:, :1500], AnomalyTrack.fresh(2), 10, 2000, **kw)
    b2, t2 = score(raw[:, 1500:], t1, 10, 2000, **kw)
    np.testing.assert_allclose(np.concatenate([b1, b2], 1), a)
    for name in ("slow_short", "slow_mean", "slow_var", "slow_count", "slow_exceed", "count"):
        np.testing.assert_allclose(getattr(t2, name), getattr(ta, name))


def _bursts(n=3000, every=300, length=6, size=5.0, seed=7):
    """Noise with a burst of `length` points `size` sigma out every `every` points, from point 600."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=n)
    starts = np.arange(600, n - length, every)
    for s in starts:
        v[s:s + length] = size + rng.normal(size=length)
    raw = surprise(v[None], np.zeros((1, n)), np.ones((1, n)))
    return raw, starts


def test_empirical_tail_stops_routine_bursts_alarming_but_not_the_first():
    raw, starts = _bursts()
    kw = dict(raw_cap=2.0, scale="soft")
    gauss, _ = score(raw, AnomalyTrack.fresh(1), 10, 2000, **kw)
    checked, _ = score(raw, AnomalyTrack.fresh(1), 10, 2000, empirical_tail=True, **kw)
    peak = lambda s, a: s[0, a:a + 10].max()  # noqa: E731
    first, later = peak(checked, starts[0]), max(peak(checked, a) for a in starts[1:])
    # The Gaussian calls every burst a one-in-100,000 event, the tenth as the first.
    assert min(peak(gauss, a) for a in starts) > 0.45
    # The counts learn that bursts are routine: from the second on they score far below the first,
    # which nothing like it preceded, and far below the Gaussian's verdict.
    assert first > 0.4 and later < 0.3
    # Per series: in one batch, a series that never burst before keeps the Gaussian's verdict.
    quiet = raw.copy()
    quiet[0, :starts[-1]] = np.minimum(quiet[0, :starts[-1]], 1.0)
    both, _ = score(np.vstack([raw, quiet]), AnomalyTrack.fresh(2), 10, 2000, empirical_tail=True, **kw)
    assert peak(both[1:], starts[-1]) > 0.45 and peak(both[:1], starts[-1]) < 0.3


def test_final_maps_rarity_to_unit_interval_and_needs_both_rare():
    np.testing.assert_allclose(final(np.array([0.0, -5.0, -10.0, -50.0]), np.full(4, 99.0)), [0.0, 0.5, 1.0, 1.0])
    # A calm point right after a spike: the recent average is still rare, the point is not.
    assert final(np.array([-30.0]), np.array([0.2]))[0] < 0.05


def test_only_the_spike_is_flagged_not_its_calm_neighbours():
    rng = np.random.default_rng(3)
    v = rng.normal(size=800)
    v[700] = 15.0
    s, _ = _run(v, np.zeros(800), np.ones(800))
    assert np.flatnonzero(s[0, 100:] >= 0.5).tolist() == [600]


def test_a_new_extreme_scores_one_and_blocks_equal_at_once():
    rng = np.random.default_rng(4)
    v = rng.uniform(-1.0, 1.0, size=(1, 400))
    v[0, 300] = 1.5  # beyond the range seen so far, far beyond 5 % of it
    raw = surprise(v, np.zeros_like(v), np.full_like(v, 0.3))  # the extreme is a 5-sigma surprise
    kw = dict(values=v, raw_cap=3.0, gate=False, scale="soft", novelty_tolerance=0.05)
    s, t = score(raw, AnomalyTrack.fresh(1), 10, 2000, **kw)
    assert s[0, 300] == 1.0
    # A forecaster that saw the new extreme coming (drift, trend) does not make it news.
    calm = surprise(v, np.zeros_like(v), np.full_like(v, 100.0))
    s_calm, _ = score(calm, AnomalyTrack.fresh(1), 10, 2000, **kw)
    assert s_calm[0, 300] < 0.5 and (s_calm[0, 100:] < 0.5).all()
    a, ta = score(raw[:, :150], AnomalyTrack.fresh(1), 10, 2000, **{**kw, "values": v[:, :150]})
    b, tb = score(raw[:, 150:], ta, 10, 2000, **{**kw, "values": v[:, 150:]})
    np.testing.assert_allclose(np.concatenate([a, b], 1), s)
    np.testing.assert_allclose([tb.lo[0], tb.hi[0]], [t.lo[0], t.hi[0]])


def test_soft_scale_keeps_ranking_past_one_in_ten_billion():
    f = final(np.array([0.0, -5.0, -10.0, -50.0]), np.full(4, 99.0), scale="soft")
    np.testing.assert_allclose(f[:2], [0.0, 0.5])
    assert f[1] < f[2] < f[3] < 1.0


def test_cooldown_reports_an_incident_once_unless_it_gets_worse():
    s = np.array([[0.0, 0.6, 0.6, 0.5, 0.7, 0.2, np.nan, 0.65, 0.0, 0.0, 0.3]])
    out, t = cooldown(s, AnomalyTrack.fresh(1), 4)
    # 0.6 opens the incident, its repeats are 0, 0.7 is worse; four points after 0.7 the incident is over
    # (the missing point does not count), so 0.3 is reported again.
    np.testing.assert_array_equal(np.nan_to_num(out, nan=-1.0), [[0.0, 0.6, 0.0, 0.0, 0.7, 0.0, -1.0, 0.0, 0.0, 0.0, 0.3]])
    assert t.peak[0] == 0.3 and t.since[0] == 0
    a, ta = cooldown(s[:, :5], AnomalyTrack.fresh(1), 4)
    b, tb = cooldown(s[:, 5:], ta, 4)
    np.testing.assert_array_equal(np.concatenate([a, b], 1), out)
    assert (tb.peak[0], tb.since[0]) == (t.peak[0], t.since[0])


def test_a_run_of_new_extremes_is_one_flag_with_cooldown():
    rng = np.random.default_rng(5)
    v = rng.uniform(-1.0, 1.0, size=(1, 400))
    v[0, 300:310] = 1.5 + 0.5 * np.arange(10)  # a climb to new highs, point after point
    raw = surprise(v, np.zeros_like(v), np.full_like(v, 0.3))
    kw = dict(values=v, raw_cap=3.0, gate=False, scale="soft", novelty_tolerance=0.05)
    every, _ = score(raw, AnomalyTrack.fresh(1), 10, 2000, **kw)
    once, _ = score(raw, AnomalyTrack.fresh(1), 10, 2000, cooldown_steps=200, **kw)
    assert (every[0, 300:310] >= 0.5).sum() >= 5
    assert np.flatnonzero(once[0] >= 0.5).tolist() == [300]


def test_slow_channel_settings_are_checked_with_the_fix_named():
    from forecastd.config import config_from_dict
    from forecastd.errors import ConfigError

    base = {"source": {"kind": "parquet", "path": "data/*.parquet"}, "sink": {"kind": "parquet", "path": "out"}}
    # A user who shortens long_window below the slow channel's window is told both ways out.
    with pytest.raises(ConfigError, match=r"slow_window = 100 must be 0 \(off\) or between short_window = 10 and long_window = 50"):
        config_from_dict({**base, "anomaly": {"long_window": 50}})
    assert config_from_dict({**base, "anomaly": {"long_window": 50, "slow_window": 0}}).anomaly.slow_window == 0
    with pytest.raises(ConfigError, match="slow_cap"):
        config_from_dict({**base, "anomaly": {"slow_cap": 0.0}})


def _steps_one_by_one(raw, values, track, short, long, *, use_likelihood, raw_cap, gate, scale, novelty_tolerance,
                      cooldown_steps, empirical_tail, slow_window, slow_cap):
    """`score` as its docstring spells it out, one step function after another."""
    fed = np.minimum(raw, raw_cap) if raw_cap > 0 else raw
    slowed = track
    if slow_window:
        slow_tail, slowed = likelihood(np.minimum(raw, slow_cap), track, slow_window, long, empirical_tail, slow=True)
    log_tail, new = likelihood(fed, slowed, short, long, empirical_tail)
    out = final(-raw if not use_likelihood else log_tail, raw, gate=gate, scale=scale)
    if slow_window:
        out = np.fmax(out, final(slow_tail, raw, gate=False, scale=scale))
    if novelty_tolerance is not None:
        flags, nt = novel(values, track, novelty_tolerance)
        new = new.with_(lo=nt.lo, hi=nt.hi)
        with np.errstate(invalid="ignore"):
            out = np.where(flags & (raw >= NOVELTY_MIN_SURPRISE), 1.0, out)
    if cooldown_steps:
        out, new = cooldown(out, new, cooldown_steps)
    return out, new


def test_score_in_two_passes_is_the_steps_one_after_another():
    """`score` runs the steps per point in two compiled passes around one vectorised tail; each switch
    of the ablation gives what the step functions give run one after another, to the bit."""
    rng = np.random.default_rng(8)
    v = np.cumsum(rng.normal(size=(4, 700)), axis=1)
    v[:, ::61] += 12.0
    v[rng.random(v.shape) < 0.03] = np.nan  # missing values
    expected = np.concatenate([v[:, :1], v[:, :-1]], axis=1)
    expected[:, 9] = np.nan  # a point no forecast judged: value seen, no surprise
    raw = surprise(v, expected, np.full_like(v, 1.5))
    for lik, cap, gate, scale, tol, cool, emp, slow in itertools.product(
            (True, False), (0.0, 2.0), (True, False), ("soft", "linear"), (None, 0.05), (0, 100), (True, False), (0, 100)):
        kw = dict(use_likelihood=lik, raw_cap=cap, gate=gate, scale=scale, novelty_tolerance=tol, cooldown_steps=cool,
                  empirical_tail=emp, slow_window=slow, slow_cap=1.0)
        out, track = score(raw, AnomalyTrack.fresh(4), 10, 300, values=v, **kw)
        ref, ref_track = _steps_one_by_one(raw, v, AnomalyTrack.fresh(4), 10, 300, **kw)
        np.testing.assert_array_equal(out, ref, err_msg=str(kw))
        for name, a in ref_track.fields().items():
            np.testing.assert_array_equal(getattr(track, name), a, err_msg=f"{name} {kw}")


def test_the_compiled_normal_tail_matches_torchs_log_ndtr_far_into_both_tails():
    """The tail is computed point by point in compiled code now; torch's log_ndtr is the reference."""
    import math

    import torch

    from forecastd.anomaly import _log10_normal_tail

    z = np.concatenate([np.linspace(-50, 50, 20001), np.geomspace(19.0, 1e10, 2000), [0.0, 20.0, 38.0, 40.0]])
    got = _log10_normal_tail(z)
    ref = torch.special.log_ndtr(torch.from_numpy(-z)).numpy() / math.log(10.0)
    np.testing.assert_allclose(got, ref, rtol=2e-14, atol=1e-16)
    assert (np.diff(got[:20001]) <= 0).all()  # never rises with z, across the switch to the series at 20
