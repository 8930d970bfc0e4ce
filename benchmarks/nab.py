"""Streaming anomaly detection on a NAB-layout corpus, scored with our port of NAB's scorer.

    python benchmarks/nab.py --data ../shared/data/nab --out /tmp/nabout

Per data file, exactly as the daemon would see it: the rows are mapped to the long frame, validated on
the grid of the inferred frequency (`frames.infer_freq`, `frames.validate`: off-grid stamps snapped,
duplicates resolved by the product's rule), and the model is trained (`training.prepare` + `fit`) on the
probationary period only: the first min(floor(0.15 × rows), 750) input rows, as NAB counts it. Then
every row streams through the product's streaming step (`streaming.run_segments` from a fresh state,
which gives the same rows as ticking point by point: predict, then learn, so the score of a row uses
rows up to it only). Nothing is tuned to a file and labels are read only by the scorer.

The score of each grid point is mapped back to the input rows by timestamp; rows the product does not
score (a duplicate whose value the rule discarded, a row before the likelihood has history) get 0 and
are counted. One NAB results file per data file is written under --out, then the corpus is scored on
the three profiles (threshold optimised over the corpus), beside the windowed Gaussian and the null
detector computed in the same run and the anchors of NAB's own scorer on this 18-file subset.

The ablation turns each step of the anomaly pipeline (`AnomalyConfig` flags) off alone, with the same
trained models, so each step's worth is measured on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.nab_baselines import null_scores, run_detector, windowed_gaussian  # noqa: E402
from benchmarks.nab_scoring import (  # noqa: E402
    PROFILES,
    label_rows,
    load_corpus,
    load_windows,
    probation_length,
    score_corpus,
    write_results,
)
from forecastd.config import AnomalyConfig, DataConfig, ModelConfig, TrainingConfig  # noqa: E402
from forecastd.frames import Grid, infer_freq, validate  # noqa: E402
from forecastd.models import Forecaster  # noqa: E402
from forecastd.state import StreamState, plan  # noqa: E402
from forecastd.streaming import Emit, run_segments  # noqa: E402
from forecastd.training import fit, prepare  # noqa: E402
from forecastd.windowing import n_features, robust_scale, series_steps  # noqa: E402

# NAB's own scorer on these 18 files (data README): standard, reward_low_FP, reward_low_FN.
ANCHORS = {
    "ARTime": (82.1, 74.5, 86.8),
    "Numenta HTM": (68.5, 62.0, 72.3),
    "windowed Gaussian": (21.6, 10.3, 26.4),
}
PROFILE_NAMES = {"standard": "standard", "reward_low_FP_rate": "low FP", "reward_low_FN_rate": "low FN"}

# A small model for ~1,000-row training sets: a probation period is 600-750 points.
MODEL = ModelConfig(hidden_size=32, horizon=6)
TRAINING = TrainingConfig(epochs=12, min_epoch_steps=60, patience=4, segment_length=128, batch_size=8,
                          seed=0, device="cpu")
# Steps of the anomaly pipeline, each switched off alone in the ablation (name, AnomalyConfig overrides).
ABLATION: list[tuple[str, dict]] = [
    ("all steps (the defaults)", {}),
    ("- likelihood (point rarity only)", {"likelihood": False}),
    ("- raw cap", {"raw_cap": 0.0}),
    ("- novelty", {"novelty_tolerance": -1.0}),
    ("- soft scale (linear, saturating)", {"scale": "linear"}),
    ("+ point gate", {"point_gate": True}),
    ("previous pipeline (none of the above)", {"raw_cap": 0.0, "novelty_tolerance": -1.0, "scale": "linear",
                                               "point_gate": True}),
]


@dataclasses.dataclass
class Trained:
    grid: Grid
    frame: pd.DataFrame  # the validated long frame of the whole file
    model: Forecaster
    scale: float
    train_seconds: float
    repairs: dict


def train_file(name: str, raw: pd.DataFrame, mc: ModelConfig, tc: TrainingConfig, data: DataConfig) -> Trained:
    """Validate the file on its inferred grid and train on the probationary rows only."""
    long = pd.DataFrame({"series_id": name, "ts": raw["timestamp"], "value": raw["value"]})
    grid = Grid(infer_freq(long))
    frame, report = validate(long, grid=grid, duplicates=data.duplicates)
    n_prob = probation_length(len(raw))
    cutoff = pd.Timestamp(raw["timestamp"].iloc[:n_prob].max(), tz="UTC")  # input rows in time order
    train = frame[frame["ts"] <= cutoff]
    scale = robust_scale(train["value"].to_numpy())
    t0 = time.perf_counter()
    prepared = prepare(train, grid, {name: scale}, mc, data, tc.validation_fraction)
    torch.manual_seed(tc.seed)
    model = Forecaster(n_features(len(mc.level_alphas)), mc)
    model = fit(model, prepared, tc).model.cpu().eval()
    return Trained(grid, frame, model, scale, time.perf_counter() - t0, report.by_reason())


def stream_file(name: str, raw: pd.DataFrame, t: Trained, mc: ModelConfig, ac: AnomalyConfig,
                data: DataConfig) -> tuple[np.ndarray, int]:
    """Every point through the streaming step from a fresh state; scores per input row, and how many are 0."""
    steps, values = series_steps(t.frame, t.grid)[name]
    segments = plan(name, steps, values, None, data.max_gap)
    rows = mc.num_layers * (2 if mc.cell == "lstm" else 1)
    empty = StreamState.fresh([], np.zeros(0), len(mc.level_alphas), (rows, mc.hidden_size), ac.forecasts)
    # Emit from the first point: NAB wants a score on every row; the likelihood itself withholds alarms
    # until it has history, which is far inside the probationary period.
    out, _ = run_segments(t.model, empty, segments, {name: t.scale}, t.grid, mc, ac, 0, Emit(0))
    a = out.anomalies
    by_step = dict(zip(t.grid.index(a["ts"]).tolist(), a["score"].to_numpy().tolist()))
    # Map back by timestamp. Of several input rows on one grid point only the one whose value the
    # duplicates rule kept is scored ("last": the last of them in input order); the others get 0.
    in_steps = t.grid.index(pd.DatetimeIndex(raw["timestamp"]).tz_localize("UTC"))
    keep = ~pd.Series(in_steps).duplicated(keep="first" if data.duplicates == "first" else "last").to_numpy()
    scores = np.array([by_step.get(s, 0.0) if k else 0.0 for s, k in zip(in_steps.tolist(), keep)])
    unscored = int((~keep).sum() + sum(1 for s, k in zip(in_steps.tolist(), keep) if k and s not in by_step))
    return scores, unscored


def _cells(results: dict[str, pd.DataFrame], windows) -> list:
    return [score_corpus(results, windows, p) for p in PROFILES]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="NAB directory holding data/ and combined_windows.json")
    p.add_argument("--out", type=Path, required=True, help="results files go to OUT/<detector>/<category>/")
    p.add_argument("--detector", default="forecastd", help="detector name in the results files (no underscore)")
    p.add_argument("--no-ablation", action="store_true", help="score the full pipeline only")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the benchmark machine has 2 cores)")
    args = p.parse_args(argv)
    if "_" in args.detector:
        p.error("--detector must not contain '_': NAB splits results file names on it")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    corpus = load_corpus(args.data)
    windows = load_windows(args.data / "combined_windows.json")
    data = DataConfig()
    mc, tc = MODEL, TRAINING
    ac = AnomalyConfig()
    print(f"NAB corpus {args.data}: {len(corpus)} files; forecastd {mc.cell} hidden {mc.hidden_size} horizon "
          f"{mc.horizon}, {tc.epochs} epochs max, seed {tc.seed}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'file':<52} {'rows':>6} {'freq':>6} {'unscored':>8} {'train s':>7} {'stream s':>8}  repairs")
    trained, results = {}, {}
    for relpath, raw in corpus.items():
        t0 = time.perf_counter()
        t = train_file(relpath, raw, mc, tc, data)
        t1 = time.perf_counter()
        scores, unscored = stream_file(relpath, raw, t, mc, ac, data)
        t2 = time.perf_counter()
        trained[relpath] = t
        frame = pd.DataFrame({"timestamp": raw["timestamp"], "value": raw["value"], "anomaly_score": scores,
                              "label": label_rows(raw["timestamp"], windows[relpath])})
        results[relpath] = frame
        write_results(args.out, args.detector, relpath, frame)
        repairs = ", ".join(f"{k}: {v}" for k, v in t.repairs.items()) or "-"
        print(f"{relpath:<52} {len(raw):>6} {t.grid.freq:>6} {unscored:>8} {t1 - t0:>7.1f} {t2 - t1:>8.1f}  {repairs}",
              flush=True)
    stream_total = time.perf_counter() - started

    gaussian = run_detector(corpus, lambda _, v: windowed_gaussian(v))
    null = run_detector(corpus, lambda _, v: null_scores(len(v)))
    table = {
        args.detector: _cells(results, windows),
        "windowed Gaussian (same run)": _cells(gaussian, windows),
        "null (same run)": _cells(null, windows),
    }
    print()
    head = "".join(f"{PROFILE_NAMES[p]:>10}" for p in PROFILES)
    print(f"{'detector':<34}{head}   threshold (standard), windows found")
    for name, cells in table.items():
        print(f"{name:<34}" + "".join(f"{c.score:>10.1f}" for c in cells)
              + f"   t={cells[0].threshold:.4g}, {cells[0].windows_detected}/{cells[0].windows}")
    for name, anchor in ANCHORS.items():
        print(f"{name + ' (NAB scorer, anchor)':<34}" + "".join(f"{a:>10.1f}" for a in anchor))

    if not args.no_ablation:
        print("\nAblation: each step of the anomaly pipeline switched off alone (same trained models)")
        print(f"{'pipeline':<34}{head}")
        for label, overrides in ABLATION:
            acx = dataclasses.replace(ac, **overrides)
            res = {}
            for relpath, raw in corpus.items():
                scores, _ = stream_file(relpath, raw, trained[relpath], mc, acx, data)
                res[relpath] = pd.DataFrame({"timestamp": raw["timestamp"], "anomaly_score": scores})
            print(f"{label:<34}" + "".join(f"{c.score:>10.1f}" for c in _cells(res, windows)), flush=True)
    print(f"\nwall time: forecastd train + stream {stream_total:.1f} s, total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
