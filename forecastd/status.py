"""`forecastd status` and `forecastd models list`: what the state directory, the daemon and the sink say.

Read-only and lock-free, so it works while a daemon runs (every file it reads is written atomically).
The daemon leaves `daemon.json` in the state directory after each tick and retrain: its pid, the last
tick's time, duration, outcome and figures, the failure streak, and the last retrain.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import threading
from typing import Any

import numpy as np
import pandas as pd

from forecastd.config import Config
from forecastd.errors import ForecastdError
from forecastd.files import atomic_write_bytes
from forecastd.pipeline import some_of, state_store
from forecastd.state import StateStore, StreamState, manifest_grid

__all__ = ["DAEMON_FILE", "status", "model_versions", "read_daemon_info", "write_daemon_info", "running_pid"]

log = logging.getLogger(__name__)

DAEMON_FILE = "daemon.json"
LOCK_FILE = "lock"
SINK_SECONDS = 10.0  # how long `status` waits for the sink's last day of anomalies
# Each version's stream checkpoint as `StateStore.load_stream` gives it.
Streams = dict[int, tuple[StreamState | None, dict[str, Any]]]
_METRICS = ("val_loss", "val_mse", "val_persistence_mse", "best_epoch", "epochs_run")


def write_daemon_info(store: StateStore, info: dict[str, Any]) -> None:
    atomic_write_bytes(store.root / DAEMON_FILE, json.dumps(info, indent=1, default=_json_default).encode())


def read_daemon_info(store: StateStore) -> dict[str, Any]:
    try:
        return json.loads((store.root / DAEMON_FILE).read_text())
    except (OSError, ValueError):
        return {}


def running_pid(store: StateStore) -> int | None:
    """The pid of the daemon holding the state directory's lock, or None when none holds it."""
    import fcntl
    import os

    path = store.root / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1  # held, pid not written yet
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def model_versions(store: StateStore, live: int | None) -> list[dict[str, Any]]:
    """Every version on disk, oldest first: live flag (`live`, the store's live version), when trained, on
    what, validation metrics."""
    out = []
    for v in store.versions():
        try:
            m = store.manifest(v)
        except ForecastdError as exc:
            out.append({"version": v, "live": v == live, "error": str(exc)})
            continue
        metrics = m.get("metrics", {})
        out.append({
            "version": v,
            "live": v == live,
            "trained_at": m.get("trained_at"),
            "data_end": m.get("data_end"),
            "series": m.get("n_series"),
            "points": m.get("n_points"),
            "freq": m.get("freq"),
            **{k: _finite(metrics.get(k)) for k in _METRICS},
        })
    return out


def status(config: Config, now: dt.datetime) -> dict[str, Any]:
    """Everything `forecastd status` shows, as plain JSON-ready data."""
    store = state_store(config)
    now_ts = pd.Timestamp(now)
    now_ts = now_ts.tz_localize("UTC") if now_ts.tzinfo is None else now_ts.tz_convert("UTC")
    pid = running_pid(store)
    daemon = read_daemon_info(store)
    # Once: without live.json each call recovers it (reading the history and every stream) and warns.
    live = store.live_version()
    # Each version's newest usable checkpoint, read once for the problems and the watermarks.
    streams = {v: store.load_stream(v) for v in store.versions()}
    return {
        "now": now_ts.isoformat(),
        "state_dir": str(store.root),
        "problems": _problems(store, daemon, live, streams),
        "daemon": {"running": pid is not None, "pid": pid, **{k: v for k, v in daemon.items() if k != "pid"}},
        "live_version": live,
        "models": model_versions(store, live),
        "series": _watermarks(store, now_ts, live, streams),
        "anomalies": _anomalies(config, now_ts),
    }


def _problems(store: StateStore, daemon: dict[str, Any], live: int | None, streams: Streams) -> list[str]:
    """What keeps the state from serving as it should, each with the fix: without these lines a missing
    state directory, no live model, live weights that fail their checksum or lost stream checkpoints
    all showed as empty or healthy tables."""
    if not store.root.exists():
        return [f"state directory {str(store.root)!r} does not exist: nothing was trained with this config's "
                "[state] dir (forecastd train)"]
    versions = store.versions()
    if not versions:
        return ["no model version in the state directory: forecastd train"]
    if live is None:
        return [f"no model is live (no live.json): forecastd models promote {versions[-1]}"]
    out = []
    try:
        store.load_model(live)
    except ForecastdError as exc:
        out.append(f"live model v{live} does not load ({exc}): ticks serve the newest older version that loads; "
                   "forecastd train, or forecastd models promote V")
    if daemon.get("last_tick") and not any(store.has_stream(v) for v in versions):
        out.append("no stream checkpoint, though a daemon has ticked: the next tick continues each series after "
                   "its latest outputs in the sink, or at its latest point where the sink has none")
    stuck = streams.get(live, (None, {}))[1].get("waiting_warned", [])  # `pipeline._warn_stuck`
    if stuck:
        out.append(f"{len(stuck)} new series cannot start for want of observed values ({some_of(stuck)}): "
                   "check their rows and [source] value_column")
    return out


