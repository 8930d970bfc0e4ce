"""Rebuild forecastd's sample data: small synthetic series with known anomalies, gaps and NaNs.

    python sample_data/generate.py            # rewrites the files beside this script
    python sample_data/generate.py --out DIR  # writes them into DIR instead

Everything comes from fixed seeds, so a rebuild gives the same frames (and, with the same numpy, pandas,
pyarrow and SQLite versions, the same bytes). Each series draws from its own generator, seeded by
(SEED, series number), so changing one series never shifts the random numbers of another.

Values are rounded to a realistic instrument precision: it keeps the files small and makes a rebuild on
another platform (where a transcendental function may differ in the last bit) land on the same numbers.

Files written (see README.md beside this script for what each series is):
- series.parquet        hourly series, long layout `series_id, ts, value` (ts UTC, ns)
- airline.parquet       the monthly `airline` series, same layout (its own file: one grid per dataset)
- sensors_wide.parquet  the four sensors, wide layout `ts, <one column per sensor>`
- series.sqlite         table `readings` (the hourly series) and table `airline`, ts as 'YYYY-MM-DD HH:MM:SS'
- anomalies.json        the injected anomalies: series_id, kind, start, end (inclusive), magnitude, note
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "SEED",
    "START",
    "END",
    "SENSORS",
    "HOURLY_SERIES",
    "AIRLINE_ID",
    "GAP",
    "NAN_TIMESTAMPS",
    "ANOMALIES",
    "Anomaly",
    "build",
    "write",
    "main",
]

SEED = 20240331
# 90 whole days of hourly points (2,160 each), all hourly series ending on the same stamp.
START = pd.Timestamp("2024-01-02 00:00", tz="UTC")
END = pd.Timestamp("2024-03-31 23:00", tz="UTC")
SENSORS = ("sensor-temp-1", "sensor-temp-2", "sensor-load-1", "sensor-flow-1")
HOURLY_SERIES = (*SENSORS, "price-1", "sine")
AIRLINE_ID = "airline"

# Data-quality defects (not anomalies: a detector should not be asked to flag them).
# Ten hourly rows of sensor-flow-1 are absent, inclusive bounds.
GAP = ("sensor-flow-1", pd.Timestamp("2024-02-20 06:00", tz="UTC"), pd.Timestamp("2024-02-20 15:00", tz="UTC"))
# Rows present with a NaN value in sensor-temp-1 (SQLite stores them as NULL).
NAN_TIMESTAMPS = (
    "sensor-temp-1",
    tuple(
        pd.Timestamp(t, tz="UTC")
        for t in ("2024-01-20 05:00", "2024-02-03 17:00", "2024-02-27 08:00", "2024-03-10 02:00", "2024-03-22 19:00")
    ),
)


@dataclass(frozen=True)
class Anomaly:
    """One injected anomaly; `start`..`end` are inclusive UTC stamps of the affected points."""

    series_id: str
    kind: str  # "spike" (up or down, a point or a few), "level_shift", "stuck" (flat-lined sensor)
    start: str
    end: str
    magnitude: float | None  # added to the clean value; None for "stuck"
    note: str


# Placed mostly in the last third (where a model trained on the first part would be tested), none
# within a day of the gap or of another anomaly, so each stands on its own.
ANOMALIES = (
    Anomaly("sensor-temp-1", "spike", "2024-02-14 13:00", "2024-02-14 13:00", 9.0,
            "single-point upward spike of +9 degC"),
    Anomaly("sensor-temp-1", "spike", "2024-03-17 03:00", "2024-03-17 04:00", -7.0,
            "two-point downward spike of -7 degC"),
    Anomaly("sensor-temp-2", "stuck", "2024-03-05 06:00", "2024-03-05 19:00", None,
            "sensor stuck: 14 hours repeating the 05:00 reading exactly, through the daily rise"),
    Anomaly("sensor-temp-2", "spike", "2024-03-25 21:00", "2024-03-25 21:00", -10.0,
            "single-point downward spike of -10 degC"),
    Anomaly("sensor-load-1", "spike", "2024-02-08 18:00", "2024-02-08 18:00", 30.0,
            "single-point upward spike of +30 (load units)"),
    Anomaly("sensor-load-1", "level_shift", "2024-03-12 00:00", "2024-03-12 00:00", 14.0,
            "level rises by 14 at start and stays there to the end of the series; only the onset is the anomaly"),
    Anomaly("sensor-flow-1", "spike", "2024-03-26 11:00", "2024-03-26 11:00", -30.0,
            "single-point dropout: flow falls by 30 to near zero"),
)


def _hours() -> pd.DatetimeIndex:
    return pd.date_range(START, END, freq="h").as_unit("ns")


def _ar1(rng: np.random.Generator, n: int, phi: float, sigma: float) -> np.ndarray:
    """AR(1) noise with innovation std `sigma`, started from its stationary distribution."""
    eps = rng.normal(0.0, sigma, n)
    out = np.empty(n)
    out[0] = eps[0] / np.sqrt(1.0 - phi * phi)
    for i in range(1, n):
        out[i] = phi * out[i - 1] + eps[i]
    return out


def _wander(rng: np.random.Generator, n: int, sigma: float, span: int = 240) -> np.ndarray:
    """A slow random walk, smoothed by an EWMA so the drift bends over days rather than hours."""
    walk = np.cumsum(rng.normal(0.0, sigma, n))
    alpha = 2.0 / (span + 1.0)
    out = np.empty(n)
    out[0] = walk[0]
    for i in range(1, n):
        out[i] = out[i - 1] + alpha * (walk[i] - out[i - 1])
    return out - out[0]


def _sensor(k: int, ts: pd.DatetimeIndex) -> np.ndarray:
    """Clean sensor k: level + drift + daily and weekly cycles + AR(1) noise, before any injection."""
    rng = np.random.default_rng([SEED, k])
    n = len(ts)
    t = np.arange(n, dtype=float)
    hour = ts.hour.to_numpy() + ts.minute.to_numpy() / 60.0
    dow = ts.day_of_week.to_numpy()  # Monday = 0
    day = 2 * np.pi * hour / 24.0
    week = 2 * np.pi * (dow + hour / 24.0) / 7.0
    # Drift is large on purpose: the last fifth of each series sits well away from the first four fifths'
    # mean, the situation (DESIGN.md) where a model fed raw levels forecasts the wrong level.
    if k == 0:  # temp-1: warming spring, afternoon peak near 15:00
        return (18.0 + 5.0 * t / n + _wander(rng, n, 0.05)
                + 3.0 * np.cos(day - 2 * np.pi * 15 / 24) + 0.6 * np.cos(2 * day - 1.0)
                + 0.8 * np.cos(week - 0.5) + _ar1(rng, n, 0.8, 0.25))
    if k == 1:  # temp-2: a cooler room with a later, smaller cycle, its level sagging as a cooler takes over
        return (16.0 - 4.0 * t / n + _wander(rng, n, 0.05)
                + 2.0 * np.cos(day - 2 * np.pi * 17 / 24) + 0.4 * np.cos(week - 2.0) + _ar1(rng, n, 0.7, 0.2))
    if k == 2:  # load-1: business hours on weekdays, falling base load
        weekday = (dow < 5).astype(float)
        office = np.clip(np.cos(day - 2 * np.pi * 13 / 24), 0.0, None) ** 1.5
        return (60.0 - 12.0 * t / n + _wander(rng, n, 0.08)
                + 18.0 * office * (0.35 + 0.65 * weekday) + 4.0 * np.cos(day - 2 * np.pi * 19 / 24)
                + _ar1(rng, n, 0.6, 1.2))
    # flow-1: two daily peaks (morning and evening demand), demand falling off, level random-walks
    return (44.0 - 8.0 * t / n + _wander(rng, n, 0.15) + 6.0 * np.cos(2 * day - 2 * np.pi * 8 / 12)
            + 3.0 * np.cos(day - 2 * np.pi * 7 / 24) + 1.5 * np.cos(week) + _ar1(rng, n, 0.85, 0.6))


def _inject(values: dict[str, np.ndarray], ts: pd.DatetimeIndex) -> None:
    """Apply ANOMALIES in place: magnitudes add to the clean value; a stuck sensor repeats a reading."""
    for a in ANOMALIES:
        span = (ts >= pd.Timestamp(a.start, tz="UTC")) & (ts <= pd.Timestamp(a.end, tz="UTC"))
        first = int(np.argmax(span))
        v = values[a.series_id]
        if a.kind == "stuck":
            v[span] = v[first - 1]
        elif a.kind == "level_shift":
            v[first:] += a.magnitude
        else:
            v[span] += a.magnitude


def _price(ts: pd.DatetimeIndex) -> np.ndarray:
    """Geometric random walk; GARCH(1,1) variance whose baseline switches between calm and turbulent regimes.

    Student-t shocks (5 degrees of freedom) give the fat tails prices have; exp keeps the price positive.
    """
    rng = np.random.default_rng([SEED, 10])
    n = len(ts)
    # Per-hour variance baselines; the regime flips by a two-state Markov chain (calm lasts ~ 2 weeks, a
    # burst ~ 2 days), and GARCH memory makes volatility cluster within each regime.
    omega = np.array([0.003**2, 0.012**2]) * (1 - 0.05 - 0.90)
    stay = np.array([1 - 1 / 336, 1 - 1 / 48])
    z = rng.standard_t(5, n) / np.sqrt(5 / 3)
    u = rng.random(n)
    regime, var, r_prev = 0, 0.003**2, 0.0
    r = np.empty(n)
    for i in range(n):
        if u[i] > stay[regime]:
            regime = 1 - regime
        var = omega[regime] + 0.05 * r_prev**2 + 0.90 * var
        r[i] = r_prev = np.sqrt(var) * z[i]
    return 100.0 * np.exp(np.cumsum(r))


def _sine(ts: pd.DatetimeIndex) -> np.ndarray:
    rng = np.random.default_rng([SEED, 11])
    hour = ts.hour.to_numpy()
    return np.sin(2 * np.pi * hour / 24.0) + rng.normal(0.0, 0.05, len(ts))


def _airline() -> pd.DataFrame:
    """144 monthly passenger counts from 1949-01: exponential trend x yearly seasonal factors x noise.

    Multiplicative like the Box-Jenkins series (the seasonal swing grows with the level), but with its
    own factors and noise, not a copy of it.
    """
    rng = np.random.default_rng([SEED, 12])
    ts = pd.date_range("1949-01-01", periods=144, freq="MS", tz="UTC").as_unit("ns")
    t = np.arange(144, dtype=float)
    # Summer holiday peak, November trough.
    season = np.array([0.92, 0.89, 1.02, 0.99, 0.98, 1.10, 1.22, 1.21, 1.05, 0.93, 0.81, 0.90])
    season = season / season.mean()
    # The swing deepens a little over time, as it does in the classic series.
    swing = (season[ts.month.to_numpy() - 1] - 1.0) * (1.0 + 0.3 * t / 143) + 1.0
    trend = 118.0 * np.exp(0.0096 * t)
    noise = np.exp(_ar1(rng, 144, 0.5, 0.018))
    value = np.round(trend * swing * noise)
    return pd.DataFrame({"series_id": AIRLINE_ID, "ts": ts, "value": value.astype("float64")})


def build() -> dict[str, pd.DataFrame]:
    """All sample frames: 'series' (hourly, long), 'airline' (monthly, long), 'sensors_wide' (wide)."""
    ts = _hours()
    sensors = {sid: _sensor(k, ts) for k, sid in enumerate(SENSORS)}
    _inject(sensors, ts)
    values = {sid: np.round(v, 3) for sid, v in sensors.items()}  # a 1/1000 instrument resolution
    values["price-1"] = np.round(_price(ts), 4)
    values["sine"] = np.round(_sine(ts), 4)

    nan_sid, nan_ts = NAN_TIMESTAMPS
    values[nan_sid][ts.isin(pd.DatetimeIndex(nan_ts))] = np.nan

    gap_sid, gap_start, gap_end = GAP
    present = {sid: np.ones(len(ts), dtype=bool) for sid in HOURLY_SERIES}
    present[gap_sid] = (ts < gap_start) | (ts > gap_end)

    series = pd.concat(
        [
            pd.DataFrame({"series_id": sid, "ts": ts[present[sid]], "value": values[sid][present[sid]]})
            for sid in sorted(HOURLY_SERIES)
        ],
        ignore_index=True,
    )
    # The wide layout cannot leave a row out for one column only: there the gap reads as NaN.
    wide = pd.DataFrame({"ts": ts})
    for sid in SENSORS:
        wide[sid] = np.where(present[sid], values[sid], np.nan)
    return {"series": series, "airline": _airline(), "sensors_wide": wide}


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    # Explicit ns/UTC and string types, whatever resolution or string dtype pandas chose in memory.
    fields = []
    for f in table.schema:
        if pa.types.is_timestamp(f.type):
            fields.append(pa.field(f.name, pa.timestamp("ns", tz="UTC")))
        elif pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
            fields.append(pa.field(f.name, pa.string()))
        else:
            fields.append(f)
    table = table.cast(pa.schema(fields, metadata=table.schema.metadata))
    pq.write_table(table, path, compression="zstd")


def _sql_rows(frame: pd.DataFrame) -> list[tuple[str, str, float | None]]:
    stamps = frame["ts"].dt.strftime("%Y-%m-%d %H:%M:%S")
    # SQLite has no NaN: a missing reading is NULL, which is what a real sensor table holds.
    values = [None if np.isnan(v) else float(v) for v in frame["value"].to_numpy()]
    return list(zip(frame["series_id"].astype(str), stamps, values, strict=True))


def _write_sqlite(frames: dict[str, pd.DataFrame], path: Path) -> None:
    path.unlink(missing_ok=True)  # rebuilt from scratch, never appended to
    con = sqlite3.connect(path)
    try:
        for table in ("readings", "airline"):
            # No key and no index: neither unique (a test may append duplicate rows to a copy to exercise the
            # duplicate rule) nor needed at this size, and an index would double the file.
            con.execute(f"CREATE TABLE {table} (series_id TEXT NOT NULL, ts TEXT NOT NULL, value REAL)")
        con.executemany("INSERT INTO readings VALUES (?, ?, ?)", _sql_rows(frames["series"]))
        con.executemany("INSERT INTO airline VALUES (?, ?, ?)", _sql_rows(frames["airline"]))
        con.commit()
        con.execute("VACUUM")
    finally:
        con.close()


def write(out: str | Path) -> dict[str, Path]:
    """Build every frame and write the sample files into `out`; returns the paths by name."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frames = build()
    paths = {
        "series": out / "series.parquet",
        "airline": out / "airline.parquet",
        "sensors_wide": out / "sensors_wide.parquet",
        "sqlite": out / "series.sqlite",
        "anomalies": out / "anomalies.json",
    }
    for name in ("series", "airline", "sensors_wide"):
        _write_parquet(frames[name], paths[name])
    _write_sqlite(frames, paths["sqlite"])
    records = [
        {**asdict(a), "start": f"{a.start.replace(' ', 'T')}:00Z", "end": f"{a.end.replace(' ', 'T')}:00Z"}
        for a in ANOMALIES
    ]
    paths["anomalies"].write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="directory to write into (default: beside this script)")
    args = parser.parse_args(argv)
    for name, path in write(args.out).items():
        print(f"{name:13s} {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
