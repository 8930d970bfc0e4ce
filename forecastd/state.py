"""Per-series streaming state and the state directory that keeps it, with the model versions it belongs to.

Streaming state is data: a versioned record of arrays, one row per series, checked on load. The reset
rules live in `plan`: a series continues from its state unless it has none or has been silent for more
than `max_gap` steps, in which case it starts fresh and warms up again.

Layout of the state directory:

    models/v000003/weights.safetensors   weights (no pickle, ever)
    models/v000003/manifest.json         config, frequency and zone, per-series scales, metrics, versions, sha256
    live.json                            {"version": 3}: the model that serves
    streams/v000003/ckpt-000000042.safetensors + .json   hidden states, watermarks, running levels
    handover.safetensors                 watermarks and anomaly history of series whose newest stream
                                         was pruned with its model version (`HANDOVER_FIELDS`)
    lock                                 held by a serving daemon (see daemon.py)

Every file is written atomically; a checkpoint counts only once its JSON manifest (written last) exists
and its checksum matches, so a crash mid-write leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import safetensors.numpy
import safetensors.torch
import torch

from forecastd.anomaly import AnomalyTrack
from forecastd.config import ModelConfig, config_from_dict
from forecastd.errors import CheckpointError, ModelError
from forecastd.files import atomic_write, atomic_write_bytes, sha256_bytes, sha256_file, sweep_temp_files
from forecastd.frames import Grid
from forecastd.models import Forecaster
from forecastd.windowing import Track, split_at_gaps

__all__ = ["StreamState", "Segment", "plan", "StateStore", "ModelVersion", "FORMAT", "manifest_grid"]

log = logging.getLogger(__name__)

# Anomaly-track arrays added after FORMAT 2 checkpoints were first written, in AnomalyTrack's field order.
_LATER_TRACK_KEYS = ("a_lo", "a_hi", "a_peak", "a_since", "a_exceed", "a_slow_short", "a_slow_mean",
                     "a_slow_var", "a_slow_count", "a_slow_exceed")
_TRACK_KEYS = ("a_short", "a_mean", "a_var", "a_count", *_LATER_TRACK_KEYS)
HISTORY = "history.json"
HISTORY_KEEP = 200  # switches remembered; a daily retrain fills this in half a year
# A version directory with no manifest this long after it was made is a save that a crash cut short:
# a save writes both files within seconds, and a younger one may be another process's save in progress.
ABANDONED_SAVE_SECONDS = 24 * 3600
FORMAT = 2  # bump when the layout of a checkpoint or manifest changes; loaders refuse what they don't know


@dataclass
class StreamState:
    """One row per series: everything a tick needs to continue that series without re-reading history."""

    series_ids: list[str]
    step: np.ndarray  # B int64: grid step of the last processed point (the watermark)
    age: np.ndarray  # B int64: steps processed since the series last started fresh
    scale: np.ndarray  # B float64: the series' unit of change
    track: Track  # last observed value, running levels
    hidden: np.ndarray  # B, L', H float32: recurrent state (LSTM: h then c along L')
    window: np.ndarray  # B, W float32: the last W scaled changes, oldest first ([model] lookback)
    # B, m, m float64: the forecasts the last m origins (oldest first) issued for their next m steps;
    # they judge the next points (m = [anomaly] forecasts).
    pending_mean: np.ndarray
    pending_std: np.ndarray
    anomaly: AnomalyTrack

    def __len__(self) -> int:
        return len(self.series_ids)

    def handover_fields(self) -> dict[str, np.ndarray]:
        """The arrays a series hands to the next model version's stream (`HANDOVER_FIELDS`), by name."""
        fields = {**self.anomaly.fields(), "step": self.step}
        return {f: fields[f] for f in HANDOVER_FIELDS}

    @classmethod
    def fresh(cls, series_ids: list[str], scale: np.ndarray, n_levels: int, hidden_shape: tuple[int, int],
              judges: int = 2, lookback: int = 0) -> StreamState:
        B = len(series_ids)
        return cls(
            list(series_ids),
            np.full(B, -1, dtype=np.int64),
            np.zeros(B, dtype=np.int64),
            np.asarray(scale, dtype=np.float64),
            Track.fresh(B, n_levels),
            np.zeros((B, *hidden_shape), dtype=np.float32),
            np.zeros((B, lookback), dtype=np.float32),
            np.full((B, judges, judges), np.nan),
            np.full((B, judges, judges), np.nan),
            AnomalyTrack.fresh(B),
        )

    @classmethod
    def empty(cls, mc: ModelConfig, judges: int = 1) -> StreamState:
        """No series yet: `streaming.run_segments` adds each as it first comes, shaped by the model."""
        rows = mc.num_layers * (2 if mc.cell == "lstm" else 1)  # an LSTM carries h and c
        return cls.fresh([], np.zeros(0), len(mc.level_alphas), (rows, mc.hidden_size), judges,
                         mc.lookback if isinstance(mc.lookback, int) else 0)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "step": self.step, "age": self.age, "scale": self.scale,
            "last": self.track.last, "levels": self.track.levels, "hidden": self.hidden,
            "window": self.window,
            "pending_mean": self.pending_mean, "pending_std": self.pending_std,
            "a_short": self.anomaly.short, "a_mean": self.anomaly.mean,
            "a_var": self.anomaly.var, "a_count": self.anomaly.count,
            "a_lo": self.anomaly.lo, "a_hi": self.anomaly.hi,
            "a_peak": self.anomaly.peak, "a_since": self.anomaly.since, "a_exceed": self.anomaly.exceed,
            "a_slow_short": self.anomaly.slow_short, "a_slow_mean": self.anomaly.slow_mean,
            "a_slow_var": self.anomaly.slow_var, "a_slow_count": self.anomaly.slow_count,
            "a_slow_exceed": self.anomaly.slow_exceed,
        }

    @classmethod
    def from_arrays(cls, series_ids: list[str], a: dict[str, np.ndarray]) -> StreamState:
        # Checkpoints written before the novelty range or the cooldown existed lack their arrays: they take
        # a fresh track's (the range empty, NaN, so novelty waits for new history; no incident open), and
        # the checkpoint is not refused. Built only then: take and merge come here on every tick.
        fresh = None if all(k in a for k in _LATER_TRACK_KEYS) else AnomalyTrack.fresh(len(series_ids))
        return cls(
            list(series_ids), a["step"], a["age"], a["scale"], Track(a["last"], a["levels"]), a["hidden"],
            a["window"], a["pending_mean"], a["pending_std"],
            AnomalyTrack.of(**{k[2:]: a[k] if k in a else getattr(fresh, k[2:]) for k in _TRACK_KEYS}),
        )

    def take(self, index: np.ndarray) -> StreamState:
        index = np.asarray(index, dtype=np.int64)
        return StreamState.from_arrays([self.series_ids[i] for i in index],
                                       {k: v[index].copy() for k, v in self.to_arrays().items()})

    def merge(self, other: StreamState) -> StreamState:
        """This state with `other`'s rows replacing or adding series."""
        if not len(self):
            return other
        pos = {s: i for i, s in enumerate(self.series_ids)}
        replace = np.array([pos.get(s, -1) for s in other.series_ids], dtype=np.int64)
        new = replace < 0
        arrays = self.to_arrays()
        theirs = other.to_arrays()
        merged = {}
        for k, v in arrays.items():
            v = v.copy()
            v[replace[~new]] = theirs[k][~new]
            merged[k] = np.concatenate([v, theirs[k][new]])
        ids = self.series_ids + [s for s, n in zip(other.series_ids, new) if n]
        return StreamState.from_arrays(ids, merged)

    def watermarks(self, grid: Grid) -> pd.Series:
        """Each series' last processed time (series ids to UTC times), for series that have one. A
        Series, not a dict: 10,000 Timestamp objects cost a tick 13 ms to build and 8 ms to map."""
        done = self.step >= 0
        return pd.Series(grid.ts(self.step[done]), index=pd.Index(np.asarray(self.series_ids, dtype=object)[done]))


