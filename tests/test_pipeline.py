"""End-to-end behaviour of train / run_once / backfill over real Parquet files.

The properties the product promises: backfill == ticks, restart == no restart, no look-ahead,
learning beats seasonal naive, bad input is repaired or refused while the other series carry on.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from forecastd.config import load_config
from forecastd.errors import DataError, ModelError
from forecastd.pipeline import backfill, run_once, state_store, train
from forecastd.planning import START_POINTS
from forecastd.sources.parquet import ParquetSource
from forecastd.streaming import Outputs

H = 6
START = pd.Timestamp("2024-01-01", tz="UTC")


def _series(n: int = 700, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    ts = pd.date_range(START, periods=n, freq="h", tz="UTC").as_unit("ns")
    parts = [
        ("sine", 5 * np.sin(2 * np.pi * t / 24) + rng.normal(0, 0.3, n)),
        ("walk", 100 + np.cumsum(rng.normal(0, 1, n))),
        ("drift", 0.02 * t + 3 * np.sin(2 * np.pi * t / 24 + 1) + rng.normal(0, 0.5, n)),
    ]
    return pd.concat([pd.DataFrame({"series_id": s, "ts": ts, "value": v}) for s, v in parts], ignore_index=True)


def _write_config(d: Path, data: Path, **extra: str) -> Path:
    text = f"""
[source]
kind = "parquet"
path = "{data}"
[data]
warmup = 24
max_gap = 12
[model]
hidden_size = 16
horizon = {H}
lookback = 24  # stated, so every streaming test runs the carried window too ("auto" is 0 for 400 points)
[training]
epochs = 3
segment_length = 128
seed = 1
device = "cpu"
[sink]
kind = "parquet"
path = "out"
[state]
dir = "state"
"""
    for section, body in extra.items():
        text += f"\n[{section}]\n{body}\n"
    p = d / "forecastd.toml"
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """A workspace with a trained model (on the first 400 points) and the full data frame."""
    d = tmp_path_factory.mktemp("trained")
    data = _series()
    data[data["ts"] < START + pd.Timedelta(hours=400)].to_parquet(d / "data.parquet")
    train(load_config(_write_config(d, d / "data.parquet")), START + pd.Timedelta(hours=400))
    return d, data


def _workspace(trained, tmp_path: Path) -> Path:
    src, _ = trained
    shutil.copytree(src / "state", tmp_path / "state")
    return _write_config(tmp_path, tmp_path / "data.parquet")


def _ts(i: int) -> pd.Timestamp:
    return START + pd.Timedelta(hours=i)


def _key_sorted(o: Outputs) -> tuple[pd.DataFrame, pd.DataFrame]:
    f = o.forecasts.sort_values(["series_id", "issued_at", "step"]).reset_index(drop=True)
    a = o.anomalies.sort_values(["series_id", "ts"]).reset_index(drop=True)
    return f, a


def _assert_same(a: Outputs, b: Outputs) -> None:
    fa, aa = _key_sorted(a)
    fb, ab = _key_sorted(b)
    assert len(fa) == len(fb) and len(aa) == len(ab)
    pd.testing.assert_frame_equal(fa, fb, rtol=1e-4, atol=1e-6)
    pd.testing.assert_frame_equal(aa.drop(columns=["score", "is_anomaly"]), ab.drop(columns=["score", "is_anomaly"]),
                                  rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(aa["score"], ab["score"], atol=1e-3)


def _tick_through(cfg: Path, data: pd.DataFrame, stops: list[int]) -> Outputs:
    """Grow the source file to each stop (exclusive index) and run one tick there."""
    out = []
    config = load_config(cfg)
    for stop in stops:
        data[data["ts"] < _ts(stop)].to_parquet(cfg.parent / "data.parquet")
        out.append(run_once(config, _ts(stop), keep_outputs=True).outputs)
    return Outputs.concat(out)


def test_train_saves_a_live_version_with_metrics(trained):
    d, _ = trained
    store = state_store(load_config(d / "forecastd.toml"))
    assert store.live_version() == 1
    m = store.manifest(1)
    assert m["freq"] == "h" and set(m["scales"]) == {"sine", "walk", "drift"}
    assert np.isfinite(m["metrics"]["val_mse"]) and m["metrics"]["epochs_run"] >= 1
    assert m["config"]["model"]["lookback"] == 24 and store.load_live().model.lookback == 24


def test_the_same_seed_trains_the_same_model_and_another_seed_another(trained, tmp_path):
    src, data = trained
    data[data["ts"] < _ts(400)].to_parquet(tmp_path / "data.parquet")
    weights = []
    for run, seed in (("a", 1), ("b", 1), ("c", 2)):
        d = tmp_path / run
        d.mkdir()
        cfg = _write_config(d, tmp_path / "data.parquet").read_text().replace("seed = 1", f"seed = {seed}")
        (d / "forecastd.toml").write_text(cfg)
        torch.randn(1 + "abc".index(run))  # the process's random state differs between the runs
        train(load_config(d / "forecastd.toml"), _ts(400))
        weights.append((d / "state" / "models" / "v000001" / "weights.safetensors").read_bytes())
    assert weights[0] == weights[1] != weights[2]
    # The trained fixture used seed 1 too, in another state of the process.
    assert weights[0] == (src / "state" / "models" / "v000001" / "weights.safetensors").read_bytes()


def test_backfill_equals_ticks_one_and_several_points_per_tick(trained, tmp_path):
    _, data = trained
    cfg = _workspace(trained, tmp_path)
    t0 = 450
    # First tick ends at t0 (warm-up, then the point at t0), then 1 point per tick, then 7 per tick.
    stops = [t0 + 1] + list(range(t0 + 2, t0 + 20)) + list(range(t0 + 27, 700, 7)) + [700]
    ticks = _tick_through(cfg, data, stops)
    bf = backfill(load_config(cfg), _ts(t0), _ts(699), keep_outputs=True, write=False).outputs
    assert bf.anomalies["ts"].min() == _ts(t0) and bf.anomalies["ts"].max() == _ts(699)
    assert len(bf.anomalies) == 3 * 250 and len(bf.forecasts) == 3 * 250 * H
    _assert_same(ticks, bf)


@pytest.mark.parametrize("every", [1, 3])
def test_series_beginning_near_or_inside_the_range_backfill_as_ticks_start_them(trained, tmp_path, every):
    """A backfill anchored every series at its range start: one that began inside the range waited a whole
    warm-up where ticks started it at once (a series the model learnt) or at its START_POINTS-th point (one
    it never saw, whose unit the backfill also measured on points after its first output: a look-ahead),
    and ticks every few steps started a new series at a later point than ticks every step."""
    _, data = trained
    cfg = _workspace(trained, tmp_path)
    t0, t1 = 450, 560
    learnt = data[(data["series_id"] != "drift") | (data["ts"] >= _ts(t0 + 10))]  # learnt; begins inside
    walk = 20 + np.random.default_rng(3).normal(0, 1, 120).cumsum()
    newcomer = pd.DataFrame({"series_id": "newcomer", "value": walk,  # never learnt; begins just before
                             "ts": _ts(t0 - 5) + pd.to_timedelta(np.arange(120), unit="h")})
    source = pd.concat([learnt, newcomer], ignore_index=True)
    ticks = _tick_through(cfg, source, sorted({t0 + 1, *range(t0 + 1 + every, t1, every), t1}))
    bf = backfill(load_config(cfg), _ts(t0), _ts(t1 - 1), keep_outputs=True, write=False).outputs
    _assert_same(ticks, bf)
    starts = bf.anomalies.groupby("series_id")["ts"].min()
    assert starts["drift"] == _ts(t0 + 10) and starts["newcomer"] == _ts(t0 - 5 + START_POINTS - 1)
    assert starts["sine"] == starts["walk"] == _ts(t0)


def test_backfill_reads_the_last_step_stamped_after_its_time(trained, tmp_path):
    """Stamps at :05 round to the hour before them; the backfill read stopped at the last step's own
    time, and so lost the last step of every series without a count."""
    _, data = trained
    cfg = _workspace(trained, tmp_path)
    data.assign(ts=data["ts"] + pd.Timedelta(minutes=5)).to_parquet(tmp_path / "data.parquet")
    r = backfill(load_config(cfg), _ts(450), _ts(500), keep_outputs=True, write=False)
    assert r.anomalies_written == 3 * 51
    assert (r.outputs.anomalies.groupby("series_id")["ts"].max() == _ts(500)).all()


def test_backfill_writes_only_grid_points_inside_its_range(trained, tmp_path):
    """--start 00:00:01 and --end 02:31 rounded to the nearest step each, and wrote 00:00 and 03:00."""
    _, data = trained
    cfg = _workspace(trained, tmp_path)
    data.to_parquet(tmp_path / "data.parquet")
    second, half = pd.Timedelta(seconds=1), pd.Timedelta(minutes=31)
    r = backfill(load_config(cfg), _ts(450) + second, _ts(452) + half, keep_outputs=True, write=False)
    assert sorted(set(r.outputs.anomalies["ts"])) == [_ts(451), _ts(452)]
    with pytest.raises(DataError, match="no point of the model.s .h. grid lies in"):
        backfill(load_config(cfg), _ts(450) + second, _ts(450) + half, write=False)


def test_a_config_edited_since_training_is_said_once(trained, tmp_path, caplog):
    """A new horizon, cell or grid in the config changes nothing until a training: ticks and backfills kept
    writing the trained model's, without a word."""
    _, data = trained
    _workspace(trained, tmp_path)
    data[data["ts"] < _ts(500)].to_parquet(tmp_path / "data.parquet")
    config = load_config(tmp_path / "forecastd.toml", {"model.horizon": 12, "data.freq": "30min"})
    with caplog.at_level("WARNING"):
        r = run_once(config, _ts(500), keep_outputs=True)
        backfill(config, _ts(480), _ts(490), write=False)
    assert set(r.outputs.forecasts["step"]) == set(range(1, H + 1))  # served as trained
    told = [m for m in caplog.messages if "the config differs from live model v1" in m]
    assert len(told) == 1, told
    assert "[model] horizon = 12 (v1: 6)" in told[0] and "[data] freq = '30min' (v1: 'h')" in told[0]
    # "auto" agrees with the number of steps the manifest keeps for it (24 here); the unchanged config is quiet.
    caplog.clear()
    with caplog.at_level("WARNING"):
        run_once(load_config(tmp_path / "forecastd.toml", {"model.lookback": "auto"}), _ts(500))
    assert not [m for m in caplog.messages if "differs from live model" in m]


