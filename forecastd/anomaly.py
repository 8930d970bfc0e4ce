"""Anomaly scores from forecast distributions: a pipeline of small steps, each measurable on its own.

1. `surprise`: how unlikely the point was under the Gaussian forecast issued before it arrived, as
   -log10 of the two-sided tail probability. Heavy-tailed on purpose: a 6-sigma point stands far above
   a 3-sigma one. The streaming step asks the last few forecasts (one step ahead, two steps ahead, ...)
   and keeps the least surprised: the calm point after a spike was forecast well before the spike.
2. `likelihood`: Numenta's "anomaly likelihood" (Ahmad et al. 2017). A short moving average of the
   surprise is compared with the long-run distribution of that same average; the result is the tail
   probability of the recent average. A noisy series has a high long-run average and does not alarm
   all day; a quiet series that suddenly surprises does.
   The surprise fed to it may be capped (`raw_cap`): a bounded raw score, as HTM's is, keeps one
   extreme point from dominating the long-run distribution and makes a run of moderately surprising
   points (a changed pattern) count as much as one wild point.
   `empirical_tail`: the Gaussian tail of that comparison is checked against what the series has
   shown. Each series keeps the running fraction of its points whose z reached 2, 2.5, 3, ... 8; a
   point is never rarer than the fraction of earlier points that reached the highest edge below its
   own z. A bursty series (tweet volumes, busy hosts) has bursts whose short average lies ten standard
   deviations out, every few hundred points: the Gaussian calls each a one-in-10^20 event, the count
   calls it one in a few hundred. A series that never did it before keeps the Gaussian's verdict.
   `slow_window`: a second likelihood over a longer average (about 100 points) of the surprise capped
   lower (`slow_cap`, one in 10): how often the series has been mildly unusual lately. A pattern that
   changes without any one striking point (a daily jump that does not come, a rhythm that drifts) shows
   there first; the short average forgets such points before they add up. Ungated: no single point of
   such a change is rare. Each point's score is the higher of the two channels'.
3. `final`: the likelihood's rarity (optionally gated by the point's own rarity: the smaller of the
   two) on a log scale in [0, 1]: 0.5 is a one-in-100,000 event. `linear` reaches 1 at one in 10^10
   and saturates there; `soft` (1 - 2^(-x/5)) keeps ranking rarer events above each other, which
   matters when one threshold is chosen across many series.
4. `novel`: a value beyond the range the series has shown so far (running min/max carried in the
   track, widened by `tolerance` of the range) scores 1, whatever the forecaster thought, as NAB's HTM
   detector does ("spatial anomaly"): the forecaster learns changes and may find a new extreme
   unremarkable; an operator rarely does.
5. `cooldown`: an incident is reported once. Within `steps` points of the highest score reported so
   far, a point reports its score only if it is higher still (the incident got worse); the others
   report 0. The rest of an incident (a run of new extremes, the points while the likelihood still
   holds a change) would otherwise be a flood of flags for one event, and NAB counts each one outside
   the labelled window as a false positive. Threshold-free: for any threshold, the flags are the
   points that first cross it, and those that beat every score of the incident before them.

Pure functions over numpy arrays; state between calls is an `AnomalyTrack`, carried in the stream state.
Each step is a function of its own (the ablation and the tests run them alone); `score` runs them all
per point in one compiled pass, with the same point functions, so a small tick pays one call instead of
dozens (`test_anomaly` holds the two to the bit).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit

__all__ = ["AnomalyTrack", "surprise", "likelihood", "final", "novel", "cooldown", "score"]

_LN10 = math.log(10.0)
_LOG10_2 = math.log10(2.0)
Z_MAX = 1e6  # the largest z a surprise is computed for (about 2.2e11 = -log10 p)
_SQRT_HALF = math.sqrt(0.5)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
# Below this many scored points the long-run distribution is too thin to judge by; no alarms.
MIN_HISTORY = 20
# Floor under the long-run spread: a perfectly steady surprise history must not make any wobble infinite.
MIN_SPREAD = 0.05
# A new extreme counts only if the forecast found it at least this surprising (-log10 p; 2 = 1 in 100).
NOVELTY_MIN_SURPRISE = 2.0
# `since` of a series with no open incident: larger than any cooldown.
NO_INCIDENT = 2**62
# z-scores of the likelihood whose observed frequency each series keeps (`empirical_tail`). The low
# edges matter most: without 2 and 2.5 the NAB score falls from 69.2 to 57.5 (docs/benchmarks.md).
EXCEED_EDGES = np.array([2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0])


# An AnomalyTrack's arrays by name, and the rows of its three blocks that hold them.
FIELDS = ("short", "mean", "var", "count", "lo", "hi", "peak", "since", "exceed", "slow_short", "slow_mean", "slow_var",
          "slow_count", "slow_exceed")
_FLOAT_ROWS = ("short", "mean", "var", "lo", "hi", "peak", "slow_short", "slow_mean", "slow_var")  # floats [9, B]
_COUNT_ROWS = ("count", "since", "slow_count")  # counts [3, B]
_EXCEED_ROWS = ("exceed", "slow_exceed")  # exceeds [2, B, E]


def _row(name: str) -> property:
    """An AnomalyTrack field: a view of its row of its block."""
    block, rows = next((b, r) for b, r in (("floats", _FLOAT_ROWS), ("counts", _COUNT_ROWS), ("exceeds", _EXCEED_ROWS))
                       if name in r)
    i = rows.index(name)
    return property(lambda track: getattr(track, block)[i], doc=f"{block}[{i}]")


class AnomalyTrack:
    """Per series [B]: short moving average of surprise, long-run mean and variance of its cube root, count;
    lowest and highest value seen (NaN before the first); the open incident's highest reported score
    and the points scored since it was reported (`cooldown`); how often the likelihood's z reached each
    edge (`empirical_tail`, [B, E]); the same average, moments, count and edges for the slow channel,
    which has its own count, as a model switch carries this channel over and starts the main one afresh.

    Held as three blocks, float64 [9, B], int64 [3, B] and float64 [2, B, E], each field a view of its
    row (`FIELDS`; writes go through): a tick copies and hands over three arrays instead of fourteen,
    which for one series cost more than the scoring (5.4 us of a 40 us update).
    """

    __slots__ = ("floats", "counts", "exceeds")
    short, mean, var = _row("short"), _row("mean"), _row("var")
    count = _row("count")
    lo, hi, peak, since = _row("lo"), _row("hi"), _row("peak"), _row("since")
    exceed = _row("exceed")  # B, E: running fraction of scored points whose z reached each of EXCEED_EDGES
    slow_short, slow_mean, slow_var = _row("slow_short"), _row("slow_mean"), _row("slow_var")
    slow_count, slow_exceed = _row("slow_count"), _row("slow_exceed")

    def __init__(self, floats: np.ndarray, counts: np.ndarray, exceeds: np.ndarray) -> None:
        self.floats, self.counts, self.exceeds = floats, counts, exceeds

    @classmethod
    def of(cls, **fields: np.ndarray) -> AnomalyTrack:
        """A track from its fields by name (`FIELDS`, every one), copied into blocks of their own."""
        return cls(np.array([fields[k] for k in _FLOAT_ROWS], dtype=np.float64),
                   np.array([fields[k] for k in _COUNT_ROWS], dtype=np.int64),
                   np.array([fields[k] for k in _EXCEED_ROWS], dtype=np.float64))

    @classmethod
    def fresh(cls, batch: int) -> AnomalyTrack:
        floats = np.zeros((len(_FLOAT_ROWS), batch))
        floats[[_FLOAT_ROWS.index("lo"), _FLOAT_ROWS.index("hi")]] = np.nan
        counts = np.zeros((len(_COUNT_ROWS), batch), dtype=np.int64)
        counts[_COUNT_ROWS.index("since")] = NO_INCIDENT
        return cls(floats, counts, np.zeros((len(_EXCEED_ROWS), batch, len(EXCEED_EDGES))))

    def fields(self) -> dict[str, np.ndarray]:
        """Every field by name, in `FIELDS` order: views of the blocks."""
        return {k: getattr(self, k) for k in FIELDS}

    def copy(self) -> AnomalyTrack:
        """A track of its own: the blocks copied."""
        return AnomalyTrack(self.floats.copy(), self.counts.copy(), self.exceeds.copy())

    def with_(self, **changes: np.ndarray) -> AnomalyTrack:
        """This track with some arrays replaced (copied, as the rest is)."""
        return AnomalyTrack.of(**{**self.fields(), **changes})


def _log10_normal_tail(z: np.ndarray) -> np.ndarray:
    """log10 P(Z > z) for a standard normal, accurate far into the tail, element by element."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty(z.shape)
    _tail_steps(z.reshape(-1), out.reshape(-1))
    return out


