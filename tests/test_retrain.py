"""Retraining: the verdict, the tail comparison, switching the live model without a gap, rollback."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from forecastd import retrain as retrain_module
from forecastd.config import cron_fields, load_config
from forecastd.errors import ModelError
from forecastd.pipeline import TrainSummary, run_once, state_store
from forecastd.retrain import decide, retrain, rollback_target, switch_live, tail_losses

from serve_support import T0, append_rows, clone, outputs

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize("live, challenger, margin, always, promote", [
    (1.0, 0.9, 0.0, False, True),
    (1.0, 1.0, 0.0, False, False),  # a tie keeps the live model
    (1.0, 0.97, 0.05, False, False),  # better, but not by the margin
    (1.0, 0.94, 0.05, False, True),
    (1.0, 5.0, 0.0, True, True),  # always_promote
    (1.0, math.nan, 0.0, True, False),  # never a non-finite challenger, even with always_promote
    (1.0, math.inf, 0.0, False, False),
    (math.nan, 1.0, 0.0, False, True),
])
def test_decide(live, challenger, margin, always, promote):
    assert decide(live, challenger, margin, always)[0] is promote


@pytest.mark.parametrize("expr, weekday", [
    ("0 3 * * *", "*"),
    ("0 3 * * 0", "sun"),  # crontab's Sunday, which APScheduler 3 would read as Monday
    ("0 3 * * 7", "sun"),
    ("0 3 * * 1-5", "mon,tue,wed,thu,fri"),
    ("0 3 * * */2", "sun,tue,thu,sat"),
    ("0 3 * * mon-fri", "mon-fri"),
])
def test_cron_weekdays_follow_crontab(expr, weekday):
    assert cron_fields(expr)["day_of_week"] == weekday


def test_cron_with_seconds():
    assert cron_fields("*/5 * * * * *") == {"second": "*/5", "minute": "*", "hour": "*", "day": "*", "month": "*",
                                            "day_of_week": "*"}
    with pytest.raises(ValueError):
        cron_fields("0 3 * *")


def test_the_live_model_against_itself_scores_its_own_validation_loss(tmp_path):
    config = load_config(clone(tmp_path))
    store = state_store(config)
    mv = store.load_model(1)
    live, challenger = tail_losses(config, mv, mv, NOW)
    assert live == challenger
    # On its own tail this is the loss training reported (same data, same mask, same definition).
    assert challenger == pytest.approx(mv.manifest["metrics"]["val_loss"], rel=1e-4)


def test_retrain_promotes_and_the_switch_leaves_no_gap(tmp_path):
    """A promoted challenger warms up from the old model's watermarks: every new point gets its row."""
    config = load_config(clone(tmp_path, serve={"always_promote": True}))
    store = state_store(config)
    append_rows(tmp_path / "src.db", T0, T0 + pd.Timedelta(days=2))
    result = retrain(config, NOW)
    assert result.outcome == "promote" and result.challenger == 2 and result.live == 1, result
    assert math.isfinite(result.live_loss) and math.isfinite(result.challenger_loss)
    assert store.live_version() == 1  # retrain judges; the caller switches
    assert switch_live(store, 2, reason="test", now=NOW) == 1
    assert store.live_history()[-1]["version"] == 2

    # The old stream once saw values far outside anything in the days the new one warms up on, and
    # reported an incident 26 points before its watermark (more than the warm-up of 24) that the 72 new
    # points leave open (cooldown 100).
    old = store.load_stream(1)[0]
    old.anomaly.lo[:], old.anomaly.hi[:] = -1e6, 1e6
    old.anomaly.peak[:], old.anomaly.since[:] = 0.999, 26
    old.anomaly.slow_count[:] = 5000  # and a slow channel with a long history behind it
    store.save_stream(1, old, {}, keep=2)

    append_rows(tmp_path / "src.db", T0 + pd.Timedelta(days=2), T0 + pd.Timedelta(days=3))
    report = run_once(config, NOW)
    assert report.model_version == 2
    # The new stream warmed up over a few days, but knows every value the old one had seen.
    new_state = store.load_stream(2)[0]
    assert sorted(new_state.series_ids) == sorted(old.series_ids)
    assert (new_state.anomaly.lo == -1e6).all() and (new_state.anomaly.hi == 1e6).all()
    # ... and knows the incident is still open: its count of points goes on from the old one's (every
    # scored point after the old watermark adds one), and no point of the new stream, all scoring lower,
    # reports it again.
    steps_after = new_state.step - old.take(np.array([old.series_ids.index(i) for i in new_state.series_ids])).step
    assert (new_state.anomaly.peak == 0.999).all()
    assert (new_state.anomaly.since > 26 + steps_after - 5).all() and (new_state.anomaly.since <= 26 + steps_after).all()
    # The slow channel goes on from the old stream's history (the warm-up's points reach it again);
    # the main likelihood starts over with the new model.
    assert (new_state.anomaly.slow_count >= 5000 + steps_after).all()
    assert (new_state.anomaly.count < 5000).all()
    anomalies = outputs(tmp_path / "forecastd.toml")["anomalies"]
    new = anomalies[anomalies["ts"] > T0]
    assert len(new) == 3 * 24 * 3  # three days of three hourly series, none missing
    assert not new.duplicated(["series_id", "ts"]).any()
    # The days before the switch were written by v1 (nothing ticked them in between, so v2 did), the
    # model only ever ran from its own warmed-up state.
    assert set(new["model_version"]) == {2}
    assert (new["score"] == 0).all()
    assert store.load_stream(2)[0] is not None


