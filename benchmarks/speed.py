"""Speed of the carried state against recomputing a window, measured in one run on synthetic series.

    python benchmarks/speed.py [--sizes 1 100 10000 100000] [--e2e 10000] [--e2e-ticks 4] [--device cpu|cuda]
                               [--threads N] [--lookback auto|N] [--backfill 1000] [--system-malloc]
                               [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/test]

Prints:
1. streaming throughput (series-steps/s) of one tick advancing N series by one point with the carried
   state: the bare recurrent step, and the product's whole streaming step (features, model, anomaly
   scoring, output rows); against the same model recomputing a lookback window of 96 for every update
   (what a window-based forecaster does), and the ratio;
2. single-series tick latency p50/p99 in process, and one series of 14,400 steps streamed in one call
   (`run_segments`, as a backfill or the rolling evaluation of benchmarks/peers.py does);
3. training throughput (target-steps/s) of the TBPTT loop;
4. end-to-end `run_once` ticks over N series on Parquet and on SQLite (read, step, write H=24
   forecasts and anomaly rows, checkpoint), each timed (a write may slow as the tables fill), the last
   split by stage; with --pg-url also Parquet in, PostgreSQL out, and PostgreSQL in and out (into tables named speed_*_<pid>,
   dropped afterwards);
5. peak memory and streaming-state bytes per series; threads used.

On a machine shared with other jobs, `--threads 1` gives steadier figures: with 2 threads every op
waits at a barrier for a thread the other jobs may have descheduled.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forecastd.config import AnomalyConfig, ModelConfig, TrainingConfig, load_config  # noqa: E402
from forecastd.frames import Grid  # noqa: E402
from forecastd.models import Forecaster  # noqa: E402
from forecastd.runtime import freeze_heap, single_thread_blas, tune_malloc  # noqa: E402
from forecastd.state import Segment, StreamState  # noqa: E402
from forecastd.streaming import Emit, advance, run_segments  # noqa: E402
from forecastd.training import AdamW, train_rows  # noqa: E402
from forecastd.windowing import n_features  # noqa: E402

WINDOW = 96
LONG = 14_400  # ETTh1's rows: the rolling evaluation of benchmarks/peers.py
GRID = Grid("1h")


def _best(fn, repeat: int = 5, min_time: float = 0.2) -> float:
    """Best seconds per call over `repeat` rounds of enough calls to fill `min_time`."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    n = max(1, int(min_time / once))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def _state(model: Forecaster, mc: ModelConfig, n: int) -> StreamState:
    """A warmed-up state for n series (20 steps of random walk each)."""
    rng = np.random.default_rng(0)
    values = 100 + np.cumsum(rng.normal(size=(n, 20)), axis=1)
    segs = [Segment(f"s{i}", True, 0, values[i]) for i in range(n)]
    _, state = run_segments(model, StreamState.empty(mc), segs, {f"s{i}": 1.0 for i in range(n)}, GRID, mc,
                            AnomalyConfig(), 1, Emit(10**9))
    return state


def streaming(sizes: list[int], mc: ModelConfig, device: torch.device) -> None:
    print("\n1. Streaming: advance N series by one point (series-steps/s)")
    print(f"{'N':>8} | {'RNN step':>12} | {'full tick step':>14} | {'window recompute':>16} | {'ratio step/window':>17}")
    F = n_features(len(mc.level_alphas))
    model = Forecaster(F, mc).to(device).eval()
    for n in sizes:
        with torch.no_grad():
            x1 = torch.randn(n, 1, F, device=device)
            h = model.initial_state(n)
            xw = torch.randn(n, WINDOW, F, device=device)

            def rnn_step() -> None:
                model(x1, h)
                if device.type == "cuda":
                    torch.cuda.synchronize()

            def window() -> None:
                model(xw)  # the whole lookback for every update, as window-based forecasters do
                if device.type == "cuda":
                    torch.cuda.synchronize()

            t_step = _best(rnn_step)
            try:
                t_win = _best(window, repeat=3)
            except torch.OutOfMemoryError:
                t_win = float("nan")  # a window of 96 steps for 1M series needs more than the card has
            del xw
        full = "-"
        if n <= 100_000:  # building the warmed-up state of more series takes minutes
            state = _state(model, mc, n)
            vals = 100 + np.random.default_rng(1).normal(size=(n, 1))
            lengths = np.ones(n, dtype=np.int64)
            ac, emit = AnomalyConfig(), Emit(0)  # settings, made once as the daemon makes them
            t_full = _best(lambda: advance(model, state, vals, lengths, GRID, mc, ac, 1, emit), repeat=3)
            full = f"{n / t_full:>14,.0f}"
        print(f"{n:>8} | {n / t_step:>12,.0f} | {full:>14} | {n / t_win:>16,.0f} | {t_win / t_step:>16.0f}x")
        if device.type == "cuda":
            torch.cuda.empty_cache()


