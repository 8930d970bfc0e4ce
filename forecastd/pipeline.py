"""The one place where stages meet: train, run_once (a tick) and backfill.

Data flows one way: source -> frames -> windowing -> model + state -> anomaly -> sink -> state checkpoint.
The CLI, the daemon and the benchmarks call these functions and nothing deeper. `now` is passed in;
only the CLI and the daemon read the clock.

Warm-up rule (shared by ticks and backfills, which is what makes them give the same rows): a series
without a carried state starts fresh at its first point at or after `anchor - warmup` and is credited
with the warm-up it got, so its point at `anchor` is the first one written. For a tick the anchor is the
first point after the series' previous watermark (kept across model versions, so a retrain leaves no
gap), or else its latest point; for a backfill it is the range start.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from forecastd.config import Config, ModelConfig, config_to_dict
from forecastd.errors import DataError
from forecastd.frames import LATE, FrameReport, Grid, infer_freq, validate
from forecastd.models import Forecaster
from forecastd.sinks import Sink, open_sink
from forecastd.sources import Source, open_source
from forecastd.planning import START_POINTS, plan_backfill, plan_tick
from forecastd.state import ModelVersion, StateStore, StreamState
from forecastd.streaming import Carried, Emit, Outputs, run_segments
from forecastd.training import fit, prepare, resolve_device
from forecastd.windowing import n_features, resolve_lookback, robust_scale, series_steps

__all__ = ["TrainSummary", "TickReport", "History", "read_history", "train", "run_once", "backfill", "state_store"]

log = logging.getLogger(__name__)


def state_store(config: Config) -> StateStore:
    return StateStore(config.resolve(config.state.dir))


@dataclass
class TrainSummary:
    version: int
    series: int
    points: int
    freq: str
    metrics: dict
    history: list[dict]
    repairs: dict[str, int]


@dataclass
class TickReport:
    model_version: int
    series: int = 0
    rows_read: int = 0
    points: int = 0
    forecasts_written: int = 0
    anomalies_written: int = 0
    anomalies_flagged: int = 0
    repairs: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    outputs: Outputs | None = None

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "outputs"}
        return d


class _Clock:
    """Stage timings for the report (monotonic durations, not wall-clock time)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self._t, 6)
        self._t = now


def _read(config: Config, grid_freq: str | None, **kwargs) -> tuple[pd.DataFrame, Grid, FrameReport, int]:
    source = open_source(config)
    raw = source.read(**{k: v for k, v in kwargs.items() if k in ("since", "until", "series")})
    freq = grid_freq or config.data.freq or infer_freq(raw, config.source.timezone)
    grid = Grid(freq, config.source.timezone)  # whole-day steps fall on local midnights
    frame, report = validate(
        raw, grid=grid, timezone=config.source.timezone, duplicates=config.data.duplicates,
        watermarks=kwargs.get("watermarks"), now=kwargs.get("now"),
    )
    return frame, grid, report, len(raw)


@dataclass
class History:
    """What a training learns from: the validated rows, their grid and the repairs made reading them."""

    frame: pd.DataFrame
    grid: Grid
    report: FrameReport


def read_history(config: Config, now: dt.datetime, window: int = 0) -> History:
    """Every row the source holds, validated; with `window`, the last `window` grid steps only."""
    frame, grid, report, _ = _read(config, None, now=now)
    report.log()
    if window and not frame.empty:
        steps = grid.index(frame["ts"])
        frame = frame[steps > steps.max() - window]
    return History(frame, grid, report)


