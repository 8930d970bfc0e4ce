import json

import numpy as np
import pytest
import torch

from forecastd.config import ModelConfig, config_to_dict, example_config
from forecastd.errors import ModelError
from forecastd.models import Forecaster
from forecastd.frames import Grid
from forecastd.state import StateStore, StreamState, plan


def _state(ids, seed=0):
    rng = np.random.default_rng(seed)
    s = StreamState.fresh(ids, np.ones(len(ids)), 3, (1, 4))
    s.step[:] = np.arange(len(ids)) + 10
    s.hidden[:] = rng.normal(size=s.hidden.shape)
    return s


def _manifest():
    return {"config": config_to_dict(example_config()), "freq": "h", "n_features": 11, "scales": {"a": 1.0}}


def test_stream_checkpoint_roundtrip_and_corrupt_fallback(tmp_path, caplog):
    store = StateStore(tmp_path)
    s1 = _state(["a", "b"], 1)
    s2 = _state(["a", "b", "c"], 2)
    store.save_stream(1, s1, {}, keep=3)
    store.save_stream(1, s2, {}, keep=3)
    loaded, info = store.load_stream(1)
    assert loaded.series_ids == ["a", "b", "c"] and info["seq"] == 2
    np.testing.assert_array_equal(loaded.hidden, s2.hidden)
    # Truncate the newest checkpoint: the previous one takes over.
    newest = tmp_path / "streams" / "v000001" / "ckpt-000000002.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    loaded, info = store.load_stream(1)
    assert loaded.series_ids == ["a", "b"] and info["seq"] == 1
    # All of them unusable: no state, and an error that names the way to fill the gap.
    first = tmp_path / "streams" / "v000001" / "ckpt-000000001.safetensors"
    first.write_bytes(first.read_bytes()[:100])
    with caplog.at_level("ERROR"):
        assert store.load_stream(1) == (None, {})
    assert "forecastd backfill" in caplog.text


def test_old_checkpoints_are_pruned(tmp_path):
    store = StateStore(tmp_path)
    for i in range(5):
        store.save_stream(1, _state(["a"], i), {}, keep=2)
    assert len(list((tmp_path / "streams" / "v000001").glob("ckpt-*.json"))) == 2


def test_pruning_hands_over_the_series_only_a_pruned_stream_held(tmp_path, caplog):
    store = StateStore(tmp_path)
    m = Forecaster(11, ModelConfig())
    store.set_live(store.save_model(m, _manifest(), keep=1))
    store.save_stream(1, _state(["a", "b"]), {}, keep=2)  # a at step 10, b at 11
    store.set_live(store.save_model(m, _manifest(), keep=1))
    store.save_stream(2, _state(["b"]), {}, keep=2)  # v2 has run b (now at step 10), not a
    store.set_live(store.save_model(m, _manifest(), keep=1))  # prunes v1: only a is not in a kept stream
    assert store.versions() == [2, 3] and not (tmp_path / "streams" / "v000001").exists()
    assert store.load_handover()[0] == ["a"]
    store.set_live(store.save_model(m, _manifest(), keep=1))  # prunes v2, the last stream that held b
    ids, fields = store.load_handover()
    assert store.versions() == [3, 4] and ids == ["a", "b"] and fields["step"].tolist() == [10, 10]
    assert set(fields) == {"step", "lo", "hi", "peak", "since", "slow_short", "slow_mean", "slow_var",
                           "slow_count", "slow_exceed"}
    (tmp_path / "handover.safetensors").write_bytes(b"\0" * 64)
    assert store.load_handover() == ([], {}) and "handover record is unusable" in caplog.text


def test_a_version_being_written_by_another_process_keeps_its_number(tmp_path):
    """`forecastd train` beside a retrain worker: both took max + 1, and one's weights sat under the
    other's manifest. A version is claimed by creating its directory."""
    store = StateStore(tmp_path)
    m = Forecaster(11, ModelConfig())
    assert store.save_model(m, _manifest(), keep=5) == 1
    (tmp_path / "models" / "v000002").mkdir()  # another writer's weights are on their way
    assert store.save_model(m, _manifest(), keep=5) == 3
    assert store.versions() == [1, 3]


def test_an_unreadable_live_pointer_serves_the_newest_version_that_has_served(tmp_path, caplog):
    """It served the newest version, which may be a challenger a retrain kept and never promoted."""
    store = StateStore(tmp_path)
    m = Forecaster(11, ModelConfig())
    store.set_live(store.save_model(m, _manifest(), keep=5))
    store.save_stream(1, _state(["a"]), {}, keep=2)
    store.save_model(m, _manifest(), keep=5)  # v2: trained, kept, never live
    (tmp_path / "live.json").write_text("{trunc")
    assert store.live_version() == 1 and "serving v1" in caplog.text


