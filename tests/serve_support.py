"""Helpers for the daemon tests: a small trained state, a growing SQLite source, real `serve` processes.

The trained state is built once per test process (training is the slow part) and copied for each test.
Its source is a copy of sample_data/series.sqlite cut at T0; tests append later rows from the sample
file, so the daemon always has new points to tick through, and compare what it wrote with one
uninterrupted `run_once` over the same rows.
"""

from __future__ import annotations

import atexit
import datetime as dt
import functools
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DB = ROOT / "sample_data" / "series.sqlite"
SERIES = ("price-1", "sensor-temp-1", "sine")  # three of the six keep training and ticks quick
T0 = pd.Timestamp("2024-02-15 23:00", tz="UTC")  # the trained state's source ends here
END = pd.Timestamp("2024-03-31 23:00", tz="UTC")  # the sample data ends here

SECTIONS: dict[str, dict[str, Any]] = {
    "source": {"kind": "sql", "url": "sqlite:///src.db", "table": "readings"},
    "data": {"freq": "1h", "warmup": 24},
    "model": {"hidden_size": 8, "horizon": 6},
    "training": {"epochs": 1, "max_seconds": 1.0, "batch_size": 64, "segment_length": 64, "bptt": 32,
                 "burn_in": 8, "device": "cpu"},
    "sink": {"kind": "parquet", "path": "out"},
    "state": {"dir": "state"},
    # retrain_growth 0: every retrain these tests ask for trains (test_retrain tests the wait itself).
    "serve": {"interval": 0.5, "retrain_cron": "", "http_port": 0, "misfire_grace": 5.0, "retrain_growth": 0.0},
}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def write_config(directory: Path, **sections: dict[str, Any]) -> Path:
    """forecastd.toml in `directory`: SECTIONS with the given keys of each section replaced."""
    merged = {name: {**SECTIONS.get(name, {}), **sections.get(name, {})} for name in {*SECTIONS, *sections}}
    # A None value drops the key.
    text = "".join(f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in keys.items() if v is not None) + "\n"
                   for name, keys in merged.items())
    path = directory / "forecastd.toml"
    path.write_text(text)
    return path


def _text(ts: pd.Timestamp) -> str:
    return ts.tz_convert("UTC").strftime("%Y-%m-%d %H:%M:%S")


def append_rows(db: Path, since: pd.Timestamp, until: pd.Timestamp) -> int:
    """Copy the sample rows with since < ts <= until into the source table of `db`."""
    with sqlite3.connect(SAMPLE_DB) as src:
        rows = src.execute("SELECT series_id, ts, value FROM readings WHERE ts > ? AND ts <= ? "
                           f"AND series_id IN ({','.join('?' * len(SERIES))}) ORDER BY ts, series_id",
                           (_text(since), _text(until), *SERIES)).fetchall()
    con = sqlite3.connect(db, timeout=30)
    try:
        with con:
            con.executemany("INSERT INTO readings (series_id, ts, value) VALUES (?, ?, ?)", rows)
    finally:
        con.close()
    return len(rows)


@functools.lru_cache(maxsize=1)
def trained_template() -> Path:
    """A directory with config, source up to T0, a trained model v1 and one tick (watermarks at T0)."""
    from forecastd.config import load_config
    from forecastd.pipeline import run_once, train

    directory = Path(tempfile.mkdtemp(prefix="forecastd-serve-template-"))
    shutil.copy(SAMPLE_DB, directory / "src.db")
    with sqlite3.connect(directory / "src.db") as con:
        con.execute("DELETE FROM airline")
        con.execute("DELETE FROM readings WHERE ts > ?", (_text(T0),))
        con.execute(f"DELETE FROM readings WHERE series_id NOT IN ({','.join('?' * len(SERIES))})", SERIES)
    config = load_config(write_config(directory))
    now = dt.datetime.now(dt.timezone.utc)
    train(config, now)
    run_once(config, now)
    atexit.register(shutil.rmtree, directory, True)
    return directory


