"""The streaming step: one batched, chunked call gives the rows and states of ticking each series alone.

The batched call runs torch's kernels while more series are active than the compiled loops take, then
the compiled loop over the ragged tails; the ticks run the compiled one-step path. Both go through
`advance`'s ragged and whole-block branches.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
import torch

from forecastd.config import AnomalyConfig, ModelConfig
from forecastd.frames import Grid
from forecastd.models import _LOOP_MAX_ROWS, Forecaster
from forecastd.state import Segment, StreamState
from forecastd.streaming import Emit, Outputs, run_segments
from forecastd.windowing import Track, encode, n_features

GRID = Grid("1h")
KEYS = {"forecasts": ["series_id", "issued_at", "step"], "anomalies": ["series_id", "ts"]}


def _model(cell: str, lookback: int) -> tuple[Forecaster, ModelConfig]:
    mc = ModelConfig(cell=cell, hidden_size=8, horizon=3, lookback=lookback)
    torch.manual_seed(0)
    model = Forecaster(n_features(len(mc.level_alphas)), mc).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)  # the untrained head forecasts no change at all
    return model, mc


def _segments(n: int) -> list[Segment]:
    rng = np.random.default_rng(0)
    segs = []
    for i in range(n):
        values = 50 + np.cumsum(rng.normal(size=5 + 3 * i))
        values[rng.random(values.size) < 0.1] = np.nan
        values[-1] = 60.0  # a known last value: every segment ends observed
        segs.append(Segment(f"s{i:02d}", True, i, values))
    return segs


def _sorted(out: Outputs) -> dict[str, pd.DataFrame]:
    return {t: getattr(out, t).sort_values(k, ignore_index=True) for t, k in KEYS.items()}


def _assert_same_rows(got: Outputs, want: Outputs) -> None:
    """The same rows, their numbers to float32 round-off."""
    got, want = _sorted(got), _sorted(want)
    for table in KEYS:
        assert len(got[table]) == len(want[table]) > 0
        for col in want[table].columns:
            a, b = want[table][col], got[table][col]
            if pd.api.types.is_float_dtype(a):
                np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-5, atol=1e-6, err_msg=col)
            elif col != "is_anomaly":  # a score at the threshold may round either way
                assert (a.to_numpy() == b.to_numpy()).all(), col


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("lookback", [0, 4])
def test_one_chunked_batch_equals_ticking_each_series_alone(cell, lookback):
    model, mc = _model(cell, lookback)
    ac = AnomalyConfig()
    segs = _segments(_LOOP_MAX_ROWS + 6)
    empty = StreamState.fresh([], np.zeros(0), len(mc.level_alphas), (1 + (cell == "lstm"), mc.hidden_size),
                              ac.forecasts, model.lookback)
    scales = {g.series_id: 1.0 + i / 4 for i, g in enumerate(segs)}
    batch, batch_state = run_segments(model, empty, segs, scales, GRID, mc, ac, 1, Emit(3), chunk=7)

    alone, states = [], []
    for g in segs:
        state = empty
        for j in range(len(g.values)):
            tick = Segment(g.series_id, j == 0, g.start + j, g.values[j : j + 1])
            out, state = run_segments(model, state, [tick], scales, GRID, mc, ac, 1, Emit(3))
            alone.append(out)
        states.append(state)

    _assert_same_rows(batch, Outputs.concat(alone))
    by_id = {s: i for i, s in enumerate(batch_state.series_ids)}
    for g, state in zip(segs, states):
        mine = batch_state.take(np.array([by_id[g.series_id]])).to_arrays()
        for key, value in state.to_arrays().items():
            np.testing.assert_allclose(mine[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("cell,layers", [("gru", 1), ("lstm", 2), ("rnn", 2)])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_a_tick_of_a_few_or_many_series_gives_torchs_rows_and_state(monkeypatch, cell, layers, rows):
    """A one-step block as the tick serves it (a few series in one compiled call, `_tick_few`; more on numpy
    arrays, `tick_arrays`), against the same block through torch's kernels: series at different
    watermarks (each row's own calendar terms), a missing value, a series warming up."""
    mc = ModelConfig(cell=cell, hidden_size=8, num_layers=layers, horizon=3, lookback=4)
    torch.manual_seed(1)
    model = Forecaster(n_features(len(mc.level_alphas)), mc).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    ac = AnomalyConfig()
    segs = [Segment(f"s{i}", True, 3 * i, 50 + np.cumsum(np.random.default_rng(i).normal(size=12 + i)))
            for i in range(rows)]
    empty = StreamState.fresh([], np.zeros(0), len(mc.level_alphas), (layers * (1 + (cell == "lstm")), 8),
                              ac.forecasts, model.lookback)
    scales = {g.series_id: 1.0 + i / 4 for i, g in enumerate(segs)}
    _, state = run_segments(model, empty, segs, scales, GRID, mc, ac, 1, Emit(0))
    values = 50 + np.random.default_rng(9).normal(size=(rows, 1))
    if rows > 1:
        values[rows // 2, 0] = np.nan
    lengths = np.ones(rows, dtype=np.int64)

    from forecastd import models, streaming

    got, got_state = streaming.advance(model, state, values, lengths, GRID, mc, ac, 1, Emit(3))
    monkeypatch.setattr(streaming, "_TICK_LOOP_ROWS", 0)
    monkeypatch.setattr(models, "_TICK_MAX_ROWS", 0)
    want, want_state = streaming.advance(model, state, values, lengths, GRID, mc, ac, 1, Emit(3))
    _assert_same_rows(got, want)
    for key, value in want_state.to_arrays().items():
        np.testing.assert_allclose(got_state.to_arrays()[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_each_point_is_judged_by_the_forecast_issued_one_step_before():
    """expected/lower/upper of an anomaly row are the step-1 forecast of the previous origin, also
    across chunk boundaries (carried as the pending forecasts)."""
    model, mc = _model("gru", 4)
    ac = AnomalyConfig()
    segs = _segments(12)
    empty = StreamState.fresh([], np.zeros(0), len(mc.level_alphas), (1, mc.hidden_size), ac.forecasts, model.lookback)
    out, _ = run_segments(model, empty, segs, {g.series_id: 1.0 for g in segs}, GRID, mc, ac, 1, Emit(0), chunk=7)
    one_ahead = out.forecasts[out.forecasts["step"] == 1]
    judged = out.anomalies.merge(one_ahead, left_on=["series_id", "ts"], right_on=["series_id", "target_ts"],
                                 suffixes=("", "_fc"))
    # Forecasts are written for observed origins only: every observed point after an observed one.
    assert len(judged) == sum(int((np.isfinite(g.values[1:]) & np.isfinite(g.values[:-1])).sum()) for g in segs)
    for col in ("lower", "upper"):
        np.testing.assert_allclose(judged[col], judged[f"{col}_fc"], rtol=1e-12)
    np.testing.assert_allclose(judged["expected"], judged["mean"], rtol=1e-12)


@pytest.mark.parametrize("freq", ["1h", "MS"])
def test_forecast_rows_are_the_models_forecasts_in_the_series_own_units(freq):
    """Every forecast row, against the model run by hand over the encoded block: mean = last value +
    change x scale, the band z x spread x scale either side, issued at the origin's time and aimed k grid
    steps later (calendar months on a monthly grid). Only the emitted origins have rows."""
    model, mc = _model("gru", 4)
    ac = AnomalyConfig()
    grid, scale = Grid(freq), 2.5
    values = 50 + np.cumsum(np.random.default_rng(1).normal(size=30))
    values[[7, 8, 20]] = np.nan
    start = int(grid.index(pd.DatetimeIndex(["2024-01-01"], tz="UTC"))[0])
    empty = StreamState.empty(mc)
    out, _ = run_segments(model, empty, [Segment("a", True, start, values)], {"a": scale}, grid, mc, ac, 1,
                          Emit(3, start + 5, start + 25))

    steps = start + np.arange(values.size)
    x, origin, _ = encode(values[None], grid.ns(steps)[None], Track.fresh(1, len(mc.level_alphas)),
                          np.array([scale]), mc.level_alphas, mc.input_clip)
    with torch.no_grad():
        mean, spread, _ = model(torch.from_numpy(x))
    emitted = np.flatnonzero(np.isfinite(values) & (np.arange(values.size) >= 5) & (np.arange(values.size) <= 25))
    k = np.arange(1, mc.horizon + 1)
    want_mean = (origin[0, emitted, None] + mean[0, emitted].double().numpy() * scale).ravel()
    half = (NormalDist().inv_cdf(0.5 + ac.coverage / 2) * spread[0, emitted].double().numpy() * scale).ravel()

    f = out.forecasts
    assert len(f) == emitted.size * mc.horizon
    assert (f["step"].to_numpy() == np.tile(k, emitted.size)).all()
    issued = grid.ts(steps[emitted])
    assert (f["issued_at"].to_numpy() == np.repeat(issued.to_numpy(), mc.horizon)).all()
    assert (f["target_ts"].to_numpy() == grid.ts((steps[emitted, None] + k).ravel()).to_numpy()).all()
    if freq == "MS":  # a month ahead is a calendar month, not a fixed number of nanoseconds
        assert (f["target_ts"][f["step"] == 1].dt.day == 1).all()
    np.testing.assert_allclose(f["mean"], want_mean, rtol=1e-6)
    np.testing.assert_allclose(f["upper"] - f["mean"], half, rtol=1e-5)
    np.testing.assert_allclose(f["mean"] - f["lower"], half, rtol=1e-5)
    assert (f["model_version"] == 1).all() and (f["series_id"] == "a").all()


def test_outputs_expand_per_origin_ids_when_joined_with_another_horizon():
    """A step's forecasts keep one id per origin (Outputs' horizon); the frame and a join with rows of
    another horizon give every row its own id."""
    def part(ids, K):
        n = len(ids)
        f = {"series_id": np.array(ids, dtype=object), "issued_at": np.zeros(n * K, dtype=np.int64),
             "step": np.tile(np.arange(1, K + 1), n), "target_ts": np.zeros(n * K, dtype=np.int64),
             "mean": np.zeros(n * K), "lower": np.zeros(n * K), "upper": np.zeros(n * K),
             "model_version": np.ones(n * K, dtype=np.int64)}
        a = {"series_id": np.array(ids, dtype=object), "ts": np.zeros(n, dtype=np.int64), "value": np.zeros(n),
             "expected": np.zeros(n), "lower": np.zeros(n), "upper": np.zeros(n), "score": np.zeros(n),
             "is_anomaly": np.zeros(n, dtype=bool), "model_version": np.ones(n, dtype=np.int64)}
        return Outputs(f, a, K)

    assert part(["a", "b"], 2).forecasts["series_id"].tolist() == ["a", "a", "b", "b"]
    same = Outputs.concat([part(["a"], 2), part(["b", "c"], 2)])
    assert same.forecasts["series_id"].tolist() == ["a", "a", "b", "b", "c", "c"]
    mixed = Outputs.concat([part(["a"], 2), part(["b"], 3)])
    assert mixed.forecasts["series_id"].tolist() == ["a", "a", "b", "b", "b"]
    assert mixed.forecasts["step"].tolist() == [1, 2, 1, 2, 3]
    assert mixed.anomalies["series_id"].tolist() == ["a", "b"]


@pytest.mark.parametrize("spike", [1e10, 1e154, 1e300, np.finfo(np.float64).max])
def test_a_spike_of_any_size_is_flagged(spike):
    """A point of 1e154 or more after calm scored 0 and raised no alarm: its z overflowed into an infinite
    surprise, which scores as missing. Surprise stops growing at anomaly.Z_MAX instead."""
    model, mc = _model("gru", 4)
    ac = AnomalyConfig()
    values = 10 + np.random.default_rng(1).normal(size=400)
    values[350] = spike
    empty = StreamState.fresh([], np.zeros(0), len(mc.level_alphas), (1, mc.hidden_size), ac.forecasts, model.lookback)
    out, _ = run_segments(model, empty, [Segment("s", True, 0, values)], {"s": 1.0}, GRID, mc, ac, 1, Emit(0))
    a = out.anomalies.set_index(GRID.index(pd.DatetimeIndex(out.anomalies["ts"])))
    assert a.loc[350, "score"] == 1.0 and a.loc[350, "is_anomaly"]
    assert not a.loc[300:349, "is_anomaly"].any()
