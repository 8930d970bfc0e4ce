"""Prometheus metrics and the health check, served over HTTP on [serve] http_host:http_port.

Each daemon owns its registry (never prometheus-client's global one), so tests can run several and a
library user who imports forecastd does not find our metrics in their own /metrics.

    GET /metrics   Prometheus text format
    GET /healthz   200 while ticks succeed; 503 after [serve] unhealthy_after failures in a row, when no
                   tick has succeeded for 3 intervals, or while a tick has run past [serve] tick_timeout
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from forecastd.errors import ConfigError

__all__ = ["Metrics", "Health", "MetricsServer", "input_kind"]

log = logging.getLogger(__name__)

# Ticks of a few series take milliseconds; thousands of series or a slow database take seconds.
_TICK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Retrains run from seconds (tests, small data) to hours (many series on CPU).
_TRAIN_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0)


def input_kind(reason: str) -> str:
    """Sort a FrameReport reason into late, future, rejected or repaired (for the `kind` label)."""
    if reason.startswith("late"):
        return "late"
    if reason.startswith("future"):
        return "future"
    if "rejected" in reason:
        return "rejected"
    return "repaired"


class Metrics:
    """Every metric the daemon exports, in one registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.ticks = Counter("forecastd_ticks",
                             "Ticks run, by outcome (ok, error, skipped while backing off or while the last still runs).",
                             ["outcome"], registry=r)
        self.rows_read = Counter("forecastd_rows_read", "Rows read from the source by ticks.", registry=r)
        self.points = Counter("forecastd_points", "Series points advanced through the model by ticks.", registry=r)
        self.rows_written = Counter("forecastd_rows_written", "Output rows upserted, by table.", ["table"], registry=r)
        self.input_rows = Counter(
            "forecastd_input_rows",
            "Input rows repaired, rejected or future-stamped (deferred, counted at each read until due), "
            "by kind and reason.", ["kind", "reason"], registry=r)
        self.anomalies_flagged = Counter("forecastd_anomalies_flagged", "Points flagged as anomalous.", registry=r)
        self.tick_seconds = Histogram("forecastd_tick_duration_seconds", "Wall time of a tick, failed ones included.",
                                      buckets=_TICK_BUCKETS, registry=r)
        self.train_seconds = Histogram("forecastd_train_duration_seconds",
                                       "Wall time of a retrain (challenger training and evaluation).",
                                       buckets=_TRAIN_BUCKETS, registry=r)
        self.retrains = Counter("forecastd_retrains", "Retrains, by outcome (promoted, kept, failed, abandoned, skipped).",
                                ["outcome"], registry=r)
        self.live_version = Gauge("forecastd_live_model_version", "Version number of the model that serves.",
                                  registry=r)
        self.last_success = Gauge("forecastd_last_success_timestamp_seconds",
                                  "Unix time of the last tick that succeeded (0: none yet).", registry=r)
        self.consecutive_failures = Gauge("forecastd_consecutive_tick_failures", "Ticks failed in a row.",
                                          registry=r)
        self.series = Gauge("forecastd_tick_series", "Series advanced by the last successful tick.", registry=r)
        self.healthy = Gauge("forecastd_healthy", "1 while /healthz answers 200, else 0.", registry=r)
        # Zero-valued series exist from the start, so rate() and alerts see them before the first event.
        for outcome in ("ok", "error", "skipped"):
            self.ticks.labels(outcome)
        for table in ("forecasts", "anomalies"):
            self.rows_written.labels(table)
        for outcome in ("promoted", "kept", "failed", "abandoned", "skipped"):
            self.retrains.labels(outcome)

    def tick_ok(self, report: object, seconds: float, wall: float) -> None:
        """Count a successful tick from its pipeline.TickReport."""
        self.ticks.labels("ok").inc()
        self.tick_seconds.observe(seconds)
        self.rows_read.inc(report.rows_read)  # type: ignore[attr-defined]
        self.points.inc(report.points)  # type: ignore[attr-defined]
        self.rows_written.labels("forecasts").inc(report.forecasts_written)  # type: ignore[attr-defined]
        self.rows_written.labels("anomalies").inc(report.anomalies_written)  # type: ignore[attr-defined]
        self.anomalies_flagged.inc(report.anomalies_flagged)  # type: ignore[attr-defined]
        for reason, n in report.repairs.items():  # type: ignore[attr-defined]
            self.input_rows.labels(input_kind(reason), reason).inc(n)
        self.series.set(report.series)  # type: ignore[attr-defined]
        self.live_version.set(report.model_version)  # type: ignore[attr-defined]
        self.last_success.set(wall)
        self.consecutive_failures.set(0)

    def tick_failed(self, seconds: float, consecutive: int) -> None:
        self.ticks.labels("error").inc()
        self.tick_seconds.observe(seconds)
        self.consecutive_failures.set(consecutive)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class Health:
    """What /healthz decides from. Updated by the tick job; read by HTTP threads (under `lock`)."""

    interval: float
    unhealthy_after: int
    tick_timeout: float
    started: float = field(default_factory=time.monotonic)
    consecutive_failures: int = 0
    last_success: float | None = None  # monotonic
    last_success_wall: float | None = None  # Unix time, for the message
    tick_started: float | None = None  # monotonic, while a tick runs
    last_error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def tick_begins(self) -> None:
        with self.lock:
            self.tick_started = time.monotonic()

    def tick_ends(self, ok: bool, error: str | None = None) -> int:
        """Record a tick's outcome; returns the failures in a row."""
        with self.lock:
            self.tick_started = None
            if ok:
                self.consecutive_failures = 0
                self.last_success = time.monotonic()
                self.last_success_wall = time.time()
                self.last_error = None
            else:
                self.consecutive_failures += 1
                self.last_error = error
            return self.consecutive_failures

    def hung(self, now: float | None = None) -> bool:
        """A tick has run longer than tick_timeout: the loop is stuck (the watchdog stops pinging)."""
        now = time.monotonic() if now is None else now
        with self.lock:
            return self.tick_started is not None and self.tick_timeout > 0 and now - self.tick_started > self.tick_timeout

    def check(self, now: float | None = None) -> tuple[bool, str]:
        """(healthy, reason)."""
        now = time.monotonic() if now is None else now
        if self.hung(now):
            return False, f"a tick has been running for more than {self.tick_timeout:g} s"
        with self.lock:
            if self.consecutive_failures >= self.unhealthy_after:
                return False, f"{self.consecutive_failures} ticks failed in a row; last error: {self.last_error}"
            since = self.last_success if self.last_success is not None else self.started
            if now - since > 3 * self.interval:
                what = "the last successful tick" if self.last_success is not None else "start"
                return False, f"no tick has succeeded in {now - since:.0f} s since {what} (3 intervals)"
            if self.consecutive_failures:
                return True, f"{self.consecutive_failures} tick(s) failed in a row; last error: {self.last_error}"
            return True, "ticks succeed"

    def snapshot(self) -> dict:
        ok, reason = self.check()
        with self.lock:
            return {
                "status": "ok" if ok else "unhealthy",
                "reason": reason,
                "consecutive_failures": self.consecutive_failures,
                "last_success": self.last_success_wall,
            }


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer

    def do_GET(self) -> None:  # http.server's naming
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            ok, _ = self.server.health.check()
            self.server.metrics.healthy.set(1 if ok else 0)
            self._send(200, self.server.metrics.render(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            snap = self.server.health.snapshot()
            body = (json.dumps(snap) + "\n").encode()
            self._send(200 if snap["status"] == "ok" else 503, body, "application/json")
        else:
            self._send(404, b"not found; try /metrics or /healthz\n", "text/plain; charset=utf-8")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # http.server's signature
        log.debug("http %s - %s", self.address_string(), format % args)


class MetricsServer(ThreadingHTTPServer):
    """/metrics and /healthz on a thread of its own; `close()` stops it."""

    daemon_threads = True

    def __init__(self, host: str, port: int, metrics: Metrics, health: Health) -> None:
        self.metrics, self.health = metrics, health
        if ":" in host:  # an IPv6 literal such as ::1
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host, port), _Handler)
        except OSError as exc:
            raise ConfigError(f"[serve] http_host = {host!r}, http_port = {port}: cannot listen there ({exc.strerror}); "
                              "choose a free port, or http_port = 0 to disable the endpoint") from None
        self._thread = threading.Thread(target=self.serve_forever, name="forecastd-http", daemon=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("serving /metrics and /healthz on http://%s:%d", self.server_address[0], self.port)
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self.shutdown()
        self.server_close()