def test_plot_of_the_last_point_gets_its_stored_rows(trained, tmp_path, monkeypatch):
    """--last 1 read the sink from the window's one point, exclusive: the plot said "no anomaly scores in
    this window; no forecast" though the sink held both."""
    import forecastd.plot
    from forecastd.demo import plot_stored

    config, _ = _ticked_to_500(trained, tmp_path, "1e7")
    seen = {}
    monkeypatch.setattr(forecastd.plot, "plot_series", lambda history, forecasts, anomalies, *a, **k: seen.update(
        forecasts=forecasts, anomalies=anomalies))
    plot_stored(config, "sine", tmp_path / "x.png", last=1)
    assert seen["anomalies"]["ts"].tolist() == [_ts(499)]
    assert set(seen["forecasts"]["issued_at"]) == {_ts(499)}


def test_a_backfill_warns_of_new_series_too_short_to_start(trained, tmp_path, caplog):
    """A backfill writes nothing at all for a new series with fewer points than START_POINTS in its range;
    the line that says so was at INFO, under the default log level."""
    _, data = trained
    cfg = _workspace(trained, tmp_path)
    short = pd.DataFrame({"series_id": "newbie", "ts": [_ts(i) for i in range(480, 490)], "value": np.arange(10.0)})
    pd.concat([data, short], ignore_index=True).to_parquet(tmp_path / "data.parquet")
    with caplog.at_level("WARNING"):
        r = backfill(load_config(cfg), _ts(470), _ts(495), keep_outputs=True, write=False)
    assert "newbie" not in set(r.outputs.anomalies["series_id"])
    assert any(rec.levelname == "WARNING" and "1 new series wait" in rec.getMessage() and "'newbie'" in rec.getMessage()
               for rec in caplog.records)


def test_series_resume_without_a_gap_after_more_promotions_than_kept_versions(trained, tmp_path):
    """A new live version has no stream until it runs a point, so its series continue from the stream
    before it; that stream was pruned with its version once [state] keep_versions newer versions existed
    (retrains every few seconds, or a quiet source), and every series then started at its latest point:
    every point sent meanwhile went without outputs."""
    _, data = trained
    config = load_config(_workspace(trained, tmp_path))
    store = state_store(config)
    data[data["ts"] < _ts(500)].to_parquet(tmp_path / "data.parquet")
    run_once(config, _ts(500))
    for _ in range(3):  # retrains promoted between two ticks (same weights: the switch is what matters)
        mv = store.load_live()
        store.set_live(store.save_model(mv.model, store.manifest(mv.version), keep=2))
    assert store.versions() == [3, 4] and store.live_version() == 4
    data[data["ts"] < _ts(560)].to_parquet(tmp_path / "data.parquet")  # the source sends again
    a = run_once(config, _ts(560), keep_outputs=True).outputs.anomalies
    assert len(a) == 3 * 60 and a.groupby("series_id")["ts"].min().eq(_ts(500)).all()


