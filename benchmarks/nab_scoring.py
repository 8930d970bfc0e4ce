"""Numenta Anomaly Benchmark v1.1 scoring, reimplemented from NAB's own code.

Every rule follows a named piece of numenta/NAB, so a figure from here can be set beside NAB's:

- per-row weights: ``nab/sweeper.py`` ``Sweeper.calcSweepScore`` (scaled sigmoid of the position in a window,
  or of the distance after the preceding window, ``-1`` with no preceding window);
- detections and the threshold: ``Sweeper.calcScoreByThreshold`` and ``nab/optimizer.py`` (every distinct score
  over the whole corpus is a candidate threshold, ``score >= threshold`` is a detection, the best total wins,
  ties going to the highest threshold);
- the probationary period: ``nab/util.py`` ``getProbationPeriod``;
- normalisation: ``nab/runner.py`` ``Runner.normalize`` (100 × (raw − null) / (perfect − null));
- cost matrices: ``config/profiles.json``;
- results files: ``nab/detectors/base.py`` ``detectDataSet`` (``<detector>/<category>/<detector>_<file>.csv``).

NAB loops over rows in Python; here one stable sort of all scores and a few cumulative sums give the score of
every threshold at once, so a corpus scores in well under a second.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "PROFILES",
    "CostMatrix",
    "CorpusScore",
    "Window",
    "label_rows",
    "load_corpus",
    "load_windows",
    "probation_length",
    "read_results",
    "scaled_sigmoid",
    "score_corpus",
    "write_results",
]

Window = tuple[pd.Timestamp, pd.Timestamp]


@dataclass(frozen=True)
class CostMatrix:
    """Weights of one NAB application profile (``tnWeight`` exists in NAB's file but no scorer reads it)."""

    tp: float
    fp: float
    fn: float


# config/profiles.json of numenta/NAB, keyed by NAB's own profile names.
PROFILES: dict[str, CostMatrix] = {
    "standard": CostMatrix(tp=1.0, fp=0.11, fn=1.0),
    "reward_low_FP_rate": CostMatrix(tp=1.0, fp=0.22, fn=1.0),
    "reward_low_FN_rate": CostMatrix(tp=1.0, fp=0.11, fn=2.0),
}
# The short names used in the paper and in our data README.
_PROFILE_ALIASES = {"reward_low_FP": "reward_low_FP_rate", "reward_low_FN": "reward_low_FN_rate"}

PROBATION_FRACTION = 0.15
# NAB caps the probationary period at this fraction of 5000 rows (750 rows at 15 %).
_PROBATION_CAP_ROWS = 5000
# NAB's sweep starts above every score in [0, 1]: the "detect nothing" threshold.
_NO_DETECTION = 1.1


@dataclass(frozen=True)
class CorpusScore:
    """One detector on one profile over a set of files.

    ``tp``/``fp``/``fn``/``tn`` are NAB's counts: rows after the probationary period, a row inside a window
    being a TP when detected and an FN when not. ``windows_detected`` counts windows with at least one
    detection, which is what the score rewards.
    """

    profile: str
    score: float  # normalised: the null detector 0, the perfect one 100
    raw: float
    null: float
    perfect: float
    threshold: float
    tp: int
    fp: int
    fn: int
    tn: int
    windows: int
    windows_detected: int
    per_file: dict[str, float]  # raw score of each file at `threshold`


def scaled_sigmoid(position: np.ndarray | float) -> np.ndarray:
    """NAB's ``scaledSigmoid``: 2·sigmoid(−5x) − 1, and −1 beyond x = 3.

    x = −1 is the left edge of a window (≈ 0.9866), 0 its right edge (0), positive x lies after a window.
    """
    x = np.asarray(position, dtype=float)
    capped = np.minimum(x, 3.0)  # keeps exp() finite; the capped part is replaced below anyway
    value = 2.0 * (1.0 / (1.0 + np.exp(5.0 * capped))) - 1.0
    return np.where(x > 3.0, -1.0, value)


_MAX_TP = float(scaled_sigmoid(-1.0))


def probation_length(n_rows: int, fraction: float = PROBATION_FRACTION) -> int:
    """Rows at the start of a file whose detections NAB ignores: min(floor(f·n), f·5000).

    NAB compares ``row >= f·5000``; the ceiling is the same test on integers.
    """
    return min(math.floor(fraction * n_rows), math.ceil(fraction * _PROBATION_CAP_ROWS))


def load_windows(path: str | Path) -> dict[str, list[Window]]:
    """Read NAB's ``combined_windows.json``: relative data path -> [(start, end)], both ends inclusive."""
    raw = json.loads(Path(path).read_text())
    return {
        relpath: [(pd.Timestamp(start), pd.Timestamp(end)) for start, end in limits]
        for relpath, limits in raw.items()
    }


def load_corpus(nab_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Read every ``data/<category>/<name>.csv`` under a NAB directory, keyed like combined_windows.json."""
    data_dir = Path(nab_dir) / "data"
    corpus = {}
    for csv in sorted(data_dir.glob("*/*.csv")):
        frame = pd.read_csv(csv)
        frame["timestamp"] = pd.to_datetime(frame["timestamp"])
        corpus[csv.relative_to(data_dir).as_posix()] = frame
    if not corpus:
        raise FileNotFoundError(f"no NAB data files under {data_dir}; pass the directory holding data/")
    return corpus


def label_rows(timestamps: pd.Series | np.ndarray, windows: Sequence[Window]) -> np.ndarray:
    """NAB's ``label`` column: 1 for rows inside a window (ends included), else 0."""
    ts = _as_ns(timestamps)
    label = np.zeros(len(ts), dtype=np.int64)
    for start, end in windows:
        label[(ts >= _ns(start)) & (ts <= _ns(end))] = 1
    return label


def score_corpus(
    results: Mapping[str, pd.DataFrame],
    windows: Mapping[str, Sequence[Window]],
    profile: str | CostMatrix = "standard",
    threshold: float | None = None,
    probation_fraction: float = PROBATION_FRACTION,
) -> CorpusScore:
    """Score a detector's results (``timestamp``, ``anomaly_score`` per row) over the files it covers.

    With ``threshold=None`` the threshold is NAB's: the one maximising the corpus total. Null and perfect are
    computed over the same files, so a subset is normalised against itself.
    """
    name, cost = _profile(profile)
    rows = _corpus_rows(results, windows, cost, probation_fraction)
    if threshold is None:
        thresholds, totals, _, _ = _sweep(rows.score, rows.weight, rows.window, cost.fn)
        # np.argmax keeps the first maximum, i.e. the highest threshold, as NAB's stable sort does.
        threshold = float(thresholds[int(np.argmax(totals))])

    detected = rows.score >= threshold
    in_window = rows.window >= 0
    per_window_best = _best_per_window(rows, detected, cost.fn)
    per_file_fp = np.bincount(
        rows.file[detected & ~in_window], weights=rows.weight[detected & ~in_window], minlength=len(rows.names)
    )
    per_file_windows = np.bincount(rows.window_file, weights=per_window_best, minlength=len(rows.names))
    per_file = {name_: float(fp + win) for name_, fp, win in zip(rows.names, per_file_fp, per_file_windows)}
    raw = float(sum(per_file.values()))

    first_weight = _first_row_weight_per_window(rows)
    never = -cost.fn * rows.n_windows
    # NAB's null detector emits a constant, so its optimised score is the better of never and always.
    always = float(first_weight.sum() + rows.weight[~in_window].sum())
    null = max(never, always)
    perfect = float(first_weight.sum())  # one detection on the first scorable row of every window
    span = perfect - null
    return CorpusScore(
        profile=name,
        score=100.0 * (raw - null) / span if span > 0 else float("nan"),
        raw=raw,
        null=null,
        perfect=perfect,
        threshold=float(threshold),
        tp=int((detected & in_window).sum()),
        fp=int((detected & ~in_window).sum()),
        fn=int((~detected & in_window).sum()),
        tn=int((~detected & ~in_window).sum()),
        windows=rows.n_windows,
        windows_detected=int(np.unique(rows.window[detected & in_window]).size),
        per_file=per_file,
    )


def write_results(
    out_dir: str | Path,
    detector: str,
    relpath: str,
    frame: pd.DataFrame,
    windows: Sequence[Window] | None = None,
    float_format: str | None = None,
) -> Path:
    """Write one NAB results file: ``out_dir/<detector>/<category>/<detector>_<name>.csv``.

    Columns ``timestamp,value,anomaly_score,label``; ``label`` comes from ``frame`` or, if absent, from
    ``windows``. ``float_format="%.12g"`` reproduces the 12 significant digits of NAB's Python 2 results files.
    """
    if "label" not in frame.columns and windows is None:
        raise ValueError(f"{relpath}: frame has no 'label' column; pass windows= so labels can be derived")
    category, name = relpath.split("/")
    path = Path(out_dir) / detector / category / f"{detector}_{name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    out = pd.DataFrame(
        {
            "timestamp": pd.to_datetime(frame["timestamp"]).dt.strftime("%Y-%m-%d %H:%M:%S"),
            "value": frame["value"],
            "anomaly_score": frame["anomaly_score"],
            "label": frame["label"] if "label" in frame.columns else label_rows(frame["timestamp"], windows),
        }
    )
    out.to_csv(path, index=False, float_format=float_format)
    return path


def read_results(out_dir: str | Path, detector: str) -> dict[str, pd.DataFrame]:
    """Read the results files ``write_results`` (or NAB itself) wrote for one detector, keyed by data path."""
    base = Path(out_dir) / detector
    prefix = f"{detector}_"
    results = {}
    for csv in sorted(base.glob(f"*/{prefix}*.csv")):
        frame = pd.read_csv(csv)
        frame["timestamp"] = pd.to_datetime(frame["timestamp"])
        results[f"{csv.parent.name}/{csv.name[len(prefix):]}"] = frame
    return results


# --- internals -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rows:
    """Scorable rows (after probation) of all files, concatenated."""

    names: list[str]
    score: np.ndarray  # anomaly score
    weight: np.ndarray  # NAB's sweep score of a detection on this row
    window: np.ndarray  # corpus-wide window id, -1 outside windows
    file: np.ndarray  # index into names
    window_file: np.ndarray  # file index of each window id
    n_windows: int


def _profile(profile: str | CostMatrix) -> tuple[str, CostMatrix]:
    if isinstance(profile, CostMatrix):
        return "custom", profile
    name = _PROFILE_ALIASES.get(profile, profile)
    if name not in PROFILES:
        raise ValueError(f"unknown NAB profile {profile!r}; use one of {sorted(PROFILES)}")
    return name, PROFILES[name]


def _ns(t: pd.Timestamp) -> np.int64:
    return np.int64(pd.Timestamp(t).as_unit("ns").value)


def _as_ns(timestamps: pd.Series | np.ndarray) -> np.ndarray:
    # pandas 3 infers second or microsecond resolution from text; compare everything in nanoseconds.
    return pd.to_datetime(pd.Series(timestamps)).to_numpy().astype("datetime64[ns]").astype(np.int64)


def _window_bounds(ts: np.ndarray, windows: Sequence[Window], relpath: str) -> list[tuple[int, int]]:
    """Row indices of each window's ends. NAB requires both ends to be timestamps of the file."""
    bounds = []
    for start, end in windows:
        ends = []
        for t in (start, end):
            hits = np.flatnonzero(ts == _ns(t))
            if hits.size == 0:
                raise ValueError(f"{relpath}: window end {t} is not a timestamp of the file (NAB requires it)")
            ends.append(int(hits[0]))
        bounds.append((ends[0], ends[1]))
    for (l0, r0), (l1, r1) in zip(bounds, bounds[1:]):
        if not (l0 <= r0 < l1 <= r1):
            raise ValueError(f"{relpath}: windows must be ordered and disjoint, got rows {l0}-{r0} and {l1}-{r1}")
    return bounds


def _row_weights(n: int, bounds: Sequence[tuple[int, int]], cost: CostMatrix) -> tuple[np.ndarray, np.ndarray]:
    """Sweep score of a detection on every row, and the window index of every row (-1 outside)."""
    rows = np.arange(n)
    weight = np.full(n, -cost.fp)  # before the first window: NAB's "no preceding window" FP, −1 × fp
    window = np.full(n, -1)
    for k, (left, right) in enumerate(bounds):
        width = right - left + 1
        inside = slice(left, right + 1)
        window[inside] = k
        # −1 at the first row, −1/width at the last: a detection always earns a little, earlier earns more.
        weight[inside] = scaled_sigmoid(-(right - rows[inside] + 1) / width) * cost.tp / _MAX_TP
        after = slice(right + 1, bounds[k + 1][0] if k + 1 < len(bounds) else n)
        # Just after a window an FP costs almost nothing, three window-widths later the full fp weight.
        # NAB divides by width − 1 and fails on a one-row window; such a window's FPs count as far away.
        distance = (rows[after] - right) / (width - 1) if width > 1 else np.inf
        weight[after] = scaled_sigmoid(distance) * cost.fp
    return weight, window


def _corpus_rows(
    results: Mapping[str, pd.DataFrame],
    windows: Mapping[str, Sequence[Window]],
    cost: CostMatrix,
    probation_fraction: float,
) -> _Rows:
    if not results:
        raise ValueError("no results to score")
    names = sorted(results)
    parts: dict[str, list[np.ndarray]] = {"score": [], "weight": [], "window": [], "file": []}
    window_file: list[int] = []
    for f, relpath in enumerate(names):
        if relpath not in windows:
            raise ValueError(f"{relpath}: no entry in the windows file (files without anomalies need an empty list)")
        frame = results[relpath]
        ts = _as_ns(frame["timestamp"])
        score = frame["anomaly_score"].to_numpy(dtype=float)
        if len(score) and not np.isfinite(score).all():
            raise ValueError(f"{relpath}: anomaly_score has NaN or infinite values; NAB needs a score on every row")
        weight, window = _row_weights(len(ts), _window_bounds(ts, windows[relpath], relpath), cost)
        keep = slice(probation_length(len(ts), probation_fraction), None)
        window = window[keep]
        # Windows wholly inside probation vanish from the score, as in NAB (its labeler also drops them).
        local_ids, window = np.unique(window, return_inverse=True)
        has_outside = local_ids.size > 0 and local_ids[0] == -1
        window = window - int(has_outside)  # -1 stays -1 for rows outside windows
        n_here = local_ids.size - int(has_outside)
        parts["window"].append(np.where(window >= 0, window + len(window_file), -1))
        window_file.extend([f] * n_here)
        parts["score"].append(score[keep])
        parts["weight"].append(weight[keep])
        parts["file"].append(np.full(len(window), f))
    return _Rows(
        names=names,
        window_file=np.asarray(window_file, dtype=np.int64),
        n_windows=len(window_file),
        **{k: np.concatenate(v) for k, v in parts.items()},
    )


def _sweep(
    score: np.ndarray, weight: np.ndarray, window: np.ndarray, fn_weight: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Total score at every candidate threshold, highest threshold first, like NAB's calcScoreByThreshold.

    Returns (thresholds, totals, tp, fp): the first entry is NAB's 1.1 (nothing detected), then one entry
    per distinct score, counting every row with ``score >= threshold`` as detected.
    """
    order = np.argsort(-score, kind="stable")
    s, w, win = score[order], weight[order], window[order]
    inside = win >= 0
    n_windows = np.unique(win[inside]).size
    # A window's contribution is the best (earliest) detected row so far, −fn until one is detected; walking
    # down the sorted scores, its running maximum rises, and each rise is a step of the corpus total.
    gain = np.where(inside, 0.0, w)
    if inside.any():
        frame = pd.DataFrame({"window": win[inside], "weight": w[inside]})
        best = frame.groupby("window")["weight"].cummax()
        before = best.groupby(frame["window"]).shift(1).fillna(-fn_weight)
        gain[inside] = (best - before).to_numpy()
    totals = -fn_weight * n_windows + np.cumsum(gain)
    tp = np.cumsum(inside)
    fp = np.cumsum(~inside)
    last_of_value = np.flatnonzero(np.append(s[1:] != s[:-1], True)) if s.size else np.zeros(0, dtype=int)
    return (
        np.concatenate([[_NO_DETECTION], s[last_of_value]]),
        np.concatenate([[-fn_weight * n_windows], totals[last_of_value]]),
        np.concatenate([[0], tp[last_of_value]]),
        np.concatenate([[0], fp[last_of_value]]),
    )


def _best_per_window(rows: _Rows, detected: np.ndarray, fn_weight: float) -> np.ndarray:
    """Each window's score: the weight of its earliest detection, or −fn when it has none."""
    best = np.full(rows.n_windows, -np.inf)
    hit = detected & (rows.window >= 0)
    np.maximum.at(best, rows.window[hit], rows.weight[hit])
    return np.where(np.isfinite(best), best, -fn_weight)


def _first_row_weight_per_window(rows: _Rows) -> np.ndarray:
    """Weight of each window's first scorable row: what a detection there, the perfect detector's, earns."""
    best = np.full(rows.n_windows, -np.inf)
    inside = rows.window >= 0
    np.maximum.at(best, rows.window[inside], rows.weight[inside])
    return best