def test_a_failed_training_leaves_the_live_model(tmp_path):
    config = load_config(clone(tmp_path, source={"table": "no_such_table"}, serve={"always_promote": True}))
    result = retrain(config, NOW)
    assert result.outcome == "failed" and "training failed" in result.reason and "no_such_table" in result.reason
    assert state_store(config).live_version() == 1


def test_a_non_finite_challenger_is_never_promoted(tmp_path, monkeypatch):
    config = load_config(clone(tmp_path, serve={"always_promote": True}))
    monkeypatch.setattr(retrain_module, "train", lambda c, now, make_live, **kwargs: TrainSummary(
        2, 3, 100, "h", {"val_loss": math.nan}, [], {}))
    result = retrain(config, NOW)
    assert result.outcome == "failed" and "non-finite" in result.reason
    assert state_store(config).live_version() == 1


def _add_version(store, seed: int) -> int:
    mv = store.load_model(1)
    torch.manual_seed(seed)
    torch.nn.init.normal_(mv.model.head.weight, std=0.01)
    return store.save_model(mv.model, {k: v for k, v in mv.manifest.items()
                                       if k not in ("version", "weights_sha256", "format", "libraries")}, keep=10)


def test_switches_keep_only_the_freshest_stream_and_rollback_returns(tmp_path):
    config = load_config(clone(tmp_path))
    store = state_store(config)
    _add_version(store, 2)  # never served: rollback must skip it
    v3 = _add_version(store, 3)
    # v3 carries a stale stream (say, from an earlier time it served); v1's is the fresh one.
    state, _ = store.load_stream(1)
    stale = state.take(range(len(state)))
    stale.step -= 5
    store.save_stream(v3, stale, {"ticked_at": "2020-01-01T00:00:00+00:00"}, keep=3)
    with pytest.raises(ModelError, match="nothing to roll back"):
        rollback_target(store)

    switch_live(store, v3, reason="test", now=NOW)
    assert (store.root / "streams" / "v000001").exists()
    assert not (store.root / "streams" / "v000003").exists()  # v3 warms up from v1's watermarks instead
    append_rows(tmp_path / "src.db", T0, T0 + pd.Timedelta(hours=2))
    assert run_once(config, NOW).anomalies_written == 2 * 3  # from v1's watermarks: no gap
    grid = store.load_model(v3).grid
    assert set(store.load_stream(v3)[0].watermarks(grid)) == {T0 + pd.Timedelta(hours=2)}

    # v2 never served: rollback skips it and returns to v1, which continues from v3's fresher stream.
    assert rollback_target(store) == 1
    switch_live(store, rollback_target(store), reason="rollback", now=NOW)
    assert store.live_version() == 1
    assert sorted(p.name for p in (store.root / "streams").iterdir()) == ["v000003"]
    # v1 by `forecastd train` (the fixture's), then the two switches.
    assert [e["version"] for e in json.loads((store.root / "history.json").read_text())] == [1, 3, 1]