@pytest.mark.parametrize("promoted", [False, True])
def test_a_series_back_from_a_long_silence_warms_up_whether_or_not_a_model_was_promoted(promoted, trained, tmp_path):
    """A silence of more than [data] max_gap steps restarts a series, which warms up over [data] warmup
    steps before its outputs. After a promotion during the silence it came back through the older
    stream's watermark, was credited with a warm-up, and wrote outputs (and alarms) from its first point."""
    _, data = trained
    config = load_config(_workspace(trained, tmp_path))
    store = state_store(config)
    data[data["ts"] < _ts(480)].to_parquet(tmp_path / "data.parquet")
    run_once(config, _ts(480))
    if promoted:
        mv = store.load_live()
        store.set_live(store.save_model(mv.model, store.manifest(mv.version), keep=2))
    back = 480 + 40  # "walk" is silent for 40 steps: longer than max_gap (12) and the warm-up (24)
    silent = (data["series_id"] == "walk") & (data["ts"] >= _ts(480)) & (data["ts"] < _ts(back))
    data[~silent & (data["ts"] < _ts(600))].to_parquet(tmp_path / "data.parquet")
    a = run_once(config, _ts(600), keep_outputs=True).outputs.anomalies
    first = a.groupby("series_id")["ts"].min()
    assert first["walk"] == _ts(back + 24)  # its warm-up (24 steps) after its first point back
    assert first["sine"] == first["drift"] == _ts(480)  # the others continue


def test_restart_from_disk_equals_ticking_straight_through(trained, tmp_path):
    _, data = trained
    straight = _tick_through(_workspace(trained, tmp_path / "a"), data, list(range(500, 560, 3)))
    first = _tick_through(_workspace(trained, tmp_path / "b"), data, list(range(500, 530, 3)))
    # "Restart": a new workspace (another process, another machine) continues from the copied state.
    shutil.copytree(tmp_path / "b" / "state", tmp_path / "c" / "state")
    cfg_c = _write_config(tmp_path / "c", tmp_path / "c" / "data.parquet")
    second = _tick_through(cfg_c, data, list(range(530, 560, 3)))
    _assert_same(straight, Outputs.concat([first, second]))


def test_no_look_ahead(trained, tmp_path):
    _, data = trained
    cfg = _workspace(trained, tmp_path)
    data.to_parquet(tmp_path / "data.parquet")
    before = backfill(load_config(cfg), _ts(420), _ts(699), keep_outputs=True, write=False).outputs
    cut = 550
    changed = data.copy()
    late = changed["ts"] > _ts(cut)
    changed.loc[late, "value"] = changed.loc[late, "value"] * 3 + 50
    changed.to_parquet(tmp_path / "data.parquet")
    after = backfill(load_config(cfg), _ts(420), _ts(699), keep_outputs=True, write=False).outputs
    keep_f = lambda f: f[f["issued_at"] <= _ts(cut)]  # noqa: E731
    keep_a = lambda a: a[a["ts"] <= _ts(cut)]  # noqa: E731
    _assert_same(Outputs(keep_f(before.forecasts), keep_a(before.anomalies)),
                 Outputs(keep_f(after.forecasts), keep_a(after.anomalies)))
    # ...and the change is visible after the cut, so the comparison above is not vacuous.
    assert not np.allclose(before.forecasts["mean"], after.forecasts["mean"])


def test_second_tick_without_new_data_writes_nothing(trained, tmp_path):
    _, data = trained
    cfg = _workspace(trained, tmp_path)
    data.to_parquet(tmp_path / "data.parquet")
    config = load_config(cfg)
    first = run_once(config, _ts(700))
    assert first.anomalies_written == 3 and first.forecasts_written == 3 * H
    again = run_once(config, _ts(700))
    assert again.points == 0 and again.forecasts_written == 0
    out = pd.read_parquet(tmp_path / "out" / "forecasts")
    assert not out.duplicated(["series_id", "issued_at", "step"]).any()


def test_new_series_joining_later_warms_up_and_others_carry_on(trained, tmp_path):
    _, data = trained
    cfg = _workspace(trained, tmp_path)
    config = load_config(cfg)
    data[data["ts"] < _ts(500)].to_parquet(tmp_path / "data.parquet")
    run_once(config, _ts(500))
    newcomer = data[data["series_id"] == "sine"].assign(series_id="sine-2")
    pd.concat([data[data["ts"] < _ts(510)], newcomer[newcomer["ts"] < _ts(510)]]).to_parquet(tmp_path / "data.parquet")
    r = run_once(config, _ts(510), keep_outputs=True)
    a = r.outputs.anomalies
    assert set(a["series_id"]) == {"sine", "walk", "drift", "sine-2"}
    assert (a["series_id"] == "sine").sum() == 10 and (a["series_id"] == "sine-2").sum() == 1
    assert r.repairs == {}  # its rows past the others' watermarks were read once, not counted as duplicates


def test_a_silent_series_does_not_hold_every_read_back_and_its_late_backlog_is_processed(trained, tmp_path):
    """A dead sensor made every tick re-read all series' rows since it died and count them as late."""
    config, data = _ticked_to_500(trained, tmp_path, "1e7")
    walk = data["series_id"] == "walk"
    for stop in (520, 540, 560):  # "walk" sends nothing after 499; max_gap is 12 steps
        data[(data["ts"] < _ts(stop)) & ~(walk & (data["ts"] >= _ts(500)))].to_parquet(tmp_path / "data.parquet")
        r = run_once(config, _ts(stop))
        assert r.rows_read == 2 * 20 and r.repairs == {}, (stop, r.rows_read, r.repairs)
    # Its backlog arrives, up to 40 steps before the others' watermarks, with one row past them: read
    # back to its own watermark and processed without a gap.
    data = data[(data["ts"] < _ts(600)) & ~(walk & (data["ts"] >= _ts(561)))]
    data.to_parquet(tmp_path / "data.parquet")
    r = run_once(config, _ts(600), keep_outputs=True)
    a = r.outputs.anomalies
    assert (a["series_id"] == "walk").sum() == 61 and a.loc[a["series_id"] == "walk", "ts"].min() == _ts(500)
    assert (a["series_id"] == "sine").sum() == 40 and r.repairs == {}, r.repairs