def train(
    config: Config,
    now: dt.datetime,
    *,
    progress: Callable[[int, int, float, float], None] | None = None,
    make_live: bool = True,
    window: int = 0,
    init: ModelVersion | None = None,
    history: History | None = None,
) -> TrainSummary:
    """Train a model on what the source holds and save it as a new version (live by default).

    window: learn from the last `window` grid steps only (0 = all history). init: start from this
    model's weights (a warm start) when the new model has the same shape and grid; otherwise, and
    without it, from fresh weights. history: what `read_history(config, now, window)` gave, when the
    caller has read it already.
    """
    history = history or read_history(config, now, window)
    frame, grid, report = history.frame, history.grid, history.report
    if frame.empty:
        raise DataError("the source has no usable rows to train on; check [source] path/table and the column mapping")
    series = series_steps(frame, grid)
    scales = {sid: robust_scale(v) for sid, (_, v) in series.items()}
    # "auto" becomes a number of steps for this grid; the manifest keeps the number, so every later
    # load builds the same model.
    longest = max(int(st[-1] - st[0]) + 1 for st, _ in series.values())
    mc = dataclasses.replace(config.model, lookback=resolve_lookback(config.model.lookback, grid.step_ns, longest))
    config = dataclasses.replace(config, model=mc)
    prepared = prepare(frame, grid, scales, mc, config.data, config.training.validation_fraction)
    device = resolve_device(config.training.device)
    # The start weights are drawn here, before fit seeds its own shuffling: without the seed they came from
    # whatever the process had drawn before, and the same [training] seed trained another model each run.
    torch.manual_seed(config.training.seed)
    model = Forecaster(n_features(len(mc.level_alphas)), mc)
    weights = warm_weights(init.model, init.model_config, mc) if init is not None and init.grid.freq == grid.freq else None
    warm = weights is not None
    if warm:
        model.load_state_dict(weights)
    elif init is not None:
        log.info("cold start: model v%d (%s, %s) differs from the new model (%s, %s) in grid or shape",
                 init.version, init.grid.freq, init.model_config, grid.freq, mc)
    result = fit(model, prepared, config.training, device=device, progress=progress)
    result.metrics["warm_start_from"] = init.version if warm else None
    store = state_store(config)
    manifest = {
        "config": config_to_dict(config),
        "freq": grid.freq,
        "zone": grid.zone,
        "n_features": n_features(len(mc.level_alphas)),
        "scales": scales,
        "metrics": result.metrics,
        "history": result.history,
        "trained_at": pd.Timestamp(now).isoformat(),
        "data_end": frame["ts"].max().isoformat(),
        "n_series": len(series),
        "n_points": int(len(frame)),
    }
    version = store.save_model(result.model.cpu(), manifest, keep=config.state.keep_versions)
    if make_live:
        previous = store.live_version()
        store.set_live(version)
        # Recorded as the daemon's switches are: a rollback looks for the versions that have served here.
        store.record_switch(version, previous, "forecastd train", pd.Timestamp(now).isoformat())
    log.info("trained model v%d on %d series, %d points: val mse %.4f (persistence %.4f)", version,
             len(series), len(frame), result.metrics["val_mse"], result.metrics["val_persistence_mse"])
    return TrainSummary(version, len(series), int(len(frame)), grid.freq, result.metrics, result.history,
                        report.by_reason())


def warm_weights(init: Forecaster, init_config: ModelConfig, config: ModelConfig) -> dict[str, torch.Tensor] | None:
    """Weights for a new model of `config` that start from `init`'s, or None when they cannot.

    The same shape carries over as is. A longer window of recent changes (an "auto" lookback grows with
    the history a retrain learns from) carries over too: the old path weights keep their lags and the
    added, older lags start at zero, so the new model starts out forecasting exactly as the live one
    and a warm start is not lost each time the history doubles. Any other change starts fresh.
    """
    if dataclasses.replace(init_config, lookback=config.lookback) != config or config.lookback < init_config.lookback:
        return None
    weights = dict(init.state_dict())
    if config.lookback > init_config.lookback:
        old = weights.get("path")
        path = torch.zeros(config.horizon, config.lookback, dtype=init.head.weight.dtype, device=init.head.weight.device)
        if old is not None:
            path[:, : old.shape[1]] = old  # column j-1 weighs the value j steps ago, in both
        weights["path"] = path
    return weights


