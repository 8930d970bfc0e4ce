"""Retraining: train a challenger, judge it against the live model on the same recent tail, promote or keep.

The judgement: both models are run over the challenger's held-back validation tail (the last
`validation_fraction` of each series in the data the challenger was trained on), each with its own
per-series scales, exactly as each would run in production, and scored with training's validation loss
(each series' MSE relative to persistence, averaged over series: unit-free, so the two compare directly).
The live model may have trained on the start of that tail, which favours it: a challenger must win
despite that, which is the safe direction. It is promoted if its loss is lower by `[serve]
promote_margin` of the live loss (or always, with `always_promote`).

Switching the live model is `switch_live`: the new live model never continues another model's hidden
states. Every stream but one is removed (the old live model's; the series only the others hold go to the
handover record first), so the new model, lacking its own, warms up from that stream's watermarks
(pipeline's rule: the newest other version's stream, then the handover record), and a model switched
back to while its own stream is that one simply continues it. Switches are recorded in `history.json`,
which `rollback` reads.

The daemon runs `retrain` in a child process (`python -m forecastd.retrain`, request as JSON on stdin,
log records and the result as JSON lines on stdout); see daemon.py for why.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from forecastd.config import Config, DataConfig, ModelConfig, config_from_dict, config_to_dict
from forecastd.errors import CheckpointError, ForecastdError, ModelError
from forecastd.files import exclusive_lock
from forecastd.frames import Grid, validate
from forecastd.pipeline import read_history, state_store, train
from forecastd.sources import open_source
from forecastd.state import ModelVersion, StateStore
from forecastd.models import Forecaster
from forecastd.training import evaluate, prepare, resolve_device
from forecastd.windowing import robust_scale, series_steps

__all__ = ["RetrainResult", "retrain", "growth_wait", "tail_losses", "decide", "tail_loss", "switch_live", "rollback_target"]

log = logging.getLogger(__name__)



@dataclass
class RetrainResult:
    """What a retrain did. `outcome`: promote (the caller switches), keep, failed, or skipped (too few new
    points: `[serve] retrain_growth`)."""

    outcome: str
    reason: str
    live: int | None = None
    challenger: int | None = None
    live_loss: float = math.nan
    challenger_loss: float = math.nan
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("live_loss", "challenger_loss"):  # JSON has no NaN
            d[k] = d[k] if math.isfinite(d[k]) else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RetrainResult:
        d = dict(d)
        for k in ("live_loss", "challenger_loss"):
            d[k] = math.nan if d.get(k) is None else float(d[k])
        return cls(**d)


def decide(live_loss: float, challenger_loss: float, margin: float, always: bool) -> tuple[bool, str]:
    """Promote? The challenger must be finite and beat the live loss by `margin` of its magnitude."""
    if not math.isfinite(challenger_loss):
        return False, f"challenger validation loss is {challenger_loss}; the live model stays"
    if always:
        return True, "[serve] always_promote = true"
    if not math.isfinite(live_loss):
        return True, f"live model's loss on the tail is {live_loss}"
    need = live_loss - margin * abs(live_loss)
    if challenger_loss < need:
        return True, f"challenger loss {challenger_loss:.4f} beats live {live_loss:.4f} by more than {margin:.1%}"
    return False, f"challenger loss {challenger_loss:.4f} does not beat live {live_loss:.4f} by more than {margin:.1%}"


def retrain(config: Config, now: dt.datetime) -> RetrainResult:
    """Train a challenger (not live) and judge it; never raises for a failed training, never switches."""
    started = time.monotonic()
    store = state_store(config)
    live = store.live_version()
    init = None
    try:
        history = read_history(config, now, config.serve.retrain_window)
        wait = growth_wait(store, history.frame, config.serve.retrain_growth, config.model)
        if wait is not None:
            return RetrainResult("skipped", wait, live, seconds=round(time.monotonic() - started, 3))
        # Only once it trains: on a GPU host, loading the live weights onto [training] device starts CUDA.
        init = _warm_start(store, live, config)
        summary = train(config, now, make_live=False, init=init, history=history)
    except ForecastdError as exc:
        return RetrainResult("failed", f"training failed: {exc}", live, seconds=time.monotonic() - started)
    except Exception as exc:  # a bug or a library failure: the live model must not care
        log.exception("training failed unexpectedly")
        return RetrainResult("failed", f"training failed: {type(exc).__name__}: {exc}", live,
                             seconds=time.monotonic() - started)
    result = RetrainResult("keep", "", live, summary.version, metrics=_finite(summary.metrics))
    if not math.isfinite(summary.metrics.get("val_loss", math.nan)):
        result.outcome, result.reason = "failed", (f"challenger v{summary.version} has a non-finite validation "
                                                   f"loss ({summary.metrics.get('val_loss')}); the live model stays")
    elif live is None:
        result.outcome, result.reason = "promote", "no live model yet"
    else:
        try:
            # The warm start's model is the live one unless the live files failed to load; then the challenger
            # is judged against the version that serves instead (load_live's fallback): against the corrupt
            # one every retrain failed, and nothing could replace it.
            device = resolve_device(config.training.device)
            live_mv = init if init is not None and init.version == live else store.load_live(device)
            challenger_mv = store.load_model(summary.version, device)
            result.live_loss, result.challenger_loss = tail_losses(config, live_mv, challenger_mv, now)
        except Exception as exc:  # ForecastdError or not: the live model stays, and the line says why
            result.outcome, result.reason = "failed", f"cannot compare with live v{live}: {exc}"
        else:
            promote, result.reason = decide(result.live_loss, result.challenger_loss, config.serve.promote_margin,
                                            config.serve.always_promote)
            result.outcome = "promote" if promote else "keep"
    result.seconds = round(time.monotonic() - started, 3)
    return result


def _warm_start(store: StateStore, live: int | None, config: Config) -> ModelVersion | None:
    """The live model, for the challenger to start from its weights (when the shapes agree), so a
    retrain refines what serves rather than relearning it; None when there is none or it does not load."""
    if live is None:
        return None
    try:
        return store.load_live(resolve_device(config.training.device))
    except ForecastdError as exc:
        log.warning("the challenger starts from fresh weights: the live model does not load (%s)", exc)
        return None


def growth_wait(store: StateStore, frame: pd.DataFrame, growth: float, model: ModelConfig) -> str | None:
    """Why a retrain waits, or None: fewer new points than `growth` times those the newest version
    learnt from. New: past that version's data end, or of a series it did not learn from.

    The newest version, not the live one: a challenger that was kept still learnt from those points,
    and judging by the live model would retrain at every run until one is promoted. A version built
    with other `[model]` settings than `model` never makes a retrain wait: the new settings need one.
    """
    versions = store.versions()
    if growth <= 0 or not versions:
        return None
    try:
        manifest = store.manifest(versions[-1])
        end, points, known = pd.Timestamp(manifest["data_end"]), int(manifest["n_points"]), manifest["scales"]
        built = config_from_dict(manifest["config"]).model
    except (ForecastdError, KeyError, TypeError, ValueError) as exc:
        log.warning("retraining without [serve] retrain_growth's check: v%d's manifest has no data end, point "
                    "count or config (%s)", versions[-1], exc)
        return None
    # "auto" was resolved to a number of steps in the manifest.
    if built != (model if model.lookback != "auto" else replace(model, lookback=built.lookback)):
        log.info("retraining now: [model] settings differ from v%d's", versions[-1])
        return None
    new = int(((frame["ts"] > end) | ~frame["series_id"].isin(list(known))).sum())
    need = math.ceil(growth * points)
    if new >= need:
        return None
    return (f"{new} new points since v{versions[-1]} learnt from {points} (data to {end.isoformat()}); "
            f"[serve] retrain_growth = {growth:g} waits for {need}")


def tail_losses(config: Config, live: ModelVersion, challenger: ModelVersion, now: dt.datetime) -> tuple[float, float]:
    """(live loss, challenger loss) on the challenger's validation tail, each model with its own scales.

    The loss is training's validation loss (each series' MSE relative to persistence, averaged), which
    has no unit, so two models with different per-series scales compare directly. Raises ModelError when
    the two cannot be compared (another grid or horizon).
    """
    if live.grid.freq != challenger.grid.freq or live.model_config.horizon != challenger.model_config.horizon:
        raise ModelError(f"live v{live.version} ({live.grid.freq}, horizon {live.model_config.horizon}) and "
                         f"challenger v{challenger.version} ({challenger.grid.freq}, horizon "
                         f"{challenger.model_config.horizon}) differ in grid or horizon; promote by hand with "
                         f"`forecastd models promote {challenger.version}` if the change is intended")
    grid = challenger.grid
    until = pd.Timestamp(challenger.manifest["data_end"])  # the data the challenger saw, not rows added since
    raw = open_source(config).read(until=until)
    frame, _ = validate(raw, grid=grid, timezone=config.source.timezone, duplicates=config.data.duplicates, now=now)
    fraction = config_from_dict(challenger.manifest["config"]).training.validation_fraction
    return tuple(tail_loss(mv.model, mv.model_config, mv.scales, frame, grid, config.data, fraction)
                 for mv in (live, challenger))


def tail_loss(model: Forecaster, mc: ModelConfig, scales: dict[str, float], frame: pd.DataFrame, grid: Grid,
              data: DataConfig, fraction: float) -> float:
    """One model's validation loss on the last `fraction` of each series of a validated frame, with its own
    per-series scales; NaN when no series has a tail. The pure half of `tail_losses` (benchmarks use it)."""
    # A series new to a model gets the scale it would take when it starts streaming.
    own = {sid: float(scales.get(sid) or robust_scale(v)) for sid, (_, v) in series_steps(frame, grid).items()}
    prepared = prepare(frame, grid, own, mc, data, fraction)
    device = next(model.parameters()).device
    return evaluate(model, prepared.val, device)["loss"] if prepared.val else math.nan


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}


# -- switching the live model ---------------------------------------------------------------------

def _switch_lock(store: StateStore) -> contextlib.AbstractContextManager[None]:
    """Serialises switches by the daemon and by `forecastd models` (the daemon's own lock is held for its
    lifetime, so the CLI cannot take that one)."""
    return exclusive_lock(store.root / "live.lock")


def _stream_dirs(store: StateStore) -> dict[int, Path]:
    base = store.root / "streams"
    if not base.exists():
        return {}
    return {int(d.name[1:]): d for d in base.iterdir() if d.name.startswith("v") and d.name[1:].isdigit()}


def _coverage(store: StateStore, version: int) -> tuple[int, int]:
    """(series, sum of watermark steps) of a version's newest good checkpoint; (-1, 0) when it has none."""
    state, _ = store.load_stream(version)
    if state is None:
        return (-1, 0)
    return (len(state), int(state.step[state.step >= 0].sum()))