def test_a_series_a_few_steps_behind_does_not_turn_the_others_rows_into_late_ones(trained, tmp_path):
    """The read starts at the lagging series' watermark, so it brings back the other series' processed
    rows: each tick counted and logged them as late, and a late-rows alert fired on a healthy feed."""
    config, data = _ticked_to_500(trained, tmp_path, "1e7")
    walk = data["series_id"] == "walk"
    for stop in (503, 506, 509, 512):  # "walk" always 3 steps behind the others, well within max_gap
        data[(data["ts"] < _ts(stop)) & ~(walk & (data["ts"] >= _ts(stop - 3)))].to_parquet(tmp_path / "data.parquet")
        r = run_once(config, _ts(stop), keep_outputs=True)
        assert r.repairs == {}, (stop, r.repairs)
        a = r.outputs.anomalies
        # Each series' points are processed once: the re-read rows are dropped, not processed again.
        assert not a.duplicated(["series_id", "ts"]).any()
        assert (a["series_id"] == "walk").sum() == (0 if stop == 503 else 3)
        assert (a["series_id"] == "sine").sum() == 3
    assert r.rows_read > r.points  # the other series' last 3 steps were read again


def test_a_row_without_a_series_is_counted_once_not_at_every_tick(trained, tmp_path):
    """A null id has no watermark to drop its row by once it was read: each tick whose read reached it
    counted it again (with the series a few steps behind, three ticks counted one row three times)."""
    config, data = _ticked_to_500(trained, tmp_path, "1e7")
    walk = data["series_id"] == "walk"
    orphan = pd.DataFrame({"series_id": [None, "x" * 1001], "ts": [_ts(501), _ts(501)], "value": [1.0, 2.0]})
    counts = []
    for stop in (503, 506, 509, 509):  # the last tick brings nothing new
        rows = data[(data["ts"] < _ts(stop)) & ~(walk & (data["ts"] >= _ts(stop - 3)))]
        pd.concat([rows, orphan], ignore_index=True).to_parquet(tmp_path / "data.parquet")
        counts.append(run_once(config, _ts(stop)).repairs)
    assert counts[0] == {"rejected: null series_id": 1, "rejected: series_id longer than 1000 bytes": 1}
    assert counts[1:] == [{}, {}, {}]


@pytest.mark.parametrize("loss", ["deleted", "corrupt"])
def test_lost_stream_checkpoints_resume_from_the_sinks_latest_outputs(trained, tmp_path, loss):
    """Every checkpoint of the live stream gone: the series started again at their latest point and the
    points since the last checkpoint got no outputs, a hole the next checkpoint hid. The sink holds
    outputs up to where each series got (they are durable before a checkpoint moves): ticks go on from
    there, after a warm-up, and write what a tick with its checkpoints would have."""
    config, data = _ticked_to_500(trained, tmp_path, "1e7")
    data[data["ts"] < _ts(520)].to_parquet(tmp_path / "data.parquet")
    kept = tmp_path / "kept"
    shutil.copytree(tmp_path / "state", kept / "state")
    shutil.copytree(tmp_path / "out", kept / "out")
    streams = tmp_path / "state" / "streams"
    for f in streams.rglob("ckpt-*.safetensors"):
        if loss == "deleted":
            f.unlink()
            f.with_suffix(".json").unlink()
        else:
            f.write_bytes(f.read_bytes()[:50])
    r = run_once(config, _ts(520), keep_outputs=True)
    reference = run_once(load_config(_write_config(kept, tmp_path / "data.parquet")), _ts(520), keep_outputs=True)
    a, ref = r.outputs.anomalies, reference.outputs.anomalies
    assert len(ref) == 3 * 20 and len(a) == len(ref)  # every point since the last tick, for every series
    pd.testing.assert_series_equal(a.sort_values(["series_id", "ts"])["ts"].reset_index(drop=True),
                                   ref.sort_values(["series_id", "ts"])["ts"].reset_index(drop=True))


def test_watermarks_recovered_from_the_sink_are_kept_while_no_point_comes(trained, tmp_path, monkeypatch, caplog):
    """With no checkpoint and no new point, a tick checkpointed nothing: every tick searched the sink again
    and warned again. The recovered watermarks are checkpointed until their series run."""
    from forecastd.sinks.parquet import ParquetSink

    config, data = _ticked_to_500(trained, tmp_path, "1e7")
    shutil.rmtree(tmp_path / "state" / "streams")
    reads = []
    read = ParquetSink.read
    monkeypatch.setattr(ParquetSink, "read", lambda self, table, *a, **k: (reads.append(table), read(self, table, *a, **k))[1])
    with caplog.at_level("WARNING"):
        for _ in range(3):  # no new point
            assert run_once(config, _ts(500)).points == 0
    assert len(reads) == 1 and sum("continue after their latest outputs" in m for m in caplog.messages) == 1
    from forecastd.status import status

    shown = {r["series_id"]: r["watermark"] for r in status(config, _ts(500))["series"]}
    assert shown == {s: _ts(499).isoformat() for s in ("sine", "walk", "drift")}
    data[data["ts"] < _ts(503)].to_parquet(tmp_path / "data.parquet")
    r = run_once(config, _ts(503), keep_outputs=True)
    assert sorted(set(r.outputs.anomalies["ts"])) == [_ts(500), _ts(501), _ts(502)] and r.outputs.anomalies.shape[0] == 9
    assert state_store(config).load_stream(1)[1]["recovered"] == {}


class _CountingSource:
    """The real Parquet source, counting how often every series id is listed (a scan of every file)."""

    def __init__(self, inner):
        self.inner, self.listings = inner, 0

    def read(self, *args, **kwargs):
        return self.inner.read(*args, **kwargs)

    def series_ids(self):
        self.listings += 1
        return self.inner.series_ids()