def latency(mc: ModelConfig, device: torch.device) -> None:
    model = Forecaster(n_features(len(mc.level_alphas)), mc).to(device).eval()
    state = _state(model, mc, 1)
    vals = np.array([[101.0]])
    lengths = np.ones(1, dtype=np.int64)
    ac, emit = AnomalyConfig(), Emit(0)
    times = []
    for _ in range(2000):
        t0 = time.perf_counter()
        _, state = advance(model, state, vals, lengths, GRID, mc, ac, 1, emit)
        times.append(time.perf_counter() - t0)
    times = np.array(times[200:]) * 1e3
    print(f"\n2. Single-series tick (whole streaming step incl. output rows): p50 {np.percentile(times, 50):.3f} ms, "
          f"p99 {np.percentile(times, 99):.3f} ms")
    values = 100 + np.cumsum(np.random.default_rng(2).normal(size=LONG))
    t = _best(lambda: run_segments(model, StreamState.empty(mc), [Segment("s", True, 0, values)], {"s": 1.0}, GRID,
                                   mc, AnomalyConfig(), 1, Emit(0, LONG - 2_880)), repeat=3, min_time=1.0)
    print(f"   One series, {LONG:,} steps in one call (run_segments, rows for the last 2,880): {t:.3f} s")


def backfill(n: int, steps: int, mc: ModelConfig, device: torch.device) -> None:
    """A backfill's streaming: n series of `steps` points each from a fresh state, in one call."""
    model = Forecaster(n_features(len(mc.level_alphas)), mc).to(device).eval()
    values = 100 + np.cumsum(np.random.default_rng(3).normal(size=(n, steps)), axis=1)
    segs = [Segment(f"s{i}", True, 0, values[i]) for i in range(n)]
    scales = {f"s{i}": 1.0 for i in range(n)}
    t = _best(lambda: run_segments(model, StreamState.empty(mc), segs, scales, GRID, mc, AnomalyConfig(), 1,
                                   Emit(0)), repeat=2, min_time=0.0)
    print(f"   Backfill, {n:,} series x {steps} steps in one call (run_segments, all rows): {t:.2f} s, "
          f"{n * steps / t:,.0f} series-steps/s")