def test_a_missing_live_pointer_is_recovered_from_the_switch_history_or_named(tmp_path, caplog):
    """A deleted live.json made every tick say "no trained model; run forecastd train", with the models
    and their streams intact. The last recorded switch names the live version; with no record and
    nothing that served, the error names the versions and the command that makes one live."""
    store = StateStore(tmp_path)
    m = Forecaster(11, ModelConfig())
    store.save_model(m, _manifest(), keep=5)
    (tmp_path / "live.json").unlink(missing_ok=True)
    with pytest.raises(ModelError, match=r"no model is live .* versions v1 exist.*forecastd models promote 1"):
        store.load_live()
    store.save_model(m, _manifest(), keep=5)
    store.set_live(1)
    store.record_switch(1, None, "forecastd train", "2024-01-01T00:00:00+00:00")
    (tmp_path / "live.json").unlink()
    with caplog.at_level("WARNING"):
        assert store.live_version() == 1 and store.load_live().version == 1
    assert "live.json is missing; serving v1, the last version made live (history.json)" in caplog.text


def test_model_versions_checksum_and_fallback(tmp_path):
    store = StateStore(tmp_path)
    m = Forecaster(11, ModelConfig())
    with pytest.raises(ModelError, match="forecastd train"):
        store.load_live()
    v1 = store.save_model(m, _manifest(), keep=5)
    torch.nn.init.normal_(m.head.weight)
    v2 = store.save_model(m, _manifest(), keep=5)
    store.set_live(v2)
    mv = store.load_live()
    assert mv.version == 2
    torch.testing.assert_close(mv.model.head.weight, m.head.weight)
    weights = tmp_path / "models" / "v000002" / "weights.safetensors"
    weights.write_bytes(b"garbage" + weights.read_bytes()[7:])
    assert store.load_live().version == v1  # corrupt live falls back with a warning
    assert json.loads((tmp_path / "models" / "v000001" / "manifest.json").read_text())["libraries"]["torch"]


def test_a_manifest_without_a_zone_loads_as_utc_and_a_zone_is_kept(tmp_path):
    """Models trained before grids had a zone put daily steps on UTC midnights: they keep serving so."""
    store = StateStore(tmp_path)
    m = Forecaster(11, ModelConfig())
    old = store.save_model(m, {**_manifest(), "freq": "D"}, keep=5)
    new = store.save_model(m, {**_manifest(), "freq": "D", "zone": "Pacific/Auckland"}, keep=5)
    store.set_live(old)
    assert store.load_live().grid == Grid("D") and store.load_live().grid.regular
    store.set_live(new)
    assert store.load_live().grid == Grid("D", "Pacific/Auckland")


def test_no_pickle_anywhere_in_the_state_dir(tmp_path):
    store = StateStore(tmp_path)
    store.save_model(Forecaster(11, ModelConfig()), _manifest(), keep=5)
    store.save_stream(1, _state(["a"]), {}, keep=2)
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert p.suffix in {".json", ".safetensors"}, p
            assert not p.read_bytes().startswith(b"\x80")  # pickle protocol marker


def test_prune_keeps_the_live_version(tmp_path):
    store = StateStore(tmp_path)
    m = Forecaster(11, ModelConfig())
    store.save_model(m, _manifest(), keep=2)
    store.set_live(1)
    for _ in range(3):
        store.save_model(m, _manifest(), keep=2)
    assert 1 in store.versions() and store.versions()[-1] == 4


def test_sweep_removes_crash_leftovers(tmp_path):
    store = StateStore(tmp_path)
    (tmp_path / "streams").mkdir()
    (tmp_path / "streams" / ".ckpt.json.abc.forecastd-tmp").write_text("half")
    assert store.sweep() == 1


def test_plan_continues_short_gaps_and_restarts_after_long_ones():
    steps = np.array([12, 13, 30, 31])
    segs = plan("a", steps, np.arange(4.0), state_step=10, max_gap=5)
    assert [(g.fresh, g.start) for g in segs] == [(False, 11), (True, 30)]
    assert np.isnan(segs[0].values[0]) and segs[0].values[1] == 0.0
    segs = plan("a", steps, np.arange(4.0), state_step=2, max_gap=5)
    assert segs[0].fresh  # silent for 9 steps > max_gap: start over


def test_merge_replaces_and_appends():
    a = _state(["a", "b"], 1)
    b = _state(["b", "c"], 2)
    m = a.merge(b)
    assert m.series_ids == ["a", "b", "c"]
    np.testing.assert_array_equal(m.hidden[1], b.hidden[0])
    np.testing.assert_array_equal(m.hidden[0], a.hidden[0])