def test_series_are_listed_once_per_interval_and_a_newcomer_with_only_old_rows_waits_for_it(trained, tmp_path):
    from forecastd.sources import open_source

    src, data = trained
    shutil.copytree(src / "state", tmp_path / "state")
    config = load_config(_write_config(tmp_path, tmp_path / "data.parquet", serve="list_series_every = 86400"))
    source = _CountingSource(open_source(config))
    data[data["ts"] < _ts(500)].to_parquet(tmp_path / "data.parquet")
    run_once(config, _ts(500), source=source)
    assert source.listings == 1  # no listing recorded yet
    # A series loaded with its history only, every row older than the oldest watermark (499).
    old = data[(data["series_id"] == "walk") & (data["ts"] < _ts(450))].assign(series_id="old")
    for stop in (501, 502, 503):
        pd.concat([data[data["ts"] < _ts(stop)], old]).to_parquet(tmp_path / "data.parquet")
        r = run_once(config, _ts(stop), keep_outputs=True, source=source)
        assert "old" not in set(r.outputs.anomalies["series_id"])
        assert "list" not in r.seconds
    assert source.listings == 1  # the rows past the watermarks told each tick what it needed
    # A day after the last listing the next one finds it; the others carry on.
    pd.concat([data[data["ts"] < _ts(524)], old]).to_parquet(tmp_path / "data.parquet")
    r = run_once(config, _ts(524), keep_outputs=True, source=source)
    assert source.listings == 2 and r.seconds["list"] > 0  # timed on its own, apart from the read
    a = r.outputs.anomalies
    assert (a["series_id"] == "old").sum() >= 1 and (a["series_id"] == "sine").sum() == 21
    # Idle ticks (nothing new: a daemon ticking every minute on hourly data) list no more often: the one
    # due a day later lists, and the next one knows it did.
    for later in (25, 26):
        r = run_once(config, _ts(524 + later), source=source)
        assert r.points == 0
    assert source.listings == 3


def _ticked_to_500(trained, tmp_path: Path, list_series_every: str) -> tuple:
    """A copy of the trained state, ticked once over the data before step 500 (the config and the data)."""
    src, data = trained
    shutil.copytree(src / "state", tmp_path / "state")
    config = load_config(_write_config(tmp_path, tmp_path / "data.parquet",
                                       serve=f"list_series_every = {list_series_every}"))
    data[data["ts"] < _ts(500)].to_parquet(tmp_path / "data.parquet")
    run_once(config, _ts(500))
    return config, data


def test_a_new_series_arriving_point_by_point_starts_with_a_measured_unit(trained, tmp_path):
    """A series the model never saw, started at its first point, kept a unit of a thousandth of that
    value: every band written for it was far too narrow (1 % coverage for 95 %)."""
    config, data = _ticked_to_500(trained, tmp_path, "1e7")
    noise = np.random.default_rng(5).normal(20.0, 1.0, 40)
    newcomer = pd.DataFrame({"series_id": "new", "ts": _ts(500) + pd.to_timedelta(np.arange(40), unit="h"),
                             "value": noise})
    rows = []
    for k in range(1, 41):
        pd.concat([data[data["ts"] < _ts(500 + k)], newcomer.iloc[:k]]).to_parquet(tmp_path / "data.parquet")
        r = run_once(config, _ts(500 + k), keep_outputs=True)
        a = r.outputs.anomalies
        rows.append(a[a["series_id"] == "new"])
        if k < START_POINTS:
            assert rows[-1].empty, k
    mine = pd.concat(rows)
    assert len(mine) == 40 - START_POINTS + 1  # from its START_POINTS-th point on, each point once
    state, _ = state_store(config).load_stream(state_store(config).live_version())
    scale = float(state.scale[state.series_ids.index("new")])
    assert 0.5 < scale < 5.0, scale  # the changes of N(20, 1) noise: about 1.4 (one value gave 0.02)
    inside = ((mine["value"] >= mine["lower"]) & (mine["value"] <= mine["upper"])).mean()
    assert inside >= 0.6, inside


def test_a_waiting_series_is_read_from_its_first_row_and_looked_up_once(trained, tmp_path, monkeypatch):
    """While a new series waits for START_POINTS points, every tick read it from the source's beginning
    (a scan of every Parquet file) and searched every older stream and the handover record for it. Now
    the first tick does, and later ones read from its first row, until the model versions change."""
    import forecastd.pipeline as pipeline
    from forecastd.state import StateStore

    config, data = _ticked_to_500(trained, tmp_path, "1e7")
    newcomer = pd.DataFrame({"series_id": "new", "ts": _ts(500) + pd.to_timedelta(np.arange(30), unit="h"),
                             "value": np.random.default_rng(7).normal(20.0, 1.0, 30)})
    reads, lookups = [], []
    read = ParquetSource.read
    monkeypatch.setattr(ParquetSource, "read", lambda self, since=None, until=None, series=None: (
        reads.append((since, series)), read(self, since, until, series))[1])
    prior = pipeline._prior
    monkeypatch.setattr(pipeline, "_prior", lambda store, live, wanted, versions: (
        lookups.append(list(wanted)), prior(store, live, wanted, versions))[1])
    versions = StateStore.versions
    started = []
    for k in range(1, 31):
        if k == 10:  # a new model version (trained, say, and not promoted): the series is looked for again
            monkeypatch.setattr(StateStore, "versions", lambda self: [*versions(self), 99])
        pd.concat([data[data["ts"] < _ts(500 + k)], newcomer.iloc[:k]]).to_parquet(tmp_path / "data.parquet")
        reads.clear()
        r = run_once(config, _ts(500 + k), keep_outputs=True)
        started.append("new" in set(r.outputs.anomalies["series_id"]))
        history = [since for since, series in reads if series == ["new"]]
        if k in (1, 10):
            assert history == [None], (k, reads)  # from the beginning, once
        elif k < START_POINTS:
            assert history == [_ts(499)], (k, reads)  # from its first row
    assert lookups == [["new"], ["new"]]
    assert started.index(True) == START_POINTS - 1  # at its START_POINTS-th point, as before


def test_a_promotions_first_tick_reads_a_waiting_series_from_its_first_row_not_the_whole_source(
        trained, tmp_path, monkeypatch):
    """The new model has no stream; the old one's checkpoint names a series waiting for START_POINTS
    points. That series had no place to read from, and the tick read every series' whole history."""
    from forecastd.retrain import switch_live

    config, data = _ticked_to_500(trained, tmp_path, "1e7")
    newcomer = pd.DataFrame({"series_id": "new", "ts": _ts(500) + pd.to_timedelta(np.arange(10), unit="h"),
                             "value": np.random.default_rng(7).normal(20.0, 1.0, 10)})
    for k in range(1, 6):  # it waits
        pd.concat([data[data["ts"] < _ts(500 + k)], newcomer.iloc[:k]]).to_parquet(tmp_path / "data.parquet")
        run_once(config, _ts(500 + k))
    store = state_store(config)
    mv = store.load_live()
    switch_live(store, store.save_model(mv.model, store.manifest(mv.version), keep=5), reason="test", now=_ts(505))
    pd.concat([data[data["ts"] < _ts(507)], newcomer.iloc[:7]]).to_parquet(tmp_path / "data.parquet")
    reads = []
    read = ParquetSource.read
    monkeypatch.setattr(ParquetSource, "read", lambda self, since=None, until=None, series=None: (
        reads.append((since, until, series)), read(self, since, until, series))[1])
    r = run_once(config, _ts(507), keep_outputs=True)
    assert all(since is not None for since, _, _ in reads), reads  # no read from the source's beginning
    assert r.rows_read < 3 * 100
    a = r.outputs.anomalies
    assert set(a["ts"]) == {_ts(505), _ts(506)} and "new" not in set(a["series_id"])  # it still waits