def _prior(store: StateStore, live: int, wanted: list[str], versions: list[int]
           ) -> tuple[dict[str, int], dict[str, Carried], dict[str, int]]:
    """For each `wanted` series, from the newest other version's stream that holds it, else from the
    handover record of pruned streams: its watermark (grid step), so a new model picks up where the old
    one stopped, and what its anomaly track carries over (`Carried`): its value range, so novelty does
    not start over from a warm-up's few points (a value only beyond the last four days would be flagged
    as never seen), and its open incident, so the switch does not report it again.

    Newest holder, not newest stream: a series quiet through two switches is in neither the live stream
    nor the one before it. Streams stop loading once every wanted series is found: a tick calls this
    while any series it reads is new to the live stream. Also the wanted series that an older stream kept
    waiting for START_POINTS points (its checkpoint's "waiting"): new series, not a backlog. `versions`:
    the store's, as the tick listed them."""
    missing = set(wanted)
    steps: dict[str, int] = {}
    carried: dict[str, Carried] = {}
    waited: dict[str, int] = {}
    for v in sorted((v for v in versions if v != live), reverse=True):
        if not missing:
            break
        state, info = store.load_stream(v)
        for sid, first in info.get("waiting", {}).items():
            if sid in missing:
                waited.setdefault(sid, int(first))
        if state is None:
            continue
        fields = state.handover_fields()
        for i, sid in enumerate(state.series_ids):
            if state.step[i] >= 0 and sid in missing:
                steps[sid], carried[sid] = int(state.step[i]), Carried.of_fields(fields, i)
                missing.discard(sid)
    ids, fields = store.load_handover() if missing else ([], {})
    for i, sid in enumerate(ids):
        if sid in missing:
            steps[sid], carried[sid] = int(fields["step"][i]), Carried.of_fields(fields, i)
    return steps, carried, {s: v for s, v in waited.items() if s not in steps}


_DIFFERS_TOLD: set[tuple[str, int, str]] = set()


def _tell_if_config_differs(config: Config, mv: ModelVersion, store: StateStore) -> None:
    """Ticks and backfills run the live model as it was trained; a [model] key or [data] freq edited since
    changes nothing until a training. Said once per process and model, as a warning: an edited horizon
    that silently kept writing the old one looked like a bug in the new config."""
    trained = mv.manifest.get("config", {}).get("model", {})
    # A manifest keeps the number of steps "auto" came to for its data: any number agrees with "auto".
    differs = [f"[model] {k} = {v!r} (v{mv.version}: {trained.get(k)!r})"
               for k, v in config_to_dict(config)["model"].items()
               if k in trained and trained[k] != v and not (k == "lookback" and v == "auto")]
    if config.data.freq is not None and Grid(config.data.freq, mv.grid.zone).step_ns != mv.grid.step_ns:
        differs.append(f"[data] freq = {config.data.freq!r} (v{mv.version}: {mv.grid.freq!r})")
    told = (str(store.root), mv.version, "; ".join(differs))
    if differs and told not in _DIFFERS_TOLD:
        _DIFFERS_TOLD.add(told)
        log.warning("the config differs from live model v%d, which serves as trained until a training: %s; "
                    "`forecastd train` makes a model of the config", mv.version, told[2])


def _sink_watermarks(sink: Sink, grid: Grid, wanted: list[str], now: dt.datetime, span: int) -> dict[str, int]:
    """For series that no stream or handover places, the step of their latest anomaly row in the sink:
    outputs are durable before a checkpoint moves, so where checkpoints were lost (deleted, every one
    corrupt) the sink says how far each series got, and it goes on from there after a warm-up instead of
    starting again at its latest point, leaving every point in between without outputs. Read backwards
    in windows of `span` steps growing fourfold, up to 4^5 of them: a recovery reads about what it needs."""
    end = grid.index(pd.DatetimeIndex([_utc(now)]))[0]
    found: dict[str, int] = {}
    missing = list(wanted)
    hi = end
    for _ in range(6):
        lo = hi - span
        rows = sink.read("anomalies", series=missing, since=grid.ts(np.array([lo]))[0],
                         until=grid.ts(np.array([hi]))[0])
        if len(rows):
            latest = rows.groupby("series_id")["ts"].max()
            found.update(zip(latest.index, grid.index(pd.DatetimeIndex(latest.to_numpy())).tolist()))
            missing = [s for s in missing if s not in found]
        if not missing:
            break
        hi, span = lo, span * 4
    if found:
        log.warning("model has no stream checkpoint: %d series continue after their latest outputs in the sink "
                    "(watermarks recovered; a warm-up runs first), %d start afresh", len(found), len(missing))
    return {s: int(v) for s, v in found.items()}


