"""From the long frame to model inputs: regular grid, gap mask, level-invariant features, TBPTT rows.

Pure functions over numpy arrays; nothing here reads a clock, a file or a database.

Why level-invariant features (DESIGN.md, "A lesson already paid for"): series drift, and a model fed
absolute levels forecasts the training period's level. The model therefore sees, per step,
- the scaled change from the last observed value,
- the last observed value relative to running levels (EWMAs carried in the streaming state),
- a missing flag, and calendar position,
and it forecasts changes from the last observed value. Nothing it sees or emits depends on the level.

Scaled quantities are clipped at ±`clip`: a spike moves the carried state no further than a
`clip`-sigma move would. We clip rather than feed the anomaly flag because the flag depends on the
previous step's forecast, which would force a step-by-step loop and lose cuDNN's whole-sequence kernels;
clipping keeps a backfill one batched pass, and identical to ticking.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numba import njit

from forecastd.frames import Grid

__all__ = [
    "Track",
    "n_features",
    "calendar",
    "robust_scale",
    "series_steps",
    "encode",
    "targets",
    "split_at_gaps",
    "training_rows",
    "resolve_lookback",
]

_NS_HOUR = 3_600_000_000_000
_NS_DAY = 24 * _NS_HOUR
_YEAR_DAYS = 365.2425


# "auto" gives the window at most one step per this many training steps of the longest series: its
# horizon x lookback weights overfit a short history (NAB's two-day probation periods: 35.7 standard
# with a 336-step window, 47.2 with none), and a long one keeps the whole week (ETTh1: 8,640 steps).
_STEPS_PER_WINDOW_STEP = 50


def resolve_lookback(lookback: int | str, step_ns: int = _NS_HOUR, history: int | None = None) -> int:
    """Steps of the carried window. "auto": one week of steps, at least 24 and at most 336, and no more
    than `history` / 50 (history = steps of the longest training series). Below a day of steps (or 336,
    or 24, whichever lies between) that means none.

    A week holds the daily and weekly cycles of hourly data; 336 caps the state (1.3 KB a series) and
    still spans more than a day of 5-minute data; 24 gives daily or monthly data two years or a month.
    A window that cannot span the daily cycle sees part of a pattern and its weights fit noise: on NAB's
    5-minute files, retrains with 24-239-step windows scored 51.9 against 57.3 without (docs/benchmarks.md).
    Without `history` (a model built outside `pipeline.train`: tests, benchmarks on synthetic data) the
    week alone decides, and for hourly steps that is 168.
    """
    if lookback != "auto":
        return int(lookback)
    steps = int(np.clip(round(7 * _NS_DAY / step_ns), 24, 336))
    if history is not None:
        steps = min(steps, history // _STEPS_PER_WINDOW_STEP)
    shortest = int(np.clip(round(_NS_DAY / step_ns), 24, 336))
    return steps if steps >= shortest else 0


def n_features(n_levels: int) -> int:
    """Change, one relative level per EWMA, missing flag, six calendar terms."""
    return 1 + n_levels + 1 + 6


def calendar(ts_ns: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Hour of day, day of week, day of year as sin/cos pairs: [...] int64 ns -> [..., 6] float32.

    `out` [..., 6] (any float32 view, such as the calendar columns of a feature block) is written in place.
    """
    ts_ns = np.asarray(ts_ns, dtype=np.int64)
    if out is None:
        out = np.empty((*ts_ns.shape, 6), dtype=np.float32)
    if ts_ns.ndim == 2 and ts_ns.shape[0] > 1 and (ts_ns == ts_ns[:1]).all():
        # Series on one grid that advance together (every tick, most backfills) share their times: the
        # terms of one row, copied, instead of six transcendentals per series (1.1 ms at 10,000 series).
        out[:] = calendar(ts_ns[:1])
        return out
    if ts_ns.size == 1:  # such a row of a tick: a dozen numpy calls cost 25 us, scalar Python 5, compiled 1
        _calendar_one(ts_ns.flat[0], out)
        return out
    phases = np.stack(_cycles(ts_ns / _NS_DAY), axis=-1) * (2 * np.pi)
    out[..., :3] = np.sin(phases)
    out[..., 3:] = np.cos(phases)
    return out


