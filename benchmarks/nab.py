"""Streaming anomaly detection on a NAB-layout corpus, scored with our port of NAB's scorer.

    python benchmarks/nab.py --data ../shared/data/nab --out /tmp/nabout

Per data file, exactly as the daemon would see it: the rows are mapped to the long frame, validated on
the grid of the inferred frequency (`frames.infer_freq`, `frames.validate`: off-grid stamps snapped,
duplicates resolved by the product's rule), and the model is trained (`training.prepare` + `fit`) on the
probationary period only: the first min(floor(0.15 × rows), 750) input rows, as NAB counts it. Then
every row streams through the product's streaming step (`streaming.run_segments` from a fresh state,
which gives the same rows as ticking point by point: predict, then learn, so the score of a row uses
rows up to it only). Nothing is tuned to a file and labels are read only by the scorer.

Retraining (`--retrain`, default "doubling"), as the daemon retrains on a schedule: when 2, 4, 8, ...
times the probationary rows have been seen, a challenger is trained on every row seen so far (warm
started from the live weights unless --cold), judged as `retrain.retrain` judges (`retrain.tail_loss`
of both models on the challenger's validation tail, `retrain.decide`, margin 0 or --margin) and, if promoted, takes
over as the pipeline switches versions: a fresh state run over the last `[data] warmup` points up to the
switch, then streaming on. A doubling schedule keeps the cost at a few trainings per file where the
daemon's daily cron would retrain dozens of times on the longest files; it never uses a row not yet seen.
As `pipeline.train` does, every training resolves "auto" lookback for the history it learns from, so a
later model may carry a longer window, warm started with zero weight on the added lags. With --clean
(not what the daemon does), the points the live stream flagged by then are left out of the challenger's
training and of the tail both models are judged on.

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
import hashlib
import math
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import cores  # noqa: E402
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
from forecastd.errors import ForecastdError  # noqa: E402
from forecastd.frames import Grid, infer_freq, validate  # noqa: E402
from forecastd.models import Forecaster  # noqa: E402
from forecastd.state import StreamState, plan  # noqa: E402
from forecastd.pipeline import warm_weights  # noqa: E402
from forecastd.retrain import decide, tail_loss  # noqa: E402
from forecastd.streaming import Carried, Emit, Outputs, run_segments  # noqa: E402
from forecastd.training import fit, prepare  # noqa: E402
from forecastd.windowing import n_features, resolve_lookback, robust_scale, series_steps  # noqa: E402

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
    ("- likelihood (point rarity only)", {"likelihood": False, "slow_window": 0}),
    ("- raw cap", {"raw_cap": 0.0}),
    ("- novelty", {"novelty_tolerance": -1.0}),
    ("- cooldown (report every point)", {"cooldown": 0}),
    ("- soft scale (linear, saturating)", {"scale": "linear"}),
    ("- point gate", {"point_gate": False}),
    ("- empirical tail (Gaussian only)", {"empirical_tail": False}),
    ("- slow channel", {"slow_window": 0}),
    ("two judges (forecasts = 2)", {"forecasts": 2}),
    ("previous pipeline (none of the above)", {"raw_cap": 0.0, "novelty_tolerance": -1.0, "scale": "linear",
                                               "point_gate": True, "cooldown": 0,
                                               "empirical_tail": False, "forecasts": 2, "slow_window": 0}),
]


@dataclasses.dataclass
class Version:
    """A model that streams from grid step `cut` + 1 on (the first one from the start of the file)."""

    cut: int | None
    model: Forecaster
    scale: float
    mc: ModelConfig  # with the lookback resolved for the history it trained on


@dataclasses.dataclass
class Trained:
    grid: Grid
    frame: pd.DataFrame  # the validated long frame of the whole file
    versions: list[Version]  # the live model at each point in time, oldest first
    train_seconds: float
    repairs: dict
    retrains: list[str]  # one line per retrain: row, verdict, losses


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When the benchmark retrains, as the daemon's `[serve] retrain_cron` would: after `rows` input rows.

    rows: input-row counts at which a challenger is trained on every row seen so far (never a later one)
    and promoted only if it beats the live model on its own validation tail (`retrain.decide`) by
    `margin` of its loss, as `[serve] promote_margin` asks of the daemon's challengers.
    warm: the challenger starts from the live weights (a warm start) rather than from fresh ones.
    track: what a promoted model's stream keeps of the previous stream's anomaly track: "fresh" (start
    over from the warm-up window), "range" (the pipeline's rule for a new version, `streaming.Carried`:
    the lowest/highest value seen, for novelty, the open incident, for the cooldown, and the slow
    channel's history, passed to `run_segments` as the pipeline passes it) or "all" (also the main
    likelihood's history of surprise).
    """

    rows: tuple[int, ...] = ()
    warm: bool = True
    track: str = "range"
    margin: float = 0.0
    clean: bool = False  # leave the points the live model flags out of a challenger's training and tail


