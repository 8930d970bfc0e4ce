"""`forecastd serve` as a real process: readiness, the lock, signals, crash safety, outages, retraining.

Every test runs the daemon as `python -m forecastd serve` on a copy of one small trained state (see
serve_support.py) and checks what it left on disk against one uninterrupted tick over the same rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from conftest import PG_DB, PG_HOST, PG_PORT, PG_USER

from serve_support import (
    END,
    SAMPLE_DB,
    SERIES,
    T0,
    NotifySocket,
    Serve,
    append_rows,
    assert_same_outputs,
    clone,
    free_port,
    outputs,
    reference,
    wait_until,
    watermark,
)

DAY = T0 + pd.Timedelta(hours=24)
STOP_TIMEOUT = 15.0  # well inside systemd's TimeoutStopSec in deploy/forecastd.service (90 s)


@pytest.fixture
def notify():
    sock = NotifySocket()
    yield sock
    sock.close()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_ready_lock_http_and_sigterm(tmp_path, notify):
    port = free_port()
    config = clone(tmp_path, serve={"http_port": port})
    with sqlite3.connect(tmp_path / "src.db") as con:  # guarantee 7: deferred, counted, never written
        con.execute("INSERT INTO readings VALUES ('sine', '2100-01-01 00:00:00', 0.5)")
    serve = Serve(config, notify=notify)
    try:
        ready = notify.wait_for("READY", "1", proc=serve.proc)
        assert "serving: model v1" in ready["STATUS"]
        assert json.loads((tmp_path / "state" / "lock").read_text() or "0") == serve.pid

        # Guarantee 4: a second daemon on the same state directory is refused, naming the first one's pid.
        second = Serve(config, log_name="second.log")
        try:
            assert second.wait(60) == 7  # StateError's exit code
        finally:
            second.kill()
        assert f"in use by forecastd pid {serve.pid}" in second.log()

        append_rows(tmp_path / "src.db", T0, DAY)
        with sqlite3.connect(tmp_path / "src.db") as con:  # a series too new to start: it waits, logged
            con.executemany("INSERT INTO readings VALUES ('newcomer', ?, 1.0)",
                            [(f"{T0 + pd.Timedelta(hours=h):%Y-%m-%d %H:%M:%S}",) for h in (1, 2, 3)])
        wait_until(lambda: watermark(config) == DAY, 30, "the new rows to be ticked")
        # The daemon's own line per tick, not the pipeline's as well; the pipeline's other INFO lines stay.
        wait_until(lambda: "1 new series wait for" in serve.log(), 30, "the waiting series to be logged")
        assert "tick: model v" not in serve.log() and "tick ok" in serve.log()
        status, body = _get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert "forecastd_points_total 72.0" in body  # 24 hours x 3 series
        rows_read = [line for line in body.splitlines() if line.startswith("forecastd_rows_read_total ")]
        assert float(rows_read[0].split()[-1]) >= 72  # and the future row, again at every tick
        assert 'forecastd_rows_written_total{table="anomalies"} 72.0' in body
        assert "forecastd_live_model_version 1.0" in body
        future = [line for line in body.splitlines() if line.startswith('forecastd_input_rows_total{kind="future"')]
        assert future and float(future[0].split()[-1]) >= 1, body

        started = time.monotonic()
        serve.signal(signal.SIGTERM)
        assert serve.wait(STOP_TIMEOUT) == 0, serve.log()
        assert time.monotonic() - started < STOP_TIMEOUT
        notify.wait_for("STOPPING", "1", timeout=2)
        assert "stopped" in serve.log()
        info = json.loads((tmp_path / "state" / "daemon.json").read_text())
        assert info["state"] == "stopped" and info["ticks"]["ok"] >= 1
    finally:
        serve.kill()
    assert_same_outputs(outputs(config), reference(DAY))


def test_sigterm_during_a_tick_lets_it_finish_and_exits_0(tmp_path, notify):
    """Guarantee 5: a month of new rows makes a long first tick; SIGTERM lands in it; the tick completes
    (outputs and checkpoint), then the daemon exits 0."""
    config = clone(tmp_path)
    append_rows(tmp_path / "src.db", T0, END)
    serve = Serve(config, notify=notify)
    try:
        notify.wait_for("READY", "1", proc=serve.proc)  # the first tick starts with the scheduler
        assert watermark(config) == T0, "the tick finished before SIGTERM; nothing was tested"
        serve.signal(signal.SIGTERM)
        assert serve.wait(STOP_TIMEOUT + 30) == 0, serve.log()
    finally:
        serve.kill()
    assert "3240 rows read" in serve.log() and "stopped" in serve.log()
    assert watermark(config) == END
    assert_same_outputs(outputs(config), reference(END))


def _crash_run(tmp_path: Path, kills: int, max_delay: float, seed: int, retrain: bool) -> None:
    """Grow the source, start serve, SIGKILL it at a random moment; repeat; corrupt the newest checkpoint
    and leave a temp file behind; finish; compare with one uninterrupted tick over the same rows."""
    rng = random.Random(seed)
    # Retrains that never promote, so kills also land mid-retrain; a promotion would change the model
    # and with it the values the uninterrupted run is compared with.
    serve = {"retrain_cron": "*/3 * * * * *", "promote_margin": 1e9} if retrain else {}
    config = clone(tmp_path, serve=serve)
    batches = pd.date_range(T0, END, periods=kills + 2).floor("h")  # kills + 1 appends, the last ending at END
    mid_retrain = 0
    for i in range(kills):
        append_rows(tmp_path / "src.db", batches[i], batches[i + 1])
        notify = NotifySocket()
        daemon = Serve(config, notify=notify)
        try:
            if i % 3 == 1:  # a third of the kills land while it starts (imports, recovery)
                time.sleep(rng.uniform(0.0, 2.0))
            else:  # the rest while it ticks (mid-read, mid-write, mid-checkpoint) or retrains
                notify.wait_for("READY", "1", proc=daemon.proc)
                if i == 0:  # one checkpoint past the template's, so the one corrupted below has a fallback
                    wait_until(lambda d=daemon: d.running() and watermark(config) == batches[1], 60, "the first tick")
                time.sleep(rng.uniform(0.0, max_delay))
            mid_retrain += bool(daemon.children())  # a retrain worker is running: it dies too
        finally:
            daemon.kill()
            notify.close()
        assert daemon.proc.returncode == -signal.SIGKILL
    append_rows(tmp_path / "src.db", batches[kills], batches[kills + 1])
    if retrain:
        assert mid_retrain >= 3, f"only {mid_retrain} kills landed during a retrain"

    # Guarantee 3 at the daemon level: a truncated newest checkpoint falls back to the one before (an
    # older watermark, so its rows are replayed: upserts, no duplicates); a crash's temp files are swept.
    streams = sorted((tmp_path / "state" / "streams" / "v000001").glob("ckpt-*.safetensors"))
    assert len(streams) >= 2, "the kills left fewer than two checkpoints; nothing to fall back to"
    streams[-1].write_bytes(streams[-1].read_bytes()[:64])
    leftover = tmp_path / "state" / "models" / "v000001" / ".weights.safetensors.x1y2.forecastd-tmp"
    leftover.write_bytes(b"half a file")

    final = Serve(config)
    try:
        try:
            wait_until(lambda: final.running() and watermark(config) == END, 180,
                       "the daemon to catch up to the end of the data")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the daemon's log and stacks:\n{final.stacks()}") from None
        final.signal(signal.SIGTERM)
        assert final.wait(STOP_TIMEOUT) == 0, final.log()
    finally:
        final.kill()
    assert not leftover.exists()
    assert "falling back to the previous one" in final.log()
    # Nothing half-written: every version with a manifest loads, and no challenger became live.
    from forecastd.config import load_config
    from forecastd.pipeline import state_store

    store = state_store(load_config(config))
    for v in store.versions():
        store.load_model(v)
    assert store.live_version() == 1
    assert_same_outputs(outputs(config), reference(END))


def test_sigkill_at_random_moments_leaves_no_gap_and_no_duplicate(tmp_path):
    _crash_run(tmp_path, kills=5, max_delay=2.0, seed=5, retrain=False)


@pytest.mark.slow
def test_sigkill_20_times_including_mid_retrain(tmp_path):
    _crash_run(tmp_path, kills=20, max_delay=12.0, seed=20, retrain=True)


def test_retrain_promotes_then_sigterm_during_the_next_one_exits_0(tmp_path, notify):
    """A retrain in the worker process promotes its challenger; ticks go on with no gap on the new model;
    SIGTERM during the next retrain abandons it, exits 0 and leaves nothing half-written."""
    config = clone(tmp_path, serve={"retrain_cron": "* * * * * *", "always_promote": True})
    serve = Serve(config, notify=notify)
    try:
        notify.wait_for("READY", "1", proc=serve.proc)
        notify.wait_for("STATUS", "retrain promoted: [serve] always_promote = true", timeout=300, proc=serve.proc)
        append_rows(tmp_path / "src.db", T0, T0 + pd.Timedelta(hours=6))
        wait_until(lambda: serve.running() and watermark(config) == T0 + pd.Timedelta(hours=6), 60,
                   "the new model to tick the new rows")

        children = wait_until(serve.children, 300, "the next retrain's worker process")
        time.sleep(0.5)  # into its imports or its training
        serve.signal(signal.SIGTERM)
        assert serve.wait(STOP_TIMEOUT) == 0, serve.log()
    finally:
        serve.kill()
    for pid in children:  # the worker is gone with the daemon, not orphaned
        wait_until(lambda pid=pid: _gone(pid), 5, f"retrain worker {pid} to exit")
    log = serve.log()
    assert "retrain promoted" in log and "retrain abandoned" in log
    from forecastd.config import load_config
    from forecastd.pipeline import state_store

    store = state_store(load_config(config))
    for v in store.versions():  # every version that counts (has a manifest) loads
        store.load_model(v)
    assert store.live_version() >= 2
    anomalies = outputs(config)["anomalies"]
    new = anomalies[anomalies["ts"] > T0]
    assert len(new) == 6 * 3 and not new.duplicated(["series_id", "ts"]).any()  # no gap across the switch
    assert (new["model_version"] >= 2).all()


def test_sighup_is_logged_and_ignored_by_the_daemon_and_its_retrain_worker(tmp_path, notify):
    """Python's default for SIGHUP ends a process, and systemd's Restart=on-failure takes that death as
    clean: the daemon would stay down. It keeps ticking instead and says there is no reload, and a retrain
    worker that gets one too (`systemctl kill -s HUP` signals every process of the unit) is not killed."""
    config = clone(tmp_path, serve={"retrain_cron": "* * * * * *", "promote_margin": 1e9})
    serve = Serve(config, notify=notify)
    try:
        notify.wait_for("READY", "1", proc=serve.proc)
        workers = wait_until(lambda: serve.running() and serve.children(), 120, "a retrain worker process")
        for pid in (serve.pid, *workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
        append_rows(tmp_path / "src.db", T0, DAY)
        wait_until(lambda: serve.running() and watermark(config) == DAY, 60, "the new rows to be ticked")
        wait_until(lambda: "received SIGHUP" in serve.log(), 10, "the SIGHUP warning")
        # A worker killed by the signal is reported at once as "retrain failed ... killed by signal 1".
        log = serve.log()
        assert "retrain failed" not in log and "killed by signal" not in log, log[-3000:]
        serve.signal(signal.SIGTERM)
        assert serve.wait(STOP_TIMEOUT) == 0, serve.log()
    finally:
        serve.kill()
    log = serve.log()
    assert "WARNING forecastd.daemon: received SIGHUP: forecastd does not reload its configuration" in log
    assert "restart it to apply a new config" in log and "stopped" in log
    assert_same_outputs(outputs(config), reference(DAY))


def test_the_daemon_freezes_its_startup_heap_before_it_is_ready(tmp_path, notify):
    serve = Serve(clone(tmp_path), notify=notify, log_level="debug")
    try:
        notify.wait_for("READY", "1", proc=serve.proc)
        serve.signal(signal.SIGTERM)
        assert serve.wait(STOP_TIMEOUT) == 0, serve.log()
    finally:
        serve.kill()
    log = serve.log()
    frozen = [line for line in log.splitlines() if "objects frozen out of the garbage collector" in line]
    assert frozen and int(frozen[0].split("objects frozen")[0].split()[-1]) > 100_000, log[-3000:]
    assert log.index("objects frozen out of") < log.index("serving: model v1")


def test_scheduled_retrains_wait_for_the_history_to_grow(tmp_path, notify):
    """The default [serve] retrain_growth: runs of the cron with no new history train nothing, and say so."""
    port = free_port()
    config = clone(tmp_path, serve={"retrain_cron": "*/2 * * * * *", "http_port": port, "retrain_growth": None})
    serve = Serve(config, notify=notify)
    try:
        notify.wait_for("READY", "1", proc=serve.proc)

        def skipped() -> list[str]:
            return [m["STATUS"] for m in list(notify.messages)
                    if m.get("STATUS", "").startswith("retrain skipped: 0 new points since v1 learnt from")]

        wait_until(lambda: len(skipped()) >= 2, 120, "two runs of the cron to be skipped")
        metrics = _get(f"http://127.0.0.1:{port}/metrics")[1]
        count = [line for line in metrics.splitlines() if line.startswith('forecastd_retrains_total{outcome="skipped"}')]
        assert count and float(count[0].split()[-1]) >= 2, metrics
        assert "forecastd_train_duration_seconds_count 0.0" in metrics  # nothing trained
        assert "retrain_growth = 1 waits for" in skipped()[0]
        serve.signal(signal.SIGTERM)
        assert serve.wait(STOP_TIMEOUT) == 0, serve.log()
    finally:
        serve.kill()
    assert "retrain skipped" in serve.log()
    from forecastd.config import load_config
    from forecastd.pipeline import state_store

    assert state_store(load_config(config)).versions() == [1]


def test_locked_sqlite_source_fails_ticks_then_catches_up(tmp_path):
    """Guarantee 6: the source goes away (an exclusive lock); ticks fail, /healthz says so, no gap after."""
    port = free_port()
    config = clone(tmp_path, serve={"http_port": port, "unhealthy_after": 1})
    serve = Serve(config)
    healthz = f"http://127.0.0.1:{port}/healthz"
    try:
        wait_until(lambda: serve.running() and _up(healthz) and _get(healthz)[0] == 200, 60,
                   "the daemon to tick and be healthy")
        con = sqlite3.connect(tmp_path / "src.db", isolation_level=None, timeout=30)
        con.execute("ATTACH DATABASE ? AS sample", (str(SAMPLE_DB),))
        con.execute("BEGIN EXCLUSIVE")  # readers now get "database is locked"
        # Rows that arrive during the outage become visible when it ends.
        con.execute("INSERT INTO main.readings (series_id, ts, value) SELECT series_id, ts, value "
                    f"FROM sample.readings WHERE ts > ? AND ts <= ? AND series_id IN ({','.join('?' * len(SERIES))})",
                    (f"{T0:%Y-%m-%d %H:%M:%S}", f"{DAY:%Y-%m-%d %H:%M:%S}", *SERIES))
        def failing() -> dict | None:
            code, body = _get(healthz)
            body = json.loads(body)
            return body if code == 503 and body["consecutive_failures"] >= 1 else None

        body = wait_until(failing, 60, "/healthz to report the failed tick")
        assert body["status"] == "unhealthy" and "database is locked" in body["reason"]
        con.execute("COMMIT")
        con.close()
        wait_until(lambda: _get(healthz)[0] == 200, 40, "/healthz to recover")
        wait_until(lambda: watermark(config) == DAY, 30, "the catch-up tick")
        metrics = _get(f"http://127.0.0.1:{port}/metrics")[1]
        failed = [line for line in metrics.splitlines() if line.startswith('forecastd_ticks_total{outcome="error"}')]
        assert failed and float(failed[0].split()[-1]) >= 1
        serve.signal(signal.SIGTERM)
        assert serve.wait(STOP_TIMEOUT) == 0
    finally:
        serve.kill()
    assert "tick failed (1 in a row)" in serve.log()
    assert_same_outputs(outputs(config), reference(DAY))


def _gone(pid: int) -> bool:
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


def _up(url: str) -> bool:
    try:
        return _get(url)[0] in (200, 503)
    except OSError:
        return False


@contextlib.contextmanager
def _own_database():
    """A database and a login role of the test's own, both named `name`: (name, admin connection, connection
    to the new database as the superuser). Dropped afterwards, with any connection still open to it."""
    import uuid

    import psycopg

    name = f"forecastd_test_{uuid.uuid4().hex[:10]}"
    admin = psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=PG_DB, autocommit=True)
    admin.execute(f'CREATE ROLE "{name}" LOGIN')  # generated names, not user input
    admin.execute(f'CREATE DATABASE "{name}" OWNER "{name}"')
    admin.execute(f'REVOKE CONNECT ON DATABASE "{name}" FROM PUBLIC')
    admin.execute(f'GRANT CONNECT ON DATABASE "{name}" TO "{name}"')
    db = psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=name, autocommit=True)
    try:
        db.execute("CREATE TABLE readings (series_id text, ts timestamptz, value double precision)")
        db.execute(f'ALTER TABLE readings OWNER TO "{name}"')
        yield name, admin, db
    finally:
        db.close()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'DROP ROLE IF EXISTS "{name}"')
        admin.close()


@pytest.mark.postgres
def test_postgresql_outage_fails_ticks_then_catches_up(tmp_path, pg_server):
    """Guarantee 6 against the real server: the daemon's database refuses it and its connections are cut
    (what a restart looks like from the client), while rows keep arriving; after it, no gap.

    Stopping the server itself would break every other test using it, so the outage is confined to a
    database and a role of this test's own: REVOKE CONNECT plus pg_terminate_backend.
    """
    port = free_port()
    with _own_database() as (name, admin, db):
        _copy_rows(db, None, T0)
        url = f"postgresql+psycopg://{name}@{PG_HOST}:{PG_PORT}/{name}"
        config = clone(tmp_path, source={"url": url}, sink={"kind": "sql", "url": url, "path": None},
                       serve={"http_port": port, "unhealthy_after": 1})
        serve = Serve(config)
        healthz = f"http://127.0.0.1:{port}/healthz"
        try:
            wait_until(lambda: serve.running() and _up(healthz) and _get(healthz)[0] == 200, 60,
                   "the daemon to tick and be healthy")
            admin.execute(f'REVOKE CONNECT ON DATABASE "{name}" FROM "{name}"')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,))
            _copy_rows(db, T0, DAY)  # rows keep arriving while the daemon cannot read them

            def failing() -> dict | None:
                code, body = _get(healthz)
                body = json.loads(body)
                return body if code == 503 and body["consecutive_failures"] >= 2 else None

            body = wait_until(failing, 60, "/healthz to report the failed ticks")
            assert "permission denied for database" in body["reason"] or "terminat" in body["reason"], body
            admin.execute(f'GRANT CONNECT ON DATABASE "{name}" TO "{name}"')
            wait_until(lambda: _get(healthz)[0] == 200, 60, "/healthz to recover")
            wait_until(lambda: watermark(config) == DAY, 30, "the catch-up tick")
            serve.signal(signal.SIGTERM)
            assert serve.wait(STOP_TIMEOUT) == 0
        finally:
            serve.kill()
        assert "tick failed (2 in a row)" in serve.log()
        got = outputs(config)
        want = {"forecasts": reference(DAY)["forecasts"].query("issued_at > @T0"),
                "anomalies": reference(DAY)["anomalies"].query("ts > @T0")}
        assert_same_outputs(got, want)


@pytest.mark.postgres
def test_postgresql_connections_stay_bounded_across_ticks(tmp_path, pg_server):
    """Ticks share one source and one sink: at most one connection each, however many ticks run (a new
    source and sink per tick left a connection behind each time, 10 after 5 ticks). At shutdown they close."""
    with _own_database() as (name, admin, db):
        _copy_rows(db, None, T0)
        url = f"postgresql+psycopg://{name}@{PG_HOST}:{PG_PORT}/{name}"
        config = clone(tmp_path, source={"url": url}, sink={"kind": "sql", "url": url, "path": None})

        def connections() -> int:
            return admin.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (name,)).fetchone()[0]

        def ticks_ok() -> int:
            return serve.log().count("tick ok")

        serve = Serve(config)
        try:
            counts = []
            hour = T0
            for _ in range(6):  # new rows every few ticks, so the sink writes too
                append_to = hour + pd.Timedelta(hours=4)
                _copy_rows(db, hour, append_to)
                hour = append_to
                wait_until(lambda h=hour: serve.running() and watermark(config) == h, 60, f"the rows up to {hour}")
                for _ in range(3):
                    before = ticks_ok()
                    wait_until(lambda b=before: serve.running() and ticks_ok() > b, 30, "the next tick")
                    counts.append(connections())
            assert ticks_ok() >= 20, serve.log()[-3000:]
            assert max(counts) <= 2, counts
            serve.signal(signal.SIGTERM)
            assert serve.wait(STOP_TIMEOUT) == 0, serve.log()
        finally:
            serve.kill()
        wait_until(lambda: connections() == 0, 10, "the daemon's connections to close")
        assert "tick failed" not in serve.log()


def _copy_rows(db, since: pd.Timestamp | None, until: pd.Timestamp) -> None:
    with sqlite3.connect(SAMPLE_DB) as src:
        rows = src.execute(
            f"SELECT series_id, ts, value FROM readings WHERE ts > ? AND ts <= ? AND series_id IN "
            f"({','.join('?' * len(SERIES))})",
            (f"{since:%Y-%m-%d %H:%M:%S}" if since is not None else "", f"{until:%Y-%m-%d %H:%M:%S}", *SERIES),
        ).fetchall()
    with db.cursor().copy("COPY readings (series_id, ts, value) FROM STDIN") as copy:
        for sid, ts, value in rows:
            copy.write_row((sid, ts + "+00", value))


def test_intervals_a_long_tick_overruns_are_counted_and_said_once(tmp_path, caplog):
    """APScheduler warned at every interval a long tick overran ("maximum number of running instances
    reached"), and those ticks were counted nowhere."""
    from forecastd.config import load_config
    from forecastd.daemon import Daemon

    daemon = Daemon(load_config(clone(tmp_path, serve={"interval": 0.1})))
    daemon.tick = lambda: time.sleep(1.0)  # one long tick
    scheduler = daemon._scheduler()
    with caplog.at_level("INFO"):
        scheduler.start()
        time.sleep(1.2)
        scheduler.shutdown(wait=True)
    skipped = daemon.metrics.ticks.labels("skipped")._value.get()
    assert skipped >= 5
    assert "maximum number of running instances" not in caplog.text
    assert caplog.text.count("the tick is still running at its next interval") == 1