@dataclass(frozen=True)
class Segment:
    """A contiguous run of grid steps to process for one series; `fresh` starts it from a new state."""

    series_id: str
    fresh: bool
    start: int  # grid step of values[0]
    values: np.ndarray  # dense, NaN where missing
    age: int = 0  # warm-up steps already credited to a fresh segment


def plan(
    series_id: str, steps: np.ndarray, values: np.ndarray, state_step: int | None, max_gap: int
) -> list[Segment]:
    """The reset rules: split new points into segments; only the first may continue the carried state."""
    segments = split_at_gaps(steps, values, max_gap)
    out = []
    for i, (start, dense) in enumerate(segments):
        if i == 0 and state_step is not None and state_step >= 0 and start - state_step - 1 <= max_gap:
            gap = np.full(start - state_step - 1, np.nan)
            out.append(Segment(series_id, False, state_step + 1, np.concatenate([gap, dense])))
        else:
            out.append(Segment(series_id, True, start, dense))
    return out


# What a series' stream hands to the next model version's (`streaming.Carried`), kept past the pruning
# of the version that last ran it: its watermark, value range, open incident and slow channel.
HANDOVER_FIELDS = ("step", "lo", "hi", "peak", "since", "slow_short", "slow_mean", "slow_var", "slow_count",
                   "slow_exceed")