def retrain_rows(spec: str, n_rows: int) -> tuple[int, ...]:
    """"none"; "doubling" (2, 4, 8, ... times the probationary period); "growth:G" (whenever the rows seen
    reach 1 + G times the rows of the last training, as `[serve] retrain_growth = G` has the daemon do;
    "growth:1" is "doubling"); or an integer N (every N rows)."""
    n_prob = probation_length(n_rows)
    if spec == "none" or n_prob == 0:
        return ()
    if spec == "doubling" or spec.startswith("growth:"):
        growth = 1.0 if spec == "doubling" else float(spec.removeprefix("growth:"))
        out, k = [], n_prob
        while (k := max(math.ceil(k * (1 + growth)), k + 1)) < n_rows:
            out.append(k)
        return tuple(out)
    every = int(spec)
    return tuple(range(n_prob + every, n_rows, every))


def _cutoff(raw: pd.DataFrame, rows: int) -> pd.Timestamp:
    """The newest timestamp among the first `rows` input rows: what the daemon has seen by then."""
    return pd.Timestamp(raw["timestamp"].iloc[:rows].max(), tz="UTC")


def _fit(train: pd.DataFrame, grid: Grid, name: str, mc: ModelConfig, tc: TrainingConfig, data: DataConfig,
         init: Version | None) -> Version:
    """As `pipeline.train`: "auto" lookback resolved for this history; warm from `init` when its weights
    carry over (`pipeline.warm_weights`: same shape, or a longer window), else from fresh weights. The
    version's cut is left to the caller."""
    steps = grid.index(train["ts"])
    mc = dataclasses.replace(mc, lookback=resolve_lookback(mc.lookback, grid.step_ns, int(steps.max() - steps.min()) + 1))
    scale = robust_scale(train["value"].to_numpy())
    prepared = prepare(train, grid, {name: scale}, mc, data, tc.validation_fraction)
    torch.manual_seed(tc.seed)
    model = Forecaster(n_features(len(mc.level_alphas)), mc)
    weights = warm_weights(init.model, init.mc, mc) if init is not None else None
    if weights is not None:
        model.load_state_dict(weights)
    return Version(None, fit(model, prepared, tc).model.cpu().eval(), scale, mc)


def _validated(name: str, raw: pd.DataFrame, data: DataConfig):
    long = pd.DataFrame({"series_id": name, "ts": raw["timestamp"], "value": raw["value"]})
    grid = Grid(infer_freq(long))
    frame, report = validate(long, grid=grid, duplicates=data.duplicates)
    return grid, frame, report


def train_file(name: str, raw: pd.DataFrame, mc: ModelConfig, tc: TrainingConfig, data: DataConfig,
               schedule: Schedule) -> Trained:
    """Validate the file on its inferred grid, train on the probationary rows, then retrain on schedule."""
    grid, frame, report = _validated(name, raw, data)
    t0 = time.perf_counter()
    versions = [_fit(frame[frame["ts"] <= _cutoff(raw, probation_length(len(raw)))], grid, name, mc, tc, data, None)]
    lines = []
    for rows in schedule.rows:
        cutoff = _cutoff(raw, rows)
        seen = frame[frame["ts"] <= cutoff]
        if schedule.clean:
            # The points the live stream flagged by then (scores as the stream gave them, threshold 0.5),
            # dropped: a challenger would learn them as normal, and win on a tail that holds them.
            ac = AnomalyConfig()
            so_far = Trained(grid, seen, list(versions), 0.0, {}, [])
            part = raw.iloc[:rows]
            scores, _ = stream_file(name, part, so_far, ac, data, schedule.track)
            flagged = pd.DatetimeIndex(part["timestamp"][scores >= ac.threshold]).tz_localize("UTC")
            seen = seen[~seen["ts"].isin(flagged)]
        live = versions[-1]
        try:
            challenger = _fit(seen, grid, name, mc, tc, data, live if schedule.warm else None)
        except ForecastdError as exc:  # as the daemon does: the live model goes on
            lines.append(f"row {rows}: retrain failed ({exc}); live kept")
            continue
        # The daemon's verdict: both models on the challenger's validation tail, each with its own scale.
        losses = [tail_loss(v.model, v.mc, {name: v.scale}, seen, grid, data, tc.validation_fraction)
                  for v in (live, challenger)]
        promote, _ = decide(losses[0], losses[1], schedule.margin, False)
        lines.append(f"row {rows}: lookback {challenger.mc.lookback}, live {losses[0]:.3f} challenger "
                     f"{losses[1]:.3f} {'promoted' if promote else 'kept'}")
        if promote:
            versions.append(dataclasses.replace(challenger, cut=int(grid.index(pd.DatetimeIndex([cutoff]))[0])))
    return Trained(grid, frame, versions, time.perf_counter() - t0, report.by_reason(), lines)