@njit(cache=True, nogil=True)
def _calendar_one(ns, out):  # pragma: no cover - compiled
    """`calendar` of one time into out [..., 6] (one row, any layout), as the array path computes it
    (int64 / int64 in float64)."""
    days = ns / _NS_DAY
    day, week, year = _compiled_cycles(days)
    for i, p in enumerate((day, week, year)):
        out[..., i] = math.sin(2 * math.pi * p)
        out[..., 3 + i] = math.cos(2 * math.pi * p)


def _cycles(days):
    """Fractions of the day, week and year elapsed at `days` since 1970 (a float or an array of them)."""
    # 1970-01-01 was a Thursday: +3 puts Monday at 0.
    return days % 1.0, (days + 3.0) % 7.0 / 7.0, days % _YEAR_DAYS / _YEAR_DAYS


_compiled_cycles = njit(cache=True, nogil=True, inline="always")(_cycles)  # for _calendar_one


def robust_scale(values: np.ndarray) -> float:
    """Typical size of a one-step change: 1.4826 × MAD of first differences, with fallbacks.

    Changes, not levels, because the model's inputs and outputs are changes; MAD so that a few spikes
    do not set the unit. Falls back to the mean absolute change, then to the level, then to 1, so a
    constant or flat-lined series still gets a positive unit. Finite and positive for any input.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return 1.0
    # Near the largest double, differences and sums overflow (1.7e308 - -1.7e308 is inf), and an infinite
    # unit made every feature inf/inf and training diverge for every series. Such values are measured
    # 2**600 times smaller (a power of two: exact) and the unit scaled back, capped at the largest double.
    # The floor keeps 1e-3 of a subnormal level from rounding to a zero unit.
    shrink = 2.0**600 if float(np.abs(v).max()) > _HUGE else 1.0
    unit = _unit(v / shrink) * shrink
    return min(max(unit, _TINY), _LARGEST)


_HUGE = 2.0**900  # about 8e270: below it no difference, median or sum in `_unit` can overflow
_TINY = float(np.finfo(np.float64).tiny)
_LARGEST = float(np.finfo(np.float64).max)


def _unit(v: np.ndarray) -> float:
    """`robust_scale` of finite values that cannot overflow."""
    if v.size >= 3:
        d = np.diff(v)
        mad = 1.4826 * float(np.median(np.abs(d - np.median(d))))
        if mad > 0:
            return mad
        mean_abs = float(np.mean(np.abs(d)))
        if mean_abs > 0:
            return mean_abs
    level = float(np.mean(np.abs(v)))
    if level > 0:
        return level * 1e-3
    return 1.0


@dataclass
class Track:
    """The running quantities a series carries between calls (besides the recurrent state).

    last:   [B] last observed value (NaN before the first observation of a segment)
    levels: [B, A] EWMAs of observed values
    """

    last: np.ndarray
    levels: np.ndarray

    @classmethod
    def fresh(cls, batch: int, n_levels: int) -> Track:
        return cls(np.full(batch, np.nan), np.full((batch, n_levels), np.nan))


def encode(
    values: np.ndarray,
    ts_ns: np.ndarray,
    track: Track,
    scale: np.ndarray,
    alphas: tuple[float, ...],
    clip: float,
) -> tuple[np.ndarray, np.ndarray, Track]:
    """Features for a block of steps, starting from `track`.

    values [B, T] float64, NaN = missing; ts_ns [B, T] int64; scale [B].
    Returns x [B, T, F] float32, origin [B, T] float64 (the last observed value at each step: the point
    forecasts are changes from), and the track after the block. Sequential in T (compiled, `_encode_steps`).
    """
    B, T = values.shape
    values, scale = np.ascontiguousarray(values, dtype=np.float64), np.asarray(scale, dtype=np.float64)
    alpha = _alpha_array(tuple(alphas))
    if T == 1:  # a tick: one compiled call, where numpy's calls around it cost more than the work
        ts_ns = np.asarray(ts_ns, dtype=np.int64)
        if ts_ns.shape != (B, 1):  # one time for every series, as the general path's calendar takes it
            ts_ns = np.broadcast_to(ts_ns, (B, 1))
        x, origin, last, levels = _encode_tick(values, ts_ns, track.last, track.levels, scale, alpha, float(clip))
        return x, origin, Track(last, levels)
    last = track.last.astype(np.float64)  # copies: the caller's track is left as it was
    levels = track.levels.astype(np.float64)
    x = np.empty((B, T, n_features(len(alphas))), dtype=np.float32)
    origin = np.empty((B, T), dtype=np.float64)
    _encode_steps(values, last, levels, scale, alpha, float(clip), x, origin)
    calendar(ts_ns, out=x[:, :, 2 + len(alphas) :])
    return x, origin, Track(last, levels)


@njit(cache=True, nogil=True)
def _encode_tick(values, ts_ns, last, levels, scale, alpha, clip):  # pragma: no cover - compiled
    """`encode` of a one-step block [B, 1], compiled whole for the streaming step: the track's copies,
    `_encode_steps`, and the calendar terms, computed once for a run of rows at the same time and copied
    along it. Returns x, origin and the track's last values and levels after the step."""
    B = values.shape[0]
    A = alpha.shape[0]
    last, levels = last.astype(np.float64), levels.astype(np.float64)  # the caller's track is left as it was
    x = np.empty((B, 1, 8 + A), dtype=np.float32)  # n_features(A)
    origin = np.empty((B, 1))
    _encode_steps(values, last, levels, scale, alpha, clip, x, origin)
    for r in range(B):
        if r > 0 and ts_ns[r, 0] == ts_ns[r - 1, 0]:
            x[r, 0, 2 + A :] = x[r - 1, 0, 2 + A :]
        else:
            _calendar_one(ts_ns[r, 0], x[r, 0, 2 + A :])
    return x, origin, last, levels


