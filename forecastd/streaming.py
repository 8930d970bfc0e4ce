"""The streaming step: advance many series' carried states by their new points, emitting outputs.

One generator serves ticks, backfills and backtests (predict, then learn): for every new point the
forecast issued one step earlier scores it, then the point advances the state and issues the next
forecasts. A tick that brings n points costs n recurrent steps for that series; all series of a call
advance together in one batched (packed) RNN call; a backfill is the same function over longer blocks,
so it gives the same rows as ticking through the same range.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd
import torch
from numba import njit

from forecastd import anomaly
from forecastd.config import AnomalyConfig, ModelConfig
from forecastd.frames import ANOMALY_COLUMNS, FORECAST_COLUMNS, Grid
from forecastd.models import _TICK_LOOP_ROWS, Forecaster, State, _tick_rows, pack_hidden, unpack_hidden
from forecastd.state import Segment, StreamState
from forecastd.windowing import Track, _alpha_array, _encode_tick, encode

__all__ = ["Outputs", "Emit", "Carried", "advance", "run_segments", "empty_forecasts", "empty_anomalies"]


def empty_forecasts() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=d) for c, d in FORECAST_COLUMNS.items()})


def empty_anomalies() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=d) for c, d in ANOMALY_COLUMNS.items()})


Columns = dict[str, np.ndarray]


def _no_rows(schema: dict[str, str]) -> Columns:
    return {name: np.empty(0, dtype="int64" if dtype.startswith("datetime64") else dtype)
            for name, dtype in schema.items()}


def _to_frame(cols: Columns, schema: dict[str, str]) -> pd.DataFrame:
    """Columns (timestamps as int64 ns) to a contract frame."""
    out = {}
    for name, dtype in schema.items():
        v = cols[name]
        if dtype.startswith("datetime64"):
            v = pd.DatetimeIndex(np.asarray(v, dtype=np.int64).view("M8[ns]")).tz_localize("UTC")
        out[name] = v
    return pd.DataFrame(out)


class Outputs:
    """Forecast and anomaly rows. Kept as numpy columns until a frame is asked for: building pandas
    frames costs more than the whole recurrent step for a small tick. With `horizon`, the forecasts'
    series_id column holds one id per origin, standing for its `horizon` rows: the object array of every
    row's id, built with the frame, was a fifth of a 100-series tick at H = 96."""

    def __init__(self, forecasts: pd.DataFrame | Columns, anomalies: pd.DataFrame | Columns, horizon: int = 0) -> None:
        self._forecasts = forecasts
        self._anomalies = anomalies
        self._horizon = horizon

    @property
    def forecasts(self) -> pd.DataFrame:
        if not isinstance(self._forecasts, pd.DataFrame):
            self._forecasts = _to_frame(self._forecast_columns(), FORECAST_COLUMNS)
        return self._forecasts

    def _forecast_columns(self) -> Columns:
        """The forecasts' columns, one id per row."""
        cols, K = self._forecasts, self._horizon
        if not K:
            return cols
        ids = cols["series_id"]
        # Broadcast then copied flat: half the time of np.repeat on an object array (6 ms for 960,000 rows).
        return {**cols, "series_id": np.broadcast_to(ids[:, None], (ids.size, K)).ravel()}

    @property
    def anomalies(self) -> pd.DataFrame:
        if not isinstance(self._anomalies, pd.DataFrame):
            self._anomalies = _to_frame(self._anomalies, ANOMALY_COLUMNS)
        return self._anomalies

    def __len__(self) -> int:
        a = self._anomalies
        return len(a) if isinstance(a, pd.DataFrame) else len(a["series_id"])

    @classmethod
    def empty(cls) -> Outputs:
        return cls(empty_forecasts(), empty_anomalies())

    @classmethod
    def concat(cls, parts: Iterable[Outputs]) -> Outputs:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        if all(isinstance(p._forecasts, dict) and isinstance(p._anomalies, dict) for p in parts):
            K = parts[0]._horizon if len({p._horizon for p in parts}) == 1 else 0
            forecasts = [p._forecasts if K else p._forecast_columns() for p in parts]
            return cls({k: np.concatenate([f[k] for f in forecasts]) for k in FORECAST_COLUMNS},
                       {k: np.concatenate([p._anomalies[k] for p in parts]) for k in ANOMALY_COLUMNS}, K)
        return cls(
            pd.concat([p.forecasts for p in parts], ignore_index=True),
            pd.concat([p.anomalies for p in parts], ignore_index=True),
        )


