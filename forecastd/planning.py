"""Which segments a tick or a backfill processes, planned for all series at once.

The rules are those of `forecastd.state.plan` (continue the carried state across a gap of at most
`max_gap` steps, otherwise start fresh; a silence of more than `max_gap` steps inside the new points
restarts the series too) and the pipeline's warm-up rule (a series without a carried state starts fresh
at its first point at or after `anchor - warmup` and is credited with the warm-up it got). `plan` is
the scalar reference, one series at a time; this module gives the same segments, but its work is a
handful of numpy passes over every row instead of a Python loop per series: at 10,000 series the loop
was the largest stage of a tick. tests/test_planning.py holds the two to each other on random inputs.

Segment values are views into one buffer that holds every segment's dense values back to back.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from forecastd.frames import Grid
from forecastd.state import Segment
from forecastd.windowing import robust_scale

__all__ = ["Plan", "plan_tick", "plan_backfill", "START_POINTS"]

_NONE = np.iinfo(np.int64).min  # no prior watermark; only ever compared, never offset

# Observed points a series the model has never seen needs before a tick starts it: its unit of change
# (`robust_scale`) is measured on them and kept until a retrain. Started at its first point, a new
# sensor kept a unit measured on one value (a thousandth of its level) and every band written for it
# was some 50x too narrow, with 1 % coverage where 95 % was asked for.
START_POINTS = 24


@dataclass
class Plan:
    segments: list[Segment]  # per series in id order, each series' segments in time order
    fresh_scale: dict[str, float]  # the unit of every series that starts (or restarts) fresh
    series: int  # series with at least one segment
    points: int  # observed values across the segments
    waiting: list[str] = field(default_factory=list)  # new series with fewer than START_POINTS points
    first_steps: dict[str, int] = field(default_factory=dict)  # tick plans: the step of each waiting one's first row
    # tick plans: each waiting one's observed points and rows
    observed: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Rows:
    """The frame's rows grouped by series: G groups in id order, rows in step order within each."""

    ids: np.ndarray  # G str
    first: np.ndarray  # G int64: row offset of each group; first[g + 1] (or N) ends it
    group: np.ndarray  # N int64
    steps: np.ndarray  # N int64
    values: np.ndarray  # N float64

    @property
    def last(self) -> np.ndarray:  # G int64: row index of each group's last row
        return np.r_[self.first[1:], len(self.steps)] - 1


def _rows(frame: pd.DataFrame, grid: Grid) -> _Rows:
    steps = grid.index(frame["ts"]) if len(frame) else np.zeros(0, dtype=np.int64)
    codes, ids = pd.factorize(frame["series_id"].to_numpy(dtype=object), sort=True)
    codes = codes.astype(np.int64)
    values = frame["value"].to_numpy(dtype=np.float64)
    # validate() hands over frames already sorted by (series_id, ts); sort only when that is not so.
    if len(codes) > 1 and not ((np.diff(codes) > 0) | ((np.diff(codes) == 0) & (np.diff(steps) >= 0))).all():
        order = np.lexsort((steps, codes))
        codes, steps, values = codes[order], steps[order], values[order]
    first = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if len(codes) else np.zeros(0, dtype=np.int64)
    return _Rows(np.asarray([str(s) for s in ids], dtype=object), first, codes, steps, values)