def test_a_promotions_warm_up_does_not_count_repairs_again(trained, tmp_path):
    """The new model warms up over rows the old stream processed and counted; its first tick counted
    their NaNs, snaps and duplicates once more, at every promotion."""
    from forecastd.retrain import switch_live

    _, data = trained
    config = load_config(_workspace(trained, tmp_path))
    data = data.copy()
    data.loc[(data["series_id"] == "sine") & (data["ts"] == _ts(495)), "value"] = np.nan
    dup = data[(data["series_id"] == "walk") & (data["ts"] == _ts(496))]
    bad = pd.concat([data, dup], ignore_index=True)
    bad[bad["ts"] < _ts(500)].to_parquet(tmp_path / "data.parquet")
    first = run_once(config, _ts(500)).repairs
    assert first["NaN kept as missing"] >= 1 and first["duplicate timestamp resolved by 'last'"] == 1
    store = state_store(config)
    mv = store.load_live()
    switch_live(store, store.save_model(mv.model, store.manifest(mv.version), keep=5), reason="test", now=_ts(500))
    bad[bad["ts"] < _ts(503)].to_parquet(tmp_path / "data.parquet")
    r = run_once(config, _ts(503), keep_outputs=True)
    assert r.repairs == {}, r.repairs
    assert set(r.outputs.anomalies["ts"]) == {_ts(500), _ts(501), _ts(502)}


def test_a_waiting_series_that_a_retrain_learns_starts_at_its_first_row_as_a_backfill_starts_it(trained, tmp_path):
    """A learnt series starts at its first point. One that waited for its 24th point when a retrain learnt
    it started at its latest point instead, after the promotion, as if it were a backlog: the points it
    sent while it waited were never scored, though a backfill scores them."""
    config, data = _ticked_to_500(trained, tmp_path, "1e7")
    newcomer = pd.DataFrame({"series_id": "new", "ts": _ts(500) + pd.to_timedelta(np.arange(40), unit="h"),
                             "value": 20 + 3 * np.sin(np.arange(40) / 3.0)})
    for k in range(1, 11):  # it waits
        pd.concat([data[data["ts"] < _ts(500 + k)], newcomer.iloc[:k]]).to_parquet(tmp_path / "data.parquet")
        assert "new" not in set(run_once(config, _ts(500 + k), keep_outputs=True).outputs.anomalies["series_id"])
    train(config, _ts(510))  # a retrain that learns it, made live
    assert "new" in state_store(config).load_live().scales
    pd.concat([data[data["ts"] < _ts(512)], newcomer.iloc[:12]]).to_parquet(tmp_path / "data.parquet")
    ticked = run_once(config, _ts(512), keep_outputs=True).outputs.anomalies
    filled = backfill(config, _ts(500), _ts(511), keep_outputs=True, write=False).outputs.anomalies
    mine = ticked[ticked["series_id"] == "new"]
    assert mine["ts"].min() == _ts(500) == filled.loc[filled["series_id"] == "new", "ts"].min()
    assert len(mine) == 12


def test_a_first_stream_of_waiting_series_only_keeps_them_and_starts_them(trained, tmp_path):
    """Ticks whose every series waits (a source that has just begun collecting) checkpoint an empty
    stream that remembers them; the series start at their START_POINTS-th point all the same."""
    config = load_config(_workspace(trained, tmp_path))
    shutil.rmtree(tmp_path / "state" / "streams", ignore_errors=True)
    rng = np.random.default_rng(8)
    newcomers = pd.concat([pd.DataFrame({"series_id": sid, "ts": _ts(600) + pd.to_timedelta(np.arange(30), unit="h"),
                                         "value": rng.normal(20.0, 1.0, 30)}) for sid in ("p", "q")])
    firsts, first_step = [], {}
    for k in range(1, 27):
        newcomers[newcomers["ts"] < _ts(600 + k)].to_parquet(tmp_path / "data.parquet")
        r = run_once(config, _ts(600 + k), keep_outputs=True)
        state, info = state_store(config).load_stream(state_store(config).live_version())
        first_step = first_step or dict(info["waiting"])
        if k < START_POINTS:
            assert len(r.outputs) == 0 and len(state) == 0 and info["waiting"] == first_step, k
            assert set(first_step) == {"p", "q"} and len(set(first_step.values())) == 1
        elif not firsts:
            firsts.append(k)
            assert set(r.outputs.anomalies["series_id"]) == {"p", "q"} and info["waiting"] == {}
    assert firsts == [START_POINTS]


def test_a_waiting_series_counts_its_repairs_once(trained, tmp_path):
    """A new series' rows are read again at every tick while it waits for START_POINTS points: its NaN
    was counted, and logged as a warning, at each of those reads."""
    config, data = _ticked_to_500(trained, tmp_path, "1e7")
    values = np.random.default_rng(6).normal(20.0, 1.0, 30)
    values[2] = np.nan
    newcomer = pd.DataFrame({"series_id": "new", "ts": _ts(500) + pd.to_timedelta(np.arange(30), unit="h"),
                             "value": values})
    nan_counts, started = [], []
    for k in range(1, 31):
        pd.concat([data[data["ts"] < _ts(500 + k)], newcomer.iloc[:k]]).to_parquet(tmp_path / "data.parquet")
        r = run_once(config, _ts(500 + k), keep_outputs=True)
        nan_counts.append(r.repairs.get("NaN kept as missing", 0))
        started.append("new" in set(r.outputs.anomalies["series_id"]))
    assert started.index(True) == START_POINTS  # its 24th observed point is its 25th row
    assert sum(nan_counts) == 1 and nan_counts[START_POINTS] == 1


