"""Anomaly scores from forecast distributions: a pipeline of small steps, each measurable on its own.

1. `surprise`: how unlikely the point was under the Gaussian forecast issued before it arrived, as
   -log10 of the two-sided tail probability. Heavy-tailed on purpose: a 6-sigma point stands far above
   a 3-sigma one. The streaming step asks the last few forecasts (one step ahead, two steps ahead, ...)
   and keeps the least surprised: the calm point after a spike was forecast well before the spike.
2. `likelihood`: Numenta's "anomaly likelihood" (Ahmad et al. 2017). A short moving average of the
   surprise is compared with the long-run distribution of that same average; the result is the tail
   probability of the recent average. A noisy series has a high long-run average and does not alarm
   all day; a quiet series that suddenly surprises does.
3. `final`: the smaller of the likelihood's and the point's own rarity, on a log scale in [0, 1]: 0.5
   is a one-in-100,000 event, 1 is one in 10^10 or rarer. One threshold then means the same rarity on
   every series, and only points that are themselves surprising are flagged.

Pure functions over numpy arrays; state between calls is an `AnomalyTrack`, carried in the stream state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["AnomalyTrack", "surprise", "likelihood", "final", "score"]

_LN10 = float(np.log(10.0))
# Below this many scored points the long-run distribution is too thin to judge by; no alarms.
MIN_HISTORY = 20
# Floor under the long-run spread: a perfectly steady surprise history must not make any wobble infinite.
MIN_SPREAD = 0.05


@dataclass
class AnomalyTrack:
    """Per series [B]: short moving average of surprise, long-run mean and variance of its cube root, count."""

    short: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    count: np.ndarray

    @classmethod
    def fresh(cls, batch: int) -> AnomalyTrack:
        z = np.zeros(batch)
        return cls(z.copy(), z.copy(), z.copy(), np.zeros(batch, dtype=np.int64))


def _log10_normal_tail(z: np.ndarray) -> np.ndarray:
    """log10 P(Z > z) for a standard normal, accurate far into the tail."""
    return torch.special.log_ndtr(torch.from_numpy(-np.asarray(z, dtype=np.float64))).numpy() / _LN10


def surprise(values: np.ndarray, expected: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """-log10 of the two-sided tail probability of each value; NaN where any input is missing."""
    z = np.abs(values - expected) / spread
    out = -(_log10_normal_tail(np.nan_to_num(z, nan=0.0)) + np.log10(2.0))
    return np.where(np.isfinite(z), np.maximum(out, 0.0), np.nan)


def likelihood(
    raw: np.ndarray, track: AnomalyTrack, short_window: int, long_window: int
) -> tuple[np.ndarray, AnomalyTrack]:
    """Log10 tail probability of the short average of `raw` [B, T] under its long-run distribution.

    Sequential in T, vectorised over B; NaN steps (missing points) leave the track untouched and score NaN.
    """
    B, T = raw.shape
    a_short = 2.0 / (short_window + 1.0)
    short, mean, var, count = track.short.copy(), track.mean.copy(), track.var.copy(), track.count.copy()
    zs = np.full((B, T), np.nan)
    for t in range(T):
        r = raw[:, t]
        seen = np.isfinite(r)
        new_short = np.where(count == 0, r, short + a_short * (r - short))
        short = np.where(seen, new_short, short)
        # The average of surprises is gamma-like (right-skewed); its cube root is close to normal
        # (Wilson-Hilferty), so a Gaussian tail on the cube root is honest rather than ~10x too alarmed.
        u = np.cbrt(short)
        sd = np.maximum(np.sqrt(var), MIN_SPREAD)
        zs[:, t] = np.where(seen & (count >= MIN_HISTORY), (u - mean) / sd, np.where(seen, -np.inf, np.nan))
        # Running moments: exact mean/variance until long_window points, then exponentially forgetting.
        alpha = np.maximum(1.0 / (count + 1.0), 1.0 / long_window)
        delta = u - mean
        mean = np.where(seen, mean + alpha * delta, mean)
        var = np.where(seen, (1.0 - alpha) * (var + alpha * delta**2), var)
        count = count + seen
    log_tail = np.where(np.isnan(zs), np.nan, _log10_normal_tail(np.nan_to_num(zs, nan=0.0, neginf=-40.0)))
    return log_tail, AnomalyTrack(short, mean, var, count)


def final(log_tail: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Score in [0, 1]: the rarer of the recent average and the point itself, as -log10(p) / 10.

    The likelihood alone stays high for the ~short_window points after a spike (their average still
    holds it); taking the smaller of the two flags the surprising points, not their calm neighbours,
    while a noisy series' routine surprises stay unflagged because the likelihood is low.
    """
    return np.clip(np.minimum(-log_tail, raw) / 10.0, 0.0, 1.0)


def score(
    raw: np.ndarray, track: AnomalyTrack, short_window: int, long_window: int
) -> tuple[np.ndarray, AnomalyTrack]:
    """Surprise [B, T] (from `surprise`; NaN where unscored) -> scores [B, T] in [0, 1] and the new track."""
    log_tail, track = likelihood(raw, track, short_window, long_window)
    return final(log_tail, raw), track