def switch_live(store: StateStore, version: int, *, reason: str, now: dt.datetime) -> int | None:
    """Make `version` live; returns the previous live version. Safe while a daemon ticks.

    Order matters for a crash at any point: stale streams go first (the old live keeps serving from
    the freshest one meanwhile), the live pointer moves last, the history is a record only.
    """
    with _switch_lock(store):
        previous = store.live_version()
        if version == previous:
            return previous
        if version not in store.versions():
            raise ModelError(f"model version {version} does not exist; `forecastd models list` shows the versions")
        try:
            store.load_model(version)
        except CheckpointError as exc:
            raise ModelError(f"model v{version} cannot be made live: {exc}") from None
        streams = _stream_dirs(store)
        if streams:
            # The one stream kept is the one the new model takes its watermarks from: the old live model's,
            # which has been ticking (else the one that holds the most). A series only the others hold (one
            # silent since an earlier model ran) moves to the handover record first, so no watermark is
            # lost. Keeping the stream with the most series instead kept an older model's whenever a
            # silent series was missing from the live one, and the new model replayed, and rewrote,
            # every point the old live model had written since.
            keep = previous if previous in streams and store.has_stream(previous) else \
                max(streams, key=lambda v: _coverage(store, v))
            doomed = [v for v in streams if v != keep]
            store.hand_over(doomed)
            for v in doomed:
                shutil.rmtree(streams[v], ignore_errors=True)
        store.set_live(version)
        store.record_switch(version, previous, reason, pd.Timestamp(now).isoformat())
        log.info("model v%d is live (was %s): %s", version, f"v{previous}" if previous else "none", reason)
        return previous


