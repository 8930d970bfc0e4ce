"""Peers side by side: forecastd against Darts and NeuralForecast recurrent models, measured in one run.

    pip install 'forecastd[bench]'
    python benchmarks/peers.py --data ../shared/data/ett/ETTh1.csv [--horizons 24 96] [--epochs 10] [--seeds 1]

Every model forecasts univariate OT of ETTh1 under the protocol of ``benchmarks/ett_protocol.py``
(standard splits, train-only standardisation, every stride-1 test window scored, MSE/MAE on the
standardised scale) with hidden size 64 and, for the peers, a lookback of L = 96. forecastd is
``benchmarks/ett.py``'s ``forecastd_forecasts`` unchanged (product defaults, its own early stopping);
it reads history through its carried state instead of a window. Its rolling evaluation streams from a
fresh state over the ``--warmup`` rows (1,000) before the first test origin and then the test rows:
the state forgets what lies further back (H=96, seed 0: MSE 0.05191 from 1,000 rows, 0.05192 from all
14,400), and it is what a rolling evaluation needs, as the peers' L-row windows are what theirs needs.

Per model and horizon it prints: test MSE/MAE; training time (early stopping on the validation
split, at most ``--epochs`` epochs for the peers); the time to forecast every test window; and the
per-update latency, the median time to turn one new point per series into a new H-step forecast for
1, 100 and 10,000 series (all series in one call, as a tick runs them). Then the ratios against
forecastd and the goals of issue 4.

How each peer is run (the fastest honest way each library offers that we found):
- Darts: inputs scaled by ``darts.dataprocessing.transformers.Scaler`` (min-max, fitted on train);
  BlockRNNModel also with RevIN (``use_reversible_instance_norm``), which RNNModel does not accept.
  Best-validation weights restored from Darts' checkpoints. Rolling evaluation is
  ``historical_forecasts(retrain=False, stride=1, last_points_only=False)`` with the scaler passed as
  ``data_transformers`` (Darts' optimised strided path for torch models, batch 1024). An update is
  ``predict(n=H, series=[...])`` with all series in one batch, on series already scaled.
- NeuralForecast: ``scaler_type='robust'`` (per-window, the library default), one recurrent layer,
  MSE loss. ``max_steps`` = epochs × windows per epoch / ``windows_batch_size``, validated once per
  such epoch; the library keeps the last weights, not the best. Rolling evaluation is
  ``cross_validation(test_size=2880, step_size=1, use_fitted=True)``: the fitted model predicts
  every window in batches, no refit. An update is ``predict(df=...)`` with the last L points of
  every series.
Building the peers' input series and frames for an update is left out of their timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.ett import _frame, forecastd_forecasts  # noqa: E402
from benchmarks.ett_protocol import EttSplits, evaluate, load_ett, persistence  # noqa: E402
from benchmarks.speed import GRID, _state  # noqa: E402
from forecastd.config import AnomalyConfig, ModelConfig, TrainingConfig  # noqa: E402
from forecastd.models import Forecaster  # noqa: E402
from forecastd.runtime import single_thread_blas, tune_malloc  # noqa: E402
from forecastd.streaming import Emit, advance  # noqa: E402
from forecastd.windowing import n_features  # noqa: E402

HIDDEN = 64
INSTALL_HINT = "pip install 'forecastd[bench]'"

# name -> (import name, label)
PEERS: dict[str, tuple[str, str]] = {
    "darts-blockrnn": ("darts", "Darts BlockRNN GRU"),
    "darts-rnn": ("darts", "Darts RNNModel GRU"),
    "nf-gru": ("neuralforecast", "NeuralForecast GRU"),
    "nf-lstm": ("neuralforecast", "NeuralForecast LSTM"),
}


def check_peers(
    names: list[str], find_spec: Callable[[str], object | None] = importlib.util.find_spec,
) -> tuple[list[str], list[str]]:
    """The peers whose library is importable, and one message for each that is not."""
    runnable, messages = [], []
    for name in names:
        module, label = PEERS[name]
        if find_spec(module) is None:
            messages.append(f"{label}: skipped, {module} is not installed; install the peers with "
                            f"`{INSTALL_HINT}` (best in a virtualenv of its own).")
        else:
            runnable.append(name)
    return runnable, messages


@dataclasses.dataclass(frozen=True)
class Task:
    """What every model sees: the standardised OT rows of the three splits ([0, 14400) of an hourly file)
    with their timestamps."""

    splits: EttSplits
    values: np.ndarray  # (14400,) hourly
    times: pd.DatetimeIndex  # (14400,), tz-naive, as the peers want them
    horizon: int
    epochs: int
    patience: int
    seed: int

    @property
    def lookback(self) -> int:
        return self.splits.lookback

    @property
    def borders(self) -> tuple[int, int, int]:
        """Where train, validation and test end (rows)."""
        layout = self.splits.layout
        return layout.train_end, layout.val_end, layout.test_end


class Peer(Protocol):
    label: str
    setup: str

    def fit(self, task: Task) -> tuple[float, int]: ...  # seconds, epochs run
    def rolling(self, task: Task) -> tuple[np.ndarray, float]: ...  # (N, H) forecasts, seconds
    def update(self, task: Task, n_series: int) -> Callable[[int], None]: ...  # one update per call


def _quiet() -> None:
    """Lightning and the peers log a banner for every Trainer; an update makes one per call."""
    if importlib.util.find_spec("pytorch_lightning") is not None:
        import pytorch_lightning  # noqa: F401  (sets its logger to INFO on import: import it before muting)
    for name in ("lightning", "lightning.pytorch", "lightning_fabric", "pytorch_lightning", "darts",
                 "neuralforecast", "lightning.pytorch.utilities.rank_zero", "pytorch_lightning.utilities.rank_zero",
                 "lightning.fabric.utilities.seed", "lightning_fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _tick_windows(task: Task, n_series: int, ticks: int) -> np.ndarray:
    """(ticks, n_series, L) input windows: series i at tick k ends at test row i + k + L − 1.

    Fewer distinct ticks for many series (2 at 10,000), so the peers' inputs (one Darts TimeSeries per
    series and tick) fit in memory and build in seconds; the calls cycle through them.
    """
    ticks = max(2, min(ticks, 6400 // n_series))
    test = task.splits.test[:, 0]
    L = task.lookback
    idx = np.arange(ticks)[:, None, None] + np.arange(n_series)[None, :, None] + np.arange(L)[None, None, :]
    return test[idx % len(test)]


class DartsPeer:
    def __init__(self, block: bool) -> None:
        self.block = block
        self.label = PEERS["darts-blockrnn" if block else "darts-rnn"][1]
        self.setup = ("Scaler (min-max, train) + RevIN" if block else
                      "Scaler (min-max, train), one-step model trained once for all horizons") + \
            "; historical_forecasts(retrain=False, stride=1, last_points_only=False)"
        self._fitted: dict[int, tuple] = {}

    def _series(self, task: Task, lo: int, hi: int):
        from darts import TimeSeries

        return TimeSeries.from_times_and_values(task.times[lo:hi], task.values[lo:hi, None].astype(np.float32))

    def fit(self, task: Task) -> tuple[float, int]:
        # RNNModel forecasts one step and rolls out, so its training does not depend on H: train it once
        # per seed and report that training time at every horizon.
        if not self.block and task.seed in self._fitted:
            self.model, self.scaler, seconds, epochs = self._fitted[task.seed]
            return seconds, epochs
        seconds, epochs = self._fit(task)
        if not self.block:
            self._fitted[task.seed] = (self.model, self.scaler, seconds, epochs)
        return seconds, epochs

    def _fit(self, task: Task) -> tuple[float, int]:
        from darts.dataprocessing.transformers import Scaler
        from darts.models import BlockRNNModel, RNNModel
        from pytorch_lightning.callbacks import EarlyStopping

        L, H = task.lookback, task.horizon
        train_end, val_end, _ = task.borders
        self.scaler = Scaler().fit(self._series(task, 0, train_end))
        train = self.scaler.transform(self._series(task, 0, train_end))
        val = self.scaler.transform(self._series(task, train_end - L, val_end))
        self._dir = tempfile.TemporaryDirectory()
        common = dict(
            model="GRU", hidden_dim=HIDDEN, n_rnn_layers=1, input_chunk_length=L, n_epochs=task.epochs,
            batch_size=32, random_state=task.seed, save_checkpoints=True, work_dir=self._dir.name,
            model_name="peer", force_reset=True,
            pl_trainer_kwargs=dict(
                accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, logger=False,
                callbacks=[EarlyStopping("val_loss", patience=task.patience, mode="min")],
            ),
        )
        if self.block:
            cls, kw = BlockRNNModel, dict(output_chunk_length=H, use_reversible_instance_norm=True)
        else:
            # One-step-ahead, rolled out recursively for H steps; sequences of L + 24 steps to train on.
            cls, kw = RNNModel, dict(training_length=L + 24)
        model = cls(**common, **kw)
        t0 = time.perf_counter()
        model.fit(train, val_series=val, verbose=False)
        epochs = model.epochs_trained
        self.model = cls.load_from_checkpoint("peer", work_dir=self._dir.name, best=True)
        return time.perf_counter() - t0, epochs

    def rolling(self, task: Task) -> tuple[np.ndarray, float]:
        L, H = task.lookback, task.horizon
        _, val_end, test_end = task.borders
        test = self._series(task, val_end - L, test_end)
        t0 = time.perf_counter()
        forecasts = self.model.historical_forecasts(
            test, start=L, start_format="position", forecast_horizon=H, stride=1, retrain=False,
            last_points_only=False, overlap_end=False, verbose=False, data_transformers={"series": self.scaler},
            predict_kwargs={"batch_size": 1024},
        )
        pred = np.stack([f.values()[:, 0] for f in forecasts])  # N, K
        return pred, time.perf_counter() - t0

    def update(self, task: Task, n_series: int) -> Callable[[int], None]:
        import pytorch_lightning as pl
        from darts import TimeSeries

        windows = _tick_windows(task, n_series, 64)
        val_end = task.borders[1]
        times = task.times[val_end - task.lookback: val_end]  # a series' timestamps do not change the cost
        ticks = [[TimeSeries.from_times_and_values(times, w[:, None].astype(np.float32)) for w in tick]
                 for tick in windows]
        ticks = [[self.scaler.transform(s) for s in tick] for tick in ticks]

        # A Trainer made once and passed in (a documented argument) halves the 1-series latency against
        # Darts building one per call.
        trainer = pl.Trainer(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, logger=False)

        def one(k: int) -> None:
            self.model.predict(n=task.horizon, series=ticks[k % len(ticks)], batch_size=n_series, verbose=False,
                               show_warnings=False, trainer=trainer)

        return one


class NeuralForecastPeer:
    def __init__(self, cell: str) -> None:
        self.cell = cell
        self.label = PEERS[f"nf-{cell.lower()}"][1]
        self.setup = "scaler_type='robust' (per window); cross_validation(step_size=1, use_fitted=True)"

    def _frame(self, task: Task, lo: int, hi: int) -> pd.DataFrame:
        return pd.DataFrame({"unique_id": "OT", "ds": task.times[lo:hi], "y": task.values[lo:hi]})

    def fit(self, task: Task) -> tuple[float, int]:
        from neuralforecast import NeuralForecast
        from neuralforecast.losses.pytorch import MSE
        from neuralforecast.models import GRU, LSTM

        L, H = task.lookback, task.horizon
        train_end, val_end, _ = task.borders
        windows_batch = 128
        # NeuralForecast counts optimiser steps; an "epoch" here is one pass's worth of train windows.
        steps = math.ceil((train_end - L - H + 1) / windows_batch)
        cls = GRU if self.cell == "GRU" else LSTM
        model = cls(
            h=H, input_size=L, encoder_hidden_size=HIDDEN, encoder_n_layers=1, loss=MSE(), scaler_type="robust",
            max_steps=task.epochs * steps, val_check_steps=steps, early_stop_patience_steps=task.patience,
            windows_batch_size=windows_batch, random_seed=task.seed, accelerator="cpu", enable_progress_bar=False,
            enable_model_summary=False, logger=False,
        )
        self.nf = NeuralForecast(models=[model], freq=task.splits.layout.freq)
        t0 = time.perf_counter()
        self.nf.fit(df=self._frame(task, 0, val_end), val_size=val_end - train_end)
        seconds = time.perf_counter() - t0
        done = getattr(getattr(self.nf.models[0], "trainer", None), "global_step", task.epochs * steps)
        return seconds, math.ceil(done / steps)

    def rolling(self, task: Task) -> tuple[np.ndarray, float]:
        H = task.horizon
        _, val_end, test_end = task.borders
        t0 = time.perf_counter()
        cv = self.nf.cross_validation(df=self._frame(task, 0, test_end), n_windows=None,
                                      test_size=test_end - val_end, step_size=1, use_fitted=True, refit=False)
        seconds = time.perf_counter() - t0
        cv = cv.sort_values(["cutoff", "ds"])
        pred = cv[self.cell].to_numpy().reshape(-1, H)  # N, K
        return pred, seconds

    def update(self, task: Task, n_series: int) -> Callable[[int], None]:
        L = task.lookback
        windows = _tick_windows(task, n_series, 64)
        ids = np.repeat([f"s{i}" for i in range(n_series)], L)
        val_end = task.borders[1]
        ds = np.tile(task.times[val_end - L: val_end], n_series)
        frames = [pd.DataFrame({"unique_id": ids, "ds": ds, "y": w.ravel()}) for w in windows]

        def one(k: int) -> None:
            self.nf.predict(df=frames[k % len(frames)])

        return one


def make_peer(name: str) -> Peer:
    return {"darts-blockrnn": lambda: DartsPeer(block=True), "darts-rnn": lambda: DartsPeer(block=False),
            "nf-gru": lambda: NeuralForecastPeer("GRU"), "nf-lstm": lambda: NeuralForecastPeer("LSTM")}[name]()


def scaled_reps(reps: int, n_series: int) -> int:
    """Timed calls for an update of n_series: `reps` up to 100 series, fewer above (5 at 10,000), as a
    peer's update of 10,000 series takes seconds."""
    return max(5, min(reps, reps * 100 // n_series))


def median_seconds(fn: Callable[[int], None], reps: int, warmup: int = 3) -> float:
    """Median wall time of one call; the median, not the best, as a stream sees every call."""
    for k in range(warmup):
        fn(k)
    times = []
    for k in range(reps):
        t0 = time.perf_counter()
        fn(warmup + k)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def forecastd_update(mc: ModelConfig, n_series: int) -> Callable[[int], None]:
    """The product's streaming step (features, model, anomaly scoring, output rows), as speed.py times it.

    Untrained weights: the cost of a step does not depend on them.
    """
    model = Forecaster(n_features(len(mc.level_alphas)), mc).eval()
    state = [_state(model, mc, n_series)]
    values = 100 + np.random.default_rng(1).normal(size=(n_series, 1))
    lengths = np.ones(n_series, dtype=np.int64)
    ac, emit = AnomalyConfig(), Emit(0)  # settings, made once as the daemon makes them

    def one(k: int) -> None:
        _, state[0] = advance(model, state[0], values, lengths, GRID, mc, ac, 1, emit)

    return one


@dataclasses.dataclass
class Result:
    mse: list[float] = dataclasses.field(default_factory=list)
    mae: list[float] = dataclasses.field(default_factory=list)
    train_s: list[float] = dataclasses.field(default_factory=list)
    epochs: list[int] = dataclasses.field(default_factory=list)
    roll_s: list[float] = dataclasses.field(default_factory=list)
    tick: dict[int, float] = dataclasses.field(default_factory=dict)  # series -> median seconds

    def add(self, mse: float, mae: float, train_s: float, epochs: int, roll_s: float) -> None:
        self.mse.append(mse)
        self.mae.append(mae)
        self.train_s.append(train_s)
        self.epochs.append(epochs)
        self.roll_s.append(roll_s)


def _mean(xs: list[float], fmt: str) -> str:
    if not xs:
        return "-"
    return f"{np.mean(xs):{fmt}}" + (f"±{np.std(xs):{fmt}}" if len(xs) > 1 else "")


def _x(ratio: float) -> str:
    return f"{ratio:.1f}x" if ratio < 10 else f"{ratio:.0f}x"


def report(horizon: int, windows: int, results: dict[str, Result], base_mse: float, base_mae: float,
           sizes: list[int]) -> None:
    fd = results["forecastd GRU"]
    width = {n: max(15, len(f"update {n} ms") + 2) for n in sizes}
    tick_head = "".join(f"{f'update {n} ms':>{width[n]}}" for n in sizes)
    print(f"\nH={horizon}: {windows} test windows, MSE/MAE on the standardised scale (mean over seeds)")
    print(f"{'model':<22}{'MSE':>14}{'MAE':>14}{'train s':>12}{'epochs':>8}{'roll-eval s':>13}{tick_head}")
    for label, r in results.items():
        ticks = "".join(f"{r.tick[n] * 1e3:>{width[n]}.2f}" if n in r.tick else f"{'-':>{width[n]}}" for n in sizes)
        print(f"{label:<22}{_mean(r.mse, '.4f'):>14}{_mean(r.mae, '.4f'):>14}{_mean(r.train_s, '.1f'):>12}"
              f"{_mean(r.epochs, '.0f'):>8}{_mean(r.roll_s, '.2f'):>13}{ticks}")
    print(f"{'persistence':<22}{base_mse:>14.4f}{base_mae:>14.4f}")
    peers = {k: v for k, v in results.items() if k != "forecastd GRU"}
    if not peers:
        return
    print(f"\nRatios, peer time / forecastd time (higher = forecastd faster); accuracy = forecastd MSE vs the peer's")
    ratio_head = "".join(f"{f'update {n}':>{width[n] - 3}}" for n in sizes)
    print(f"{'peer':<22}{'train':>9}{'accuracy':>12}{'roll-eval':>11}{ratio_head}")
    fd_mse, fd_train, fd_roll = np.mean(fd.mse), np.mean(fd.train_s), np.mean(fd.roll_s)
    goals = []
    for label, r in peers.items():
        mse = np.mean(r.mse)
        acc = "better" if fd_mse < mse else ("equal" if fd_mse == mse else "worse")
        train_x, roll_x = np.mean(r.train_s) / fd_train, np.mean(r.roll_s) / fd_roll
        tick_x = {n: r.tick[n] / fd.tick[n] for n in sizes if n in r.tick and n in fd.tick}
        ticks = "".join(f"{_x(tick_x[n]):>{width[n] - 3}}" if n in tick_x else f"{'-':>{width[n] - 3}}" for n in sizes)
        print(f"{label:<22}{_x(train_x):>9}{acc:>12}{_x(roll_x):>11}{ticks}")
        met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
        if label.startswith("Darts"):
            goals.append(f"rolling evaluation >= 50x faster than {label} historical_forecasts: {_x(roll_x)}, "
                         f"{met(roll_x >= 50)}")
        if tick_x:
            worst = min(tick_x.values())
            goals.append(f"per-update throughput >= 100x {label}: {', '.join(f'{_x(x)} ({n} series)' for n, x in tick_x.items())}, "
                         f"{met(worst >= 100)}")
        goals.append(f"training to equal or better accuracy >= 5x faster than {label}: {_x(train_x)}, accuracy "
                     f"{acc}, {met(train_x >= 5 and fd_mse <= mse)}")
    print("Goals (issue 4):")
    for g in goals:
        print(f"  {g}")


def run(args: argparse.Namespace) -> None:
    # As the CLI sets them for `forecastd serve`; process-wide, so the peers run under them too.
    malloc = "glibc defaults" if args.system_malloc else "tuned" if tune_malloc() else "not tunable here"
    blas = "numpy BLAS 1 thread" if single_thread_blas() else "numpy BLAS as configured"
    wanted = list(dict.fromkeys(args.peers))
    runnable, messages = check_peers(wanted)
    for m in messages:
        print(m, file=sys.stderr)
    _quiet()
    splits = load_ett(args.data, ("OT",), args.lookback)
    values = np.concatenate([splits.train, splits.val[args.lookback:], splits.test[args.lookback:]])[:, 0]
    end = splits.layout.test_end
    times = pd.DatetimeIndex(pd.to_datetime(pd.read_csv(args.data, usecols=["date"])["date"][:end]))
    frame, ts = _frame(args.data, ("OT",))
    mc = ModelConfig(hidden_size=HIDDEN)
    tc = TrainingConfig(epochs=args.forecastd_epochs, device="cpu")
    versions = [f"torch {torch.__version__}"]
    for module in ("darts", "neuralforecast", "pytorch_lightning"):
        if importlib.util.find_spec(module) is not None:
            versions.append(f"{module} {__import__(module).__version__}")
    print(f"{args.data.name} OT, L={args.lookback}, hidden {HIDDEN}, seeds {args.seeds}, peers <= {args.epochs} epochs "
          f"(patience {args.patience}), forecastd <= {args.forecastd_epochs} epochs; {', '.join(versions)}; "
          f"{torch.get_num_threads()} torch threads; malloc {malloc}, {blas} (every model)")
    print("forecastd GRU: product defaults (its own robust scale, carried state); rolling evaluation = the "
          f"streaming step from a fresh state over {args.warmup} rows before the first test origin, then the test")
    print(f"Rolling evaluation seconds: the fastest of {args.rolling_repeats} runs for every model")
    peers = {name: make_peer(name) for name in runnable}
    for p in peers.values():
        print(f"{p.label}: {p.setup}")

    for horizon in args.horizons:
        n_windows = len(splits.test) - args.lookback - horizon + 1
        base = evaluate(splits.test, args.lookback, horizon, lambda x: persistence(x, horizon))
        results = {"forecastd GRU": Result(), **{p.label: Result() for p in peers.values()}}
        for seed in range(args.seeds):
            task = Task(splits, values, times, horizon, args.epochs, args.patience, seed)
            pred, info = forecastd_forecasts(frame, ts, ("OT",), horizon, seed, mc, tc, args.warmup,
                                             args.rolling_repeats)
            m = evaluate(splits.test, args.lookback, horizon, pred)
            results["forecastd GRU"].add(m.mse, m.mae, info["train_seconds"], info.get("epochs_run", -1),
                                         info["infer_seconds"])
            print(f"  H={horizon} seed {seed} forecastd GRU: MSE {m.mse:.4f}, train {info['train_seconds']:.1f} s",
                  flush=True)
            for p in peers.values():
                train_s, epochs = p.fit(task)
                pred, roll_s = p.rolling(task)
                for _ in range(args.rolling_repeats - 1):
                    roll_s = min(roll_s, p.rolling(task)[1])
                m = evaluate(splits.test, args.lookback, horizon, pred)
                results[p.label].add(m.mse, m.mae, train_s, epochs, roll_s)
                print(f"  H={horizon} seed {seed} {p.label}: MSE {m.mse:.4f}, train {train_s:.1f} s, "
                      f"{epochs} epochs, rolling {roll_s:.1f} s", flush=True)
        fd_mc = dataclasses.replace(mc, horizon=horizon)
        for n in args.update_series:
            results["forecastd GRU"].tick[n] = median_seconds(forecastd_update(fd_mc, n), scaled_reps(args.fd_reps, n))
            for p in peers.values():
                results[p.label].tick[n] = median_seconds(p.update(task, n), scaled_reps(args.reps, n))
        report(horizon, n_windows, results, base.mse, base.mae, args.update_series)
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="path to ETTh1.csv")
    p.add_argument("--horizons", type=int, nargs="+", default=[24, 96])
    p.add_argument("--lookback", type=int, default=96, help="the peers' input window L")
    p.add_argument("--peers", nargs="+", choices=list(PEERS), default=list(PEERS))
    p.add_argument("--epochs", type=int, default=10, help="most epochs a peer trains (early stopping on validation)")
    p.add_argument("--patience", type=int, default=3, help="validation checks without improvement before a peer stops")
    p.add_argument("--forecastd-epochs", type=int, default=TrainingConfig.epochs)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1000,
                   help="rows forecastd streams before the first test origin in the rolling evaluation")
    p.add_argument("--update-series", type=int, nargs="+", default=[1, 100, 10000])
    p.add_argument("--rolling-repeats", type=int, default=2,
                   help="rolling evaluations per model; the fastest counts (the first pays one-time costs: "
                        "loading compiled code, Lightning's setup)")
    p.add_argument("--reps", type=int, default=30,
                   help="timed updates per peer and size up to 100 series; fewer above (5 at 10,000)")
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's malloc defaults instead of the CLI's settings (forecastd/runtime.py), "
                        "for every model")
    p.add_argument("--fd-reps", type=int, default=300, help="timed updates of forecastd per size, scaled as --reps")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
