"""The first-run experience behind `forecastd demo`, and the storage readers `forecastd plot` shares.

`run_demo` writes a config into a working directory pointing at the repository's `sample_data/`, trains
a small model, backfills the whole sample history after the warm-up, measures the forecasts against two
naive baselines and the anomaly flags against the injected anomalies, and draws one series. It returns
a `DemoResult`; the CLI prints it.

The baselines are computed on exactly the rows the model forecast, so the three columns compare like
with like: persistence repeats the value at `issued_at`; the seasonal naive repeats the value one day
(24 steps of the hourly sample data) before the target.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from forecastd.config import Config, load_config
from forecastd.errors import ConfigError, DataError, SourceError
from forecastd.files import atomic_write_bytes
from forecastd.frames import Grid, empty_frame, infer_freq, validate

__all__ = [
    "DEMO_EPOCHS",
    "DEMO_SERIES",
    "DemoResult",
    "ErrorRow",
    "run_demo",
    "sample_data_dir",
    "demo_config_text",
    "forecast_errors",
    "injected_caught",
    "anomaly_events",
    "read_history",
    "read_outputs",
    "plot_stored",
]

# Enough epochs for the model to beat persistence clearly on the sample data, few enough that the
# whole demo takes about a minute on two CPU cores (the config also caps training at 120 s).
DEMO_EPOCHS = 10
# The plotted series: two injected spikes and five NaN rows, so the picture shows flags and gaps.
DEMO_SERIES = "sensor-temp-1"
# The sample data is hourly with a daily cycle.
SEASON_STEPS = 24
REPORT_STEPS = (1, 24)
# The first line of a config the demo wrote; any other file at that path is the user's, not ours.
DEMO_MARKER = "# forecastd demo config"
PLOT_POINTS = 24 * 30


@dataclass(frozen=True)
class ErrorRow:
    """Mean absolute error of the model and the two baselines on the same forecast rows."""

    scope: str  # "all": the whole backfill; "held-out": origins in the validation tail training never fit
    step: int
    model: float
    persistence: float
    seasonal: float
    n: int


@dataclass
class DemoResult:
    directory: Path
    config_path: Path
    series: int
    points: int
    start: pd.Timestamp
    end: pd.Timestamp
    version: int
    loss_curve: list[dict]  # per epoch: epoch, train_loss, val_loss
    best_epoch: int  # the epoch whose weights were kept (lowest validation loss)
    learning_rate: float | None  # the rate of the run kept, and every rate's validation loss
    learning_rate_losses: dict[str, float | None]
    train_seconds: float
    val_mse: float
    val_persistence_mse: float
    validation_fraction: float
    backfill_start: pd.Timestamp
    backfill_end: pd.Timestamp
    backfill_seconds: float
    forecast_rows: int
    anomaly_rows: int
    flagged: int
    errors: list[ErrorRow]
    top_anomalies: list[dict]  # strongest runs of flags: series_id, start, points, ts, value, expected, score
    injected_total: int
    injected_caught: int
    flags_elsewhere: int  # flagged points away from every injected anomaly (±1 step)
    plot_path: Path
    per_series: dict[str, dict[str, float]] = field(default_factory=dict)  # series -> MAE by method at step 1


def sample_data_dir() -> Path:
    """The repository's sample_data/ (next to the installed package in a source or editable install)."""
    path = Path(__file__).resolve().parent.parent / "sample_data"
    if not (path / "series.parquet").is_file() or not (path / "forecastd.toml").is_file():
        raise SourceError(
            f"sample data not found at {str(path)!r} (needs series.parquet and forecastd.toml); the demo runs "
            "from a source checkout: clone the repository and `pip install -e .` there"
        )
    return path


def demo_config_text(sample_dir: Path) -> str:
    """sample_data/forecastd.toml with [source] path made absolute, so the config works from any directory."""
    text = (sample_dir / "forecastd.toml").read_text()
    pattern = re.compile(r'^path = "series\.parquet"', re.MULTILINE)
    if len(pattern.findall(text)) != 1:
        raise ConfigError(f"{str(sample_dir / 'forecastd.toml')!r} must have one line "
                          'path = "series.parquet" in [source]; restore it from the repository')
    source = json.dumps(str((sample_dir / "series.parquet").resolve()))  # a TOML basic string
    return pattern.sub(lambda _: f"path = {source}", text)


def read_history(config: Config, series: Sequence[str] | None = None) -> pd.DataFrame:
    """The source's rows as the validated long frame (series_id, ts UTC, value; NaN where missing)."""
    from forecastd.sources import open_source

    raw = open_source(config).read(series=series)
    if raw.empty:
        return empty_frame()
    freq = config.data.freq or infer_freq(raw, config.source.timezone)
    frame, _ = validate(raw, grid=Grid(freq, config.source.timezone), timezone=config.source.timezone,
                        duplicates=config.data.duplicates)
    return frame