def test_a_series_that_cannot_start_for_want_of_values_is_warned_about_once(trained, tmp_path, caplog):
    """A new series whose values are all missing (a sensor writing NULL) waited for ever, said at INFO
    among every tick's lines. Past STUCK_ROWS rows it is said at WARNING, naming it, once: the warning is
    checkpointed. The other series run on, and one that starts no longer counts as warned."""
    from forecastd.pipeline import STUCK_ROWS

    config, data = _ticked_to_500(trained, tmp_path, "1e7")
    n = STUCK_ROWS + 3
    times = _ts(499) - pd.to_timedelta(np.arange(n)[::-1], unit="h")
    dead = pd.DataFrame({"series_id": "dead", "ts": times, "value": np.nan})
    sparse = pd.DataFrame({"series_id": "sparse", "ts": times, "value": np.nan})
    sparse.loc[sparse.index[-3:], "value"] = 1.0  # 3 observed of n: short of START_POINTS too
    warnings, waiting = [], []
    for k in range(1, 4):
        extra = pd.DataFrame({"series_id": ["dead", "sparse"], "ts": [_ts(500 + k - 1)] * 2, "value": np.nan})
        pd.concat([data[data["ts"] < _ts(500 + k)], dead, sparse, extra]).to_parquet(tmp_path / "data.parquet")
        caplog.clear()
        with caplog.at_level("INFO", logger="forecastd.pipeline"):
            r = run_once(config, _ts(500 + k), keep_outputs=True)
        warnings.append([rec.getMessage() for rec in caplog.records if rec.levelname == "WARNING"
                         and "cannot start" in rec.getMessage()])
        assert {"sine", "walk"} <= set(r.outputs.anomalies["series_id"]), k  # the others run on
        waiting.append(state_store(config).load_stream(r.model_version)[1].get("waiting_warned"))
    assert len(warnings[0]) == 1 and "'dead' 0 of" in warnings[0][0] and "'sparse' 3 of" in warnings[0][0]
    assert warnings[1:] == [[], []]  # once
    assert waiting == [["dead", "sparse"]] * 3


def test_listing_every_tick_finds_the_newcomer_at_once(trained, tmp_path):
    config, data = _ticked_to_500(trained, tmp_path, "0")
    old = data[(data["series_id"] == "walk") & (data["ts"] < _ts(450))].assign(series_id="old")
    pd.concat([data[data["ts"] < _ts(501)], old]).to_parquet(tmp_path / "data.parquet")
    r = run_once(config, _ts(501), keep_outputs=True)
    assert (r.outputs.anomalies["series_id"] == "old").sum() >= 1


def test_long_gap_restarts_the_series_from_a_warm_up(trained, tmp_path):
    _, data = trained
    cfg = _workspace(trained, tmp_path)
    config = load_config(cfg)
    data[data["ts"] < _ts(500)].to_parquet(tmp_path / "data.parquet")
    run_once(config, _ts(500))
    # "walk" goes silent for 40 steps (> max_gap = 12) and comes back.
    gap = (data["series_id"] == "walk") & (data["ts"] >= _ts(500)) & (data["ts"] < _ts(540))
    data[~gap & (data["ts"] < _ts(600))].to_parquet(tmp_path / "data.parquet")
    r = run_once(config, _ts(600), keep_outputs=True)
    walk = r.outputs.anomalies[r.outputs.anomalies["series_id"] == "walk"]
    # Restarted fresh at 540: nothing written during its 24-step warm-up, then every point.
    assert walk["ts"].min() == _ts(540 + 24) and len(walk) == 600 - 564
    assert (r.outputs.anomalies["series_id"] == "sine").sum() == 100


def test_points_stamped_after_the_hour_are_not_read_again_as_late(trained, tmp_path):
    """Hourly data stamped at :10 sits on the :00 step; a read from the step's time brought the :10 point
    back at every tick, counted as late."""
    src, data = trained
    shutil.copytree(src / "state", tmp_path / "state")
    config = load_config(_write_config(tmp_path, tmp_path / "data.parquet"))
    data = data.assign(ts=data["ts"] + pd.Timedelta(minutes=10))
    for stop in (500, 505, 510):
        data[data["ts"] < _ts(stop)].to_parquet(tmp_path / "data.parquet")
        r = run_once(config, _ts(stop))
    assert r.points == 3 * 5 and r.rows_read == 3 * 5
    assert r.repairs == {"snapped to grid": 3 * 5}


def test_a_silent_series_backlog_with_no_newer_rows_waits_for_the_listing(trained, tmp_path):
    config, data = _ticked_to_500(trained, tmp_path, "1e7")
    walk = data["series_id"] == "walk"
    # "walk" stops at 499, and is more than max_gap = 12 steps behind at 530
    data[(data["ts"] < _ts(530)) & ~(walk & (data["ts"] >= _ts(500)))].to_parquet(tmp_path / "data.parquet")
    run_once(config, _ts(530))
    data = data[(data["ts"] < _ts(531)) & ~(walk & (data["ts"] >= _ts(510)))]  # its backlog, 500-509, arrives
    data.to_parquet(tmp_path / "data.parquet")
    r = run_once(config, _ts(531), keep_outputs=True)
    assert r.rows_read == 2 and "walk" not in set(r.outputs.anomalies["series_id"])
    relisting = load_config(_write_config(tmp_path, tmp_path / "data.parquet", serve="list_series_every = 0"))
    r = run_once(relisting, _ts(532), keep_outputs=True)
    walk_rows = r.outputs.anomalies[r.outputs.anomalies["series_id"] == "walk"]
    assert walk_rows["ts"].tolist() == [_ts(i) for i in range(500, 510)] and r.repairs == {}


def test_learning_beats_seasonal_naive(tmp_path):
    """Quality, not timing: on seasonal series a trained model must clearly beat seasonal naive."""
    data = _series(n=1500, seed=3)
    data = data[data["series_id"] != "walk"]  # nothing beats naive on a random walk
    data.to_parquet(tmp_path / "data.parquet")
    cfg = _write_config(tmp_path, tmp_path / "data.parquet")
    config = load_config(cfg, {"training.epochs": 15, "model.hidden_size": 32, "model.horizon": 24,
                               "model.lookback": "auto"})
    summary = train(config, _ts(1500))
    # "auto" is fixed at training for the grid and the history (1,500 hourly steps: 30), and the
    # manifest keeps the number, so every later load builds the same model.
    store = state_store(config)
    assert store.manifest(summary.version)["config"]["model"]["lookback"] == 30
    assert store.load_live().model.lookback == 30
    assert summary.metrics["val_mse"] < 0.5 * summary.metrics["val_persistence_mse"]
    bf = backfill(config, _ts(1200), _ts(1499), keep_outputs=True, write=False).outputs
    actual = data.set_index(["series_id", "ts"])["value"]
    f = bf.forecasts[bf.forecasts["step"].isin([1, 12, 24])]
    truth = actual.reindex(pd.MultiIndex.from_arrays([f["series_id"], f["target_ts"]])).to_numpy()
    naive = actual.reindex(pd.MultiIndex.from_arrays(
        [f["series_id"], f["target_ts"] - pd.Timedelta(hours=24)])).to_numpy()
    ok = np.isfinite(truth)
    model_mae = np.mean(np.abs(f["mean"].to_numpy()[ok] - truth[ok]))
    naive_mae = np.mean(np.abs(naive[ok] - truth[ok]))
    assert model_mae < 0.8 * naive_mae, (model_mae, naive_mae)


