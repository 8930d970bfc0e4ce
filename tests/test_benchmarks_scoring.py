"""The benchmark scorers: NAB v1.1 scoring, NAB's windowed Gaussian, and the ETT protocol.

Cases are small enough to work out by hand; several are NAB's own tests (nab/tests) re-expressed, with NAB's
numbers. The full-data checks against the README anchors are marked slow (they need ../shared/data).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

# The benchmarks package lives beside forecastd at the repository root, which pytest does not put on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import ett_protocol as ett  # noqa: E402
from benchmarks import nab_scoring as nab  # noqa: E402
from benchmarks.nab_baselines import py2_results_precision, score_baselines, windowed_gaussian  # noqa: E402

ALL_ONES = nab.CostMatrix(tp=1.0, fp=1.0, fn=1.0)  # the cost matrix of NAB's own scorer tests
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_file(n: int, detections: list[int], windows: list[tuple[int, int]]) -> tuple[pd.DataFrame, list]:
    """A results frame of n 5-minute rows scoring 1 at `detections`, and windows given by row indices."""
    ts = pd.date_range("2020-01-01", periods=n, freq="5min")
    score = np.zeros(n)
    score[detections] = 1.0
    frame = pd.DataFrame({"timestamp": ts, "value": np.arange(n, dtype=float), "anomaly_score": score})
    return frame, [(ts[a], ts[b]) for a, b in windows]


def score_one(n, detections, windows, profile="standard", threshold=0.5, probation=0.0) -> nab.CorpusScore:
    frame, limits = make_file(n, detections, windows)
    return nab.score_corpus({"cat/f.csv": frame}, {"cat/f.csv": limits}, profile, threshold, probation)


# --- NAB scoring: the pieces -------------------------------------------------------------------------------


def test_scaled_sigmoid_matches_nab_docstring_values():
    got = nab.scaled_sigmoid(np.array([-1.0, -0.5, 0.0, 1.0, 3.0, 3.5]))
    np.testing.assert_allclose(got[:4], [0.98661, 0.84828, 0.0, -0.98661], atol=5e-6)
    assert got[4] > -1.0 and got[5] == -1.0  # NAB: exactly −1 only beyond three window widths


@pytest.mark.parametrize(
    ("rows", "fraction", "expected"),
    # NAB's sweeper_test table, then two files of our data set (4032 rows, and the 750-row cap).
    [(100, 0.0, 0), (100, 1.0, 100), (100, 0.1, 10), (100, 0.15, 15), (5000, 0.1, 500), (6000, 0.1, 500),
     (4032, 0.15, 604), (22695, 0.15, 750)],
)
def test_probation_length(rows, fraction, expected):
    assert nab.probation_length(rows, fraction) == expected


def test_sweep_reproduces_nab_calc_score_by_threshold_example():
    # nab/tests/integration/sweeper_test.py::testCalcScoreByThresholdReturnsExpectedScores, probationary rows
    # already removed: (anomaly score, sweep score, window) with fnWeight 5.
    score = np.array([0.0, 0.2, 0.3, 0.5, 0.5])
    weight = np.array([-3.0, 20.0, 10.0, 5.0, -3.0])
    window = np.array([-1, 0, 0, 1, -1])
    thresholds, totals, tp, fp = nab._sweep(score, weight, window, fn_weight=5.0)
    np.testing.assert_allclose(thresholds, [1.1, 0.5, 0.3, 0.2, 0.0])
    np.testing.assert_allclose(totals, [-10.0, 5 - 3 - 5, 5 - 3 + 10, 5 - 3 + 20, 5 - 3 + 20 - 3])
    np.testing.assert_array_equal(tp, [0, 1, 2, 3, 3])
    np.testing.assert_array_equal(fp, [0, 1, 1, 1, 2])


# --- NAB scoring: whole files, worked by hand -----------------------------------------------------------------


def test_nab_scorer_test_all_metrics_example():
    # nab/tests/integration/scorer_test.py::testScoringAllMetrics: 100 rows, windows of 5 at rows 30 and 65,
    # detections at 30 (TP), 31 (second TP, ignored) and 37 (FP 3 rows after a width-5 window). NAB: −0.9540.
    result = score_one(100, [30, 31, 37], [(30, 34), (65, 69)], ALL_ONES)
    assert result.raw == pytest.approx(-0.9540, abs=5e-5)
    assert (result.tn, result.tp, result.fp, result.fn) == (89, 2, 1, 8)
    assert result.windows_detected == 1


def test_perfect_detector_scores_100_and_null_scores_0():
    first, w1 = make_file(1000, [400], [(400, 449)])
    second, w2 = make_file(1000, [600, 800], [(600, 619), (800, 819)])
    results = {"a/one.csv": first, "b/two.csv": second}
    windows = {"a/one.csv": w1, "b/two.csv": w2}
    for profile in nab.PROFILES:
        perfect = nab.score_corpus(results, windows, profile)
        assert perfect.score == pytest.approx(100.0)
        assert perfect.perfect == pytest.approx(3 * nab.PROFILES[profile].tp)
        assert perfect.null == pytest.approx(-3 * nab.PROFILES[profile].fn)
        silent = {k: f.assign(anomaly_score=0.0) for k, f in results.items()}
        null = nab.score_corpus(silent, windows, profile)
        assert null.score == pytest.approx(0.0)
        assert null.threshold == 1.1  # NAB's "detect nothing" threshold
        assert (null.tp, null.fp) == (0, 0)


def test_earlier_detection_in_window_scores_more():
    at_start = score_one(200, [50], [(50, 99)], ALL_ONES)
    at_end = score_one(200, [99], [(50, 99)], ALL_ONES)
    assert at_start.raw == pytest.approx(1.0)  # the first row of a window earns the full TP weight
    assert 0.0 < at_end.raw < at_start.raw  # the last row still earns a little: position −1/width
    assert at_end.raw == pytest.approx(float(nab.scaled_sigmoid(-1 / 50)) / float(nab.scaled_sigmoid(-1.0)))


def test_only_first_detection_in_window_counts():
    one = score_one(200, [50], [(50, 99)], ALL_ONES)
    two = score_one(200, [50, 99], [(50, 99)], ALL_ONES)
    assert two.raw == one.raw
    assert (one.tp, two.tp) == (1, 2)  # NAB's TP count is rows, the score is per window


def test_tp_at_right_edge_and_fp_just_after_nearly_cancel():
    # nab/tests/integration/true_positive_test.py::testTruePositiveAtRightEdgeOfWindow
    window = [(450, 549)]
    edge_tp = score_one(1000, [549], window, ALL_ONES)
    fp_after = score_one(1000, [550], window, ALL_ONES)
    assert edge_tp.raw + fp_after.raw + 1 == pytest.approx(0.0, abs=1e-3)


def test_false_positive_weights_follow_nab_signs():
    fp = nab.PROFILES["standard"].fp
    # No preceding window: NAB charges −1 × fp.
    assert score_one(200, [120], [], threshold=0.5).raw == pytest.approx(-fp)
    assert score_one(200, [20], [(100, 109)], threshold=0.5).raw == pytest.approx(-1.0 - fp)
    # After a window of 10 rows: cheap just after, dearer further on, −fp beyond three widths (27 rows).
    just_after = score_one(300, [110], [(100, 109)]).raw
    one_width = score_one(300, [118], [(100, 109)]).raw  # 9 rows = one (width − 1) after the last row
    far = score_one(300, [200], [(100, 109)]).raw
    assert just_after > one_width > far
    assert just_after == pytest.approx(-1.0 + fp * float(nab.scaled_sigmoid(1 / 9)))
    assert one_width == pytest.approx(-1.0 - 0.98661 * fp, abs=1e-5)
    assert far == pytest.approx(-1.0 - fp)


def test_detection_in_probationary_period_is_ignored():
    # 1000 rows: the first 150 are probationary.
    quiet = score_one(1000, [], [(500, 549)], probation=0.15)
    early = score_one(1000, [10, 149], [(500, 549)], probation=0.15)
    late = score_one(1000, [150], [(500, 549)], probation=0.15)
    assert early.raw == quiet.raw == -1.0
    assert late.raw == pytest.approx(-1.0 - 0.11)
    assert early.tp + early.fp + early.fn + early.tn == 850


def test_profiles_weigh_misses_and_false_alarms():
    assert score_one(200, [], [(100, 109)], "reward_low_FN_rate").raw == -2.0
    assert score_one(200, [], [(100, 109)], "reward_low_FN").raw == -2.0  # the paper's short name
    assert score_one(200, [20], [], "reward_low_FP_rate").raw == pytest.approx(-0.22)
    with pytest.raises(ValueError, match="unknown NAB profile"):
        score_one(200, [], [], "lenient")


def test_threshold_sweep_agrees_with_scoring_each_threshold():
    rng = np.random.default_rng(7)
    results, windows = {}, {}
    for k, (n, limits) in enumerate([(400, [(200, 229)]), (600, [(150, 169), (400, 459)]), (300, [])]):
        frame, w = make_file(n, [], limits)
        # Two decimals give many ties, the case where a threshold's detections must include equal scores.
        results[f"c/f{k}.csv"] = frame.assign(anomaly_score=np.round(rng.uniform(size=n) ** 4, 2))
        windows[f"c/f{k}.csv"] = w
    best = nab.score_corpus(results, windows, "standard")
    candidates = [1.1, *np.unique(np.concatenate([f.anomaly_score for f in results.values()]))]
    by_threshold = {t: nab.score_corpus(results, windows, "standard", threshold=t).raw for t in candidates}
    assert best.raw == pytest.approx(max(by_threshold.values()))
    assert by_threshold[best.threshold] == pytest.approx(best.raw)
    assert sum(best.per_file.values()) == pytest.approx(best.raw)

    rows = nab._corpus_rows(results, windows, nab.PROFILES["standard"], nab.PROBATION_FRACTION)
    thresholds, totals, _, _ = nab._sweep(rows.score, rows.weight, rows.window, 1.0)
    np.testing.assert_allclose(totals, [by_threshold[t] for t in thresholds], atol=1e-9)


def test_window_end_must_be_a_timestamp_of_the_file():
    frame, _ = make_file(100, [], [])
    off_grid = [(pd.Timestamp("2020-01-01 01:02:03"), pd.Timestamp("2020-01-01 02:00:00"))]
    with pytest.raises(ValueError, match="not a timestamp"):
        nab.score_corpus({"c/f.csv": frame}, {"c/f.csv": off_grid})


def test_results_files_round_trip(tmp_path):
    frame, limits = make_file(50, [20], [(20, 29)])
    path = nab.write_results(tmp_path, "gauss", "realTweets/x.csv", frame, windows=limits)
    assert path == tmp_path / "gauss" / "realTweets" / "gauss_x.csv"
    assert pd.read_csv(path).columns.tolist() == ["timestamp", "value", "anomaly_score", "label"]
    back = nab.read_results(tmp_path, "gauss")["realTweets/x.csv"]
    assert back["label"].tolist() == [0] * 20 + [1] * 10 + [0] * 20
    np.testing.assert_array_equal(back["anomaly_score"], frame["anomaly_score"])
    assert (back["timestamp"] == frame["timestamp"]).all()


def test_load_windows_parses_nab_json(tmp_path):
    path = tmp_path / "combined_windows.json"
    path.write_text('{"a/b.csv": [["2014-04-10 07:15:00.000000", "2014-04-11 16:45:00.000000"]], "a/c.csv": []}')
    windows = nab.load_windows(path)
    assert windows == {"a/b.csv": [(pd.Timestamp("2014-04-10 07:15"), pd.Timestamp("2014-04-11 16:45"))], "a/c.csv": []}


# --- NAB's windowed Gaussian ----------------------------------------------------------------------------------


def test_windowed_gaussian_by_hand():
    # Window of 2, sliding by 2: statistics change only when the window does, and values below the mean are
    # mirrored above it. Row 1 meets a flat window (std floored to 1e-6), so it scores 1.
    got = windowed_gaussian(np.array([1.0, 3.0, 2.0, 4.0, 3.0, 2.0]), window_size=2, step_size=2)
    np.testing.assert_allclose(got, [0.0, 1.0, 0.5, 0.977249868, 0.5, 0.841344746], atol=1e-9)


def test_windowed_gaussian_leaves_missing_values_out():
    got = windowed_gaussian(np.array([1.0, 3.0, np.nan, 2.0, 4.0, 3.0, 2.0]), window_size=2, step_size=2)
    np.testing.assert_allclose(got, [0.0, 1.0, 0.0, 0.5, 0.977249868, 0.5, 0.841344746], atol=1e-9)


def test_windowed_gaussian_matches_nab_published_results():
    # First rows of NAB's results/windowedGaussian/realAWSCloudwatch/windowedGaussian_ec2_cpu_utilization_24ae8d.csv
    values = [0.132, 0.134, 0.134, 0.134, 0.134, 0.134, 0.134, 0.134, 0.066, 0.132, 0.134, 0.066]
    nab_scores = ["0.0", "1.0", "0.841344746069", "0.760249938907", "0.718148569175", "0.691462461274",
                  "0.672639576991", "0.658454300845", "1.0", "0.606898964995", "0.638703095904", "0.999210733537"]
    got = py2_results_precision(windowed_gaussian(np.array(values)))
    np.testing.assert_array_equal(got, [float(s) for s in nab_scores])


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "nab").is_dir(), reason="needs ../shared/data/nab")
def test_windowed_gaussian_reproduces_nab_figures_on_subset():
    table = score_baselines(DATA / "nab", random_seeds=1)
    got = [table["windowedGaussian_py2"][p].score for p in nab.PROFILES]
    np.testing.assert_allclose(got, [21.6, 10.3, 26.4], atol=0.05)


# --- ETT protocol ------------------------------------------------------------------------------------------


@pytest.fixture
def ett_csv(tmp_path) -> Path:
    rows = 14500
    frame = pd.DataFrame({"date": pd.date_range("2016-07-01", periods=rows, freq="h").astype(str)})
    for k, column in enumerate(ett.ETT_COLUMNS):
        frame[column] = np.arange(rows, dtype=float) * (k + 1)
    path = tmp_path / "ETTh1.csv"
    frame.to_csv(path, index=False)
    return path


def test_load_ett_borders_and_train_scaling(ett_csv):
    splits = ett.load_ett(ett_csv, ("OT",), lookback=96)
    assert splits.train.shape == (8640, 1)
    assert splits.val.shape == (2880 + 96, 1) and splits.test.shape == (2880 + 96, 1)
    np.testing.assert_allclose(splits.train.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(splits.train.std(axis=0), 1.0)  # population std, as StandardScaler
    unscale = splits.test[:, 0] * splits.std[0] + splits.mean[0]
    np.testing.assert_allclose(unscale[[0, 96, -1]], np.array([11520 - 96, 11520, 14399]) * 7.0)
    both = ett.load_ett(ett_csv, ("HUFL", "OT"), lookback=24)
    assert both.test.shape == (2880 + 24, 2)
    with pytest.raises(ValueError, match="no column"):
        ett.load_ett(ett_csv, ("oil",))


@pytest.mark.parametrize("lookback", [24, 96, 336])
def test_test_windows_cover_every_origin(ett_csv, lookback):
    splits = ett.load_ett(ett_csv, ("OT",), lookback)
    inputs, targets = ett.rolling_windows(splits.test, lookback, horizon=96)
    assert inputs.shape == (2881 - 96, lookback, 1) and targets.shape == (2881 - 96, 96, 1)
    # The first target is row 11520, the last window's last target row 14399: no window dropped.
    np.testing.assert_array_equal(targets[0, 0], splits.test[lookback])
    np.testing.assert_array_equal(targets[-1, -1], splits.test[-1])
    np.testing.assert_array_equal(inputs[1, -1], targets[0, 0])


def test_persistence_on_a_ramp():
    ramp = np.arange(200, dtype=float)
    metrics = ett.evaluate(ramp, lookback=10, horizon=4, forecast=lambda x: ett.persistence(x, 4))
    h = np.arange(1, 5)
    assert metrics.mse == pytest.approx(np.mean(h**2)) and metrics.mae == pytest.approx(np.mean(h))
    assert metrics.windows == 200 - 10 - 4 + 1


def test_seasonal_naive_uses_the_same_hour_of_the_last_observed_day():
    ramp = np.arange(100, dtype=float)[:, None]
    inputs, _ = ett.rolling_windows(ramp, 48, 50)
    forecast = ett.seasonal_naive(inputs, 50)
    t = inputs[0, -1, 0]  # the last observed value is also its time index
    # h = 1..24 -> t + h − 24; h = 25..48 -> t + h − 48; h = 49, 50 -> t + h − 72
    assert forecast[0, [0, 23, 24, 47, 48, 49], 0].tolist() == [t - 23, t, t - 23, t, t - 23, t - 22]
    daily = np.sin(np.arange(500) * 2 * np.pi / 24)
    assert ett.evaluate(daily, 24, 60, lambda x: ett.seasonal_naive(x, 60)).mse == pytest.approx(0.0, abs=1e-20)


def test_evaluate_takes_precomputed_forecasts():
    series = np.random.default_rng(0).normal(size=300)
    inputs, _ = ett.rolling_windows(series, 24, 12)
    precomputed = ett.persistence(inputs, 12)[:, :, 0]  # (N, H) is accepted for one column
    assert ett.evaluate(series, 24, 12, precomputed) == ett.evaluate(series, 24, 12, lambda x: ett.persistence(x, 12))
    with pytest.raises(ValueError, match="shape"):
        ett.evaluate(series, 24, 12, precomputed[:-1])
    dropped = ett.evaluate(series, 24, 12, lambda x: ett.persistence(x, 12), drop_last_batch=32)
    assert dropped.windows == (300 - 24 - 12 + 1) // 32 * 32


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "ett" / "ETTh1.csv").is_file(), reason="needs ../shared/data/ett")
def test_persistence_reproduces_published_anchors():
    path = DATA / "ett" / "ETTh1.csv"
    for columns, horizon, anchor, drop in [(("OT",), 24, 0.034, None), (("OT",), 96, 0.069, None),
                                            (ett.ETT_COLUMNS, 96, 1.295, 32)]:
        test = ett.load_ett(path, columns, 96).test
        got = ett.evaluate(test, 96, horizon, lambda x, h=horizon: ett.persistence(x, h), drop).mse
        assert round(got, 3) == anchor


def _ett_file(path: Path, rows: int, freq: str) -> Path:
    """An ETT-layout file: every column a daily cycle (whatever the step) on a slow ramp."""
    dates = pd.date_range("2016-07-01", periods=rows, freq=freq)
    day = (dates - dates[0]) / pd.Timedelta(days=1)
    frame = pd.DataFrame({"date": dates.astype(str)})
    for k, column in enumerate(ett.ETT_COLUMNS):
        frame[column] = np.sin(2 * np.pi * np.asarray(day)) * (k + 1) + np.arange(rows) * 1e-4
    frame.to_csv(path, index=False)
    return path


def test_the_splits_follow_the_files_step(tmp_path):
    hourly = ett.load_ett(_ett_file(tmp_path / "h.csv", 14_400, "h"), ("OT",), 96)
    assert (hourly.layout.train_end, hourly.layout.val_end, hourly.layout.test_end) == (8640, 11520, 14400)
    assert (hourly.layout.freq, hourly.layout.day) == ("h", 24)
    # ETTm: 12, 4 and 4 months of 15-minute rows, as Informer's Dataset_ETT_minute cuts them.
    minute = ett.load_ett(_ett_file(tmp_path / "m.csv", 57_700, "15min"), ("OT",), 96)
    assert (minute.layout.train_end, minute.layout.val_end, minute.layout.test_end) == (34560, 46080, 57600)
    assert (minute.layout.freq, minute.layout.day) == ("15min", 96)
    assert minute.train.shape == (34560, 1) and minute.test.shape == (11520 + 96, 1)
    # The seasonal naive of a 15-minute file looks one day (96 rows) back: exact on a daily cycle.
    daily = ett.evaluate(minute.test, 96, 96, lambda x: ett.seasonal_naive(x, 96, minute.layout.day))
    assert daily.mse < 1e-4 < ett.evaluate(minute.test, 96, 96, lambda x: ett.seasonal_naive(x, 96)).mse
    with pytest.raises(ValueError, match="needs at least 57600 at one row every"):
        ett.load_ett(_ett_file(tmp_path / "short.csv", 20_000, "15min"))
    with pytest.raises(ValueError, match="an hour or a whole fraction of one"):
        ett.load_ett(_ett_file(tmp_path / "odd.csv", 14_400, "7min"))


def test_forecastd_reads_the_test_origins_of_a_15_minute_file(tmp_path):
    """benchmarks/ett.py on a 15-minute file: an untrained model forecasts no change, so at every test
    origin it must give exactly what persistence gives on the protocol's own windows."""
    import dataclasses

    from benchmarks import ett as ett_run
    from forecastd.config import ModelConfig
    from forecastd.models import Forecaster
    from forecastd.windowing import n_features, robust_scale

    path = _ett_file(tmp_path / "ETTm.csv", 57_700, "15min")
    frame, ts = ett_run._frame(path, ("OT",))
    assert len(ts) == 57_600 and ts[1] - ts[0] == pd.Timedelta(minutes=15)
    mc = dataclasses.replace(ModelConfig(hidden_size=8, lookback=0), horizon=6)
    scales = {"OT": robust_scale(frame["value"].to_numpy()[:34560])}
    pred, _ = ett_run.stream_forecasts(Forecaster(n_features(len(mc.level_alphas)), mc).eval(), mc, frame, ts,
                                       ("OT",), scales, warmup=200)
    test = ett.load_ett(path, ("OT",), 96).test
    assert pred.shape == (11520 - 6 + 1, 6, 1)
    want = ett.evaluate(test, 96, 6, lambda x: ett.persistence(x, 6))
    assert ett.evaluate(test, 96, 6, pred).mse == pytest.approx(want.mse, rel=1e-9)