def test_a_switch_keeps_the_live_stream_and_hands_over_series_only_older_streams_hold(tmp_path):
    """An older model's stream held more series (one silent since) than the live one, so a switch kept it
    and deleted the live stream: the new model replayed, and rewrote, everything the live model had
    written since. The live stream stays; the silent series' watermark moves to the handover record."""
    config = load_config(clone(tmp_path))
    store = state_store(config)
    live, _ = store.load_stream(1)
    v2 = _add_version(store, 2)
    older = live.take(range(len(live)))
    older.step -= 5  # behind the live stream
    silent = older.take([0])
    silent.series_ids = ["silent-sensor"]
    store.save_stream(v2, older.merge(silent), {}, keep=3)  # four series to the live stream's three
    v3 = _add_version(store, 3)
    switch_live(store, v3, reason="test", now=NOW)
    assert sorted(p.name for p in (store.root / "streams").iterdir()) == ["v000001"]
    ids, fields = store.load_handover()
    assert ids == ["silent-sensor"] and int(fields["step"][0]) == int(silent.step[0])
    append_rows(tmp_path / "src.db", T0, T0 + pd.Timedelta(hours=2))
    assert run_once(config, NOW).anomalies_written == 2 * 3  # only the new points: nothing replayed


def test_rollback_returns_to_the_model_that_served_not_a_challenger_kept_aside(tmp_path):
    """v1 serves, a retrain keeps its challenger v2 aside, `forecastd train` makes v3 live. Rollback went to
    v2, which never served: train's switch was not recorded, and nothing else told v1 had served."""
    from forecastd.pipeline import train

    config = load_config(clone(tmp_path))
    store = state_store(config)
    _add_version(store, 2)
    summary = train(config, NOW)
    assert store.live_version() == summary.version == 3
    assert store.live_history()[-1] == {"version": 3, "previous": 1, "at": NOW.isoformat(), "reason": "forecastd train"}
    assert rollback_target(store) == 1
    # Named by the history alone: v1's stream gone (a switch keeps one), it still counts as having served.
    for d in (store.root / "streams").iterdir():
        shutil.rmtree(d)
    assert rollback_target(store) == 1


def test_a_corrupt_version_is_never_made_live(tmp_path):
    config = load_config(clone(tmp_path))
    store = state_store(config)
    v2 = _add_version(store, 2)
    weights = store.root / "models" / f"v{v2:06d}" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ModelError, match="cannot be made live"):
        switch_live(store, v2, reason="test", now=NOW)
    with pytest.raises(ModelError, match="does not exist"):
        switch_live(store, 99, reason="test", now=NOW)
    assert store.live_version() == 1 and (store.root / "streams" / "v000001").exists()


def test_a_corrupt_live_version_is_replaced_by_a_retrain_and_its_fallback_never_pruned(tmp_path):
    """With the live version's weights corrupt, v1 served; every retrain then failed to compare with the
    corrupt one, and pruning, which spared only the live version, deleted v1: nothing loaded any more."""
    config = load_config(clone(tmp_path, serve={"always_promote": True}))
    store = state_store(config)
    v2 = _add_version(store, 2)
    store.set_live(v2)
    weights = store.root / "models" / f"v{v2:06d}" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    mv = store.load_model(1)
    manifest = {k: v for k, v in mv.manifest.items() if k not in ("version", "weights_sha256", "format", "libraries")}
    for _ in range(3):
        store.save_model(mv.model, manifest, keep=1)
    assert 1 in store.versions() and store.load_live().version == 1
    result = retrain(config, NOW)
    assert result.outcome == "promote", result.reason


