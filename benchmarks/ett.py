"""Forecast accuracy on ETT under the standard protocol, forecastd against persistence and seasonal naive.

    python benchmarks/ett.py --data ../shared/data/ett/ETTh1.csv

forecastd trains on the train rows (early stopping on the validation rows, which no training target
reaches), then runs the product's streaming step over the whole history with its carried state and
reads the forecast issued at every test origin. Its effective lookback is therefore all history before
the origin (the recurrent state, plus the window of the last `lookback` changes that the state also
carries), not a fixed L window; the baselines use L = 96 as the published tables do. Everything is on
the protocol's standardised scale; each figure is the mean ± std over seeds. The product's defaults
(learning rate, lookback) were chosen on the validation split only.

    python benchmarks/ett.py --data ../shared/data/ett/ETTh1.csv --jobs 16   # on a machine with cores

Any ETT file works (ETTh2, or ETTm1/ETTm2 every 15 minutes): the splits, the grid and the seasonal naive's
period of a day follow the step of its date column (ett_protocol.layout_of).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import cores  # noqa: E402
from benchmarks.ett_protocol import (  # noqa: E402
    ETT_COLUMNS, Layout, evaluate, layout_of, load_ett, persistence, seasonal_naive,
)
from forecastd.config import AnomalyConfig, Config, ModelConfig, TrainingConfig  # noqa: E402
from forecastd.frames import Grid  # noqa: E402
from forecastd.models import Forecaster  # noqa: E402
from forecastd.state import Segment, StreamState  # noqa: E402
from forecastd.streaming import Emit, run_segments  # noqa: E402
from forecastd.training import fit, prepare, resolve_device  # noqa: E402
from forecastd.windowing import n_features, resolve_lookback, robust_scale  # noqa: E402

LOOKBACK = 96


def _frame(path: Path, columns: tuple[str, ...]) -> tuple[pd.DataFrame, pd.DatetimeIndex]:
    """Long frame of the standardised columns over the rows of the three splits, and their timestamps."""
    raw = pd.read_csv(path)
    splits = load_ett(path, columns, LOOKBACK)
    end = splits.layout.test_end
    values = (raw[list(columns)].to_numpy(np.float64)[:end] - splits.mean) / splits.std
    ts = pd.DatetimeIndex(pd.to_datetime(raw["date"][:end]), tz="UTC").as_unit("ns")
    frame = pd.concat(
        [pd.DataFrame({"series_id": c, "ts": ts, "value": values[:, i]}) for i, c in enumerate(columns)],
        ignore_index=True,
    )
    return frame, ts


def forecastd_forecasts(
    frame: pd.DataFrame, ts: pd.DatetimeIndex, columns: tuple[str, ...], horizon: int, seed: int,
    model_config: ModelConfig, training: TrainingConfig, warmup: int | None = None, repeat: int = 1,
) -> tuple[np.ndarray, dict]:
    """Train on [0, 8640) with validation on [8640, 11520), then forecasts at every test origin: (N, H, C).

    warmup: stream only this many rows before the first test origin (None: all history, from row 0).
    repeat: stream this many times; infer_seconds is the fastest pass.
    """
    config = Config()
    layout = _layout(ts)
    grid = Grid(layout.freq)
    # As pipeline.train does: "auto" lookback for the grid and the training history.
    lookback = resolve_lookback(model_config.lookback, grid.step_ns, layout.train_end)
    mc = dataclasses.replace(model_config, horizon=horizon, lookback=lookback)
    tc = dataclasses.replace(training, seed=seed)
    history = frame[frame["ts"] < ts[layout.val_end]]
    train_part = frame[frame["ts"] < ts[layout.train_end]]
    scales = {c: robust_scale(train_part.loc[train_part["series_id"] == c, "value"].to_numpy()) for c in columns}
    prepared = prepare(history, grid, scales, mc, config.data, 0.0, val_start=ts[layout.train_end])
    torch.manual_seed(seed)
    model = Forecaster(n_features(len(mc.level_alphas)), mc)
    t0 = time.perf_counter()
    result = fit(model, prepared, tc)
    train_seconds = time.perf_counter() - t0

    model = result.model.cpu().eval()
    pred, infer_seconds = stream_forecasts(model, mc, frame, ts, columns, scales, warmup)
    for _ in range(repeat - 1):
        infer_seconds = min(infer_seconds, stream_forecasts(model, mc, frame, ts, columns, scales, warmup)[1])
    info = {**result.metrics, "train_seconds": train_seconds, "infer_seconds": infer_seconds}
    return pred, info


def stream_forecasts(
    model: Forecaster, mc: ModelConfig, frame: pd.DataFrame, ts: pd.DatetimeIndex, columns: tuple[str, ...],
    scales: dict[str, float], warmup: int | None = None,
) -> tuple[np.ndarray, float]:
    """The product's streaming step from a fresh state, in one batched pass, from row 0 (or `warmup` rows
    before the first test origin) to the end of the test split: the forecast of every test origin
    (N, H, C), and the seconds it took."""
    layout = _layout(ts)
    grid = Grid(layout.freq)
    horizon = mc.horizon
    first_origin = layout.val_end - 1
    n = (layout.test_end - layout.val_end) - horizon + 1
    first_row = 0 if warmup is None else max(0, first_origin - warmup)
    values = {c: frame.loc[frame["series_id"] == c, "value"].to_numpy()[first_row:] for c in columns}
    start = int(grid.index(ts[:1])[0])
    segments = [Segment(c, True, start + first_row, values[c]) for c in columns]
    empty = StreamState.empty(mc)
    lo = start + first_origin
    t0 = time.perf_counter()
    out, _ = run_segments(model, empty, segments, scales, grid, mc, AnomalyConfig(), 0,
                          Emit(0, lo, lo + n - 1))
    seconds = time.perf_counter() - t0
    f = out.forecasts
    f = f.assign(col=f["series_id"].map({c: i for i, c in enumerate(columns)}),
                 origin=(grid.index(f["issued_at"]) - lo))
    pred = np.full((n, horizon, len(columns)), np.nan)
    pred[f["origin"].to_numpy(), f["step"].to_numpy() - 1, f["col"].to_numpy()] = f["mean"].to_numpy()
    assert np.isfinite(pred).all(), "every test origin must have a forecast"
    return pred, seconds


def _layout(ts: pd.DatetimeIndex) -> Layout:
    return layout_of(ts.to_series(), "the ETT file")


def _run(job: tuple) -> tuple[float, float, float, float, float]:
    """One (setting, horizon, seed): test MSE, MAE, train and streaming seconds, and the validation loss
    training was judged by. Runs in a worker."""
    path, columns, h, seed, mc, tc, threads = job
    torch.set_num_threads(threads)
    frame, ts = _frame(path, columns)
    pred, info = forecastd_forecasts(frame, ts, columns, h, seed, mc, tc)
    m = evaluate(load_ett(path, columns, LOOKBACK).test, LOOKBACK, h, pred)
    return m.mse, m.mae, info["train_seconds"], info["infer_seconds"], info["val_loss"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="path to ETTh1.csv (or another ETT hourly file)")
    p.add_argument("--horizons", type=int, nargs="*", default=[24, 48, 96, 168, 336, 720],
                   help="univariate (OT) horizons; none with --multivariate-horizons alone")
    p.add_argument("--multivariate-horizons", type=int, nargs="*", default=[96])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=TrainingConfig.epochs)
    p.add_argument("--hidden", type=int, default=ModelConfig.hidden_size)
    p.add_argument("--cell", default=ModelConfig.cell)
    p.add_argument("--lookback", type=lambda v: v if v == "auto" else int(v), default=ModelConfig.lookback,
                   help="steps of recent changes the model carries (the product default; 0 = none)")
    p.add_argument("--learning-rates", type=float, nargs="*", default=list(TrainingConfig.learning_rates),
                   help="[training] learning_rates: further rates tried from the same start, the lowest validation "
                        f"loss kept (default: the product's, {' '.join(f'{r:g}' for r in TrainingConfig.learning_rates)}; "
                        "none: one training at the learning rate)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    p.add_argument("--jobs", type=int, default=cores(),
                   help="train this many (horizon, seed) runs at once, one torch thread each (default: one per "
                        "core, as free memory allows; 1 gives one run all of torch's threads); timings are then per run on a shared machine")
    args = p.parse_args(argv)
    mc = ModelConfig(cell=args.cell, hidden_size=args.hidden, lookback=args.lookback)
    tc = TrainingConfig(epochs=args.epochs, device=args.device, learning_rates=tuple(args.learning_rates))
    threads = 1 if args.jobs > 1 else max(1, torch.get_num_threads())

    settings = [("S", ("OT",), h) for h in args.horizons] + [("M", ETT_COLUMNS, h) for h in args.multivariate_horizons]
    layout = load_ett(args.data, ("OT",), LOOKBACK).layout
    lookback = resolve_lookback(mc.lookback, Grid(layout.freq).step_ns, layout.train_end)
    print(f"ETT {args.data.name} (a row every {layout.freq}): forecastd {mc.cell} hidden {mc.hidden_size} lookback {lookback}, "
          f"{args.seeds} seeds; torch {torch.__version__}, training on {resolve_device(args.device)}, "
          f"{args.jobs} job(s) x {threads} thread(s)")
    print(f"{'set':3} {'H':>4} | {'forecastd MSE':>16} {'forecastd MAE':>16} | {'persist MSE':>11} {'MAE':>6} | "
          f"{'seasonal MSE':>12} {'MAE':>6} | {'train s':>7} {'infer s':>7} | {'val loss':>8}")
    # val loss: what early stopping judged, the mean over series of the validation MSE relative to
    # persistence's; settings are to be compared on it, not on the test columns.
    jobs = [(args.data, columns, h, seed, mc, tc, threads) for _, columns, h in settings for seed in range(args.seeds)]
    with ProcessPoolExecutor(args.jobs) if args.jobs > 1 else contextlib.nullcontext() as pool:
        # In order as they finish, so a row prints as soon as its seeds are done.
        results = pool.map(_run, jobs) if pool else map(_run, jobs)
        _report(args, settings, layout, results)


def _report(args: argparse.Namespace, settings: list, layout: Layout, results: Iterator[tuple]) -> None:
    for kind, columns, h in settings:
        splits = load_ett(args.data, columns, LOOKBACK)
        base_p = evaluate(splits.test, LOOKBACK, h, lambda x: persistence(x, h))
        base_s = evaluate(splits.test, LOOKBACK, h, lambda x: seasonal_naive(x, h, layout.day))
        mses, maes, tsec, isec, vals = np.array([next(results) for _ in range(args.seeds)]).T
        print(f"{kind:3} {h:>4} | {np.mean(mses):>8.4f} ± {np.std(mses):.4f} {np.mean(maes):>8.4f} ± {np.std(maes):.4f} | "
              f"{base_p.mse:>11.4f} {base_p.mae:>6.4f} | {base_s.mse:>12.4f} {base_s.mae:>6.4f} | "
              f"{np.mean(tsec):>7.1f} {np.mean(isec):>7.2f} | {np.mean(vals):>8.4f}", flush=True)


if __name__ == "__main__":
    main()
