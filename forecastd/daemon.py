"""`forecastd serve`: APScheduler 3 wiring, signals, the state-directory lock, systemd notify, metrics.

Shape of a running daemon:

- The main thread takes the lock, recovers state, starts the HTTP endpoint and the scheduler, says
  READY=1, then only waits for SIGTERM/SIGINT. Their handlers just record the signal (no locks: a
  handler runs between two bytecodes of the main thread, whatever that thread holds) and a wakeup fd
  wakes the wait. (Blocking the signals instead is not enough: threads that numpy's BLAS starts at
  import have them unblocked, and the kernel may hand SIGTERM to one of those, killing the process.)
  SIGHUP is counted the same way and logged by the main thread: there is no reload, and Python's
  default for it would end the daemon in a way systemd's Restart=on-failure does not restart.
- Ticks share one source and one sink, opened at the first tick, so a database's connection and
  reflected tables are reused; after a tick fails on either (or unforeseeably), both are disposed of
  and opened afresh by the next one, which is how a database restart is got over, and at shutdown.
- A BackgroundScheduler in UTC, jobs built from the config at start in a MemoryJobStore:
  `tick` (every [serve] interval, one at a time, missed runs coalesced) on a one-thread pool;
  `retrain` ([serve] retrain_cron) on a pool of its own, so a retrain never holds up a tick;
  `watchdog` (every WatchdogSec/2) on the scheduler's own thread (DebugExecutor): if the scheduler
  loop hangs the pings stop, and they also stop while a tick runs past [serve] tick_timeout.
- Retraining runs in a child process (`python -m forecastd.retrain`), not a thread: the training loop
  would otherwise hold the GIL against ticks, a crash or OOM in torch takes only the child, and SIGTERM
  can abandon it at once (killing a process is clean; a thread cannot be stopped mid-epoch). The child
  writes a challenger version (counted only once its manifest exists, so a killed child leaves nothing
  half-written) and reports a verdict; the daemon switches the live model itself, under the same lock
  that each tick holds, so a model never changes under a running tick.
- A failing tick is logged, counted and retried with exponential backoff; the next good tick catches up
  from the watermarks, so an outage leaves no gap.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobSubmissionEvent
from apscheduler.executors.debug import DebugExecutor
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from forecastd.config import Config, cron_fields
from forecastd.errors import ForecastdError, LockError, SinkError, SourceError, StateError
from forecastd.metrics import Health, Metrics, MetricsServer
from forecastd.notify import Notifier, watchdog_interval
from forecastd.pipeline import TickReport, run_once, state_store
from forecastd.retrain import RetrainResult, request, switch_live
from forecastd.runtime import freeze_heap
from forecastd.sinks import Sink, open_sink
from forecastd.sources import Source, open_source
from forecastd.status import LOCK_FILE, write_daemon_info

__all__ = ["Daemon", "StateLock", "serve"]

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _NoOverrunLine(logging.Filter):
    """Drops APScheduler's WARNING for an interval that found the tick still running: one per interval
    through a long tick, though nothing is wrong that /healthz and `tick_timeout` do not report. The
    daemon counts those as skipped ticks and says so once per tick (`Daemon._overrun`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "skipped: maximum number of running instances reached" not in str(record.msg)


class _NoTickLine(logging.Filter):
    """Drops the pipeline's per-tick summary, which the daemon's own tick line covers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and str(record.msg).startswith("tick: "))


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class StateLock:
    """One daemon per state directory: an flock on `lock`, held for the process lifetime, our pid inside.

    The kernel drops an flock when its process dies, however it dies, so a crash never leaves a stale
    lock; the pid in the file is only for the message a second daemon prints.
    """

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StateError(f"cannot open the lock file {str(self.path)!r} ({exc.strerror}); check that the "
                             "[state] dir exists and is writable by this user") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockError(f"state directory {str(self.path.parent)!r} is in use by forecastd pid {holder}; "
                            "stop that daemon first (e.g. `systemctl stop forecastd`) or point [state] dir at "
                            "another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (unlinking it would race a new daemon)
            self._fd = None

    def __enter__(self) -> StateLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class RetrainWorker:
    """Runs one retrain in a child process and relays its log; `abandon()` kills it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._proc: subprocess.Popen[str] | None = None
        self._abandoned = False
        self._lock = threading.Lock()

    def run(self, now: dt.datetime) -> RetrainResult:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        # `systemctl kill -s HUP` signals every process of the unit, and SIGHUP's default would end the
        # worker mid-training. A signal mask survives fork and exec, so blocking it in this (pool) thread
        # blocks it in the worker; the daemon's main thread still takes it.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        with self._lock:
            if self._abandoned:
                return RetrainResult("abandoned", "the daemon is stopping")
            try:
                self._proc = proc = subprocess.Popen(
                    [sys.executable, "-m", "forecastd.retrain"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, text=True, env=env, close_fds=True,
                )
            except OSError as exc:
                return RetrainResult("failed", f"cannot start the retrain worker: {exc}")
        timer, timed_out = None, threading.Event()

        def expire() -> None:
            timed_out.set()
            proc.kill()

        if self.config.serve.retrain_timeout > 0:
            timer = threading.Timer(self.config.serve.retrain_timeout, expire)
            timer.daemon = True
            timer.start()
        result = None
        try:
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(request(self.config, now, logging.getLogger().getEffectiveLevel()))
                proc.stdin.close()
            except BrokenPipeError:
                pass
            for line in proc.stdout:
                result = _relay(line) or result
            code = proc.wait()
        finally:
            if timer:
                timer.cancel()
            with self._lock:
                self._proc = None
        if self._abandoned:
            return RetrainResult("abandoned", "the daemon is stopping; the challenger was discarded")
        if result is not None:
            return RetrainResult.from_dict(result)
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        if timed_out.is_set():
            how = f"ran past [serve] retrain_timeout = {self.config.serve.retrain_timeout:g} s and was killed"
        return RetrainResult("failed", f"the retrain worker {how} without a result")

    def abandon_now(self) -> None:
        """From a signal handler: kill the worker without taking a lock."""
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGKILL)

    def abandon(self) -> None:
        """Stop a running retrain now; later `run` calls return at once."""
        with self._lock:
            self._abandoned = True
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        # SIGKILL straight away: the child has nothing to clean up (a version counts only once its
        # manifest is written).
        log.info("abandoning the running retrain (pid %d)", proc.pid)
        proc.kill()


def _relay(line: str) -> dict | None:
    """Re-log a child's log record through our handlers; return its result when the line is one."""
    try:
        msg = json.loads(line)
    except ValueError:
        msg = None
    if not isinstance(msg, dict):
        if line.strip():
            log.warning("retrain worker: %s", line.rstrip())
        return None
    if "result" in msg:
        return msg["result"]
    rec = msg.get("log", {})
    level = int(rec.get("level", logging.INFO))
    # Epoch lines and the like stay at debug: the daemon logs one line per retrain itself.
    logging.getLogger(rec.get("name", "forecastd.retrain")).log(
        level if level >= logging.WARNING else logging.DEBUG, "%s", rec.get("msg", ""))
    return None


class Daemon:
    """The serving process for one config; `run()` returns the exit status."""

    def __init__(self, config: Config, *, clock: Callable[[], dt.datetime] = utc_now,
                 notifier: Notifier | None = None) -> None:
        serve = config.serve
        self.config = config
        self.store = state_store(config)
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.metrics = Metrics()
        self.health = Health(serve.interval, serve.unhealthy_after, serve.tick_timeout)
        self.worker = RetrainWorker(config)
        self.stopping = threading.Event()
        self.swap = threading.Lock()  # held by a tick and by a model switch
        self._next_attempt = 0.0  # monotonic time before which ticks are skipped (backoff)
        self._overran = False  # whether the running tick has been said to overrun its interval
        self._signal: int | None = None  # set by the signal handler, nothing else
        self._hangups = 0  # SIGHUPs received, counted by their handler
        self._io: tuple[Source, Sink] | None = None  # the ticks' source and sink; only the tick thread uses it
        self._wake: socket.socket | None = None
        self._info_lock = threading.Lock()
        self.info: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(),
                                     "started_at": clock().isoformat(), "state": "starting",
                                     "ticks": {"ok": 0, "error": 0}, "consecutive_failures": 0}

    # -- lifecycle ------------------------------------------------------------------------------
    def run(self) -> int:
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            # One line per tick: APScheduler says "Running job"/"executed" for each, and the pipeline's own
            # tick line repeats figures the daemon's line has (with rows read, repairs and duration).
            # Only that line: the pipeline's other INFO lines (series waiting to start, a cold start after a
            # retrain) say what the daemon's line does not.
            logging.getLogger("apscheduler").setLevel(logging.WARNING)
            pipeline_log = logging.getLogger("forecastd.pipeline")
            if not any(isinstance(f, _NoTickLine) for f in pipeline_log.filters):
                pipeline_log.addFilter(_NoTickLine())
        # Handlers first: a SIGTERM during recovery then stops the daemon right after it, cleanly.
        wake_r, wake_w = socket.socketpair()
        wake_w.setblocking(False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _SIGNALS}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hangup)
        previous_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        self._wake = wake_r
        try:
            with StateLock(self.store.root):
                return self._run_locked()
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            wake_r.close()
            wake_w.close()

    def _on_signal(self, signum: int, frame: object) -> None:
        """Record the signal; a second one exits at once (the last checkpoint is consistent anyway)."""
        if self._signal is not None:
            os.write(2, f"forecastd: second {signal.Signals(signum).name}, exiting without waiting\n".encode())
            self.worker.abandon_now()
            os._exit(1)
        self._signal = signum

    def _on_hangup(self, signum: int, frame: object) -> None:
        self._hangups += 1  # logged by the main thread's wait: no locks in a handler

    def _run_locked(self) -> int:
        self.notifier.status("recovering state")
        recovered = self.recover()
        server = None
        if self.config.serve.http_port:
            server = MetricsServer(self.config.serve.http_host, self.config.serve.http_port, self.metrics,
                                   self.health).start()
        scheduler = self._scheduler()
        freeze_heap()  # what is loaded by now lives as long as the daemon: no full collection walks it again
        try:
            # Before the scheduler starts: _set_info waits for a running tick, and READY must not.
            self._set_info(state="running")
            scheduler.start()
            log.info("serving: %s; tick every %g s, retrain %s", recovered, self.config.serve.interval,
                     f"on cron {self.config.serve.retrain_cron!r} (UTC)" if self.config.serve.retrain_cron.strip()
                     else "disabled")
            self.notifier.ready(f"serving: {recovered}")
            sig = self._wait_for_signal()
            log.info("received %s: stopping after the current tick", signal.Signals(sig).name)
            # STOPPING=1 as shutdown begins (systemd's convention), so `systemctl status` says why it waits.
            self.notifier.stopping("stopping: finishing the current tick")
            self._shutdown(scheduler)
        finally:
            if scheduler.running:
                scheduler.shutdown(wait=False)
            if server is not None:
                server.close()
            self._close_io()
        self._set_info(state="stopped", stopped_at=self.clock().isoformat())
        log.info("stopped")
        return 0

    def recover(self) -> str:
        """Sweep temp files, load the live model and its stream (corrupt ones fall back); describe them."""
        removed = self.store.sweep()
        mv = self.store.load_live()  # ModelError when there is none: serve refuses to start
        state, info = self.store.load_stream(mv.version)
        self.metrics.live_version.set(mv.version)
        if state is not None:
            what = f"model v{mv.version}, {len(state)} series from checkpoint {info.get('seq')}"
        else:
            what = (f"model v{mv.version}, no checkpoint of its own yet (series continue from earlier versions' "
                    "watermarks where they hold them, and warm up on the first tick)")
        if removed:
            what += f", {removed} leftover temp file(s) removed"
        return what

    def _wait_for_signal(self) -> int:
        hangups = 0
        while self._signal is None:
            if select.select([self._wake], [], [], 1.0)[0]:
                self._wake.recv(64)
            if self._hangups != hangups:
                hangups = self._hangups
                log.warning("received SIGHUP: forecastd does not reload its configuration and keeps running with "
                            "the one it started with; restart it to apply a new config (systemctl restart forecastd)")
        return self._signal

    def _shutdown(self, scheduler: BackgroundScheduler) -> None:
        """Stop taking work, abandon a retrain, let a running tick finish (it checkpoints at its end).

        A second SIGTERM/SIGINT while waiting exits at once: the last checkpoint is consistent anyway.
        """
        self.stopping.set()
        done = threading.Event()

        def stop() -> None:
            self.worker.abandon()
            scheduler.shutdown(wait=True)
            done.set()

        # In a thread, so the main thread stays free to run the handler of a second signal.
        threading.Thread(target=stop, name="forecastd-stop", daemon=True).start()
        while not done.wait(0.2):
            pass

    def _scheduler(self) -> BackgroundScheduler:
        serve = self.config.serve
        scheduler = BackgroundScheduler(
            jobstores={"default": MemoryJobStore()},
            executors={"default": ThreadPoolExecutor(1), "retrain": ThreadPoolExecutor(1),
                       "loop": DebugExecutor()},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": max(1, int(serve.misfire_grace))},
            timezone=dt.timezone.utc,
        )
        scheduler.add_job(self.tick, IntervalTrigger(seconds=serve.interval, timezone=dt.timezone.utc),
                          id="tick", name="tick", next_run_time=utc_now())
        scheduler.add_listener(self._overrun, EVENT_JOB_MAX_INSTANCES)
        scheduler_log = logging.getLogger("apscheduler.scheduler")
        if not any(isinstance(f, _NoOverrunLine) for f in scheduler_log.filters):
            scheduler_log.addFilter(_NoOverrunLine())
        if serve.retrain_cron.strip():
            scheduler.add_job(self.retrain, CronTrigger(**cron_fields(serve.retrain_cron), timezone=dt.timezone.utc),
                              id="retrain", name="retrain", executor="retrain")
        ping = watchdog_interval()
        if ping and self.notifier.enabled:
            scheduler.add_job(self.watchdog, IntervalTrigger(seconds=ping, timezone=dt.timezone.utc),
                              id="watchdog", name="watchdog", executor="loop", next_run_time=utc_now())
        return scheduler

    def _overrun(self, event: JobSubmissionEvent) -> None:
        """A tick due while the last one still runs is skipped: counted, and said once per long tick."""
        if event.job_id != "tick":
            return
        self.metrics.ticks.labels("skipped").inc()
        if not self._overran:
            self._overran = True
            log.info("the tick is still running at its next interval; ticks are skipped until it ends")

    # -- jobs -----------------------------------------------------------------------------------
    def tick(self) -> TickReport | None:
        if self.stopping.is_set():
            return None
        if time.monotonic() < self._next_attempt:
            self.metrics.ticks.labels("skipped").inc()
            return None
        now = self.clock()
        self.health.tick_begins()
        self._overran = False
        started = time.perf_counter()
        try:
            with self.swap:
                if self._io is None:
                    self._io = (open_source(self.config), open_sink(self.config))
                source, sink = self._io
                report = run_once(self.config, now, source=source, sink=sink)
        except Exception as exc:
            if isinstance(exc, (SourceError, SinkError)) or not isinstance(exc, ForecastdError):
                # Opened afresh by the next tick: a restarted database, a table dropped and made again or a
                # replaced file share leave a dead connection or a stale reflected table behind, and what
                # forecastd did not foresee may have too. A bad model or bad data leaves them as they are.
                self._close_io()
            self._tick_failed(exc, now, time.perf_counter() - started)
            return None
        seconds = time.perf_counter() - started
        self.health.tick_ends(True)
        self._next_attempt = 0.0
        self.metrics.tick_ok(report, seconds, time.time())
        repairs = ", ".join(f"{n} {r}" for r, n in sorted(report.repairs.items())) or "none"
        log.info("tick ok in %.3f s: model v%d, %d rows read, %d series, %d points, %d forecast rows, "
                 "%d anomaly rows (%d flagged); input rows repaired/rejected: %s", seconds, report.model_version,
                 report.rows_read, report.series, report.points, report.forecasts_written,
                 report.anomalies_written, report.anomalies_flagged, repairs)
        self.notifier.status(f"tick ok at {now:%Y-%m-%d %H:%M:%S} UTC: model v{report.model_version}, "
                             f"{report.points} points, {seconds:.2f} s")
        with self._info_lock:
            self.info["ticks"]["ok"] += 1
        self._set_info(consecutive_failures=0, last_success_at=now.isoformat(), last_tick={
            "at": now.isoformat(), "duration_seconds": round(seconds, 4), "outcome": "ok", **report.as_dict()})
        return report

    def _close_io(self) -> None:
        io, self._io = self._io, None
        for part in io or ():
            engine = getattr(part, "engine", None)  # SQL sources and sinks; Parquet holds nothing open
            if engine is not None:
                try:
                    engine.dispose()
                except Exception as exc:  # a connection that cannot even be closed cleanly is gone anyway
                    log.debug("disposing of %r: %s", part, exc)

    def _tick_failed(self, exc: Exception, now: dt.datetime, seconds: float) -> None:
        message = str(exc) if isinstance(exc, ForecastdError) else f"{type(exc).__name__}: {exc}"
        message = " ".join(message.split())
        failures = self.health.tick_ends(False, message)
        self.metrics.tick_failed(seconds, failures)
        serve = self.config.serve
        backoff = min(serve.interval * 2 ** min(failures - 1, 30), max(serve.max_backoff, serve.interval))
        self._next_attempt = time.monotonic() + backoff - serve.interval / 2
        # The traceback once per failure streak, for what forecastd did not foresee; then one line each.
        log.error("tick failed (%d in a row) after %.3f s: %s; next attempt in %.1f s", failures, seconds, message,
                  backoff, exc_info=failures == 1 and not isinstance(exc, ForecastdError))
        self.notifier.status(f"tick failing ({failures} in a row): {message[:200]}")
        with self._info_lock:
            self.info["ticks"]["error"] += 1
        self._set_info(consecutive_failures=failures, last_tick={
            "at": now.isoformat(), "duration_seconds": round(seconds, 4), "outcome": "error", "error": message})

    def retrain(self) -> RetrainResult | None:
        if self.stopping.is_set():
            return None
        now = self.clock()
        self.notifier.status("retraining")
        started = time.monotonic()
        result = self.worker.run(now)
        result.seconds = round(time.monotonic() - started, 3)
        try:
            self._judge(result)
        except Exception as exc:  # whatever went wrong, the live model stays and the failure is counted
            log.exception("retrain: unexpected error after training")
            result.outcome, result.reason = "failed", f"{type(exc).__name__}: {exc}"
        outcome = {"keep": "kept"}.get(result.outcome, result.outcome)
        result.outcome = outcome
        self.metrics.retrains.labels(outcome).inc()
        if outcome not in ("abandoned", "skipped"):  # what trained, so the histogram stays training times
            self.metrics.train_seconds.observe(result.seconds)
        level = logging.WARNING if outcome == "failed" else logging.INFO
        figures = ""
        if result.challenger is not None:
            figures = (f": challenger v{result.challenger} (tail loss {_f(result.challenger_loss)}, "
                       f"{result.metrics.get('epochs_run', '-')} epochs) vs live {_v(result.live)} "
                       f"(tail loss {_f(result.live_loss)})")
        log.log(level, "retrain %s in %.1f s%s: %s", outcome, result.seconds, figures, result.reason)
        self.notifier.status(f"retrain {outcome}: {result.reason[:200]}")
        self._set_info(last_retrain={"at": now.isoformat(), **result.as_dict()})
        return result

    def _judge(self, result: RetrainResult) -> None:
        """Carry out a `promote` verdict: switch the live model between ticks, unless things changed."""
        if result.outcome != "promote":
            return
        with self.swap:
            live = self.store.live_version()
            if self.stopping.is_set():
                result.outcome, result.reason = "abandoned", "the daemon is stopping"
            elif live != result.live:
                result.outcome = "kept"
                result.reason = (f"the live model changed to v{live} during the retrain (by hand?); "
                                 f"challenger v{result.challenger} was judged against v{result.live}")
            else:
                try:
                    switch_live(self.store, result.challenger, reason=f"retrain: {result.reason}", now=self.clock())
                except ForecastdError as exc:
                    result.outcome, result.reason = "failed", f"promotion failed: {exc}"
                    return
                result.outcome = "promoted"
                self.metrics.live_version.set(result.challenger)

    def watchdog(self) -> None:
        if self.health.hung():
            log.error("a tick has run for more than [serve] tick_timeout = %g s; withholding the watchdog "
                      "ping so systemd restarts the daemon", self.config.serve.tick_timeout)
            return
        self.notifier.watchdog()

    def _set_info(self, **fields: Any) -> None:
        # Under the tick lock so daemon.json is written in step with the ticks it describes.
        with self.swap, self._info_lock:
            self.info.update(fields)
            try:
                write_daemon_info(self.store, self.info)
            except OSError as exc:  # status is a convenience; a full disk shows up in the tick anyway
                log.warning("cannot write %s: %s", self.store.root / "daemon.json", exc)


def _v(version: int | None) -> str:
    return f"v{version}" if version is not None else "-"


def _f(x: float) -> str:
    return f"{x:.4f}" if math.isfinite(x) else "-"


def serve(config: Config) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT; returns the exit status."""
    return Daemon(config).run()