def _watermarks(store: StateStore, now: pd.Timestamp, live: int | None, streams: Streams) -> list[dict[str, Any]]:
    if live is None:
        return []
    try:
        grid = manifest_grid(store.manifest(live))
    except (ForecastdError, KeyError):
        return []
    # Each series from the live model's stream, else from the newest other stream that holds it, else from
    # the handover record of pruned streams: where the next tick continues it (`pipeline._prior`). Right
    # after a switch the live model has no stream yet; after more switches than [state] keep_versions with
    # no data between, only the handover record holds the watermarks (model_version None).
    versions = [live] + sorted((v for v in streams if v != live), reverse=True)
    found: dict[str, tuple[int, int | None, bool]] = {}
    for v in versions:
        state, info = streams.get(v, (None, {}))
        for sid, st, age in zip(state.series_ids, state.step, state.age, strict=True) if state is not None else ():
            found.setdefault(sid, (int(st), v, bool(age > 0)))
        # Watermarks a tick recovered from the sink's outputs, for series that have not run since.
        for sid, st in info.get("recovered", {}).items():
            found.setdefault(sid, (int(st), v, False))
    ids, fields = store.load_handover()
    for sid, st in zip(ids, fields.get("step", ()), strict=True):
        found.setdefault(sid, (int(st), None, False))
    step = pd.tseries.frequencies.to_offset(grid.freq)
    out = []
    for sid, (st, v, warm) in found.items():
        row: dict[str, Any] = {"series_id": sid, "watermark": None, "lag_seconds": None, "lag_steps": None,
                               "model_version": v, "warm": warm}
        if st >= 0:
            wm = grid.ts(np.array([st]))[0]
            lag = (now - wm).total_seconds()
            row.update(watermark=wm.isoformat(), lag_seconds=lag)
            if hasattr(step, "nanos"):  # fixed steps; month starts have no fixed length
                row["lag_steps"] = lag / (step.nanos / 1e9)
        out.append(row)
    return out


def _anomalies(config: Config, now: pd.Timestamp) -> dict[str, Any]:
    """Flagged points with ts in (now - 1 day, now], per series and the top ones by score."""
    from forecastd.sinks import open_sink

    since = now - pd.Timedelta(days=1)
    result: dict[str, Any] = {"since": since.isoformat(), "until": now.isoformat()}
    # In a thread of its own, given SINK_SECONDS: a table locked by a writer held `status` until the lock
    # went (23 s in a soak), and a status is wanted most when something is stuck.
    answer: dict[str, Any] = {}

    def read() -> None:
        try:
            answer["rows"] = open_sink(config).read("anomalies", since=since, until=now)
        except Exception as exc:  # a sink that is down must not hide the rest of the status
            answer["error"] = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ForecastdError) else str(exc)

    reader = threading.Thread(target=read, name="status-sink", daemon=True)
    reader.start()
    reader.join(SINK_SECONDS)
    if reader.is_alive():
        answer["error"] = f"the sink did not answer within {SINK_SECONDS:g} s (a table locked by a writer?)"
    if "error" in answer:
        result["error"] = answer["error"]
        return result
    rows = answer["rows"]
    flagged = rows[rows["is_anomaly"].astype(bool)]
    result["scored"] = int(len(rows))
    result["flagged"] = int(len(flagged))
    result["by_series"] = {str(k): int(n) for k, n in flagged.groupby("series_id").size().items()}
    top = flagged.sort_values("score", ascending=False).head(10)
    result["top"] = [
        {"series_id": r.series_id, "ts": pd.Timestamp(r.ts).isoformat(), "value": _finite(float(r.value)),
         "expected": _finite(float(r.expected)), "score": float(r.score)}
        for r in top.itertuples(index=False)
    ]
    return result


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _json_default(v: Any) -> Any:
    if isinstance(v, (pd.Timestamp, dt.datetime)):
        return v.isoformat()
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")