def test_bad_input_is_repaired_counted_and_the_others_carry_on(trained, tmp_path):
    _, data = trained
    cfg = _workspace(trained, tmp_path)
    config = load_config(cfg)
    good = data[data["ts"] < _ts(500)]
    bad = pd.DataFrame({
        "series_id": ["'; DROP TABLE x;--"] * 30 + ["constant"] * 30 + ["one-point"],
        "ts": list(pd.date_range(_ts(470), periods=30, freq="h")) * 2 + [_ts(499)],
        "value": [np.nan, np.inf, -np.inf] + list(np.arange(27.0)) + [7.0] * 30 + [1.0],
    })
    dup = good[good["series_id"] == "sine"].tail(3)  # duplicates of existing rows, out of order
    raw = pd.concat([good, bad, dup.iloc[::-1]], ignore_index=True)
    raw["ts"] = raw["ts"].astype("datetime64[ns, UTC]")
    raw.to_parquet(tmp_path / "data.parquet")
    r = run_once(config, _ts(500), keep_outputs=True)
    assert r.repairs["NaN kept as missing"] == 1 and r.repairs["inf kept as missing"] == 2
    assert r.repairs["duplicate timestamp resolved by 'last'"] == 3
    a = r.outputs.anomalies
    for sid in ["sine", "walk", "drift", "'; DROP TABLE x;--", "constant"]:
        assert (a["series_id"] == sid).sum() == 1, sid
    assert "one-point" not in set(a["series_id"])  # waits for START_POINTS points to measure its unit
    assert np.isfinite(r.outputs.forecasts["mean"]).all()
    constant = r.outputs.forecasts[r.outputs.forecasts["series_id"] == "constant"]
    assert np.allclose(constant["mean"], 7.0, atol=0.5)


def test_clear_errors_for_empty_source_and_untrained_state(tmp_path):
    pd.DataFrame({"series_id": pd.Series([], dtype=str), "ts": pd.Series([], dtype="datetime64[ns, UTC]"),
                  "value": pd.Series([], dtype=float)}).to_parquet(tmp_path / "data.parquet")
    config = load_config(_write_config(tmp_path, tmp_path / "data.parquet"), {"data.freq": "1h"})
    with pytest.raises(DataError, match="no usable rows"):
        train(config, START)
    with pytest.raises(ModelError, match="forecastd train"):
        run_once(config, START)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_serving_on_cuda_without_a_gpu_names_the_setting(trained, tmp_path):
    cfg = _workspace(trained, tmp_path)
    _, data = trained
    data[data["ts"] < _ts(420)].to_parquet(tmp_path / "data.parquet")
    config = load_config(cfg, {"serve.device": "cuda"})
    with pytest.raises(ModelError, match=r'\[serve\] device = "cuda" but no CUDA device'):
        run_once(config, _ts(420))
    assert load_config(cfg).serve.device == "cpu"  # the default, also on GPU hosts


def test_daily_data_at_local_midnight_keeps_one_row_a_day_across_a_dst_change(tmp_path):
    """Auckland (+12 / +13 h): local midnight is 12:00 or 11:00 UTC. On a grid of UTC midnights every row
    was counted as snapped, and the 29th and 30th (either side of the 2024-09-29 change) met on one step."""
    zone = "Pacific/Auckland"
    days = pd.date_range("2024-05-01", "2024-10-03", freq="D")  # naive local midnights, as a user stores dates
    rng = np.random.default_rng(0)
    t = np.arange(len(days))
    data = pd.DataFrame({"series_id": "sales", "ts": days.as_unit("ns"),
                         "value": 50 + 10 * np.sin(2 * np.pi * t / 7) + rng.normal(0, 1, len(days))})
    cfg = _write_config(tmp_path, tmp_path / "data.parquet")
    cfg.write_text(cfg.read_text().replace("[source]\n", f'[source]\ntimezone = "{zone}"\n', 1))
    config = load_config(cfg, {"training.epochs": 1})  # the grid is under test, not the model

    def upto(day: str) -> pd.Timestamp:  # writes the rows before that local day; returns its UTC instant
        data[data["ts"] < pd.Timestamp(day)].to_parquet(tmp_path / "data.parquet")
        return pd.Timestamp(day, tz=zone).tz_convert("UTC")

    summary = train(config, upto("2024-09-01"))
    manifest = state_store(config).manifest(summary.version)
    assert pd.Timedelta(pd.tseries.frequencies.to_offset(manifest["freq"])) == pd.Timedelta(days=1)  # inferred
    assert manifest["zone"] == zone
    first = run_once(config, upto("2024-09-27"), keep_outputs=True)  # warm-up over the history, then rows
    second = run_once(config, upto("2024-10-04"), keep_outputs=True)  # the week across the change
    assert first.repairs == {} and second.repairs == {}  # nothing snapped, nothing a duplicate
    a = second.outputs.anomalies
    expected = pd.date_range("2024-09-27", "2024-10-03", freq="D", tz=zone).tz_convert("UTC")
    assert a["ts"].tolist() == expected.tolist()
    assert a["ts"].iloc[2:4].tolist() == [pd.Timestamp("2024-09-28 12:00", tz="UTC"),  # the 29th, +12
                                          pd.Timestamp("2024-09-29 11:00", tz="UTC")]  # the 30th, +13
    values = data.set_index("ts")["value"]
    np.testing.assert_array_equal(a["value"], values[pd.date_range("2024-09-27", "2024-10-03", freq="D")])
    both = pd.concat([first.outputs.anomalies["ts"], a["ts"]])
    assert both.is_unique and (both.dt.tz_convert(zone).dt.hour == 0).all()
    f = second.outputs.forecasts
    assert (f["issued_at"].dt.tz_convert(zone).dt.hour == 0).all()
    assert (f["target_ts"].dt.tz_convert(zone).dt.hour == 0).all()
    # A forecast k days ahead is for the local midnight k days on, whatever the hours between.
    issued = f["issued_at"].dt.tz_convert(zone).dt.tz_localize(None)
    target = f["target_ts"].dt.tz_convert(zone).dt.tz_localize(None)
    assert ((target - issued) == pd.to_timedelta(f["step"], unit="D")).all()