def training(mc: ModelConfig, device: torch.device) -> None:
    tc = TrainingConfig()
    F = n_features(len(mc.level_alphas))
    model = Forecaster(F, mc).to(device)
    opt = AdamW(model.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)  # as `fit` makes it
    B, S = tc.batch_size, tc.segment_length
    x = torch.randn(B, S, F, device=device)
    y = torch.randn(B, S, mc.horizon, device=device)
    m = torch.ones(B, S, mc.horizon, dtype=torch.bool, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    t = _best(lambda: train_rows(model, opt, x, y, m, tc.bptt, tc.clip, autocast), repeat=3, min_time=1.0)
    print(f"\n3. Training (TBPTT, batch {B} x {S} steps, bptt {tc.bptt}, H={mc.horizon}): "
          f"{B * S / t:,.0f} sample-steps/s")


def end_to_end(n: int, mc: ModelConfig, device: torch.device, pg_url: str | None = None, ticks: int = 1) -> None:
    """`ticks` run_once ticks over n series that each got one new point, on Parquet and on SQLite (and
    PostgreSQL), with the source and sink kept across ticks as the daemon keeps them. Several ticks show
    whether a write slows as the output tables grow."""
    import sqlite3

    from forecastd.pipeline import run_once
    from forecastd.sinks import open_sink
    from forecastd.sources import open_source
    from forecastd.state import ModelVersion  # noqa: F401

    print(f"\n4. End-to-end tick, {n} series, one new point each, H={mc.horizon}")
    rng = np.random.default_rng(0)
    T = 200
    ts = pd.date_range("2024-01-01", periods=T + ticks, freq="h", tz="UTC").as_unit("ns")
    ids = np.array([f"s{i:06d}" for i in range(n)], dtype=object)
    values = 100 + np.cumsum(rng.normal(size=(n, T + ticks)), axis=1)
    frame = pd.DataFrame({"series_id": np.repeat(ids, T + ticks), "ts": np.tile(ts, n), "value": values.ravel()})
    pg_tables = (f"speed_forecasts_{os.getpid()}", f"speed_anomalies_{os.getpid()}", f"speed_readings_{os.getpid()}")
    lookback = '"auto"' if mc.lookback == "auto" else mc.lookback
    for kind in ("parquet", "sqlite") + (("postgresql", "pg-pg") if pg_url else ()):
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            if kind == "pg-pg":  # readings in PostgreSQL too, keyed and indexed as a kept table is
                pg = _pg_readings(pg_url, pg_tables[2], frame[frame["ts"] < ts[T]])
                src = f'kind = "sql"\nurl = "{pg_url}"\ntable = "{pg_tables[2]}"'
                sink = (f'kind = "sql"\nurl = "{pg_url}"\nforecasts_table = "{pg_tables[0]}"\n'
                        f'anomalies_table = "{pg_tables[1]}"')
            elif kind in ("parquet", "postgresql"):
                frame[frame["ts"] < ts[T]].to_parquet(d / "data.parquet")
                src = f'kind = "parquet"\npath = "{d / "data.parquet"}"'
                sink = f'kind = "parquet"\npath = "{d / "out"}"\npartition = "hour"'
                if kind == "postgresql":
                    sink = (f'kind = "sql"\nurl = "{pg_url}"\nforecasts_table = "{pg_tables[0]}"\n'
                            f'anomalies_table = "{pg_tables[1]}"')
            else:
                con = sqlite3.connect(d / "data.db")
                f = frame[frame["ts"] < ts[T]].assign(ts=lambda x: x["ts"].dt.strftime("%Y-%m-%d %H:%M:%S"))
                f.to_sql("readings", con, index=False)
                # The indexes of a kept readings table: by time for the ticks' reads, and its key, by
                # which the series listing skips from one id to the next.
                con.execute("CREATE INDEX readings_ts ON readings (ts)")
                con.execute("CREATE UNIQUE INDEX readings_key ON readings (series_id, ts)")
                con.commit()
                src = f'kind = "sql"\nurl = "sqlite:///{d / "data.db"}"\ntable = "readings"'
                sink = f'kind = "sql"\nurl = "sqlite:///{d / "out.db"}"'
            (d / "c.toml").write_text(
                f"[source]\n{src}\n[sink]\n{sink}\n[model]\nhidden_size = {mc.hidden_size}\nhorizon = {mc.horizon}\n"
                f"lookback = {lookback}\n"
                f"[data]\nwarmup = 48\n[training]\ndevice = \"{device.type}\"\n[serve]\ndevice = \"{device.type}\"\n"
                f"[state]\ndir = \"{d / 'state'}\"\n")
            try:
                config = load_config(d / "c.toml")
                _save_untrained(config, mc, ids)
                # The source and sink live across ticks, as `forecastd serve` keeps them: connections,
                # reflected tables and compiled statements are made once, not every tick.
                kept = dict(source=open_source(config), sink=open_sink(config))
                # First tick: warm-up of every series, and a listing of every series id. Half an hour
                # later, the measured tick does not list again ([serve] list_series_every = 3600).
                run_once(config, ts[T - 1] + pd.Timedelta(minutes=30), **kept)
                freeze_heap()  # as the daemon does once started (forecastd/runtime.py)
                totals = []
                for k in range(T, T + ticks):
                    if kind == "pg-pg":
                        with pg.cursor().copy(f"COPY {pg_tables[2]} (series_id, ts, value) FROM STDIN") as cp:
                            for i, v in zip(ids, values[:, k]):
                                cp.write_row((i, ts[k].to_pydatetime(), float(v)))
                        pg.commit()
                    elif kind != "sqlite":
                        frame[frame["ts"] <= ts[k]].to_parquet(d / "data.parquet")
                    else:
                        stamp = ts[k].strftime("%Y-%m-%d %H:%M:%S")
                        con.executemany("INSERT INTO readings VALUES (?, ?, ?)",
                                        [(i, stamp, float(v)) for i, v in zip(ids, values[:, k])])
                        con.commit()
                    t0 = time.perf_counter()
                    r = run_once(config, ts[k], **kept)
                    totals.append(time.perf_counter() - t0)
                stages = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in r.seconds.items())
                label = {"postgresql": "parquet -> postgresql", "pg-pg": "postgresql -> postgresql"}.get(kind, kind)
                each = " / ".join(f"{t * 1e3:,.0f}" for t in totals) + " ms" + ("; the last one" if ticks > 1 else "")
                t0 = time.perf_counter()
                n_ids = len(kept["source"].series_ids())
                listing = time.perf_counter() - t0
                print(f"  {label:8}: {each} for {r.points} points, {r.forecasts_written:,} forecast + "
                      f"{r.anomalies_written:,} anomaly rows ({stages}); a listing of the {n_ids:,} series ids, "
                      f"which a tick adds at most every list_series_every: {listing * 1e3:,.0f} ms")
            finally:
                if kind == "pg-pg":
                    pg.close()
                if kind in ("postgresql", "pg-pg"):
                    _drop_tables(pg_url, pg_tables)