def plan_tick(
    frame: pd.DataFrame,
    grid: Grid,
    carried_ids: Sequence[str],
    carried_step: np.ndarray,
    carried_scale: np.ndarray,
    model_scales: Mapping[str, float],
    prior: Mapping[str, int],
    warmup: int,
    max_gap: int,
    waited: Collection[str] = (),
) -> Plan:
    """Segments for a tick over `frame` (validated: no row at or before a carried watermark).

    carried_*: the stream state's series, their watermarks (grid steps, -1 for none) and units.
    prior: watermarks from another model version's stream for series this one carries no state for;
    such a series resumes after its prior watermark, any other new series at its latest point.
    waited: new series that earlier ticks kept waiting for START_POINTS points; they start at their start
    point once they can, even where that lies before the newest step processed (a retrain learnt one).
    """
    rows = _rows(frame, grid)
    G = len(rows.ids)
    if G == 0:
        return Plan([], {}, 0, 0)
    pos = pd.Index(list(carried_ids), dtype=object).get_indexer(rows.ids)  # G, -1 = no carried state
    known = pos >= 0
    cstep = np.full(G, -1, dtype=np.int64)  # G
    cstep[known] = np.asarray(carried_step, dtype=np.int64)[pos[known]]
    first_step = rows.steps[rows.first]
    late = known & (cstep >= 0) & (first_step <= cstep)
    if late.any():
        sid = rows.ids[np.flatnonzero(late)[0]]
        raise ValueError(f"series {sid!r} has rows at or before its watermark; validate() must reject them first")

    # Anchor of each new series: its first step after the prior watermark; else, for one that could start
    # (`_start_step`) only after the newest step the stream has processed, that start point, so that its
    # outputs begin there whether ticks come every step or every few; else (a first tick, a backlog) its
    # latest step.
    prior_step = (np.array([prior.get(s, _NONE) for s in rows.ids], dtype=np.int64) if prior
                  else np.full(G, _NONE, dtype=np.int64))  # G
    resumed = ~known & (prior_step != _NONE)
    at_or_before = np.add.reduceat((rows.steps <= prior_step[rows.group]).astype(np.int64), rows.first)
    anchor_row = np.where(resumed, rows.first + at_or_before, rows.last)
    planned = known | (anchor_row <= rows.last)  # a resumed series with nothing after its watermark waits
    anchor = rows.steps[np.minimum(anchor_row, rows.last)]  # G, used for new series only
    start, enough, counts = _start_step(rows, model_scales)
    fresh = ~known & ~resumed
    carried_step = np.asarray(carried_step, dtype=np.int64)
    if carried_step.size and carried_step.max() >= 0:
        anchor = np.where(fresh & enough & (start > carried_step.max()), start, anchor)
    if len(waited):
        # A series that waited was new when it came, not a backlog: it starts where a backfill starts it.
        # After a retrain learnt it, that is its first row, before the steps processed while it waited.
        anchor = np.where(fresh & enough & np.isin(rows.ids, list(waited)), start, anchor)
    short = np.flatnonzero(fresh & ~enough)  # a new series without a unit from the model waits until it can
    planned[short] = False                   # be measured
    waiting = rows.ids[short].tolist()

    keep = planned[rows.group] & (known[rows.group] | (rows.steps >= anchor[rows.group] - warmup))
    # A resumed series silent for more than max_gap steps since its prior watermark restarts, as it would
    # have in the stream it left: it warms up again, where one credited with a warm-up wrote outputs from
    # its first point back whenever a model had been promoted during its silence.
    restarting = resumed & (anchor - prior_step - 1 > max_gap)
    plan = _plan(rows, keep, cstep, ~known & ~restarting, anchor, anchor, carried_scale, pos, model_scales, warmup,
                 max_gap)
    plan.waiting = waiting
    plan.first_steps = dict(zip(waiting, first_step[short].tolist()))
    plan.observed = dict(zip(waiting, zip(counts[short].tolist(), (rows.last - rows.first + 1)[short].tolist())))
    return plan


