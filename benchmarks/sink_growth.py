"""Whether a sink's write slows as the day fills: a day of ticks into one partition, in one run.

    python benchmarks/sink_growth.py [--series 2000] [--ticks 288] [--horizon 24] [--step-minutes 5]
                                     [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/test]
                                     [--sinks parquet sqlite postgresql]

Each tick writes one point's outputs for every series (`horizon` forecast rows and one anomaly row a
series), as the daemon does, at consecutive steps of one UTC day, so every write lands in the same
day's Parquet partition. Prints, per sink, the mean write time of the first and the last ten ticks,
the slowest write, the total, the rows read back and (Parquet) the part files left. SQLite (and
PostgreSQL with --pg-url: tables named growth_*_<pid>, dropped afterwards) append to an indexed
table: the baseline a write that does not slow looks like.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forecastd.sinks.parquet import ParquetSink  # noqa: E402
from forecastd.sinks.sql import SqlSink  # noqa: E402


def tick(ids: np.ndarray, ts: pd.Timestamp, horizon: int, step: pd.Timedelta, rng) -> tuple[pd.DataFrame, pd.DataFrame]:
    n = len(ids)
    steps = np.tile(np.arange(1, horizon + 1), n)
    mean = rng.normal(size=n * horizon)
    forecasts = pd.DataFrame({
        "series_id": np.repeat(ids, horizon), "issued_at": pd.DatetimeIndex([ts] * (n * horizon)).as_unit("ns"),
        "step": steps.astype("int64"), "target_ts": pd.DatetimeIndex(ts + steps * step).as_unit("ns"),
        "mean": mean, "lower": mean - 1.0, "upper": mean + 1.0, "model_version": np.int64(1),
    })
    value = rng.normal(size=n)
    anomalies = pd.DataFrame({
        "series_id": ids, "ts": pd.DatetimeIndex([ts] * n).as_unit("ns"), "value": value, "expected": 0.0,
        "lower": -2.0, "upper": 2.0, "score": 0.0, "is_anomaly": False, "model_version": np.int64(1),
    })
    return forecasts, anomalies


def run(name: str, sink, args, parquet_dir: str | None = None) -> None:
    ids = np.array([f"s{i}" for i in range(args.series)], dtype=object)
    step = pd.Timedelta(minutes=args.step_minutes)
    day = pd.Timestamp("2024-03-01", tz="UTC")
    rng = np.random.default_rng(0)
    times = []
    for i in range(args.ticks):
        forecasts, anomalies = tick(ids, day + i * step, args.horizon, step, rng)
        start = time.perf_counter()
        sink.write(forecasts, anomalies)
        times.append(time.perf_counter() - start)
    rows = len(sink.read("forecasts")) + len(sink.read("anomalies"))
    files = f"{len(glob.glob(f'{parquet_dir}/*/*/*.parquet')):>6}" if parquet_dir else f"{'-':>6}"
    k = min(10, len(times))
    print(f"{name:<12}{np.mean(times[:k]) * 1e3:>12.0f}{np.mean(times[-k:]) * 1e3:>12.0f}{max(times) * 1e3:>10.0f}"
          f"{sum(times):>10.1f}{rows:>12}{files}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=2000)
    ap.add_argument("--ticks", type=int, default=288)
    ap.add_argument("--horizon", type=int, default=24)
    ap.add_argument("--step-minutes", type=int, default=5)
    ap.add_argument("--pg-url", default=None)
    ap.add_argument("--sinks", nargs="+", default=["parquet", "sqlite", "postgresql"],
                    choices=["parquet", "sqlite", "postgresql"])
    args = ap.parse_args()
    if args.ticks * args.step_minutes > 24 * 60:
        ap.error("--ticks x --step-minutes must fit in one day (one partition)")
    print(f"{args.ticks} ticks of {args.series} series, H={args.horizon}: "
          f"{args.ticks * args.series * (args.horizon + 1):,} rows into one day")
    print(f"{'sink':<12}{'first 10 ms':>12}{'last 10 ms':>12}{'max ms':>10}{'total s':>10}{'rows':>12}{'files':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        if "parquet" in args.sinks:
            run("parquet", ParquetSink(f"{tmp}/out"), args, f"{tmp}/out")
        if "sqlite" in args.sinks:
            run("sqlite", SqlSink(f"sqlite:///{tmp}/out.sqlite"), args)
    if args.pg_url and "postgresql" in args.sinks:
        pid = os.getpid()
        sink = SqlSink(args.pg_url, forecasts_table=f"growth_forecasts_{pid}", anomalies_table=f"growth_anomalies_{pid}")
        try:
            run("postgresql", sink, args)
        finally:
            from sqlalchemy import create_engine, text
            engine = create_engine(args.pg_url)
            with engine.begin() as conn:
                for t in ("forecasts", "anomalies"):
                    conn.execute(text(f"DROP TABLE IF EXISTS growth_{t}_{pid}"))
            engine.dispose()


if __name__ == "__main__":
    main()
