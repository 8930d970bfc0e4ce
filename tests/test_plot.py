"""plot_series: writes a readable PNG from whatever frames exist, and names the series it cannot find."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from forecastd.errors import ConfigError, DataError
from forecastd.frames import ANOMALY_COLUMNS, FORECAST_COLUMNS
from forecastd.plot import plot_series

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _history(n: int = 300, gap: slice | None = None) -> pd.DataFrame:
    ts = pd.date_range("2024-03-01", periods=n, freq="h", tz="UTC").as_unit("ns")
    value = 20 + 3 * np.sin(2 * np.pi * np.arange(n) / 24) + np.random.default_rng(0).normal(0, 0.3, n)
    frame = pd.concat([
        pd.DataFrame({"series_id": "sensor-a", "ts": ts, "value": value}),
        pd.DataFrame({"series_id": "sensor-b", "ts": ts, "value": value * 2}),
    ], ignore_index=True)
    if gap is not None:
        a = frame[frame["series_id"] == "sensor-a"]
        frame = frame.drop(a.index[gap])
    return frame


def _anomalies(history: pd.DataFrame, series_id: str = "sensor-a") -> pd.DataFrame:
    # A one-step expectation a day behind (seasonal naive), a fixed band, and two forced flags.
    h = history[history["series_id"] == series_id].reset_index(drop=True)
    expected = h["value"].shift(24).fillna(h["value"])
    out = pd.DataFrame({
        "series_id": series_id, "ts": h["ts"], "value": h["value"], "expected": expected,
        "lower": expected - 1.5, "upper": expected + 1.5, "score": 0.1, "is_anomaly": False, "model_version": 1,
    })
    out.loc[[100, 250], ["is_anomaly", "score"]] = [True, 0.99]
    return out.astype(ANOMALY_COLUMNS)


def _forecasts(history: pd.DataFrame, series_id: str = "sensor-a", horizon: int = 24) -> pd.DataFrame:
    h = history[history["series_id"] == series_id]
    rows = []
    # Two issues: only the later one should be drawn.
    for issued, level in ((h["ts"].iloc[-2], 0.0), (h["ts"].iloc[-1], 1.0)):
        step = np.arange(1, horizon + 1)
        mean = h["value"].iloc[-1] + level + 3 * np.sin(2 * np.pi * step / 24)
        rows.append(pd.DataFrame({
            "series_id": series_id, "issued_at": issued, "step": step,
            "target_ts": issued + pd.to_timedelta(step, unit="h"), "mean": mean,
            "lower": mean - 0.2 * np.sqrt(step), "upper": mean + 0.2 * np.sqrt(step), "model_version": 1,
        }))
    return pd.concat(rows, ignore_index=True).astype(FORECAST_COLUMNS)


def _assert_png(path: Path, min_bytes: int = 10_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
    assert width >= 800 and height >= 300


def test_writes_a_png_with_everything(tmp_path: Path) -> None:
    history = _history()
    out = plot_series(history, _forecasts(history), _anomalies(history), "sensor-a", tmp_path / "a.png")
    assert out == tmp_path / "a.png"
    _assert_png(out)


def test_creates_missing_directories_and_accepts_str_path(tmp_path: Path) -> None:
    history = _history()
    out = plot_series(history, _forecasts(history), _anomalies(history), "sensor-a", str(tmp_path / "x" / "a.png"))
    _assert_png(out)
    assert not [p for p in (tmp_path / "x").iterdir() if p.name != "a.png"]  # no temp file left behind


def test_a_path_that_cannot_be_written_is_named(tmp_path: Path) -> None:
    history = _history()
    (tmp_path / "plain").write_text("a file, not a directory")
    with pytest.raises(ConfigError, match=r"cannot write the plot to .*plain/a\.png.*give --out a path"):
        plot_series(history, _forecasts(history), _anomalies(history), "sensor-a", tmp_path / "plain" / "a.png")


@pytest.mark.parametrize(
    ("forecasts_kind", "anomalies_kind"),
    [("typed-empty", "typed-empty"), ("bare-empty", "bare-empty"), ("other-series", "typed-empty"),
     ("bare-empty", "other-series")],
)
def test_draws_what_exists_when_forecasts_or_anomalies_are_missing(
    tmp_path: Path, forecasts_kind: str, anomalies_kind: str
) -> None:
    history = _history()
    fc = {"typed-empty": _forecasts(history).iloc[:0], "bare-empty": pd.DataFrame(),
          "other-series": _forecasts(history, "sensor-b")}[forecasts_kind]
    an = {"typed-empty": _anomalies(history).iloc[:0], "bare-empty": pd.DataFrame(),
          "other-series": _anomalies(history, "sensor-b")}[anomalies_kind]
    _assert_png(plot_series(history, fc, an, "sensor-a", tmp_path / "a.png"))


def test_handles_gaps_nans_last_none_and_naive_timestamps(tmp_path: Path) -> None:
    history = _history(gap=slice(50, 60))
    history.loc[history.index[5], "value"] = np.nan
    naive = history.assign(ts=history["ts"].dt.tz_localize(None))
    _assert_png(plot_series(naive, pd.DataFrame(), _anomalies(history), "sensor-a", tmp_path / "a.png", last=None,
                            title="custom"))


def test_last_keeps_only_recent_points(tmp_path: Path) -> None:
    history = _history()
    # A tiny window still plots, with anomaly rows outside it dropped rather than stretching the axis.
    _assert_png(plot_series(history, _forecasts(history), _anomalies(history), "sensor-a", tmp_path / "a.png",
                            last=5), min_bytes=5_000)


def test_unknown_series_names_it_and_the_ones_that_exist(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        plot_series(_history(), pd.DataFrame(), pd.DataFrame(), "sensor-z", tmp_path / "a.png")
    message = str(err.value)
    assert "'sensor-z'" in message and "'sensor-a'" in message and "'sensor-b'" in message
    assert not (tmp_path / "a.png").exists()


def test_unknown_series_in_an_empty_history(tmp_path: Path) -> None:
    empty = _history().iloc[:0]
    with pytest.raises(DataError, match="'sensor-z'.*empty"):
        plot_series(empty, pd.DataFrame(), pd.DataFrame(), "sensor-z", tmp_path / "a.png")


def test_frames_missing_columns_are_named(tmp_path: Path) -> None:
    history = _history()
    with pytest.raises(DataError, match="history.*value"):
        plot_series(history.drop(columns="value"), pd.DataFrame(), pd.DataFrame(), "sensor-a", tmp_path / "a.png")
    with pytest.raises(DataError, match="anomalies.*expected"):
        plot_series(history, pd.DataFrame(), _anomalies(history).drop(columns="expected"), "sensor-a",
                    tmp_path / "a.png")


@pytest.mark.parametrize("last", [0, -3, 2.5, True])
def test_bad_last_is_refused(tmp_path: Path, last: object) -> None:
    with pytest.raises(ConfigError, match="last"):
        plot_series(_history(), pd.DataFrame(), pd.DataFrame(), "sensor-a", tmp_path / "a.png", last=last)
