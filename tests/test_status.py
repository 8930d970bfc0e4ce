"""`forecastd status` and `forecastd models`: the library function and the commands over it."""

from __future__ import annotations

import datetime as dt
import json
import os

import pandas as pd
import pytest
from typer.testing import CliRunner

from forecastd.cli import app
from forecastd.config import load_config
from forecastd.daemon import StateLock
from forecastd.errors import LockError
from forecastd.pipeline import run_once, state_store
from forecastd.status import running_pid, status, write_daemon_info

from serve_support import T0, append_rows, clone

runner = CliRunner()
NOW = dt.datetime(2024, 2, 16, 12, 0, tzinfo=dt.timezone.utc)  # 13 hours after the data ends at T0


def test_status_reports_versions_watermarks_daemon_and_anomalies(tmp_path):
    config = load_config(clone(tmp_path))
    append_rows(tmp_path / "src.db", T0, T0 + pd.Timedelta(hours=6))
    run_once(config, NOW)
    store = state_store(config)
    write_daemon_info(store, {"pid": 1, "state": "running", "last_tick": {"at": NOW.isoformat(), "outcome": "ok",
                                                                          "duration_seconds": 0.25}})
    s = status(config, NOW)
    assert s["live_version"] == 1
    [model] = s["models"]
    assert model["live"] and model["val_loss"] == pytest.approx(store.manifest(1)["metrics"]["val_loss"])
    assert {r["series_id"] for r in s["series"]} == {"price-1", "sensor-temp-1", "sine"}
    for r in s["series"]:
        assert pd.Timestamp(r["watermark"]) == T0 + pd.Timedelta(hours=6)
        assert r["lag_steps"] == pytest.approx(7.0) and r["lag_seconds"] == 7 * 3600
    assert not s["daemon"]["running"] and s["daemon"]["last_tick"]["duration_seconds"] == 0.25  # pid 1 holds no lock
    a = s["anomalies"]
    # The day before NOW holds the template's first tick (the last point at T0 of each series) and the six
    # hours after it.
    assert a["scored"] == 3 * (1 + 6)
    assert a["flagged"] == sum(a["by_series"].values()) and len(a["top"]) == min(a["flagged"], 10)
    assert s["problems"] == []
    json.dumps(s)  # plain data, for --json


def test_status_lists_series_that_only_the_handover_record_holds(tmp_path):
    """After more promotions than [state] keep_versions with no data between, every stream was pruned and
    `status` listed no series, though ticks continue them from the handover record."""
    config = load_config(clone(tmp_path))
    append_rows(tmp_path / "src.db", T0, T0 + pd.Timedelta(hours=6))
    run_once(config, NOW)
    store = state_store(config)
    for _ in range(3):  # retrains promoted in a quiet hour
        mv = store.load_live()
        store.set_live(store.save_model(mv.model, store.manifest(mv.version), keep=2))
    assert not [v for v in store.versions() if store.load_stream(v)[0] is not None]
    s = status(config, NOW)
    assert {r["series_id"] for r in s["series"]} == {"price-1", "sensor-temp-1", "sine"}
    assert all(pd.Timestamp(r["watermark"]) == T0 + pd.Timedelta(hours=6) and r["model_version"] is None
               for r in s["series"])
    json.dumps(s)


def test_status_names_broken_state_instead_of_empty_or_healthy_tables(tmp_path):
    """Lost checkpoints, live weights that fail their checksum, a deleted live pointer and a state
    directory that does not exist each showed as empty tables or a healthy model, exit 0, no word."""
    config = load_config(clone(tmp_path))
    store = state_store(config)
    write_daemon_info(store, {"pid": 1, "last_tick": {"at": NOW.isoformat(), "outcome": "ok"}})
    weights = store.root / "models" / "v000001" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"garbage!")
    for f in (store.root / "streams").rglob("ckpt-*"):
        f.unlink()
    problems = status(config, NOW)["problems"]
    assert len(problems) == 2
    assert "live model v1 does not load" in problems[0] and "fail their checksum" in problems[0]
    assert "no stream checkpoint, though a daemon has ticked" in problems[1]
    (store.root / "live.json").unlink()
    (store.root / "history.json").unlink(missing_ok=True)
    assert status(config, NOW)["problems"] == ["no model is live (no live.json): forecastd models promote 1"]
    result = runner.invoke(app, ["status", "--config", str(tmp_path / "forecastd.toml")])
    assert result.exit_code == 0 and "problem: no model is live" in result.output
    gone = load_config(tmp_path / "forecastd.toml", {"state.dir": str(tmp_path / "nowhere")})
    assert "does not exist" in status(gone, NOW)["problems"][0]