def _read_start(state: StreamState, grid: Grid, max_gap: int) -> tuple[pd.Timestamp | None, dict[str, int]]:
    """Where a tick's read starts, the oldest watermark of the series within `max_gap` steps of the newest
    one, and the series further behind (silent longer than a gap that restarts a series) with their
    watermark steps: those are read apart, so that they do not hold every tick's read back. (None, {})
    before any watermark."""
    done = state.step >= 0
    if not done.any():
        return None, {}
    current = done & (state.step >= state.step[done].max() - max_gap)
    behind = np.flatnonzero(done & ~current)
    stale = {state.series_ids[i]: int(state.step[i]) for i in behind}
    return grid.last_instant(np.array([state.step[current].min()]))[0], stale


def run_once(config: Config, now: dt.datetime, *, keep_outputs: bool = False,
             source: Source | None = None, sink: Sink | None = None) -> TickReport:
    """One tick: read rows past each series' watermark, advance each carried state by exactly those
    rows, write forecasts and anomaly rows, then checkpoint state and watermarks (in that order).

    A long-lived caller (the daemon) passes its own `source` and `sink` so connections and reflected
    tables are reused across ticks.
    """
    clock = _Clock()
    store = state_store(config)
    # No sweep of temp files here: another writer (a retrain, `models promote`) may be mid-write. The
    # daemon sweeps once at start; leftovers are ignored by every loader until then.
    mv = store.load_live(resolve_device(config.serve.device, "[serve] device"))
    _tell_if_config_differs(config, mv, store)
    grid = mv.grid
    state, info = store.load_stream(mv.version)
    streamless = state is None  # a first tick, or checkpoints lost: watermarks may be in the sink
    if state is None:
        state = StreamState.empty(mv.model_config, config.anomaly.forecasts)
    state = _fit_judges(state, config.anomaly.forecasts)
    report = TickReport(mv.version)
    clock.lap("load")

    source = source or open_source(config)
    known = set(state.series_ids)
    watermarks = state.watermarks(grid)
    listed_at = info.get("listed_at")
    every = config.serve.list_series_every
    listing_due = not known or listed_at is None or every <= 0 or \
        (pd.Timestamp(now) - pd.Timestamp(listed_at)).total_seconds() >= every
    frames = []
    since, stale = _read_start(state, grid, config.data.max_gap)
    if known:
        frames.append(source.read(since=since))
    clock.lap("read")
    # New series: those among the rows just read, and, at most every [serve] list_series_every seconds,
    # those whose every row is older than the oldest watermark (a series loaded with its history).
    # Only a listing finds the latter: every file's id column, or a SQL table's series index (the whole
    # table where it has none).
    if listing_due:
        all_ids, listed_at = source.series_ids(), pd.Timestamp(now).isoformat()
        clock.lap("list")
    else:
        all_ids = pd.unique(frames[0]["series_id"].dropna().astype(str)).tolist()
    new_ids = [s for s in all_ids if s not in known]
    # A new series that waits for its START_POINTS-th point (planning) was looked for in the other versions'
    # streams and read from the source's beginning the tick it first came; the checkpoint keeps the step of
    # its first row, so later ticks read it from there and do not search again, while the versions stay
    # as they were (a promotion or a rollback may have put it in a stream).
    versions = store.versions()
    waited = info.get("waiting", {}) if info.get("waiting_versions") == versions else {}
    fresh = [s for s in new_ids if s not in waited]
    # Series the live model has no state for continue from the newest other version's watermark, so
    # a model switch leaves no gap even for a series that was quiet in the new model's first ticks.
    prior, carried, waited_before = _prior(store, mv.version, fresh, versions) if fresh else ({}, {}, {})
    # Watermarks recovered from the sink (`_sink_watermarks`) are checkpointed until their series run, so
    # the sink is searched once, by the tick that finds no checkpoint at all.
    recovered = {s: v for s, v in info.get("recovered", {}).items() if s in fresh and s not in prior}
    prior.update(recovered)
    unplaced = [s for s in fresh if s not in prior and s not in waited_before] if streamless else []
    if unplaced:  # (a series an older stream kept waiting has written nothing yet)
        sink = sink or open_sink(config)
        recovered.update(_sink_watermarks(sink, grid, unplaced, now, max(config.data.max_gap, config.data.warmup)))
        prior.update(recovered)
        clock.lap("read")
    if new_ids:
        # Where each new series' rows are needed from: a warm-up before its prior watermark, or the first
        # row it waited from; a series none of these places, from its beginning.
        warm_from = {s: prior[s] - config.data.warmup for s in fresh if s in prior}
        warm_from.update({s: v for s, v in {**waited_before, **waited}.items() if s in new_ids})
        from_start = [s for s in new_ids if s not in warm_from]
        start = grid.ts(np.array([min(warm_from.values()) - 1]))[0] if warm_from else None
        # Only the rows before the first read's: reading them twice counted every one as a duplicate.
        if not known:
            frames.append(source.read(since=start))
            if from_start and start is not None:  # their older rows, not every series' (a whole-table read)
                frames.insert(0, source.read(until=start, series=from_start))
        elif since is not None and (start is None or start < since):
            frames.insert(0, source.read(since=start, until=since, series=new_ids))  # older rows first
    # Series silent for more than [data] max_gap steps behind the others do not hold every tick's read
    # back to their watermark (one dead sensor made each tick re-read, and count as late, every row of
    # every series since it died). Their rows from there up to the read's start are fetched when they
    # send again, or at the listing interval (a backlog uploaded late).
    seen = set(all_ids)
    back = list(stale) if listing_due else [s for s in stale if s in seen]
    if back:
        first = min(stale[s] for s in back)
        frames.insert(0, source.read(since=grid.last_instant(np.array([first]))[0], until=since, series=back))
    raw = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["series_id", "ts", "value"])
    report.rows_read = len(raw)
    clock.lap("read")
    # Rows of no valid series up to the newest watermark were within an earlier tick's read (and counted
    # there): with no series they have no watermark of their own to be dropped by.
    done = state.step >= 0
    counted_until = grid.last_instant(np.array([state.step[done].max()]))[0] if done.any() else None
    # A resumed series' rows up to its prior watermark are read again for its warm-up only: the stream
    # that processed them counted their repairs.
    resumed = [s for s in fresh if s in prior]
    seen_through = pd.Series(grid.last_instant(np.array([prior[s] for s in resumed], dtype=np.int64)),
                             index=pd.Index(resumed, dtype=object)) if resumed else None
    frame, frame_report = validate(raw, grid=grid, timezone=config.source.timezone,
                                   duplicates=config.data.duplicates, watermarks=watermarks, now=now,
                                   counted_until=counted_until, seen_through=seen_through)
    # Every read starts at the oldest watermark among the series it covers, so it brings back rows that
    # the series ahead of it have processed. A row at or before its series' watermark is dropped, but it
    # is not counted or logged as late: one written after the series passed it cannot be told from one
    # read again, and counting the re-reads made a series a few steps behind the others turn every
    # tick's rows of every other series into "late" warnings and a late-rows alert (a backfill over
    # the range processes a truly late row).
    reread = sum(frame_report.counts.pop(key) for key in [k for k in frame_report.counts if k[1] == LATE])
    if reread:
        log.debug("%d row(s) at or before their series' watermark read again and dropped", reread)
    clock.lap("validate")

    planned = plan_tick(frame, grid, state.series_ids, state.step, state.scale, mv.scales, prior,
                        config.data.warmup, config.data.max_gap, waited=waited.keys() | waited_before.keys())
    # A waiting series' rows are read again at every tick until it starts, and counted then.
    waiting = set(planned.waiting)
    for key in [k for k in frame_report.counts if k[0] in waiting]:
        del frame_report.counts[key]
    frame_report.log()
    report.repairs = frame_report.by_reason()
    report.series = planned.series
    report.points = planned.points
    _log_waiting(planned.waiting)
    warned = _warn_stuck(planned.observed, set(info.get("waiting_warned", ())))
    clock.lap("plan")

    outputs, state = run_segments(mv.model, state, planned.segments, planned.fresh_scale, grid, mv.model_config,
                                  config.anomaly, mv.version, Emit(config.data.warmup), carried=carried)
    clock.lap("model")
    (sink or open_sink(config)).write(outputs.forecasts, outputs.anomalies)
    clock.lap("write")
    # Only now, with the outputs durable, may the watermarks move (DESIGN.md guarantee 1).
    # A tick with nothing to process checkpoints too when it listed, so idle ticks (a daemon ticking every
    # minute on hourly data) do not each list again.
    # So do waiting series when they change, or each later tick would read them from the beginning again.
    # And so do watermarks recovered from the sink, while their series have not run.
    running = set(state.series_ids)
    recovered = {s: v for s, v in recovered.items() if s not in running}
    if planned.segments or (len(state) and listed_at != info.get("listed_at")) or planned.first_steps != waited \
            or recovered != info.get("recovered", {}) or warned != info.get("waiting_warned", []):
        store.save_stream(mv.version, state, {"ticked_at": pd.Timestamp(now).isoformat(), "listed_at": listed_at,
                                              "waiting": planned.first_steps, "waiting_versions": versions,
                                              "waiting_warned": warned, "recovered": recovered},
                          keep=config.state.keep_checkpoints)
    clock.lap("checkpoint")
    report.forecasts_written = len(outputs.forecasts)
    report.anomalies_written = len(outputs.anomalies)
    report.anomalies_flagged = int(outputs.anomalies["is_anomaly"].sum())
    report.seconds = clock.seconds
    report.outputs = outputs if keep_outputs else None
    log.info("tick: model v%d, %d series, %d points, %d forecast rows, %d anomaly rows (%d flagged) in %.3f s",
             mv.version, report.series, report.points, report.forecasts_written, report.anomalies_written,
             report.anomalies_flagged, sum(clock.seconds.values()))
    return report


