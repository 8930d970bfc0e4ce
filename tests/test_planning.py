"""The vectorised planner gives the segments the scalar reference gives, series by series.

The reference is the per-series loop run_once and backfill used before planning was vectorised:
`series_steps`, then `state.plan` (the reset rules) or the warm-up rule, per series.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from forecastd.frames import Grid
from forecastd.planning import START_POINTS, Plan, plan_backfill, plan_tick
from forecastd.state import Segment, plan
from forecastd.windowing import robust_scale, series_steps

GRID = Grid("1h")


def _reference_warm(sid, steps, values, anchor, warmup, max_gap, restarting=False) -> list[Segment]:
    """A series without state from `anchor`, warmed on the rows within `warmup` steps before it and credited
    with that warm-up, unless it is `restarting` (back from a silence longer than max_gap)."""
    keep = steps >= anchor - warmup
    steps, values = steps[keep], values[keep]
    if steps.size == 0:
        return []
    segs = plan(sid, steps, values, None, max_gap)
    first = segs[0]
    credited = max(0, warmup - (anchor - first.start)) if first.start <= anchor and not restarting else 0
    segs[0] = Segment(sid, True, first.start, first.values, age=credited)
    return segs


def _reference_scale(model_scales, sid, values, carried_ids, carried_scale) -> float:
    if sid in model_scales:
        return float(model_scales[sid])
    if sid in carried_ids:
        return float(carried_scale[carried_ids.index(sid)])
    return robust_scale(values)


def _reference_start(sid, steps, values, model_scales) -> int | None:
    """A learnt series starts at its first row, any other at its START_POINTS-th observed point (None: waits)."""
    if sid in model_scales:
        return int(steps[0])
    observed = steps[np.isfinite(values)]
    return int(observed[START_POINTS - 1]) if observed.size >= START_POINTS else None


def reference_tick(frame, carried_ids, carried_step, carried_scale, model_scales, prior, warmup, max_gap,
                   waited=()) -> Plan:
    segments, fresh_scale = [], {}
    pos = {s: i for i, s in enumerate(carried_ids)}
    for sid, (steps, values) in series_steps(frame, GRID).items():
        if sid in pos:
            segs = plan(sid, steps, values, int(carried_step[pos[sid]]), max_gap)
            if any(g.fresh for g in segs):
                fresh_scale[sid] = _reference_scale(model_scales, sid, values, carried_ids, carried_scale)
        else:
            restarting = False
            if sid in prior:
                after = steps[steps > prior[sid]]
                if after.size == 0:
                    continue
                anchor = int(after[0])
                restarting = anchor - prior[sid] - 1 > max_gap  # it would have restarted in its old stream
            else:
                start = _reference_start(sid, steps, values, model_scales)
                if start is None:
                    continue  # too few points to measure its unit: it waits
                # startable only after the stream's newest step: from its start point
                newest = max([int(w) for w in carried_step] + [-1])
                anchor = start if (newest >= 0 and start > newest) or sid in waited else int(steps[-1])
            segs = _reference_warm(sid, steps, values, anchor, warmup, max_gap, restarting)
            kept = (steps >= anchor - warmup) & (steps <= anchor)
            fresh_scale[sid] = _reference_scale(model_scales, sid, values[kept], [], [])
        segments.extend(segs)
    return Plan(segments, fresh_scale, len({g.series_id for g in segments}),
                int(sum(np.isfinite(g.values).sum() for g in segments)))


def reference_backfill(frame, lo, model_scales, warmup, max_gap) -> Plan:
    segments, fresh_scale = [], {}
    for sid, (steps, values) in series_steps(frame, GRID).items():
        start = _reference_start(sid, steps, values, model_scales)
        if start is None:
            continue
        anchor = max(lo, start)
        segs = _reference_warm(sid, steps, values, anchor, warmup, max_gap)
        if segs:
            kept = (steps >= anchor - warmup) & (steps <= anchor)
            fresh_scale[sid] = _reference_scale(model_scales, sid, values[kept], [], [])
            segments.extend(segs)
    return Plan(segments, fresh_scale, len(fresh_scale), int(sum(np.isfinite(g.values).sum() for g in segments)))


def assert_same_plan(got: Plan, want: Plan) -> None:
    assert [(g.series_id, g.fresh, g.start, g.age, len(g.values)) for g in got.segments] == \
        [(g.series_id, g.fresh, g.start, g.age, len(g.values)) for g in want.segments]
    for a, b in zip(got.segments, want.segments):
        np.testing.assert_array_equal(a.values, b.values)  # NaN where missing, in both
    assert got.fresh_scale.keys() == want.fresh_scale.keys()
    for sid, s in want.fresh_scale.items():
        assert got.fresh_scale[sid] == s, sid
    assert (got.series, got.points) == (want.series, want.points)


def _frame(rng: np.random.Generator, ids: list[str], lo: int, hi: int) -> pd.DataFrame:
    """Random rows per series on [lo, hi): sparse or dense, with gaps of every size and NaN values."""
    parts = []
    for sid in ids:
        density = rng.choice([0.05, 0.3, 0.9, 1.0])
        steps = np.flatnonzero(rng.random(hi - lo) < density) + lo
        if rng.random() < 0.3:  # a long outage in the middle
            cut = rng.integers(lo, hi)
            steps = steps[(steps < cut) | (steps > cut + rng.integers(5, 40))]
        values = rng.normal(size=steps.size).cumsum() + 10
        values[rng.random(steps.size) < 0.1] = np.nan
        parts.append(pd.DataFrame({"series_id": sid, "ts": GRID.ts(steps), "value": values}))
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["series_id", "ts", "value"])
    return frame.sort_values(["series_id", "ts"], kind="stable", ignore_index=True)


@pytest.mark.parametrize("seed", range(40))
def test_tick_plan_matches_the_reference(seed):
    rng = np.random.default_rng(seed)
    warmup, max_gap = int(rng.integers(0, 30)), int(rng.integers(0, 15))
    ids = [f"s{i:03d}" for i in range(int(rng.integers(1, 40)))]
    carried = [s for s in ids if rng.random() < 0.6] + ["silent-1", "silent-2"]  # some without new rows
    carried_step = rng.integers(-1, 120, size=len(carried))
    carried_scale = rng.random(len(carried)) + 0.1
    new = [s for s in ids if s not in carried]
    prior = {s: int(rng.integers(60, 160)) for s in new if rng.random() < 0.5}
    model_scales = {s: float(rng.random() + 0.5) for s in ids if rng.random() < 0.5}
    frame = _frame(rng, ids, 0, 200)
    # As validate() leaves it: carried series have no row at or before their watermark.
    wm = frame["series_id"].map(dict(zip(carried, carried_step))).to_numpy(dtype=float)
    frame = frame[~(GRID.index(frame["ts"]) <= wm)].reset_index(drop=True)
    args = (carried, carried_step, carried_scale, model_scales, prior, warmup, max_gap)
    waited = [s for s in new if s not in prior and rng.random() < 0.5]  # series earlier ticks kept waiting
    assert_same_plan(plan_tick(frame, GRID, *args, waited=waited), reference_tick(frame, *args, waited=waited))


@pytest.mark.parametrize("seed", range(20))
def test_backfill_plan_matches_the_reference(seed):
    rng = np.random.default_rng(1000 + seed)
    warmup, max_gap = int(rng.integers(0, 30)), int(rng.integers(0, 15))
    ids = [f"s{i:03d}" for i in range(int(rng.integers(1, 40)))]
    model_scales = {s: float(rng.random() + 0.5) for s in ids if rng.random() < 0.5}
    frame = _frame(rng, ids, 0, 200)
    lo = int(rng.integers(0, 220))
    args = (lo, model_scales, warmup, max_gap)
    assert_same_plan(plan_backfill(frame, GRID, *args), reference_backfill(frame, *args))


def test_unsorted_frames_plan_like_sorted_ones():
    rng = np.random.default_rng(7)
    frame = _frame(rng, ["b", "a", "c"], 0, 100)
    frame = frame[(frame["series_id"] != "a") | (frame["ts"] > GRID.ts(np.array([3]))[0])]
    shuffled = frame.sample(frac=1.0, random_state=0)
    args = (["a"], np.array([3]), np.array([1.0]), {}, {"b": 50}, 10, 4)
    assert_same_plan(plan_tick(shuffled, GRID, *args), reference_tick(frame, *args))


def test_empty_frame_plans_nothing():
    empty = pd.DataFrame({"series_id": pd.Series([], dtype=object), "ts": pd.Series([], dtype="datetime64[ns, UTC]"),
                          "value": pd.Series([], dtype=float)})
    assert plan_tick(empty, GRID, ["a"], np.array([5]), np.array([1.0]), {}, {}, 10, 4).segments == []
    assert plan_backfill(empty, GRID, 0, {}, 10, 4).segments == []


def test_rows_at_or_before_the_watermark_are_refused_like_the_reference():
    frame = pd.DataFrame({"series_id": ["a", "a"], "ts": GRID.ts(np.array([5, 6])), "value": [1.0, 2.0]})
    args = (["a"], np.array([5]), np.array([1.0]), {}, {}, 10, 4)
    with pytest.raises(ValueError):
        reference_tick(frame, *args)
    with pytest.raises(ValueError, match="watermark"):
        plan_tick(frame, GRID, *args)


def test_a_new_series_waits_for_enough_points_to_measure_its_unit():
    ids = ["old", "new"]
    frame = pd.DataFrame({"series_id": ["old"] * 3 + ["new"] * (START_POINTS - 1),
                          "ts": GRID.ts(np.r_[100:103, 80:80 + START_POINTS - 1]), "value": 1.0})
    plan = plan_tick(frame, GRID, ["old"], np.array([99]), np.array([1.0]), {}, {}, 10, 5)
    assert {g.series_id for g in plan.segments} == {"old"} and plan.waiting == ["new"]
    more = pd.concat([frame, pd.DataFrame({"series_id": ["new"], "ts": GRID.ts(np.array([80 + START_POINTS - 1])),
                                           "value": 2.0})])
    plan = plan_tick(more.sort_values(["series_id", "ts"]), GRID, ["old"], np.array([99]), np.array([1.0]), {}, {}, 10, 5)
    assert {g.series_id for g in plan.segments} == set(ids) and plan.waiting == []
    # A unit the model learnt needs no measuring: such a series starts at once.
    plan = plan_tick(frame, GRID, ["old"], np.array([99]), np.array([1.0]), {"new": 3.0}, {}, 10, 5)
    assert plan.fresh_scale["new"] == 3.0 and plan.waiting == []


def test_a_resumed_series_with_nothing_new_waits():
    frame = pd.DataFrame({"series_id": ["n"] * 3, "ts": GRID.ts(np.array([1, 2, 3])), "value": [1.0, 2.0, 3.0]})
    assert plan_tick(frame, GRID, [], np.zeros(0, dtype=np.int64), np.zeros(0), {}, {"n": 3}, 10, 4).segments == []