def _start_step(rows: _Rows, model_scales: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each series can start from a fresh state, and whether it can yet: a series the model learnt
    at its first row; any other at its START_POINTS-th observed point, the first whose unit is measured.
    Also each series' observed points."""
    learnt = np.array([s in model_scales for s in rows.ids.tolist()], dtype=bool)  # G
    counts = np.cumsum(np.isfinite(rows.values))
    before = np.r_[0, counts][rows.first]  # G: observed points of the groups before each one
    nth = np.searchsorted(counts, before + START_POINTS)  # G: row of each group's START_POINTS-th point
    enough = learnt | (nth <= rows.last)
    start = np.where(learnt, rows.steps[rows.first], rows.steps[np.minimum(nth, rows.last)])
    return start, enough, counts[rows.last] - before


def plan_backfill(frame: pd.DataFrame, grid: Grid, lo: int, model_scales: Mapping[str, float], warmup: int,
                  max_gap: int) -> Plan:
    """Segments for a backfill from grid step `lo`: every series starts fresh, warmed up towards `lo`."""
    rows = _rows(frame, grid)
    G = len(rows.ids)
    if G == 0:
        return Plan([], {}, 0, 0)
    # As ticks from `lo` on would start each series: at lo, or later at its start point (`_start_step`),
    # where a series that began inside the range gets its first outputs; one that cannot start yet waits.
    start, enough, _ = _start_step(rows, model_scales)
    anchor = np.maximum(lo, start)  # G
    keep = enough[rows.group] & (rows.steps >= anchor[rows.group] - warmup)
    plan = _plan(rows, keep, np.full(G, -1, dtype=np.int64), np.ones(G, dtype=bool), anchor, anchor, np.zeros(0),
                 np.full(G, -1, dtype=np.int64), model_scales, warmup, max_gap)
    plan.waiting = rows.ids[~enough].tolist()
    return plan


def _plan(rows: _Rows, keep: np.ndarray, cstep: np.ndarray, warming: np.ndarray, anchor: np.ndarray,
          scale_until: np.ndarray, carried_scale: np.ndarray, pos: np.ndarray, model_scales: Mapping[str, float],
          warmup: int, max_gap: int) -> Plan:
    """Segments over the kept rows. Per group: cstep the carried watermark (-1: none); warming for a
    series without state, which is credited with the warm-up it got before `anchor`; scale_until the
    last step whose value counts towards a unit computed from the data."""
    group, steps, values = rows.group[keep], rows.steps[keep], rows.values[keep]
    n = len(steps)
    if n == 0:
        return Plan([], {}, 0, 0)
    new_group = np.r_[True, group[1:] != group[:-1]]  # n
    breaks = new_group.copy()
    breaks[1:] |= np.diff(steps) > max_gap + 1  # silence of more than max_gap steps
    head = np.flatnonzero(breaks)  # S: first row of each segment
    tail = np.r_[head[1:], n] - 1
    seg = np.cumsum(breaks) - 1  # n: segment of each row
    g = group[head]  # S
    lo, hi = steps[head], steps[tail]
    opening = new_group[head]  # the series' first segment: the only one that may continue
    cont = opening & (cstep[g] >= 0) & (lo - cstep[g] - 1 <= max_gap)
    start = np.where(cont, cstep[g] + 1, lo)
    age = np.where(opening & warming[g] & (lo <= anchor[g]),
                   np.maximum(0, warmup - (anchor[g] - lo)), 0)
    length = hi - start + 1
    offset = np.r_[0, np.cumsum(length)]
    dense = np.full(int(offset[-1]), np.nan)
    dense[offset[seg] + steps - start[seg]] = values

    ids = rows.ids[g]
    segments = [
        Segment(sid, not c, s, dense[o:o + k], a)
        for sid, c, s, o, k, a in zip(ids.tolist(), cont.tolist(), start.tolist(), offset[:-1].tolist(),
                                      length.tolist(), age.tolist())
    ]

    fresh_groups = np.unique(g[~cont])
    fresh_scale = {}
    for gi, sid in zip(fresh_groups.tolist(), rows.ids[fresh_groups].tolist()):
        if sid in model_scales:
            fresh_scale[sid] = float(model_scales[sid])
        elif pos[gi] >= 0:
            fresh_scale[sid] = float(carried_scale[pos[gi]])
        else:  # unknown to the model and not carried: the unit of its warm-up rows up to where it starts
            # (kept rows only: what a tick and a backfill from the same start both hold)
            lo_row = rows.first[gi]
            hi_row = rows.first[gi + 1] if gi + 1 < len(rows.first) else len(rows.steps)
            window = keep[lo_row:hi_row] & (rows.steps[lo_row:hi_row] <= scale_until[gi])
            fresh_scale[sid] = robust_scale(rows.values[lo_row:hi_row][window])
    return Plan(segments, fresh_scale, int(len(np.unique(g))), int(np.isfinite(dense).sum()))