def _pg_readings(url: str, table: str, frame: pd.DataFrame):
    """A readings table in PostgreSQL holding `frame`, with the key (series_id, ts) and an index on ts;
    returns an open psycopg connection for the ticks' new rows."""
    import psycopg
    import sqlalchemy as sa

    con = psycopg.connect(sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False))
    con.execute(f"CREATE TABLE {table} (series_id text, ts timestamptz, value double precision, "
                "PRIMARY KEY (series_id, ts))")
    con.execute(f"CREATE INDEX {table}_ts ON {table} (ts)")
    with con.cursor().copy(f"COPY {table} (series_id, ts, value) FROM STDIN") as cp:
        for row in zip(frame["series_id"], frame["ts"].dt.to_pydatetime(), frame["value"].tolist()):
            cp.write_row(row)
    con.commit()
    return con


def _drop_tables(url: str, names: tuple[str, ...]) -> None:
    import sqlalchemy as sa

    from forecastd.sources.sql import make_engine

    engine = make_engine(url)
    with engine.begin() as conn:
        for name in names:
            sa.Table(name, sa.MetaData()).drop(conn, checkfirst=True)
    engine.dispose()


def _save_untrained(config, mc: ModelConfig, ids) -> None:
    """Speed does not depend on the weights: save an untrained model as the live version."""
    from forecastd.config import config_to_dict
    from forecastd.pipeline import state_store

    store = state_store(config)
    model = Forecaster(n_features(len(mc.level_alphas)), mc)
    manifest = {"config": config_to_dict(config), "freq": "h", "n_features": n_features(len(mc.level_alphas)),
                "scales": {str(i): 1.0 for i in ids}, "metrics": {}}
    store.set_live(store.save_model(model, manifest, keep=2))


def memory(mc: ModelConfig, n: int, device: torch.device) -> None:
    model = Forecaster(n_features(len(mc.level_alphas)), mc).eval()
    state = _state(model, mc, min(n, 1000))
    per_series = sum(a.nbytes for a in state.to_arrays().values()) / len(state)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n5. Streaming state: {per_series:,.0f} bytes per series ({per_series * n / 2**20:,.1f} MiB at {n:,} series); "
          f"peak RSS of this run {peak:,.0f} MiB; torch threads {torch.get_num_threads()}")
    if device.type == "cuda":
        print(f"   peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", help="series per tick (default 1 100 10k 100k; on CUDA also 1M)")
    p.add_argument("--e2e", type=int, default=10_000, help="series in the end-to-end tick (0 skips it)")
    p.add_argument("--e2e-ticks", type=int, default=4,
                   help="end-to-end ticks in a row, each timed (later ones write into fuller tables)")
    p.add_argument("--backfill", type=int, default=1_000, help="series in the 500-step backfill (0 skips it)")
    p.add_argument("--pg-url", help="also run the end-to-end tick into this PostgreSQL database (SQLAlchemy URL)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lookback", default="auto",
                   help='the carried window: "auto" (168 steps on this hourly grid) or a number, 0 = none')
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's malloc defaults instead of the CLI's settings (forecastd/runtime.py)")
    args = p.parse_args(argv)
    malloc = "glibc defaults" if args.system_malloc else "tuned" if tune_malloc() else "not tunable here"
    blas = "1 thread" if single_thread_blas() else "as configured"  # as the CLI sets it
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.sizes is None:
        args.sizes = [1, 100, 10_000, 100_000] + ([1_000_000] if device.type == "cuda" else [])
    mc = ModelConfig(hidden_size=args.hidden, horizon=24,
                     lookback=args.lookback if args.lookback == "auto" else int(args.lookback))
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"forecastd speed: GRU hidden {mc.hidden_size}, H={mc.horizon}, lookback {mc.lookback}, torch {torch.__version__}, {name}, malloc {malloc}, numpy BLAS {blas}")
    streaming(args.sizes, mc, device)
    latency(mc, device)
    if args.backfill:
        backfill(args.backfill, 500, mc, device)
    training(mc, device)
    if args.e2e:
        end_to_end(args.e2e, mc, device, args.pg_url, args.e2e_ticks)
    memory(mc, max(args.sizes), device)


if __name__ == "__main__":
    main()