def stream_file(name: str, raw: pd.DataFrame, t: Trained, ac: AnomalyConfig, data: DataConfig,
                track: str = "range") -> tuple[np.ndarray, int]:
    """Every point through the streaming step, each by the model live at its time; scores per input
    row, and how many are 0.

    A promoted model takes over as the pipeline has it do: a fresh state run over the last `warmup`
    points up to the switch (outputs discarded: the old model wrote them), then streaming on from there.
    """
    steps, values = series_steps(t.frame, t.grid)[name]
    state, parts = StreamState.empty(t.versions[0].mc, ac.forecasts), []
    for i, v in enumerate(t.versions):
        lo = -1 if v.cut is None else v.cut
        hi = t.versions[i + 1].cut if i + 1 < len(t.versions) else np.iinfo(np.int64).max
        if v.cut is not None:
            old = state if len(state) else None
            warm = (steps > v.cut - data.warmup) & (steps <= v.cut)
            segs = plan(name, steps[warm], values[warm], None, data.max_gap)
            # "range": the pipeline's own rule and code path.
            carried = {name: Carried.of(old, 0)} if old is not None and track == "range" else None
            _, state = run_segments(v.model, StreamState.empty(v.mc, ac.forecasts), segs, {name: v.scale}, t.grid,
                                    v.mc, ac, i, Emit(0), carried=carried)
            if len(state) and old is not None and track == "all":
                state = dataclasses.replace(state, anomaly=old.anomaly)
        sel = (steps > lo) & (steps <= hi)
        at = int(state.step[0]) if len(state) else None
        segs = plan(name, steps[sel], values[sel], at, data.max_gap)
        # Emit from the first point: NAB wants a score on every row; the likelihood itself withholds
        # alarms until it has history, which is far inside the probationary period.
        out, state = run_segments(v.model, state, segs, {name: v.scale}, t.grid, v.mc, ac, i, Emit(0))
        parts.append(out)
    a = Outputs.concat(parts).anomalies
    by_step = dict(zip(t.grid.index(a["ts"]).tolist(), a["score"].to_numpy().tolist()))
    # Map back by timestamp. Of several input rows on one grid point only the one whose value the
    # duplicates rule kept is scored ("last": the last of them in input order); the others get 0.
    in_steps = t.grid.index(pd.DatetimeIndex(raw["timestamp"]).tz_localize("UTC"))
    keep = ~pd.Series(in_steps).duplicated(keep="first" if data.duplicates == "first" else "last").to_numpy()
    scores = np.array([by_step.get(s, 0.0) if k else 0.0 for s, k in zip(in_steps.tolist(), keep)])
    unscored = int((~keep).sum() + sum(1 for s, k in zip(in_steps.tolist(), keep) if k and s not in by_step))
    return scores, unscored


@dataclasses.dataclass
class FileRun:
    scores: dict[str, np.ndarray]  # ablation label -> anomaly score per input row
    unscored: int
    train_seconds: float
    stream_seconds: float
    freq: str
    repairs: dict
    retrains: list[str]
    error: str = ""  # why forecastd could not train on the file; printed by the parent, not a worker