@functools.lru_cache(maxsize=16)
def _alpha_array(alphas: tuple[float, ...]) -> np.ndarray:
    """The level rates as the compiled loop takes them (which only reads them), made once per model config,
    not once a tick."""
    return np.asarray(alphas, dtype=np.float64)


@njit(cache=True, nogil=True)
def _encode_steps(values, last, levels, scale, alpha, clip, x, origin):  # pragma: no cover - compiled
    """The sequential part of `encode`, compiled: a step's levels depend on the clipped step before.

    Fills x[:, :, :2 + A] and origin; updates last [B] and levels [B, A] in place.
    """
    B, T = values.shape
    A = alpha.shape[0]
    for b in range(B):
        s = scale[b]
        for t in range(T):
            y = values[b, t]
            seen = np.isfinite(y)
            if seen and not np.isfinite(last[b]):  # the first observation starts the levels
                last[b] = y
                for a in range(A):
                    levels[b, a] = y
            x[b, t, 0] = min(max((y - last[b]) / s, -clip), clip) if seen else 0.0
            if seen:
                for a in range(A):
                    # Clipped innovations keep a spike from dragging the levels (see module docstring).
                    innov = min(max((y - levels[b, a]) / s, -clip), clip) * s
                    levels[b, a] += alpha[a] * innov
                last[b] = y
            for a in range(A):
                rel = (last[b] - levels[b, a]) / s
                x[b, t, 1 + a] = min(max(rel, -clip), clip) if np.isfinite(rel) else 0.0
            x[b, t, 1 + A] = 0.0 if seen else 1.0
            origin[b, t] = last[b]