def rollback_target(store: StateStore) -> int:
    """The newest existing version below the live one that has served before; else the newest below it.
    Served: named by the switch history, or holding a stream checkpoint (only a live model ticks)."""
    live = store.live_version()
    if live is None:
        raise ModelError("there is no live model to roll back from; train one with `forecastd train`")
    existing = set(store.versions())
    served = {v for e in store.live_history() for v in (e.get("version"), e.get("previous")) if isinstance(v, int)}
    served |= {v for v in existing if store.has_stream(v)}
    older = sorted((v for v in existing if v < live), reverse=True)
    candidates = [v for v in older if v in served] or older
    if candidates:
        return candidates[0]
    raise ModelError(f"live model v{live} is the oldest version on disk; there is nothing to roll back to")


# -- the child process the daemon runs ------------------------------------------------------------

class _JsonLines(logging.Handler):
    """Log records as JSON lines on stdout, for the daemon to re-log through its own handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = json.dumps({"log": {"name": record.name, "level": record.levelno, "msg": record.getMessage()}})
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except Exception:
            self.handleError(record)


def _child_main() -> int:
    import signal

    # Ctrl-C in a terminal reaches the whole process group; the daemon decides this child's fate.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    request = json.loads(sys.stdin.read())
    _die_with_parent(int(request["parent"]))
    with contextlib.suppress(OSError):
        os.nice(5)  # a busy training gets about a third of a tick's CPU share: ticks stay on time
    root = logging.getLogger()
    root.handlers[:] = [_JsonLines()]
    root.setLevel(request.get("level", logging.INFO))
    config = config_from_dict(request["config"], base_dir=request["base_dir"])
    result = retrain(config, dt.datetime.fromisoformat(request["now"]))
    sys.stdout.write(json.dumps({"result": result.as_dict()}) + "\n")
    sys.stdout.flush()
    return 0


def _die_with_parent(parent: int) -> None:
    """A SIGKILLed daemon must not leave an orphan training (it would race the restarted daemon's)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL (Linux)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)


def request(config: Config, now: dt.datetime, level: int) -> str:
    """The JSON the daemon writes to the child's stdin."""
    return json.dumps({"config": config_to_dict(config), "base_dir": str(config.base_dir),
                       "now": pd.Timestamp(now).isoformat(), "parent": os.getpid(), "level": level})


if __name__ == "__main__":
    sys.exit(_child_main())