@njit(cache=True, nogil=True)
def _tail_steps(z, out):  # pragma: no cover - compiled
    for i in range(z.shape[0]):
        out[i] = _log10_tail_point(z[i])


@njit(cache=True, nogil=True, inline="always")
def _log10_tail_point(z):  # pragma: no cover - compiled
    """log10 P(Z > z) of one z: erfc up to z = 20, then the asymptotic series of Mills' ratio, whose five
    terms are exact to 1e-14 there and better beyond, where erfc underflows (at z = 38). Within 1.3e-14
    (relative) of torch's log_ndtr from -50 to 10^10, and compiled, so the steps that need it call it
    point by point instead of gathering a block for one vectorised call."""
    if z < 20.0:
        return math.log(0.5 * math.erfc(z * _SQRT_HALF)) / _LN10
    r = 1.0 / (z * z)
    series = 1.0 - r * (1.0 - 3.0 * r * (1.0 - 5.0 * r * (1.0 - 7.0 * r * (1.0 - 9.0 * r))))
    return (-0.5 * z * z - math.log(z) - _LOG_SQRT_2PI + math.log(series)) / _LN10


def surprise(values: np.ndarray, expected: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """-log10 of the two-sided tail probability of each value; NaN where any input is missing.

    With expected and spread [J, B, T] (the J forecasts that judge each point, `[anomaly] forecasts`)
    and values [B, T]: the least surprised judge's, NaN only where no judge has a forecast."""
    values = np.asarray(values, dtype=np.float64)
    if np.ndim(expected) == values.ndim + 1:
        J = np.shape(expected)[0]
        expected = np.asarray(expected, dtype=np.float64).reshape(J, -1)
        spread = np.asarray(spread, dtype=np.float64).reshape(J, -1)
    else:
        values, expected, spread = np.broadcast_arrays(values, np.asarray(expected, dtype=np.float64),
                                                       np.asarray(spread, dtype=np.float64))
        expected, spread = expected.reshape(1, -1), spread.reshape(1, -1)
    out = np.empty(values.shape)
    _surprise_steps(np.ascontiguousarray(values).reshape(-1), np.ascontiguousarray(expected),
                    np.ascontiguousarray(spread), out.reshape(-1))
    return out


@njit(cache=True, nogil=True)
def _surprise_steps(values, expected, spread, out):  # pragma: no cover - compiled
    """`surprise` of each point [N] under its judges [J, N], into out [N]."""
    for i in range(values.shape[0]):
        out[i] = _surprise_point(values[i], expected[:, i], spread[:, i])


@njit(cache=True, nogil=True, inline="always")
def _surprise_point(value, expected, spread):  # pragma: no cover - compiled
    """The surprise of one value under its judges [J]: the smallest finite |value - expected| / spread
    (the least surprised judge, as surprise falls with z), then -log10 of its two-sided tail; NaN if no
    judge gives a finite z."""
    best = np.nan
    for j in range(expected.shape[0]):
        # Capped: past Z_MAX every point is as surprising as can be, and a larger z (a spike at 1e154, a
        # difference that overflows to inf) made a surprise of inf, which scores as unscored, and no alarm.
        z = min(abs(value - expected[j]) / spread[j], Z_MAX)
        if z == z and not z >= best:  # a number beats NaN and any larger number
            best = z
    if best != best:
        return np.nan
    return max(-(_log10_tail_point(best) + _LOG10_2), 0.0)


def likelihood(
    raw: np.ndarray, track: AnomalyTrack, short_window: int, long_window: int, empirical_tail: bool = False,
    slow: bool = False,
) -> tuple[np.ndarray, AnomalyTrack]:
    """Log10 tail probability of the short average of `raw` [B, T] under its long-run distribution;
    with `empirical_tail`, no smaller than the observed frequency of such a z (module docstring).
    `slow`: on the slow channel's average, moments, count and edges instead.

    Sequential in T (compiled); NaN steps (missing points) leave the track untouched and score NaN.
    """
    short, mean, var, exceed, count = arrays = _channel(track, slow)
    zs, seen = _likelihood_steps(np.ascontiguousarray(raw, dtype=np.float64), short, mean, var, count, exceed,
                                 2.0 / (short_window + 1.0), float(long_window), EXCEED_EDGES)
    log_tail = _tails(zs)
    if empirical_tail:
        _empirical_floor(log_tail.reshape(-1), seen.reshape(-1))
    return log_tail, track.with_(**dict(zip(_CHANNEL_FIELDS[slow], arrays)))


# A likelihood channel's arrays in an AnomalyTrack, in the order the compiled steps take them: the main
# channel (False) and the slow one (True).
_CHANNEL_FIELDS = {False: ("short", "mean", "var", "exceed", "count"),
                   True: ("slow_short", "slow_mean", "slow_var", "slow_exceed", "slow_count")}


def _channel(track: AnomalyTrack, slow: bool) -> list[np.ndarray]:
    """Copies of a channel's average, moments and edges (float64) and count (int64), for the compiled
    steps to update in place: the caller's track is left as it was."""
    *floats, count = (getattr(track, name) for name in _CHANNEL_FIELDS[slow])
    return [a.astype(np.float64) for a in floats] + [count.astype(np.int64)]


def _tails(zs: np.ndarray) -> np.ndarray:
    """The log10 tail of each likelihood z; NaN stays NaN. No alarm yet (z = -inf) reads as z = -40,
    whose tail is 1 to double precision, as is any z below it."""
    missing = np.isnan(zs)
    return np.where(missing, np.nan, _log10_normal_tail(np.where(missing, 0.0, np.maximum(zs, -40.0))))


@njit(cache=True, nogil=True)
def _empirical_floor(log_tail, seen):  # pragma: no cover - compiled
    """`empirical_tail`: no point rarer than the observed frequency of its z; never seen (0): the Gaussian."""
    for i in range(log_tail.shape[0]):
        if seen[i] > 0.0:
            log_tail[i] = max(log_tail[i], math.log10(seen[i]))


@njit(cache=True, nogil=True)
def _likelihood_steps(raw, short, mean, var, count, exceed, a_short, long_window, edges):  # pragma: no cover
    """The sequential part of `likelihood`, compiled; updates short, mean, var, count [B] and exceed [B, E]
    in place. Returns z [B, T] and, per point, the fraction of earlier points whose z reached the highest
    edge at or below this one's (0 below the first edge)."""
    B, T = raw.shape
    zs = np.full((B, T), np.nan)
    seen = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            r = raw[b, t]
            if np.isfinite(r):
                zs[b, t], seen[b, t] = _likelihood_point(r, b, short, mean, var, count, exceed, a_short, long_window,
                                                         edges)
    return zs, seen


@njit(cache=True, nogil=True, inline="always")
def _likelihood_point(r, b, short, mean, var, count, exceed, a_short, long_window, edges):  # pragma: no cover
    """One finite surprise `r` of series b: its z and the frequency earlier points reached it; the track's
    row b updated in place."""
    short[b] = r if count[b] == 0 else short[b] + a_short * (r - short[b])
    # The average of surprises is gamma-like (right-skewed); its cube root is close to normal
    # (Wilson-Hilferty), so a Gaussian tail on the cube root is honest rather than ~10x too alarmed.
    u = np.cbrt(short[b])
    sd = max(np.sqrt(var[b]), MIN_SPREAD)
    z = (u - mean[b]) / sd if count[b] >= MIN_HISTORY else -np.inf
    # Running moments: exact mean/variance until long_window points, then exponentially forgetting.
    alpha = max(1.0 / (count[b] + 1.0), 1.0 / long_window)
    seen = 0.0
    for k in range(edges.shape[0]):  # edges ascend: the last one reached gives the frequency, read before its update
        reached = z >= edges[k]
        if reached:
            seen = exceed[b, k]
        exceed[b, k] += alpha * ((1.0 if reached else 0.0) - exceed[b, k])
    delta = u - mean[b]
    mean[b] += alpha * delta
    var[b] = (1.0 - alpha) * (var[b] + alpha * delta * delta)
    count[b] += 1
    return z, seen


def final(log_tail: np.ndarray, raw: np.ndarray, *, gate: bool = True, scale: str = "linear") -> np.ndarray:
    """Score in [0, 1] from the likelihood's log10 tail (-inf where it may not alarm) and the point's surprise.

    gate: take the rarer of the recent average and the point itself. The likelihood alone stays high
    for the ~short_window points after a spike (their average still holds it); the gate flags the
    surprising points, not their calm neighbours.
    scale: "linear" is -log10(p) / 10, clipped at 1 (one in 10^10); "soft" is 1 - 2^(-x/5), equal at
    0.5 (one in 100,000) and never saturating, so rarer stays above less rare on every series.
    """
    log_tail, raw = np.broadcast_arrays(np.asarray(log_tail, dtype=np.float64), np.asarray(raw, dtype=np.float64))
    out = np.empty(log_tail.shape)
    _final_steps(log_tail.ravel(), raw.ravel(), gate, scale == "soft", out.reshape(-1))
    return out


@njit(cache=True, nogil=True)
def _final_steps(log_tail, raw, gate, soft, out):  # pragma: no cover - compiled
    for i in range(log_tail.shape[0]):
        out[i] = _final_point(log_tail[i], raw[i], gate, soft)


@njit(cache=True, nogil=True, inline="always")
def _final_point(log_tail, raw, gate, soft):  # pragma: no cover - compiled
    """`final` of one point; NaN in either input gives NaN."""
    x = -log_tail
    if gate:
        x = x if x < raw or x != x else raw  # np.minimum: NaN if either is
    if x != x:
        return np.nan
    if soft:
        return 1.0 - 2.0 ** (-max(x, 0.0) / 5.0)
    return min(max(x / 10.0, 0.0), 1.0)


def novel(values: np.ndarray, track: AnomalyTrack, tolerance: float) -> tuple[np.ndarray, AnomalyTrack]:
    """Flags [B, T]: the value lies beyond the lowest/highest value seen before it, widened by
    `tolerance` × (highest − lowest). Needs MIN_HISTORY scored points and a range first. Updates lo/hi.

    The count is the likelihood's (points scored before the block), advanced here by the block's values,
    so the rule needs the same history as the likelihood and stays identical in blocks or at once.
    """
    lo, hi = track.lo.astype(np.float64), track.hi.astype(np.float64)
    flags = _novel_steps(np.ascontiguousarray(values, dtype=np.float64), lo, hi, track.count.astype(np.int64),
                         float(tolerance))
    return flags, track.with_(lo=lo, hi=hi)


@njit(cache=True, nogil=True)
def _novel_steps(values, lo, hi, count, tolerance):  # pragma: no cover - compiled
    """The sequential part of `novel`, compiled; updates lo, hi and count [B] in place."""
    B, T = values.shape
    flags = np.zeros((B, T), dtype=np.bool_)
    for b in range(B):
        for t in range(T):
            if np.isfinite(values[b, t]):
                flags[b, t] = _novel_point(values[b, t], b, lo, hi, count, tolerance)
    return flags


@njit(cache=True, nogil=True, inline="always")
def _novel_point(v, b, lo, hi, count, tolerance):  # pragma: no cover - compiled
    """Whether finite value v of series b is a new extreme; row b of lo, hi, count updated in place."""
    width = hi[b] - lo[b] if np.isfinite(hi[b] - lo[b]) else 0.0
    slack = tolerance * width
    beyond = v > hi[b] + slack or v < lo[b] - slack
    flag = beyond and width > 0 and count[b] >= MIN_HISTORY
    lo[b] = v if not np.isfinite(lo[b]) else min(lo[b], v)
    hi[b] = v if not np.isfinite(hi[b]) else max(hi[b], v)
    count[b] += 1
    return flag


def cooldown(scores: np.ndarray, track: AnomalyTrack, steps: int) -> tuple[np.ndarray, AnomalyTrack]:
    """Scores [B, T] with the repeats of an open incident set to 0; updates peak and since.

    A point scores as before if it beats the incident's highest reported score, or if `steps` points have
    passed since that score (the incident is over); otherwise 0. NaN points leave the track alone.
    """
    peak, since = track.peak.astype(np.float64), track.since.astype(np.int64)
    out = _cooldown_steps(np.ascontiguousarray(scores, dtype=np.float64), peak, since, int(steps))
    return out, track.with_(peak=peak, since=since)


@njit(cache=True, nogil=True)
def _cooldown_steps(scores, peak, since, steps):  # pragma: no cover - compiled
    """The sequential part of `cooldown`, compiled; updates peak and since [B] in place."""
    B, T = scores.shape
    out = scores.copy()
    for b in range(B):
        for t in range(T):
            if np.isfinite(scores[b, t]):
                out[b, t] = _cooldown_point(scores[b, t], b, peak, since, steps)
    return out


@njit(cache=True, nogil=True, inline="always")
def _cooldown_point(s, b, peak, since, steps):  # pragma: no cover - compiled
    """What finite score s of series b reports (s or 0); row b of peak and since updated in place."""
    if since[b] >= steps:
        peak[b] = 0.0
    if s > peak[b]:
        peak[b] = s
        since[b] = 0
        return s
    since[b] += 1
    return 0.0


def score(
    raw: np.ndarray,
    track: AnomalyTrack,
    short_window: int,
    long_window: int,
    *,
    values: np.ndarray | None = None,
    use_likelihood: bool = True,
    raw_cap: float = 0.0,
    gate: bool = True,
    scale: str = "linear",
    novelty_tolerance: float | None = None,
    cooldown_steps: int = 0,
    empirical_tail: bool = False,
    slow_window: int = 0,
    slow_cap: float = 1.0,
) -> tuple[np.ndarray, AnomalyTrack]:
    """Surprise [B, T] (from `surprise`; NaN where unscored) -> scores [B, T] in [0, 1] and the new track.

    The keyword arguments switch the steps (the defaults are the plain pipeline: likelihood, gate, linear
    scale; [anomaly] in the config chooses what the product runs). values [B, T] are needed for novelty.
    """
    raw = np.ascontiguousarray(raw, dtype=np.float64)
    novelty = novelty_tolerance is not None and values is not None
    values = np.ascontiguousarray(values, dtype=np.float64) if novelty else raw
    new, args = _score_inputs(track, short_window, long_window, use_likelihood, raw_cap, gate, scale,
                              novelty_tolerance if novelty else None, cooldown_steps, empirical_tail, slow_window,
                              slow_cap)
    return _score_blocks(raw, values, *args), new


def _score_inputs(track: AnomalyTrack, short_window: int, long_window: int, use_likelihood: bool, raw_cap: float,
                  gate: bool, scale: str, novelty_tolerance: float | None, cooldown_steps: int, empirical_tail: bool,
                  slow_window: int, slow_cap: float) -> tuple[AnomalyTrack, tuple]:
    """The new track, a copy of `track` that the pass updates in place (the caller's is left as it was),
    and `score`'s arguments to `_score_blocks` after (raw, values): the new track's blocks, then the
    settings. A caller that runs `_score_blocks` inside a compiled pass of its own (the streaming step)
    gets the same copy and arguments."""
    new = track.copy()
    return new, (new.floats, new.counts, new.exceeds, *_score_settings(
        short_window, long_window, use_likelihood, raw_cap, gate, scale, novelty_tolerance, cooldown_steps,
        empirical_tail, slow_window, slow_cap))


@functools.lru_cache(maxsize=32)
def _score_settings(short_window: int, long_window: int, use_likelihood: bool, raw_cap: float, gate: bool, scale: str,
                    novelty_tolerance: float | None, cooldown_steps: int, empirical_tail: bool, slow_window: int,
                    slow_cap: float) -> tuple:
    """`_score_steps`' settings, once per setting (a tick for one series paid 6 us rebuilding them)."""
    return (EXCEED_EDGES, float(long_window), 2.0 / (short_window + 1.0), float(raw_cap),
            2.0 / (slow_window + 1.0) if slow_window > 0 else 0.0, float(slow_cap), novelty_tolerance is not None,
            float(novelty_tolerance or 0.0), bool(use_likelihood), bool(gate), scale == "soft",
            bool(empirical_tail), int(cooldown_steps))


@njit(cache=True, nogil=True)
def _score_blocks(raw, values, floats, counts, exceeds, *settings):  # pragma: no cover - compiled
    """`_score_steps` on an AnomalyTrack's blocks, updated in place (rows as `_FLOAT_ROWS`, `_COUNT_ROWS`,
    `_EXCEED_ROWS`). A step that is off neither reads nor writes its rows."""
    return _score_steps(raw, values, floats[0], floats[1], floats[2], exceeds[0], counts[0], floats[6], floats[7],
                        floats[8], exceeds[1], counts[2], floats[3], floats[4], floats[5], counts[1], *settings)


@njit(cache=True, nogil=True)
def _score_steps(raw, values, short, mean, var, exceed, count, s_short, s_mean, s_var, s_exceed, s_count, lo, hi,
                 peak, since, edges, long_window, a_short, raw_cap, a_slow, slow_cap, novelty, tolerance,
                 use_likelihood, gate, soft, empirical_tail, cooldown_steps):  # pragma: no cover - compiled
    """`score` of every point [B, T], each series' points in order, with the same point functions as the
    steps run alone: novelty (`novel`), both likelihood channels (`likelihood`), `final`, `cooldown`.
    The tracks are updated in place."""
    B, T = raw.shape
    out = np.full((B, T), np.nan)
    before = count.copy()  # novelty counts on from the likelihood's count before the block
    for b in range(B):
        for t in range(T):
            flag = False
            if novelty and np.isfinite(values[b, t]):
                flag = _novel_point(values[b, t], b, lo, hi, before, tolerance)
            r = raw[b, t]
            if not np.isfinite(r):
                continue  # unscored: the likelihoods' history stays as it was
            slow_tail = np.nan
            if a_slow > 0.0:
                z, seen = _likelihood_point(min(r, slow_cap), b, s_short, s_mean, s_var, s_count, s_exceed, a_slow,
                                            long_window, edges)
                slow_tail = _tail_of(z, seen, empirical_tail)
            z, seen = _likelihood_point(min(r, raw_cap) if raw_cap > 0.0 else r, b, short, mean, var, count, exceed,
                                        a_short, long_window, edges)
            s = _final_point(_tail_of(z, seen, empirical_tail) if use_likelihood else -r, r, gate, soft)
            if a_slow > 0.0:
                s = max(s, _final_point(slow_tail, r, False, soft))
            # A new extreme the forecaster saw coming (a drifting sensor, a trending price) is not news.
            if flag and r >= NOVELTY_MIN_SURPRISE:
                s = 1.0
            if cooldown_steps > 0:
                s = _cooldown_point(s, b, peak, since, cooldown_steps)
            out[b, t] = s
    return out


@njit(cache=True, nogil=True, inline="always")
def _tail_of(z, seen, empirical_tail):  # pragma: no cover - compiled
    """The log10 tail of a likelihood z as `_tails` gives it, floored as `_empirical_floor` floors it."""
    tail = _log10_tail_point(max(z, -40.0))
    if empirical_tail and seen > 0.0:
        tail = max(tail, math.log10(seen))
    return tail