def targets(
    values: np.ndarray, origin: np.ndarray, scale: float, horizon: int, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Scaled changes y[t, k-1] = (values[t+k] - origin[t]) / scale and their mask, for one series.

    values, origin: [T]. Steps at or beyond `limit` are never targets (keeps validation data out of
    training). Returns y [T, K] float32 and mask [T, K] bool.
    """
    T = values.shape[0]
    limit = T if limit is None else min(limit, T)
    padded = np.concatenate([values[:limit], np.full(horizon, np.nan)])  # T' + K
    idx = np.arange(T)[:, None] + np.arange(1, horizon + 1)[None, :]  # T, K
    ahead = padded[np.minimum(idx, padded.shape[0] - 1)]
    ahead[idx >= limit] = np.nan
    # A change beyond the largest double (values near ±1.8e308) is no target: masked, not warned about.
    with np.errstate(over="ignore"):
        y = (ahead - origin[:, None]) / scale
    mask = np.isfinite(y)
    return np.where(mask, y, 0.0).astype(np.float32), mask


def series_steps(frame: pd.DataFrame, grid: Grid) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per series: (grid steps int64 [n], values float64 [n]) of its observed rows, in time order."""
    if frame.empty:
        return {}
    steps = grid.index(frame["ts"])
    values = frame["value"].to_numpy(dtype=np.float64)
    ids = frame["series_id"].to_numpy()
    order = np.lexsort((steps, ids))
    ids, steps, values = ids[order], steps[order], values[order]
    bounds = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    out = {}
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(ids)]):
        out[str(ids[lo])] = (steps[lo:hi], values[lo:hi])
    return out


def split_at_gaps(steps: np.ndarray, values: np.ndarray, max_gap: int) -> list[tuple[int, np.ndarray]]:
    """Dense segments: [(first step, values on every grid step, NaN where missing)].

    A run of more than `max_gap` missing steps ends a segment: such an outage restarts the series
    from a fresh state rather than stepping the model through it.
    """
    if steps.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(steps) > max_gap + 1) + 1
    out = []
    for part_steps, part_values in zip(np.split(steps, breaks), np.split(values, breaks)):
        dense = np.full(int(part_steps[-1] - part_steps[0]) + 1, np.nan)
        dense[part_steps - part_steps[0]] = part_values
        out.append((int(part_steps[0]), dense))
    return out


def training_rows(
    arrays: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    segment_length: int,
    burn_in: int,
    offset: int = 0,
    lookback: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cut series into parallel rows of `segment_length` steps, as word_language_model batchifies.

    arrays: per series (x [T, F], y [T, K], mask [T, K]). Each series is front-padded by `offset`
    masked steps (a different offset each epoch moves the row boundaries), then cut; the first
    `burn_in` steps of every row are masked because its recurrent state starts cold there. The window
    of recent changes the model carries does not start cold: each row comes with the `lookback` scaled
    changes (feature 0) before its first step, zeros before the series began, as in streaming.
    Returns x [R, S, F], y [R, S, K], mask [R, S, K], window [R, lookback].
    """
    S = segment_length
    xs, ys, ms, ws = [], [], [], []
    for x, y, m in arrays:
        T = x.shape[0]
        pad = offset % S
        n_rows = -(-(T + pad) // S)
        total = n_rows * S
        fx = np.zeros((total, x.shape[1]), dtype=np.float32)
        fy = np.zeros((total, y.shape[1]), dtype=np.float32)
        fm = np.zeros((total, m.shape[1]), dtype=bool)
        fx[pad : pad + T], fy[pad : pad + T], fm[pad : pad + T] = x, y, m
        fm = fm.reshape(n_rows, S, -1)
        fm[:, :burn_in] = False
        changes = np.concatenate([np.zeros(lookback, np.float32), fx[:, 0]])  # lookback + total
        starts = np.arange(n_rows) * S  # row r's window is changes[start, start + lookback) in this frame
        ws.append(changes[starts[:, None] + np.arange(lookback)[None, :]])
        xs.append(fx.reshape(n_rows, S, -1))
        ys.append(fy.reshape(n_rows, S, -1))
        ms.append(fm)
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    m = np.concatenate(ms)
    w = np.concatenate(ws).reshape(len(x), lookback)
    keep = m.any(axis=(1, 2))
    return x[keep], y[keep], m[keep], w[keep]