def backfill(config: Config, start: dt.datetime, end: dt.datetime, *, keep_outputs: bool = False,
             write: bool = True) -> TickReport:
    """Forecasts and anomaly rows for points in [start, end], in one batched pass with the live model.

    Leaves the streaming state alone: a backfill rewrites history, the daemon keeps ticking.
    """
    clock = _Clock()
    store = state_store(config)
    mv = store.load_live(resolve_device(config.serve.device, "[serve] device"))
    _tell_if_config_differs(config, mv, store)
    grid = mv.grid
    bounds = pd.DatetimeIndex([_utc(start), _utc(end)])
    lo, hi = (int(v) for v in grid.index(bounds))
    # The grid points within the range: the nearest step to a bound may lie outside it.
    at = grid.ts(np.array([lo, hi]))
    lo, hi = lo + int(at[0] < bounds[0]), hi - int(at[1] > bounds[1])
    if hi < lo:
        raise DataError(f"backfill range is empty: no point of the model's {grid.freq!r} grid lies in [--start {start}, --end {end}]")
    warmup = config.data.warmup
    report = TickReport(mv.version)
    # From the step before the warm-up (a series that has no START_POINTS points in it would wait) through
    # every instant that rounds to `hi`: stamps after the step's time (hourly data at :05) belong to it.
    first = lo - max(warmup, START_POINTS) - 1
    raw = open_source(config).read(since=grid.last_instant(np.array([first]))[0],
                                   until=grid.last_instant(np.array([hi]))[0])
    report.rows_read = len(raw)
    frame, frame_report = validate(raw, grid=grid, timezone=config.source.timezone,
                                   duplicates=config.data.duplicates)
    frame_report.log()
    report.repairs = frame_report.by_reason()
    clock.lap("read")
    planned = plan_backfill(frame, grid, lo, mv.scales, warmup, config.data.max_gap)
    report.series = planned.series
    report.points = planned.points
    _log_waiting(planned.waiting, logging.WARNING)
    empty = StreamState.empty(mv.model_config, config.anomaly.forecasts)
    outputs, _ = run_segments(mv.model, empty, planned.segments, planned.fresh_scale, grid, mv.model_config,
                              config.anomaly, mv.version, Emit(warmup, lo, hi))
    clock.lap("model")
    if write:
        open_sink(config).write(outputs.forecasts, outputs.anomalies)
    clock.lap("write")
    report.forecasts_written = len(outputs.forecasts)
    report.anomalies_written = len(outputs.anomalies)
    report.anomalies_flagged = int(outputs.anomalies["is_anomaly"].sum())
    report.seconds = clock.seconds
    report.outputs = outputs if keep_outputs else None
    return report