def _handover_digest(ids_text: str, arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the handover record's ids and arrays (names, dtypes, shapes and bytes), in field order."""
    h = hashlib.sha256(ids_text.encode())
    for f in HANDOVER_FIELDS:
        a = np.ascontiguousarray(arrays[f])
        h.update(f"{f}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def manifest_grid(manifest: dict[str, Any]) -> Grid:
    """The grid a model version was trained on. Manifests written before grids had a zone lack "zone":
    their daily steps were UTC midnights, so they load as UTC and keep serving as they did."""
    return Grid(manifest["freq"], manifest.get("zone", "UTC"))


@dataclass(frozen=True)
class ModelVersion:
    version: int
    model: Forecaster
    manifest: dict[str, Any]

    @property
    def grid(self) -> Grid:
        return manifest_grid(self.manifest)

    @property
    def scales(self) -> dict[str, float]:
        return self.manifest["scales"]

    @property
    def model_config(self) -> ModelConfig:
        return config_from_dict(self.manifest["config"]).model


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable or not JSON ({exc}); it will be skipped") from None


class StateStore:
    """The state directory: model versions, the live pointer, stream checkpoints."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # -- housekeeping ---------------------------------------------------------------------------
    def sweep(self) -> int:
        """Remove temp files a crashed writer left behind; returns how many."""
        removed = sweep_temp_files(self.root)
        for p in removed:
            log.warning("removed leftover temp file %s (from an interrupted write)", p)
        return len(removed)

    # -- models ---------------------------------------------------------------------------------
    def _model_dir(self, version: int) -> Path:
        return self.root / "models" / f"v{version:06d}"

    def versions(self) -> list[int]:
        """Versions with a manifest, oldest first (validity is checked on load)."""
        base = self.root / "models"
        if not base.exists():
            return []
        out = []
        for d in base.iterdir():
            if d.name.startswith("v") and d.name[1:].isdigit() and (d / "manifest.json").exists():
                out.append(int(d.name[1:]))
        return sorted(out)

    def manifest(self, version: int) -> dict[str, Any]:
        return _read_json(self._model_dir(version) / "manifest.json")

    def save_model(self, model: Forecaster, manifest: dict[str, Any], keep: int) -> int:
        """Write a new version (weights, then manifest) and return its number. Does not make it live."""
        # Claimed by creating its directory: `forecastd train` and a retrain worker saving at once both took
        # max + 1 and wrote one version's weights under the other's manifest (a live model that fails its
        # checksum). A directory without a manifest (a save cut short) keeps its number.
        version = max(self.versions(), default=0) + 1
        (self.root / "models").mkdir(parents=True, exist_ok=True)
        while True:
            d = self._model_dir(version)
            try:
                d.mkdir()
                break
            except FileExistsError:
                version += 1
        weights = safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
        atomic_write_bytes(d / "weights.safetensors", weights)
        manifest = {
            **manifest,
            "format": FORMAT,
            "version": version,
            "weights_sha256": sha256_bytes(weights),
            "libraries": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "numpy": np.__version__,
                "pandas": pd.__version__,
            },
        }
        atomic_write_bytes(d / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())
        self._prune_models(keep)
        return version

    def _prune_models(self, keep: int) -> None:
        live = self.live_version()
        # The version that serves while the live one's files are corrupt (load_live's fallback) is kept
        # too: pruning it left nothing that loads, though newer versions did.
        kept = {live, self._serving(live)}
        doomed = [v for v in self.versions()[:-keep] if v not in kept]
        if doomed:
            self.hand_over(doomed)
        for v in doomed:
            shutil.rmtree(self._model_dir(v), ignore_errors=True)
            shutil.rmtree(self.root / "streams" / f"v{v:06d}", ignore_errors=True)
        self._remove_abandoned_saves()

    def _remove_abandoned_saves(self) -> None:
        """Remove version directories that never got a manifest (`versions` skips them, so pruning never
        reached them: each crash during a save left its weights on disk for good)."""
        cutoff = time.time() - ABANDONED_SAVE_SECONDS
        for d in (self.root / "models").iterdir():
            if (d.name.startswith("v") and d.name[1:].isdigit() and d.is_dir()
                    and not (d / "manifest.json").exists() and d.stat().st_mtime < cutoff):
                shutil.rmtree(d, ignore_errors=True)
                log.warning("removed %s: a model save that never finished (no manifest.json)", d)

    def hand_over(self, doomed: list[int]) -> None:
        """Keep, in the handover record, the watermark and anomaly history of every series whose newest
        stream is among the `doomed` versions' (no kept version's stream holds it). A series quiet through
        `keep_versions` promotions (a source quiet while retrains ran) otherwise lost its watermark, and on
        its return was started at its latest point: every point in between went without outputs."""
        covered: set[str] = set()
        for v in self.versions():
            if v not in doomed:
                state, _ = self.load_stream(v)
                covered.update(state.series_ids if state is not None else ())
        ids, arrays = self.load_handover()
        parts = [(ids, arrays)]
        for v in sorted(doomed):  # oldest first: a newer stream's row replaces an older one's
            state, _ = self.load_stream(v)
            if state is not None:
                rows = [i for i, sid in enumerate(state.series_ids) if sid not in covered and state.step[i] >= 0]
                parts.append(([state.series_ids[i] for i in rows],
                              {f: a[rows] for f, a in state.handover_fields().items()}))
        all_ids = [sid for part_ids, _ in parts for sid in part_ids]
        if len(all_ids) == len(ids):
            return
        merged = {f: np.concatenate([a[f] for part_ids, a in parts if part_ids]) for f in HANDOVER_FIELDS}
        last = ~pd.Index(all_ids).duplicated(keep="last") & ~pd.Index(all_ids).isin(list(covered))
        keep_ids = [sid for sid, k in zip(all_ids, last) if k]
        arrays = {f: np.ascontiguousarray(merged[f][last]) for f in HANDOVER_FIELDS}
        ids_text = json.dumps(keep_ids)
        # One file, renamed into place whole, carrying the checksum of its own contents: a manifest beside
        # it could not be renamed in the same step, and a crash between the two renames lost the record.
        tensors = safetensors.numpy.save(arrays, metadata={"series_ids": ids_text, "format": str(FORMAT),
                                                           "sha256": _handover_digest(ids_text, arrays)})
        atomic_write_bytes(self.root / "handover.safetensors", tensors)
        log.info("%d series' watermarks handed over from pruned model version(s) %s", len(keep_ids),
                 ", ".join(f"v{v}" for v in doomed))

    def load_handover(self) -> tuple[list[str], dict[str, np.ndarray]]:
        """Series ids and their `HANDOVER_FIELDS` rows from the handover record (none if absent or corrupt)."""
        path = self.root / "handover.safetensors"
        if not path.exists():
            return [], {}
        try:
            data = path.read_bytes()
            with safetensors.safe_open(path, "numpy") as fh:
                meta = fh.metadata() or {}
            arrays = safetensors.numpy.load(data)
            ids_text = meta["series_ids"]
            if meta.get("format") != str(FORMAT) or meta.get("sha256") != _handover_digest(ids_text, arrays):
                raise CheckpointError(f"{path} fails its checksum or format check")
            return json.loads(ids_text), arrays
        except (CheckpointError, OSError, ValueError, KeyError, safetensors.SafetensorError) as exc:
            log.warning("the handover record is unusable (%s); series only it held start from their latest "
                        "point when they send again", exc)
            return [], {}

    def load_model(self, version: int, device: torch.device | str = "cpu") -> ModelVersion:
        d = self._model_dir(version)
        manifest = _read_json(d / "manifest.json")
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"model v{version} has format {manifest.get('format')!r}, this forecastd "
                                  f"reads {FORMAT}; retrain with `forecastd train`")
        weights = d / "weights.safetensors"
        if not weights.exists() or sha256_file(weights) != manifest["weights_sha256"]:
            raise CheckpointError(f"model v{version} weights at {weights} are missing or fail their checksum")
        mc = config_from_dict(manifest["config"]).model
        model = Forecaster(manifest["n_features"], mc)
        model.load_state_dict(safetensors.torch.load_file(weights))
        model.to(device).eval()
        return ModelVersion(version, model, manifest)

    def live_version(self) -> int | None:
        p = self.root / "live.json"
        if p.exists():
            try:
                return int(_read_json(p)["version"])
            except (CheckpointError, KeyError, ValueError):
                pass
        versions = self.versions()
        # Recovered, in order of trust: the last switch recorded, the newest version that has served (it has
        # a stream; not simply the newest: a challenger a retrain kept aside would serve unpromoted), and,
        # for a live.json that exists but cannot be read, the newest version. A missing live.json with none
        # of these is a state directory no model was made live in.
        recorded = [e.get("version") for e in self.live_history() if e.get("version") in versions]
        served = [v for v in versions if self.has_stream(v)]
        version = recorded[-1] if recorded else max(served, default=None)
        if version is None and p.exists():
            version = max(versions, default=None)
        if version is not None:
            log.warning("live.json is %s; serving v%d, the %s (`forecastd models promote V` sets another)",
                        "unreadable" if p.exists() else "missing", version,
                        "last version made live (history.json)" if recorded else "newest model version that has served"
                        if served else "newest model version")
        return version

    def set_live(self, version: int) -> None:
        if version not in self.versions():
            raise ModelError(f"model version {version} does not exist; `forecastd models list` shows the versions")
        atomic_write_bytes(self.root / "live.json", json.dumps({"version": version}).encode())

    def live_history(self) -> list[dict[str, Any]]:
        """Switches of the live model (retrains, `forecastd models`, `forecastd train`), oldest first ([]
        when none or unreadable); `retrain.rollback_target` reads it."""
        try:
            history = json.loads((self.root / HISTORY).read_text())
            return history if isinstance(history, list) else []
        except (OSError, ValueError):
            return []

    def record_switch(self, version: int, previous: int | None, reason: str, at: str) -> None:
        """Append a switch to the history, a record only (the live pointer is `set_live`'s)."""
        history = self.live_history()
        history.append({"version": version, "previous": previous, "at": at, "reason": reason})
        atomic_write_bytes(self.root / HISTORY, json.dumps(history[-HISTORY_KEEP:], indent=1).encode())

    def _fallbacks(self, live: int) -> list[int]:
        """The versions `load_live` tries, in order: the live one, then older ones, newest first."""
        return [live] + [v for v in reversed(self.versions()) if v < live]

    def _serving(self, live: int | None) -> int | None:
        """The version `load_live` serves: the first of `_fallbacks` that loads."""
        if live is None:
            return None
        for v in self._fallbacks(live):
            try:
                self.load_model(v)
                return v
            except CheckpointError:
                continue
        return None

    def load_live(self, device: torch.device | str = "cpu") -> ModelVersion:
        """The live model; if its files are corrupt, the newest older version that loads, with a warning."""
        live = self.live_version()
        if live is None:
            versions = self.versions()
            if versions:
                raise ModelError(f"no model is live in state directory {str(self.root)!r} (no live.json), though "
                                 f"versions {', '.join(f'v{v}' for v in versions)} exist; make one live with "
                                 f"`forecastd models promote {versions[-1]}`")
            raise ModelError(f"no trained model in state directory {str(self.root)!r}; run "
                             "`forecastd train --config FILE` first")
        for v in self._fallbacks(live):
            try:
                mv = self.load_model(v, device)
            except CheckpointError as exc:
                log.warning("cannot load model v%d: %s; trying an older version", v, exc)
                continue
            if v != live:
                log.warning("serving model v%d instead of the corrupt live v%d", v, live)
            return mv
        raise ModelError(f"no model version in {str(self.root)!r} loads (all corrupt); retrain with `forecastd train`")

    # -- streams --------------------------------------------------------------------------------
    def _stream_dir(self, version: int) -> Path:
        return self.root / "streams" / f"v{version:06d}"

    def has_stream(self, version: int) -> bool:
        """Whether `version` has a stream checkpoint: it has served (only the live model ticks)."""
        return bool(self._checkpoints(version))

    def _checkpoints(self, version: int) -> list[int]:
        d = self._stream_dir(version)
        if not d.exists():
            return []
        return sorted(int(p.stem[5:]) for p in d.glob("ckpt-*.json") if p.stem[5:].isdigit())

    def save_stream(self, version: int, state: StreamState, info: dict[str, Any], keep: int) -> int:
        """Checkpoint the stream state of model `version`; returns the checkpoint's sequence number."""
        d = self._stream_dir(version)
        seq = max(self._checkpoints(version), default=0) + 1
        tensors = safetensors.numpy.save(
            {k: np.ascontiguousarray(v) for k, v in state.to_arrays().items()},
            metadata={"series_ids": json.dumps(state.series_ids)},
        )
        atomic_write_bytes(d / f"ckpt-{seq:09d}.safetensors", tensors)
        manifest = {"format": FORMAT, "model_version": version, "seq": seq, "n_series": len(state),
                    "sha256": sha256_bytes(tensors), **info}
        atomic_write(d / f"ckpt-{seq:09d}.json", lambda p: p.write_text(json.dumps(manifest, sort_keys=True)))
        for old in self._checkpoints(version)[:-keep]:
            # Tensors first: checkpoints are listed by their JSON, so a crash between the two deletions
            # leaves a listed (and pruned next time) JSON, not a tensors file that nothing lists.
            (d / f"ckpt-{old:09d}.safetensors").unlink(missing_ok=True)
            (d / f"ckpt-{old:09d}.json").unlink(missing_ok=True)
        return seq

    def load_stream(self, version: int) -> tuple[StreamState | None, dict[str, Any]]:
        """Newest checkpoint that passes its checksum; older ones are tried if the newest is corrupt."""
        d = self._stream_dir(version)
        for seq in reversed(self._checkpoints(version)):
            try:
                manifest = _read_json(d / f"ckpt-{seq:09d}.json")
                path = d / f"ckpt-{seq:09d}.safetensors"
                data = path.read_bytes()
                if sha256_bytes(data) != manifest.get("sha256") or manifest.get("format") != FORMAT:
                    raise CheckpointError(f"{path} fails its checksum or format check")
                with safetensors.safe_open(path, "numpy") as fh:
                    ids = json.loads(fh.metadata()["series_ids"])
                arrays = safetensors.numpy.load(data)
                return StreamState.from_arrays(ids, arrays), manifest
            except (CheckpointError, OSError, ValueError, KeyError) as exc:
                log.warning("stream checkpoint %d of model v%d is unusable (%s); falling back to the previous one",
                            seq, version, exc)
        if self._checkpoints(version):
            log.error("every stream checkpoint of model v%d is unusable: a tick continues its series from an "
                      "older version's stream, the handover record or their latest outputs in the sink, whichever "
                      "holds them, after a warm-up; a series none holds starts again at its latest point, with no "
                      "outputs for the points before it (`forecastd backfill` over that time writes them)", version)
        return None, {}