def test_open_incidents_survive_a_checkpoint_and_older_checkpoints_load(tmp_path):
    store = StateStore(tmp_path)
    s = _state(["a", "b"])
    s.anomaly.peak[:] = [0.7, 0.0]
    s.anomaly.since[:] = [3, 2**62]
    store.save_stream(1, s, {}, keep=3)
    loaded, _ = store.load_stream(1)
    np.testing.assert_array_equal(loaded.anomaly.peak, [0.7, 0.0])
    np.testing.assert_array_equal(loaded.anomaly.since, [3, 2**62])
    # A checkpoint from before the cooldown: no incident is open, nothing is refused.
    arrays = {k: v for k, v in s.to_arrays().items() if k not in ("a_peak", "a_since")}
    old = StreamState.from_arrays(["a", "b"], arrays)
    np.testing.assert_array_equal(old.anomaly.peak, [0.0, 0.0])
    assert (old.anomaly.since > 10**9).all()


def test_the_empirical_tail_survives_a_checkpoint_and_older_checkpoints_start_it_empty(tmp_path):
    store = StateStore(tmp_path)
    s = _state(["a", "b"])
    s.anomaly.exceed[0] = np.linspace(0.2, 0.0, s.anomaly.exceed.shape[1])
    store.save_stream(1, s, {}, keep=3)
    loaded, _ = store.load_stream(1)
    np.testing.assert_array_equal(loaded.anomaly.exceed, s.anomaly.exceed)
    np.testing.assert_array_equal(loaded.take(np.array([1, 0])).anomaly.exceed, s.anomaly.exceed[::-1])
    # Before the empirical tail: no excursion seen yet, so the Gaussian tail decides until some are.
    old = StreamState.from_arrays(["a", "b"], {k: v for k, v in s.to_arrays().items() if k != "a_exceed"})
    assert old.anomaly.exceed.shape == s.anomaly.exceed.shape and (old.anomaly.exceed == 0).all()


def test_the_slow_channel_survives_a_checkpoint_and_older_checkpoints_start_it_empty(tmp_path):
    store = StateStore(tmp_path)
    s = _state(["a", "b"])
    s.anomaly.slow_short[:] = [0.7, 0.2]
    s.anomaly.slow_mean[:] = [0.5, 0.4]
    s.anomaly.slow_var[:] = [0.01, 0.02]
    s.anomaly.slow_count[:] = [300, 40]
    s.anomaly.slow_exceed[1] = np.linspace(0.1, 0.0, s.anomaly.slow_exceed.shape[1])
    store.save_stream(1, s, {}, keep=3)
    loaded, _ = store.load_stream(1)
    for name in ("slow_short", "slow_mean", "slow_var", "slow_count", "slow_exceed"):
        np.testing.assert_array_equal(getattr(loaded.anomaly, name), getattr(s.anomaly, name))
        np.testing.assert_array_equal(getattr(loaded.take(np.array([1, 0])).anomaly, name), getattr(s.anomaly, name)[::-1])
    # A checkpoint from before the slow channel: its history starts empty, the rest of the track is kept.
    old = StreamState.from_arrays(["a", "b"], {k: v for k, v in s.to_arrays().items() if not k.startswith("a_slow")})
    assert (old.anomaly.slow_short == 0).all() and (old.anomaly.slow_exceed == 0).all()
    assert old.anomaly.slow_exceed.shape == s.anomaly.slow_exceed.shape
    np.testing.assert_array_equal(old.anomaly.exceed, s.anomaly.exceed)


def test_pruning_removes_saves_that_never_finished(tmp_path, caplog):
    """A directory whose save a crash cut short has no manifest, so `versions` never lists it and pruning
    never reached it. Once it is old enough not to be another process's save in progress, it goes."""
    import os
    import time

    from forecastd.state import ABANDONED_SAVE_SECONDS

    store = StateStore(tmp_path)
    m = Forecaster(11, ModelConfig())
    store.save_model(m, _manifest(), keep=2)
    old, young = tmp_path / "models" / "v000002", tmp_path / "models" / "v000003"
    for d in (old, young):
        d.mkdir()
        (d / "weights.safetensors").write_bytes(b"partial")
    past = time.time() - ABANDONED_SAVE_SECONDS - 60
    os.utime(old, (past, past))
    with caplog.at_level("WARNING"):
        assert store.save_model(m, _manifest(), keep=2) == 4
    assert not old.exists() and young.exists()
    assert "v000002: a model save that never finished" in caplog.text
    assert store.versions() == [1, 4]