def run_file(job: tuple) -> FileRun:
    """Train (and retrain) one file, then stream it under every anomaly variant; one process per file.

    A file forecastd cannot learn from (too short for the horizon, no usable values) detects nothing: every
    row scores 0, which NAB counts as its windows missed, and the reason is printed with the file's row.
    The other files go on, as a bad series does not stop the daemon's other series."""
    relpath, raw, mc, tc, data, schedule, variants, threads, cache = job
    torch.set_num_threads(threads)
    try:
        t = _cached(cache, relpath, raw, mc, tc, data, schedule) if cache else train_file(relpath, raw, mc, tc, data, schedule)
    except ForecastdError as exc:
        zeros = np.zeros(len(raw))
        return FileRun({label: zeros for label, _ in variants}, len(raw), 0.0, 0.0, "-", {},
                       [f"not trained: {exc}"], str(exc))
    t0 = time.perf_counter()
    scores = {label: stream_file(relpath, raw, t, ac, data, schedule.track)[0] for label, ac in variants}
    _, unscored = stream_file(relpath, raw, t, variants[0][1], data, schedule.track)
    return FileRun(scores, unscored, t.train_seconds, time.perf_counter() - t0, t.grid.freq, t.repairs, t.retrains)


def _cached(cache: Path, relpath: str, raw: pd.DataFrame, mc: ModelConfig, tc: TrainingConfig, data: DataConfig,
            schedule: Schedule) -> Trained:
    """Trained models from an earlier run with the same settings, else train and store them: iterating
    on the anomaly pipeline need not retrain. Weights only (torch.load(weights_only=True))."""
    key = repr((mc, tc, data, schedule.rows, schedule.warm, "lookback resolved per training, widened warm")
               + ((schedule.margin,) if schedule.margin else ())  # margin 0 keeps the older caches
               + (("clean",) if schedule.clean else ()))
    # One file per settings: another model size or schedule gets its own slot instead of replacing this one.
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = cache / f"{relpath.replace('/', '__')}.seed{tc.seed}.{digest}.pt"
    if path.exists():
        blob = torch.load(path, weights_only=True)
        if blob["key"] == key:
            grid, frame, report = _validated(relpath, raw, data)
            versions = []
            for cut, scale, lookback, weights in zip(blob["cuts"], blob["scales"], blob["lookbacks"], blob["weights"]):
                vmc = dataclasses.replace(mc, lookback=lookback)
                model = Forecaster(n_features(len(mc.level_alphas)), vmc)
                model.load_state_dict(weights)
                versions.append(Version(None if cut < 0 else cut, model.eval(), scale, vmc))
            return Trained(grid, frame, versions, blob["seconds"], report.by_reason(), blob["retrains"])
    t = train_file(relpath, raw, mc, tc, data, schedule)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "cuts": [-1 if v.cut is None else v.cut for v in t.versions],
                "scales": [v.scale for v in t.versions], "lookbacks": [v.mc.lookback for v in t.versions],
                "weights": [v.model.state_dict() for v in t.versions],
                "seconds": t.train_seconds, "retrains": t.retrains}, path)
    return t


def per_file_table(results: dict[str, pd.DataFrame], windows, threshold: float) -> list[str]:
    """Windows found, first-detection delay, false positives (rows, and separate alarms) per file."""
    lines = [f"{'file':<52} {'found':>6} {'FP rows':>7} {'FP alarms':>9}  first detection (rows into window)"]
    for relpath in sorted(results):
        frame = results[relpath]
        n_prob = probation_length(len(frame))
        ts = pd.to_datetime(frame["timestamp"]).to_numpy()
        hit = frame["anomaly_score"].to_numpy() >= threshold
        hit[:n_prob] = False
        inside = np.zeros(len(frame), dtype=bool)
        found, delays, total = 0, [], 0
        for start, end in windows[relpath]:
            w = (ts >= np.datetime64(start)) & (ts <= np.datetime64(end))
            inside |= w
            if np.flatnonzero(w).size == 0 or np.flatnonzero(w)[-1] < n_prob:
                continue
            total += 1
            idx = np.flatnonzero(w & hit)
            if idx.size:
                found += 1
                delays.append(f"{idx[0] - np.flatnonzero(w)[0]}/{w.sum()}")
            else:
                delays.append("-")
        fp = hit & ~inside
        alarms = int(np.sum(fp & ~np.concatenate([[False], fp[:-1]])))
        lines.append(f"{relpath:<52} {f'{found}/{total}':>6} {int(fp.sum()):>7} {alarms:>9}  {' '.join(delays)}")
    return lines


def _cells(results: dict[str, pd.DataFrame], windows) -> list:
    return [score_corpus(results, windows, p) for p in PROFILES]