@dataclass(frozen=True)
class Carried:
    """What a series' stream under a new model version keeps from the old version's stream, which it
    takes over from at the old watermark `step`: the lowest and highest value seen (novelty), the
    open incident, its highest reported score and the points scored since (the cooldown), so a switch
    neither forgets the range nor reports an incident in progress a second time; and the slow channel's
    history, which takes thousands of points to learn (short average, moments, count, exceedances)."""

    lo: float
    hi: float
    peak: float
    since: int
    step: int
    slow: tuple  # slow_short, slow_mean, slow_var, slow_count, slow_exceed row

    @classmethod
    def of(cls, state: StreamState, i: int) -> Carried:
        """What row `i` of the old version's `state` hands over."""
        return cls.of_fields(state.handover_fields(), i)

    @classmethod
    def of_fields(cls, a: Mapping[str, np.ndarray], i: int) -> Carried:
        """Row `i` of arrays named as `state.HANDOVER_FIELDS`: an old version's stream's
        (`StreamState.handover_fields`), or the handover record's."""
        slow = (float(a["slow_short"][i]), float(a["slow_mean"][i]), float(a["slow_var"][i]),
                int(a["slow_count"][i]), a["slow_exceed"][i].copy())
        return cls(float(a["lo"][i]), float(a["hi"][i]), float(a["peak"][i]), int(a["since"][i]), int(a["step"][i]),
                   slow)


@dataclass(frozen=True)
class Emit:
    """Which processed steps become output rows: at or after `warmup` steps of age, within [lo, hi]."""

    warmup: int
    lo: int | None = None  # grid step
    hi: int | None = None


def advance(
    model: Forecaster,
    state: StreamState,
    values: np.ndarray,
    lengths: np.ndarray,
    grid: Grid,
    mc: ModelConfig,
    ac: AnomalyConfig,
    version: int,
    emit: Emit,
) -> tuple[Outputs, StreamState]:
    """Advance B series by values [B, T] (NaN = missing; steps past lengths[b] are padding).

    Series b's block starts at grid step state.step[b] + 1. Returns the output rows and the new state.
    """
    B, T = values.shape
    K = mc.horizon
    # A tick (T = 1) takes the shortest forms: a one-series tick is some forty numpy-sized calls.
    steps = (state.step + 1)[:, None] if T == 1 else state.step[:, None] + 1 + np.arange(T)  # B, T
    values = np.asarray(values, dtype=np.float64)
    # Lengths never exceed T; in a tick they are 0 or 1, and counting is 4x cheaper than a minimum.
    ragged = np.count_nonzero(lengths) < B if T == 1 else B > 0 and bool(lengths.min() < T)
    if ragged:
        values = np.where(np.arange(T) >= lengths[:, None], np.nan, values)  # padding reads as missing
    wall_ns = grid.wall_ns(steps.ravel()).reshape(B, T)

    out = np.isfinite(values)
    if emit.warmup > 0:
        out &= state.age[:, None] + np.arange(T) >= emit.warmup
    if emit.lo is not None:
        out &= steps >= emit.lo
    if emit.hi is not None:
        out &= steps <= emit.hi
    rows = _Rows(state.series_ids, out, K)
    atrack, score_args = anomaly._score_inputs(
        state.anomaly, ac.short_window, ac.long_window, ac.likelihood, ac.raw_cap, ac.point_gate, ac.scale,
        ac.novelty_tolerance if ac.novelty_tolerance >= 0 else None, ac.cooldown, ac.empirical_tail,
        ac.slow_window, ac.slow_cap)
    # After the model's forecasts, in one compiled pass: the forecasts issued before each point judge it,
    # the surprise is scored, the output rows are written (a small tick paid more for the calls between
    # these stages than for the stages).
    judge_args = (score_args, rows.b, rows.t, _z(ac.coverage), steps, grid.step_ns if grid.regular else 0,
                  float(ac.threshold), version, *rows.blocks)

    if T == 1 and not ragged and B <= _TICK_LOOP_ROWS and model.compiled_tick(B):
        # A tick of a few series: features, model and judging in one compiled call, numpy in and out.
        layers, cell, head = model.compiled_tick_parts()
        last, levels, hidden, window, pending_mean, pending_std = _tick_few(
            values, wall_ns, state.track.last, state.track.levels, state.scale, _alpha_array(mc.level_alphas),
            float(mc.input_clip), state.hidden, state.window, layers, cell, head, state.pending_mean,
            state.pending_std, lengths, *judge_args)
        track = Track(last, levels)
    else:
        x, origin, track = encode(values, wall_ns, state.track, state.scale, mc.level_alphas, mc.input_clip)
        mean, spread, hidden, window = _forecast(model, state, x, lengths if ragged else None, mc)
        pending_mean, pending_std = _judge_score_write(values, origin, mean, spread, state.scale, state.pending_mean,
                                                       state.pending_std, lengths, *judge_args)
    new = StreamState(state.series_ids, state.step + lengths, state.age + lengths, state.scale, track, hidden,
                      window, pending_mean, pending_std, atrack)
    return rows.outputs(grid, steps), new