def read_outputs(config: Config, series: Sequence[str] | None = None,
                 since: pd.Timestamp | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(forecasts, anomalies) from the sink; `since` (exclusive) filters issued_at and ts."""
    from forecastd.sinks import open_sink

    sink = open_sink(config)
    return sink.read("forecasts", series, since), sink.read("anomalies", series, since)


def plot_stored(config: Config, series_id: str, path: str | Path, *, last: int = 500) -> Path:
    """Plot one series from storage: its history from the source, forecasts and anomalies from the sink."""
    from forecastd.plot import plot_series
    from forecastd.sources import open_source

    history = read_history(config, [series_id])
    if history.empty:
        ids = open_source(config).series_ids()
        shown = ", ".join(repr(s) for s in ids[:20]) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")
        raise DataError(f"series {series_id!r} is not in the source; "
                        + (f"series present: {shown}" if ids else "the source has no rows"))
    window = history.sort_values("ts")["ts"].tail(last)
    # Just before the window's first point, so its anomaly row is included (since is exclusive). Not a
    # step computed from the window: a window of one point has none, and the cut fell on the point.
    since = window.iloc[0] - pd.Timedelta(1, unit="ns")
    forecasts, anomalies = read_outputs(config, [series_id], since)
    return plot_series(history, forecasts, anomalies, series_id, path, last=last)


def forecast_errors(history: pd.DataFrame, forecasts: pd.DataFrame, steps: Sequence[int] = REPORT_STEPS,
                    season: int = SEASON_STEPS, step_ns: int = 3_600_000_000_000,
                    held_out_from: dict[str, pd.Timestamp] | None = None) -> list[ErrorRow]:
    """MAE of the model's forecasts and of the naive baselines at each step, on the rows all three have."""
    actual = history.dropna(subset=["value"]).set_index(["series_id", "ts"])["value"]
    rows = []
    scopes = [("all", None)] + ([("held-out", held_out_from)] if held_out_from else [])
    for scope, cut in scopes:
        for step in steps:
            f = forecasts[forecasts["step"] == step]
            if cut is not None:
                f = f[f["issued_at"] >= f["series_id"].map(cut)]
            y = _lookup(actual, f["series_id"], f["target_ts"])
            last = _lookup(actual, f["series_id"], f["issued_at"])
            lag = season * -(-step // season)  # the latest whole season before the target, known at issue
            seasonal = _lookup(actual, f["series_id"], f["target_ts"] - pd.Timedelta(lag * step_ns, unit="ns"))
            mean = f["mean"].to_numpy(dtype=float)
            ok = np.isfinite(y) & np.isfinite(last) & np.isfinite(seasonal) & np.isfinite(mean)
            if not ok.any():
                continue
            rows.append(ErrorRow(scope, step, float(np.abs(mean - y)[ok].mean()), float(np.abs(last - y)[ok].mean()),
                                 float(np.abs(seasonal - y)[ok].mean()), int(ok.sum())))
    return rows


def _lookup(values: pd.Series, series: pd.Series, ts: pd.Series) -> np.ndarray:
    index = pd.MultiIndex.from_arrays([series.to_numpy(), pd.DatetimeIndex(ts)])
    return values.reindex(index).to_numpy(dtype=float)


def anomaly_events(anomalies: pd.DataFrame, step: pd.Timedelta, top: int = 5) -> list[dict]:
    """The `top` strongest runs of consecutive flagged points, strongest first.

    A spike keeps the anomaly likelihood high for a few steps after it, so ranking single points would
    show one event five times. Each run is reported at its strongest point (highest score, then the
    largest distance from the expectation in band half-widths), with its first ts and length.
    """
    flagged = anomalies[anomalies["is_anomaly"].astype(bool)].sort_values(["series_id", "ts"])
    if flagged.empty:
        return []
    half = (flagged["upper"] - flagged["lower"]).abs() / 2
    distance = ((flagged["value"] - flagged["expected"]).abs() / half.where(half > 0)).fillna(0.0)
    flagged = flagged.assign(distance=distance)
    new_run = (flagged["series_id"] != flagged["series_id"].shift()) | (flagged["ts"].diff() > step)
    events = []
    for _, run in flagged.groupby(new_run.cumsum()):
        peak = run.sort_values(["score", "distance"], ascending=False).iloc[0]
        events.append({"series_id": str(peak["series_id"]), "start": run["ts"].iloc[0], "points": len(run),
                       "ts": peak["ts"], "value": float(peak["value"]), "expected": float(peak["expected"]),
                       "score": float(peak["score"]), "distance": float(peak["distance"])})
    events.sort(key=lambda e: (-e["score"], -e["distance"], e["start"]))
    return events[:top]


def injected_caught(anomalies: pd.DataFrame, injected: list[dict], step: pd.Timedelta) -> tuple[int, int]:
    """(injected anomalies with a flag within ±1 step, flagged points away from every injected one).

    A level shift counts at its onset only, as sample_data/README.md says.
    """
    flagged = anomalies[anomalies["is_anomaly"].astype(bool)]
    near = np.zeros(len(flagged), dtype=bool)
    caught = 0
    for a in injected:
        start = pd.Timestamp(a["start"])
        end = start if a.get("kind") == "level_shift" else pd.Timestamp(a["end"])
        hit = (flagged["series_id"] == a["series_id"]) & (flagged["ts"] >= start - step) & (flagged["ts"] <= end + step)
        caught += bool(hit.any())
        near |= hit.to_numpy()
    return caught, int((~near).sum())


def run_demo(
    directory: str | Path,
    now: dt.datetime,
    *,
    epochs: int = DEMO_EPOCHS,
    progress: Callable[[int, int, float, float], None] | None = None,
    sample_dir: Path | None = None,
) -> DemoResult:
    """Write a demo config into `directory`, train, backfill the sample history, measure, plot."""
    from forecastd.pipeline import backfill, train
    from forecastd.plot import plot_series

    sample_dir = sample_dir or sample_data_dir()
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"--dir {str(directory)!r} is a file; pass a directory")
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "forecastd.toml"
    if config_path.exists() and not config_path.read_text().startswith(DEMO_MARKER):
        raise ConfigError(f"{str(config_path)!r} exists and is not a demo config; pass another --dir "
                          "so the demo does not overwrite it")
    atomic_write_bytes(config_path, demo_config_text(sample_dir).encode())
    config = load_config(config_path, {"training.epochs": epochs})

    history = read_history(config)
    started = time.monotonic()
    summary = train(config, now, progress=progress)
    train_seconds = time.monotonic() - started

    grid = Grid(summary.freq, config.source.timezone)  # as train built it
    first, last = (int(v) for v in grid.index(pd.DatetimeIndex([history["ts"].min(), history["ts"].max()])))
    lo, hi = grid.ts(np.array([first + config.data.warmup, last]))  # the whole history after the warm-up
    started = time.monotonic()
    report = backfill(config, lo.to_pydatetime(), hi.to_pydatetime(), keep_outputs=True)
    backfill_seconds = time.monotonic() - started
    assert report.outputs is not None  # keep_outputs=True
    forecasts, anomalies = report.outputs.forecasts, report.outputs.anomalies

    step = pd.Timedelta(grid.step_ns, unit="ns")
    errors = forecast_errors(history, forecasts, step_ns=grid.step_ns,
                             held_out_from=_held_out_from(history, grid, config.training.validation_fraction))
    per_series = {}
    for sid, part in forecasts.groupby("series_id"):
        rows = forecast_errors(history, part, steps=(1,), step_ns=grid.step_ns)
        if rows:
            per_series[str(sid)] = {"model": rows[0].model, "persistence": rows[0].persistence,
                                    "seasonal": rows[0].seasonal}

    injected_path = sample_dir / "anomalies.json"
    injected = json.loads(injected_path.read_text()) if injected_path.is_file() else []
    caught, elsewhere = injected_caught(anomalies, injected, step)

    plot_path = plot_series(history, forecasts[forecasts["series_id"] == DEMO_SERIES], anomalies, DEMO_SERIES,
                            directory / f"{DEMO_SERIES}.png", last=PLOT_POINTS)
    m = summary.metrics
    return DemoResult(
        directory=directory, config_path=config_path, series=summary.series, points=summary.points,
        start=history["ts"].min(), end=history["ts"].max(), version=summary.version,
        loss_curve=[{k: float(v) for k, v in h.items()} for h in summary.history],
        best_epoch=int(m.get("best_epoch") or len(summary.history)), train_seconds=train_seconds,
        learning_rate=m.get("learning_rate"), learning_rate_losses=m.get("learning_rate_losses") or {},
        val_mse=float(m.get("val_mse", np.nan)), val_persistence_mse=float(m.get("val_persistence_mse", np.nan)),
        validation_fraction=config.training.validation_fraction,
        backfill_start=lo, backfill_end=hi, backfill_seconds=backfill_seconds,
        forecast_rows=report.forecasts_written, anomaly_rows=report.anomalies_written,
        flagged=report.anomalies_flagged, errors=errors,
        top_anomalies=anomaly_events(anomalies, step),
        injected_total=len(injected), injected_caught=caught, flags_elsewhere=elsewhere,
        plot_path=plot_path, per_series=per_series,
    )


def _held_out_from(history: pd.DataFrame, grid: Grid, fraction: float) -> dict[str, pd.Timestamp]:
    """Per series, the first forecast origin of the validation tail (the rule of training.prepare)."""
    out = {}
    for sid, ts in history.groupby("series_id")["ts"]:
        first, last = (int(v) for v in grid.index(pd.DatetimeIndex([ts.min(), ts.max()])))
        out[str(sid)] = grid.ts(np.array([last - int(round((last - first) * fraction))]))[0]
    return out