def test_status_names_new_series_that_cannot_start(tmp_path):
    """A tick that warned about new series without enough observed values (`pipeline._warn_stuck`) keeps
    them in its checkpoint; `status` names them as a problem until they start."""
    config = load_config(clone(tmp_path))
    append_rows(tmp_path / "src.db", T0, T0 + pd.Timedelta(hours=1))
    run_once(config, NOW)
    store = state_store(config)
    assert status(config, NOW)["problems"] == []
    state, info = store.load_stream(1)
    store.save_stream(1, state, {**info, "waiting_warned": ["dead-sensor"]}, keep=3)
    [problem] = status(config, NOW)["problems"]
    assert "1 new series cannot start" in problem and "'dead-sensor'" in problem and "value_column" in problem


def test_running_pid_comes_from_the_lock(tmp_path):
    assert running_pid(state_store(load_config(clone(tmp_path)))) is None
    store = state_store(load_config(tmp_path / "forecastd.toml"))
    with StateLock(store.root):
        assert running_pid(store) == os.getpid()
        with pytest.raises(LockError, match=f"in use by forecastd pid {os.getpid()}"):
            StateLock(store.root).acquire()
    assert running_pid(store) is None


def test_status_and_models_commands(tmp_path):
    config = clone(tmp_path)
    result = runner.invoke(app, ["status", "--config", str(config), "--now", "2024-02-16T12:00"])
    assert result.exit_code == 0, result.output
    assert "not running" in result.output and "sensor-temp-1" in result.output and "v1" in result.output
    result = runner.invoke(app, ["status", "--config", str(config), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["live_version"] == 1

    result = runner.invoke(app, ["models", "list", "--config", str(config), "--json"])
    assert [m["version"] for m in json.loads(result.output)] == [1]
    result = runner.invoke(app, ["models", "promote", "1", "--config", str(config)])
    assert result.exit_code == 0 and "already live" in result.output
    result = runner.invoke(app, ["models", "promote", "7", "--config", str(config)])
    assert result.exit_code == 6 and "does not exist" in result.output
    result = runner.invoke(app, ["models", "rollback", "--config", str(config)])
    assert result.exit_code == 6 and "nothing to roll back" in result.output


def test_serve_commands_share_the_cli_options():
    """cli_serve declares --config and --now itself (importing cli there would be circular): same as cli's."""
    import typing

    from forecastd import cli, cli_serve

    for name in ("ConfigOption", "NowOption"):
        ours, theirs = (typing.get_args(getattr(m, name)) for m in (cli_serve, cli))
        assert ours[0] == theirs[0], name
        assert vars(ours[1]) == vars(theirs[1]), name
    assert cli_serve.DEFAULT_CONFIG == cli.DEFAULT_CONFIG


def test_status_does_not_wait_for_a_sink_that_does_not_answer(tmp_path, monkeypatch):
    """A sink table locked by a writer held `status` until the lock went."""
    import time

    import forecastd.status as status_module
    from forecastd.sinks.parquet import ParquetSink

    config = load_config(clone(tmp_path))
    monkeypatch.setattr(status_module, "SINK_SECONDS", 0.2)
    monkeypatch.setattr(ParquetSink, "read", lambda self, *a, **k: time.sleep(3))
    started = time.monotonic()
    s = status(config, NOW)
    assert time.monotonic() - started < 2.5
    assert s["anomalies"]["error"].startswith("the sink did not answer within 0.2 s") and s["live_version"] == 1