def _forecast(model: Forecaster, state: StreamState, x: np.ndarray, lengths: np.ndarray | None, mc: ModelConfig
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The model over features x [B, T, F] from the state's hidden state and window: mean and spread
    [B, T, K] in units of each series' scale, the hidden state and window after each row's last step
    (`lengths`, ragged blocks) as new arrays."""
    B, T, _ = x.shape
    if T == 1 and lengths is None and model.compiled_tick(B):  # up to a few hundred series: numpy in and out
        mean, spread, hidden, window = model.tick_arrays(x[:, 0], state.hidden, state.window)
        return mean[:, None], spread[:, None], hidden, window  # B, 1, K
    device = model.head.weight.device
    carried = State(
        unpack_hidden(torch.from_numpy(state.hidden).to(device).transpose(0, 1).contiguous(), mc.cell),
        torch.from_numpy(state.window).to(device),
    )
    with torch.no_grad():
        inputs = torch.from_numpy(x).to(device)  # B, T, F
        # Ragged blocks: each series' state stops at its own last step.
        mean, spread, carried = model(inputs, carried, None if lengths is None else torch.from_numpy(lengths))
    # The model's outputs are new tensors, so their numpy views are the new state's own arrays.
    hidden = np.ascontiguousarray(pack_hidden(carried.rnn).transpose(0, 1).float().cpu().numpy())
    window = carried.window.float().cpu().numpy()
    if np.may_share_memory(window, state.window):  # no window (lookback 0): the model hands it back
        window = window.copy()
    return mean.cpu().numpy(), spread.cpu().numpy(), hidden, window


@njit(cache=True, nogil=True)
def _tick_few(values, wall_ns, last, levels, scale, alpha, clip, hidden, window, layers, cell, head, pending_mean,
              pending_std, lengths, score_args, b, t, z, steps, step_ns, threshold, version, floats, ints, a_floats,
              a_ints, flags):  # pragma: no cover - compiled
    """`advance` for a one-step block of a few series between `_Rows` and the new state, in one compiled
    call: the features (`windowing._encode_tick`, as `encode` runs it for a one-step block), the model
    (`models._tick_rows`) and `_judge_score_write`. Returns the track's last values and levels, the
    hidden state, the window and the pending forecasts after the step. For one series the calls between
    these stages, a few microseconds each, cost more than the stages: the update took 92 us as separate
    calls, 77 us as this one (2 cores, H = 24)."""
    B = values.shape[0]
    x, origin, last, levels = _encode_tick(values, wall_ns, last, levels, scale, alpha, clip)
    mean, spread, hidden, window = _tick_rows(x[:, 0], hidden, window, layers, cell, *head)
    K = mean.shape[1]
    pending_mean, pending_std = _judge_score_write(values, origin, mean.reshape(B, 1, K), spread.reshape(B, 1, K),
                                                   scale, pending_mean, pending_std, lengths, score_args, b, t, z,
                                                   steps, step_ns, threshold, version, floats, ints, a_floats,
                                                   a_ints, flags)
    return last, levels, hidden, window, pending_mean, pending_std


@njit(cache=True, nogil=True)
def _judge_score_write(values, origin, mean, spread, scale, pending_mean, pending_std, lengths, score_args, b, t, z,
                       steps, step_ns, threshold, version, floats, ints, a_floats, a_ints, flags):  # pragma: no cover
    """`_judge`, `anomaly._score_blocks` (its arguments after raw and values: `score_args`) and `_rows`,
    in that order, in one call. Returns the next block's pending forecasts."""
    raw, expected, expected_sd, new_mean, new_std = _judge(values, origin, mean, spread, scale, pending_mean,
                                                           pending_std, lengths)
    scores = anomaly._score_blocks(raw, values, *score_args)
    _rows(mean, spread, origin, scale, b, t, z, steps, step_ns, values, expected, expected_sd, scores, threshold,
          version, floats, ints, a_floats, a_ints, flags)
    return new_mean, new_std


@njit(cache=True, nogil=True)
def _judge(values, origin, mean, spread, scale, pending_mean, pending_std, lengths):  # pragma: no cover - compiled
    """Each point's surprise [B, T] under the forecasts issued 1..m steps before it, the one-step-ahead
    forecast's mean and spread [B, T], and the next block's pending forecasts [B, m, m].

    Row q of a series' forecasts in time order (m pending from earlier blocks, then one per step of this
    block: origin + mean x scale, spread x scale, their first m steps) judges step q - m + j with its
    column j - 1. The last m rows of each series (ending at its own length) are the next pending ones.
    """
    B, T = values.shape
    m = pending_mean.shape[1]
    raw = np.empty((B, T))
    expected = np.empty((B, T))
    expected_sd = np.empty((B, T))
    new_mean = np.empty((B, m, m))
    new_std = np.empty((B, m, m))
    judge_mean = np.empty(m)
    judge_std = np.empty(m)
    for b in range(B):
        s = scale[b]
        for t in range(T):
            for j in range(m):
                q = m - 1 - j + t  # the forecast issued j + 1 steps before step t
                if q < m:
                    judge_mean[j], judge_std[j] = pending_mean[b, q, j], pending_std[b, q, j]
                else:
                    judge_mean[j] = origin[b, q - m] + np.float64(mean[b, q - m, j]) * s
                    judge_std[j] = np.float64(spread[b, q - m, j]) * s
            raw[b, t] = anomaly._surprise_point(values[b, t], judge_mean, judge_std)
            expected[b, t], expected_sd[b, t] = judge_mean[0], judge_std[0]
        for i in range(m):
            q = lengths[b] + i
            for j in range(m):
                if q < m:
                    new_mean[b, i, j], new_std[b, i, j] = pending_mean[b, q, j], pending_std[b, q, j]
                else:
                    new_mean[b, i, j] = origin[b, q - m] + np.float64(mean[b, q - m, j]) * s
                    new_std[b, i, j] = np.float64(spread[b, q - m, j]) * s
    return raw, expected, expected_sd, new_mean, new_std


@functools.lru_cache(maxsize=16)
def _z(coverage: float) -> float:
    return NormalDist().inv_cdf(0.5 + coverage / 2)


class _Rows:
    """The output rows of the steps where `out` [B, T] is set: where they lie (b, t), the series ids and
    the blocks `_rows` fills, whose rows are the numeric columns (one allocation per dtype and table,
    where a dozen allocations cost a one-series tick more than its recurrent step)."""

    def __init__(self, ids: list[str], out: np.ndarray, K: int) -> None:
        B, T = out.shape
        n = np.count_nonzero(out)
        if n == out.size:  # every step of every series (a tick, most often): the ids in order, no gather
            sid = np.array(ids, dtype=object)
            self.ids = sid if T == 1 else np.repeat(sid, T)
            self.b, self.t = (np.arange(B, dtype=np.intp), np.zeros(B, dtype=np.intp)) if T == 1 else np.nonzero(out)
        else:
            self.b, self.t = np.nonzero(out)
            self.ids = np.asarray(ids, dtype=object)[self.b]
        self.K = K
        self.blocks = (np.empty((3, n * K)), np.empty((4, n * K), dtype=np.int64), np.empty((5, n)),
                       np.empty((2, n), dtype=np.int64), np.empty(n, dtype=np.bool_))

    def outputs(self, grid: Grid, steps: np.ndarray) -> Outputs:
        """The rows as Outputs, once `_rows` has filled the blocks."""
        if not self.b.size:
            return Outputs(_no_rows(FORECAST_COLUMNS), _no_rows(ANOMALY_COLUMNS))  # frames only if asked for
        floats, ints, a_floats, a_ints, flags = self.blocks
        sid, K = self.ids, self.K
        forecasts = {
            "series_id": sid,  # one per origin (Outputs' horizon)
            "issued_at": ints[0], "step": ints[1], "target_ts": ints[2],
            "mean": floats[0], "lower": floats[1], "upper": floats[2],
            "model_version": ints[3],
        }
        anomalies = {
            "series_id": sid, "ts": a_ints[0], "value": a_floats[0], "expected": a_floats[1], "lower": a_floats[2],
            "upper": a_floats[3], "score": a_floats[4], "is_anomaly": flags, "model_version": a_ints[1],
        }
        if not grid.regular:  # months, local days (DST): not a multiple of a step after the epoch
            origin_steps = steps[self.b, self.t]
            issued = grid.ns(origin_steps)
            anomalies["ts"][:] = issued
            forecasts["issued_at"][:] = np.repeat(issued, K)
            forecasts["target_ts"][:] = grid.ns((origin_steps[:, None] + np.arange(1, K + 1)).ravel())
        return Outputs(forecasts, anomalies, K)


@njit(cache=True, nogil=True)
def _rows(mean, spread, origin, scale, b, t, z, steps, step_ns, values, expected, expected_sd, scores, threshold,
          version, floats, ints, a_floats, a_ints, flags):  # pragma: no cover - compiled
    """The numeric columns of the output rows of steps (b[i], t[i]).

    Forecast row i*K + k-1, step k ahead of origin (b[i], t[i]), in the series' own units: origin + mean x
    scale and the band +- z x spread x scale, in float64 (floats: mean, lower, upper; ints: issued_at,
    step, target_ts, model_version). Anomaly row i: the value, the one-step forecast's mean and band and
    the score, 0 where unscored (a_floats: value, expected, lower, upper, score; a_ints: ts,
    model_version; flags: is_anomaly). Times only with step_ns (a regular grid)."""
    K = mean.shape[2]
    for i in range(b.size):
        r, c = b[i], t[i]
        o, s, at = origin[r, c], scale[r], steps[r, c]
        for k in range(K):
            j = i * K + k
            m = o + np.float64(mean[r, c, k]) * s
            half = z * (np.float64(spread[r, c, k]) * s)
            floats[0, j] = m
            floats[1, j] = m - half
            floats[2, j] = m + half
            ints[1, j] = k + 1
            ints[3, j] = version
            if step_ns:
                ints[0, j] = at * step_ns
                ints[2, j] = (at + k + 1) * step_ns
        e, half = expected[r, c], z * expected_sd[r, c]
        sc = scores[r, c]
        sc = 0.0 if sc != sc else sc  # unscored points; scores are otherwise in [0, 1]
        a_floats[0, i] = values[r, c]
        a_floats[1, i] = e
        a_floats[2, i] = e - half
        a_floats[3, i] = e + half
        a_floats[4, i] = sc
        flags[i] = sc >= threshold
        a_ints[0, i] = at * step_ns
        a_ints[1, i] = version


def run_segments(
    model: Forecaster,
    state: StreamState,
    segments: list[Segment],
    fresh_scale: dict[str, float],
    grid: Grid,
    mc: ModelConfig,
    ac: AnomalyConfig,
    version: int,
    emit: Emit,
    *,
    chunk: int = 4096,
    max_cells: int = 4_000_000,
    carried: Mapping[str, Carried] | None = None,
) -> tuple[Outputs, StreamState]:
    """Process every series' segments in order, in batched rounds; returns outputs and the merged state.

    Round r takes each series' r-th segment, resetting the series first when the segment is fresh.
    Long blocks are cut into time chunks so memory stays bounded (`max_cells` series-steps a chunk);
    chunking changes no result. Up to `chunk` steps a chunk: each chunk's outputs are copied once more
    to join them, so one series over 3,880 steps took 30 ms in chunks of 1,024 and 20 ms in one.
    `carried` gives a series that `state` does not hold yet what it keeps from the model version it
    takes over from (`Carried`); its fresh state starts from that.
    """
    by_series: dict[str, list[Segment]] = {}
    for seg in segments:
        by_series.setdefault(seg.series_id, []).append(seg)
    hidden_shape = (state.hidden.shape[1], state.hidden.shape[2])
    parts = []
    rounds = max((len(v) for v in by_series.values()), default=0)
    for r in range(rounds):
        segs = [v[r] for v in by_series.values() if len(v) > r]
        pos = {s: i for i, s in enumerate(state.series_ids)}
        cont = [g for g in segs if not g.fresh and g.series_id in pos]
        fresh = [g for g in segs if g.fresh or g.series_id not in pos]
        sub_parts = []
        if cont:
            sub_parts.append(state.take(np.array([pos[g.series_id] for g in cont])))
        if fresh:
            ids = [g.series_id for g in fresh]
            scale = np.array([fresh_scale[i] for i in ids])
            st = StreamState.fresh(ids, scale, len(mc.level_alphas), hidden_shape, ac.forecasts, model.lookback)
            st.step[:] = np.array([g.start - 1 for g in fresh])
            st.age[:] = np.array([g.age for g in fresh])
            for i, g in enumerate(fresh):
                c = carried.get(g.series_id) if carried and g.series_id not in pos else None
                if c is None:
                    continue
                st.anomaly.lo[i], st.anomaly.hi[i] = c.lo, c.hi
                a = st.anomaly  # the slow channel: the warm-up's points reach it again, as they reach the range
                a.slow_short[i], a.slow_mean[i], a.slow_var[i], a.slow_count[i], a.slow_exceed[i] = c.slow
                # The warm-up from g.start re-scores the points up to the old watermark, counting them
                # again: start the count that many points back. An incident whose highest report lies
                # inside the warm-up is left to the re-scoring.
                since = c.since - max(c.step - g.start + 1, 0)
                if since >= 0:
                    st.anomaly.peak[i], st.anomaly.since[i] = c.peak, since
            sub_parts.append(st)
        sub = sub_parts[0] if len(sub_parts) == 1 else _stack(sub_parts)
        order = cont + fresh
        lengths = np.array([len(g.values) for g in order], dtype=np.int64)
        T = int(lengths.max())
        dense = np.full((len(order), T), np.nan)
        dense[np.arange(T) < lengths[:, None]] = np.concatenate([g.values for g in order])  # row by row
        step_chunk = max(1, min(chunk, max_cells // max(len(order), 1)))
        for c in range(0, T, step_chunk):
            clen = np.clip(lengths - c, 0, step_chunk)
            active = np.flatnonzero(clen > 0)
            # Most chunks advance every series of the round: no take and merge, each a copy of the state.
            every = active.size == len(order)
            part = sub if every else sub.take(active)
            block = dense[:, c : c + step_chunk] if every else dense[active, c : c + step_chunk]
            o, part = advance(model, part, block, clen[active], grid, mc, ac, version, emit)
            sub = part if every else sub.merge(part)
            parts.append(o)
        state = state.merge(sub)
    return Outputs.concat(parts), state


def _stack(parts: list[StreamState]) -> StreamState:
    arrays = [p.to_arrays() for p in parts]
    merged = {k: np.concatenate([a[k] for a in arrays]) for k in arrays[0]}
    return StreamState.from_arrays([s for p in parts for s in p.series_ids], merged)