def test_tail_loss_is_the_pure_half_of_tail_losses(tmp_path):
    """Benchmarks judge challengers with `tail_loss` on a frame they hold; it must agree with the daemon's path."""
    from forecastd.frames import validate
    from forecastd.retrain import tail_loss
    from forecastd.sources import open_source

    config = load_config(clone(tmp_path))
    mv = state_store(config).load_model(1)
    frame, _ = validate(open_source(config).read(until=pd.Timestamp(mv.manifest["data_end"])), grid=mv.grid,
                        timezone=config.source.timezone, duplicates=config.data.duplicates, now=NOW)
    own = tail_loss(mv.model, mv.model_config, mv.scales, frame, mv.grid, config.data,
                    config.training.validation_fraction)
    assert own == tail_losses(config, mv, mv, NOW)[0]


def test_retrain_warm_starts_from_the_live_weights(tmp_path, monkeypatch):
    import forecastd.pipeline as pipeline

    config = load_config(clone(tmp_path))
    store = state_store(config)
    live = store.load_model(1)
    seen = []
    real_fit = pipeline.fit

    def spy(model, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(pipeline, "fit", spy)
    result = retrain(config, NOW)
    assert result.outcome in ("promote", "keep"), result
    assert result.metrics["warm_start_from"] == 1
    for name, value in live.model.state_dict().items():
        torch.testing.assert_close(seen[0][name], value)


def test_retrain_window_bounds_what_the_challenger_learns_from(tmp_path):
    config = load_config(clone(tmp_path, serve={"retrain_window": 48}))
    store = state_store(config)
    result = retrain(config, NOW)
    assert result.challenger is not None, result
    manifest = store.manifest(result.challenger)
    assert 0 < manifest["n_points"] <= 48 * manifest["n_series"]
    assert manifest["n_points"] < store.manifest(1)["n_points"]


def test_a_challenger_of_another_shape_starts_from_fresh_weights(tmp_path):
    live_hidden = state_store(load_config(clone(tmp_path))).manifest(1)["config"]["model"]["hidden_size"]
    config = load_config(clone(tmp_path, model={"hidden_size": live_hidden + 8}))
    result = retrain(config, NOW)
    assert result.challenger is not None, result
    assert result.metrics["warm_start_from"] is None


def test_a_longer_window_warm_starts_and_forecasts_as_the_live_model_did():
    from forecastd.config import ModelConfig
    from forecastd.models import Forecaster
    from forecastd.pipeline import warm_weights

    torch.manual_seed(0)
    short = ModelConfig(hidden_size=8, horizon=3, lookback=4)
    live = Forecaster(11, short).eval()
    with torch.no_grad():
        live.path.normal_()
        live.head.weight.normal_()
    for lookback in (4, 10):
        wide = Forecaster(11, dataclasses.replace(short, lookback=lookback)).eval()
        wide.load_state_dict(warm_weights(live, short, dataclasses.replace(short, lookback=lookback)))
        x = torch.randn(2, 30, 11)
        state = wide.initial_state(2)
        state = state._replace(window=torch.randn(2, lookback))
        mean, scale, after = wide(x, state)
        # The live model sees only the last 4 changes before x: the same forecasts.
        ref_mean, ref_scale, _ = live(x, live.initial_state(2)._replace(window=state.window[:, -4:]))
        torch.testing.assert_close(mean, ref_mean)
        torch.testing.assert_close(scale, ref_scale)
    none = ModelConfig(hidden_size=8, horizon=3, lookback=0)
    assert warm_weights(Forecaster(11, none), none, short)["path"].abs().sum() == 0
    # A shorter window or another shape cannot carry the weights over.
    assert warm_weights(live, short, dataclasses.replace(short, lookback=2)) is None
    assert warm_weights(live, short, dataclasses.replace(short, hidden_size=16)) is None


def test_growth_wait_counts_the_points_the_newest_version_did_not_learn_from(tmp_path):
    config = load_config(clone(tmp_path))
    store = state_store(config)
    _add_version(store, seed=3)  # v2: the newest, not live; it learnt from the same rows as v1
    manifest = store.manifest(2)
    end, points = pd.Timestamp(manifest["data_end"]), manifest["n_points"]
    known = sorted(manifest["scales"])
    need = math.ceil(0.25 * points)

    def frame(new_points: int, new_series_points: int = 0):
        old = pd.DataFrame({"series_id": known[0], "ts": end - pd.to_timedelta(np.arange(50), "h"), "value": 1.0})
        new = pd.DataFrame({"series_id": known[1], "ts": end + pd.to_timedelta(np.arange(1, new_points + 1), "h"),
                            "value": 1.0})
        # A series the version never saw, with history older than its data end: every point is new to it.
        other = pd.DataFrame({"series_id": "newcomer", "ts": end - pd.to_timedelta(np.arange(new_series_points), "h"),
                              "value": 1.0})
        return pd.concat([old, new, other], ignore_index=True)

    wait = retrain_module.growth_wait(store, frame(need - 1), 0.25, config.model)
    assert wait == (f"{need - 1} new points since v2 learnt from {points} (data to {end.isoformat()}); "
                    f"[serve] retrain_growth = 0.25 waits for {need}")
    assert retrain_module.growth_wait(store, frame(need), 0.25, config.model) is None
    assert retrain_module.growth_wait(store, frame(need - 10, new_series_points=10), 0.25, config.model) is None
    assert retrain_module.growth_wait(store, frame(need - 10, new_series_points=9), 0.25, config.model) is not None
    assert retrain_module.growth_wait(store, frame(0), 0.0, config.model) is None  # 0: every retrain trains
    # New [model] settings need a new model: no wait. The resolved "auto" lookback is no new setting.
    wider = dataclasses.replace(config.model, hidden_size=config.model.hidden_size + 8)
    assert retrain_module.growth_wait(store, frame(0), 0.25, wider) is None
    assert config.model.lookback == "auto" and manifest["config"]["model"]["lookback"] != "auto"
    assert retrain_module.growth_wait(store, frame(0), 0.25, config.model) is not None


def test_a_scheduled_retrain_waits_for_the_history_to_grow(tmp_path):
    config = load_config(clone(tmp_path, serve={"retrain_growth": 0.5}))
    store = state_store(config)
    result = retrain(config, NOW)
    assert result.outcome == "skipped" and result.challenger is None and result.live == 1, result
    assert result.reason.startswith("0 new points since v1") and "retrain_growth = 0.5" in result.reason
    assert store.versions() == [1]  # nothing trained, nothing saved

    need = math.ceil(0.5 * store.manifest(1)["n_points"])
    added, day = 0, T0
    while added + 3 * 24 < need:  # just short of it, in whole days of the three hourly series
        added += append_rows(tmp_path / "src.db", day, day + pd.Timedelta(days=1))
        day += pd.Timedelta(days=1)
    assert retrain(config, NOW).outcome == "skipped"
    append_rows(tmp_path / "src.db", day, day + pd.Timedelta(days=1))
    result = retrain(config, NOW)
    assert result.outcome in ("promote", "keep") and result.challenger == 2, result
    # Whether or not v2 is promoted, it learnt from these points: the next run waits for growth past them.
    result = retrain(config, NOW)
    assert result.outcome == "skipped" and result.reason.startswith("0 new points since v2"), result
    assert store.versions() == [1, 2]