# Rows after which a new series still short of START_POINTS observed values is said at WARNING (`_warn_stuck`).
STUCK_ROWS = 10 * START_POINTS


def _log_waiting(waiting: list[str], level: int = logging.INFO) -> None:
    """Series not started for want of START_POINTS observed points: INFO for a tick (they start at a later
    one), WARNING for a backfill, which writes nothing for them at all."""
    if waiting:
        log.log(level, "%d new series wait for %d observed points before they start, so that their unit of "
                "change is measured (%s)", len(waiting), START_POINTS, some_of(waiting))


def _warn_stuck(observed: Mapping[str, tuple[int, int]], warned: set[str]) -> list[str]:
    """A WARNING, once per series, for waiting series with STUCK_ROWS rows or more: such a series is more
    likely broken (values NULL, of another column) than slow, and waits, read again at every tick, for as
    long as it stays so. Returns the waiting series warned about, for the checkpoint."""
    stuck = {s: v for s, v in observed.items() if v[1] >= STUCK_ROWS and s not in warned}
    if stuck:
        log.warning("%d new series with %d rows or more but fewer than %d observed values cannot start "
                    "(observed of rows: %s): a new series starts at its %dth observed value. If they should have "
                    "values, check their rows and [source] value_column (said once per series)", len(stuck),
                    STUCK_ROWS, START_POINTS, some_of(list(stuck), lambda s: f"{s!r} {stuck[s][0]} of {stuck[s][1]}"),
                    START_POINTS)
    return sorted((warned | stuck.keys()) & observed.keys())


def some_of(names: Sequence[str], show: Callable[[str], str] = repr, shown: int = 5) -> str:
    """The first `shown` of `names` for a message, each as `show` gives it, and " ..." if there are more."""
    return ", ".join(show(s) for s in names[:shown]) + (" ..." if len(names) > shown else "")


def _utc(t: dt.datetime | pd.Timestamp) -> pd.Timestamp:
    t = pd.Timestamp(t)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def _fit_judges(state: StreamState, m: int) -> StreamState:
    """[anomaly] forecasts changed since the checkpoint: the pending forecasts restart empty (logged)."""
    if state.pending_mean.shape[1] == m:
        return state
    log.warning("[anomaly] forecasts changed to %d; pending forecasts reset, the next point of each series "
                "is not scored", m)
    state.pending_mean = np.full((len(state), m, m), np.nan)
    state.pending_std = np.full((len(state), m, m), np.nan)
    return state