def _overridden(settings, items: list[str]):
    """`settings` (a config dataclass) with each KEY=VALUE of `items` applied, VALUE read as the field's type."""
    for item in items:
        key, _, value = item.partition("=")
        kind = type(getattr(settings, key))
        if kind is tuple:  # a list of numbers, comma-separated: learning_rates=0.0005,0.0003
            parsed = tuple(float(v) for v in value.split(",") if v)
        else:
            parsed = value.lower() == "true" if kind is bool else kind(value)
        settings = dataclasses.replace(settings, **{key: parsed})
    return settings


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="NAB directory holding data/ and combined_windows.json")
    p.add_argument("--out", type=Path, required=True, help="results files go to OUT/<detector>/<category>/")
    p.add_argument("--detector", default="forecastd", help="detector name in the results files (no underscore)")
    p.add_argument("--no-ablation", action="store_true", help="score the full pipeline only")
    p.add_argument("--no-baselines", action="store_true", help="skip the windowed Gaussian and null detectors")
    p.add_argument("--retrain", default="doubling",
                   help='"doubling" (at 2, 4, 8, ... x the probationary rows), "growth:G" (each time the rows '
                        'seen reach 1 + G x those of the last training), an integer N (every N rows), or "none"')
    p.add_argument("--cold", action="store_true", help="retrain from fresh weights instead of the live ones")
    p.add_argument("--clean", action="store_true",
                   help="leave the points the live model flagged (score >= 0.5) out of a challenger's training "
                        "and validation tail")
    p.add_argument("--margin", type=float, default=0.0,
                   help="promote a challenger only if it beats the live loss by this fraction ([serve] promote_margin)")
    p.add_argument("--track", choices=("fresh", "range", "all"), default="range",
                   help="what a promoted model keeps of the previous anomaly track (see Schedule); "
                        "range is what the product does")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an [anomaly] setting for this run (the ablation is relative to it)")
    p.add_argument("--models", type=Path, help="cache of trained models: reused when the settings match")
    p.add_argument("--lookback", type=lambda v: v if v == "auto" else int(v), default=MODEL.lookback,
                   help='[model] lookback: "auto" (the product default, by each file\'s grid) or steps')
    p.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                   help="override a [training] setting, e.g. learning_rate=0.003 or weight_average=0")
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                   help="override a [model] setting of the benchmark's model, e.g. hidden_size=64 or cell=lstm")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (the benchmark machine has 2 cores)")
    p.add_argument("--jobs", type=int, default=cores(),
                   help="files processed in parallel (default: one per core, as free memory allows; results do not depend on it)")
    p.add_argument("--seeds", type=int, default=1,
                   help="train with this many seeds (the [training] seed, +1, ...) and print each and their mean; "
                        "results files, per-file table and ablation are of the first")
    args = p.parse_args(argv)
    if "_" in args.detector:
        p.error("--detector must not contain '_': NAB splits results file names on it")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    corpus = load_corpus(args.data)
    windows = load_windows(args.data / "combined_windows.json")
    data = DataConfig()
    mc = _overridden(dataclasses.replace(MODEL, lookback=args.lookback), args.model)
    tc = _overridden(TRAINING, args.train)
    ac = _overridden(AnomalyConfig(), args.set)
    variants = [(label, dataclasses.replace(ac, **o)) for label, o in (ABLATION if not args.no_ablation else ABLATION[:1])]
    print(f"[anomaly] {ac}")
    print(f"NAB corpus {args.data}: {len(corpus)} files; forecastd {mc.cell} hidden {mc.hidden_size} horizon "
          f"{mc.horizon}, lookback {mc.lookback}, lr {tc.learning_rate} (or {', '.join(f'{r:g}' for r in tc.learning_rates) or 'no other'} by validation), weight average {tc.weight_average}, {tc.epochs} epochs max, seed {tc.seed}; retrain {args.retrain} "
          f"({'cold' if args.cold else 'warm'} start, promote margin {args.margin:g}, anomaly track on a switch: "
          f"{args.track}); "
          f"torch {torch.__version__}, {args.threads} thread(s) x {args.jobs} job(s)")
    print(f"{'file':<52} {'rows':>6} {'freq':>6} {'unscored':>8} {'train s':>7} {'stream s':>8}  repairs; retrains")
    # The first seed runs every variant and writes the results files; further seeds (--seeds) the defaults only.
    seeds = [dataclasses.replace(tc, seed=tc.seed + k) for k in range(args.seeds)]
    def schedule(raw: pd.DataFrame) -> Schedule:
        return Schedule(retrain_rows(args.retrain, len(raw)), not args.cold, args.track, args.margin, args.clean)

    jobs = [(relpath, raw, mc, tck, data, schedule(raw), variants if k == 0 else variants[:1], args.threads,
             args.models)
            for k, tck in enumerate(seeds) for relpath, raw in corpus.items()]
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            done = pool.map(run_file, jobs, chunksize=1)
    else:
        done = [run_file(job) for job in jobs]
    for (relpath, *_), r in zip(jobs, done):
        if r.error:
            print(f"{relpath}: no detections, forecastd could not train on it: {r.error}", file=sys.stderr)
    by_seed = [dict(zip(corpus, done[k * len(corpus):(k + 1) * len(corpus)])) for k in range(len(seeds))]
    runs = by_seed[0]
    results = {}
    for relpath, raw in corpus.items():
        r = runs[relpath]
        frame = pd.DataFrame({"timestamp": raw["timestamp"], "value": raw["value"],
                              "anomaly_score": r.scores[variants[0][0]],
                              "label": label_rows(raw["timestamp"], windows[relpath])})
        results[relpath] = frame
        write_results(args.out, args.detector, relpath, frame)
        repairs = ", ".join(f"{k}: {v}" for k, v in r.repairs.items()) or "-"
        print(f"{relpath:<52} {len(raw):>6} {r.freq:>6} {r.unscored:>8} {r.train_seconds:>7.1f} "
              f"{r.stream_seconds:>8.1f}  {repairs}; {'; '.join(r.retrains) or '-'}")
    stream_total = time.perf_counter() - started

    table = {args.detector + (f", seed {tc.seed}" if len(seeds) > 1 else ""): _cells(results, windows)}
    for tck, seed_runs in zip(seeds[1:], by_seed[1:]):
        res = {relpath: pd.DataFrame({"timestamp": raw["timestamp"], "anomaly_score": seed_runs[relpath].scores[variants[0][0]]})
               for relpath, raw in corpus.items()}
        table[f"{args.detector}, seed {tck.seed}"] = _cells(res, windows)
    per_seed = np.array([[c.score for c in cells] for cells in list(table.values())[:len(seeds)]])
    if not args.no_baselines:
        gaussian = run_detector(corpus, lambda _, v: windowed_gaussian(v))
        null = run_detector(corpus, lambda _, v: null_scores(len(v)))
        table["windowed Gaussian (same run)"] = _cells(gaussian, windows)
        table["null (same run)"] = _cells(null, windows)
    print()
    head = "".join(f"{PROFILE_NAMES[p]:>10}" for p in PROFILES)
    print(f"{'detector':<34}{head}   threshold (standard), windows found")
    for name, cells in table.items():
        print(f"{name:<34}" + "".join(f"{c.score:>10.1f}" for c in cells)
              + f"   t={cells[0].threshold:.4g}, {cells[0].windows_detected}/{cells[0].windows}")
    if len(seeds) > 1:
        # The training seed alone moves the standard score by several points (docs/benchmarks.md).
        print(f"{f'{args.detector}, mean ± std of {len(seeds)}':<34}"
              + "".join(f"{f'{m:.1f}±{sd:.1f}':>10}" for m, sd in zip(per_seed.mean(0), per_seed.std(0))))
    for name, anchor in ANCHORS.items():
        print(f"{name + ' (NAB scorer, anchor)':<34}" + "".join(f"{a:>10.1f}" for a in anchor))

    standard = next(iter(table.values()))[0]
    print(f"\nPer file at the standard threshold {standard.threshold:.4g} (after the probationary period):")
    print("\n".join(per_file_table(results, windows, standard.threshold)))

    if not args.no_ablation:
        print("\nAblation: each step of the anomaly pipeline switched off alone (same trained models)")
        print(f"{'pipeline':<34}{head}   threshold (standard), windows found")
        for label, _ in variants:
            res = {relpath: pd.DataFrame({"timestamp": raw["timestamp"], "anomaly_score": runs[relpath].scores[label]})
                   for relpath, raw in corpus.items()}
            cells = _cells(res, windows)
            print(f"{label:<34}" + "".join(f"{c.score:>10.1f}" for c in cells)
                  + f"   t={cells[0].threshold:.4g}, {cells[0].windows_detected}/{cells[0].windows}")
    print(f"\nwall time: forecastd train + stream {stream_total:.1f} s, total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