def clone(dest: Path, **sections: dict[str, Any]) -> Path:
    """A copy of the trained template in `dest` (its config rewritten with `sections`); returns the config."""
    shutil.copytree(trained_template(), dest, dirs_exist_ok=True)
    return write_config(dest, **sections)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's; a thread collects sd_notify messages."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fdn"))  # short: socket paths are limited to ~107 bytes
        self.path = str(self.dir / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line))

    def wait_for(self, key: str, value: str | None = None, timeout: float = 60.0,
                 proc: subprocess.Popen | None = None) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in list(self.messages):
                if key in m and (value is None or m[key] == value):
                    return m
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"serve exited with {proc.returncode} before {key}; messages: {self.messages}")
            time.sleep(0.05)
        raise AssertionError(f"no {key}={value or '*'} within {timeout} s; got {self.messages[-5:]}")

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Serve:
    """`python -m forecastd serve --config F` as a real process, its log in the config's directory."""

    def __init__(self, config: Path, *, notify: NotifySocket | None = None, env: dict[str, str] | None = None,
                 log_name: str = "serve.log", log_level: str = "info") -> None:
        self.config = config
        self.log_path = config.parent / log_name
        full_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    **(env or {})}
        full_env.pop("NOTIFY_SOCKET", None)
        if notify is not None:
            full_env["NOTIFY_SOCKET"] = notify.path
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", "-m", "forecastd", "--log-level", log_level, "serve", "--config",
             str(config)],
            cwd=config.parent, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        """True while the process runs; raises with its log once it has exited."""
        if self.proc.poll() is not None:
            raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        return True

    def stacks(self) -> str:
        """Every thread's Python stack (faulthandler on SIGABRT), for a daemon that seems stuck; ends it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGABRT)
            self.wait(10)
        return self.log()[-6000:]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is not None:
                self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.wait(30)

    def children(self) -> list[int]:
        pids = []
        for task in Path(f"/proc/{self.pid}/task").glob("*"):
            try:
                pids += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue
        return pids


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def watermark(config: Path) -> pd.Timestamp | None:
    """The oldest watermark across series of the live model's stream (None before the first checkpoint)."""
    from forecastd.config import load_config
    from forecastd.pipeline import state_store

    store = state_store(load_config(config))
    live = store.live_version()
    state, _ = store.load_stream(live) if live is not None else (None, {})
    if state is None or not len(state):
        return None
    freq = store.manifest(live)["freq"]
    from forecastd.frames import Grid

    return Grid(freq).ts(np.array([state.step.min()]))[0]


def outputs(config: Path) -> dict[str, pd.DataFrame]:
    from forecastd.config import load_config
    from forecastd.sinks import open_sink

    sink = open_sink(load_config(config))
    return {table: sink.read(table) for table in ("forecasts", "anomalies")}


@functools.lru_cache(maxsize=4)
def reference(until: pd.Timestamp) -> dict[str, pd.DataFrame]:
    """Outputs of one uninterrupted tick over the rows up to `until`, from the same trained state."""
    from forecastd.config import load_config
    from forecastd.pipeline import run_once

    dest = Path(tempfile.mkdtemp(prefix="forecastd-serve-reference-"))
    atexit.register(shutil.rmtree, dest, True)
    config = clone(dest)
    append_rows(dest / "src.db", T0, until)
    run_once(load_config(config), dt.datetime.now(dt.timezone.utc))
    return outputs(config)


KEYS = {"forecasts": ["series_id", "issued_at", "step"], "anomalies": ["series_id", "ts"]}


def assert_same_outputs(got: dict[str, pd.DataFrame], want: dict[str, pd.DataFrame], *, rtol: float = 1e-4,
                        atol: float = 1e-5) -> None:
    """No missing key, no duplicate key, no extra key; values equal within tolerance."""
    for table, key in KEYS.items():
        g, w = got[table], want[table]
        dup = g[g.duplicated(key, keep=False)]
        assert dup.empty, f"{table}: {len(dup)} rows with duplicate keys, e.g.\n{dup.head()}"
        merged = w.merge(g, on=key, how="outer", suffixes=("_want", "_got"), indicator=True)
        missing = merged[merged["_merge"] == "left_only"]
        extra = merged[merged["_merge"] == "right_only"]
        assert missing.empty, f"{table}: {len(missing)} keys missing, e.g.\n{missing[key].head()}"
        assert extra.empty, f"{table}: {len(extra)} unexpected keys, e.g.\n{extra[key].head()}"
        for col in w.columns:
            if col in key:
                continue
            a, b = merged[f"{col}_want"], merged[f"{col}_got"]
            if pd.api.types.is_float_dtype(a):
                np.testing.assert_allclose(b.to_numpy(float), a.to_numpy(float), rtol=rtol, atol=atol,
                                           equal_nan=True, err_msg=f"{table}.{col}")
            else:
                assert (a.to_numpy() == b.to_numpy()).all(), f"{table}.{col} differs"
