"""Metrics in a registry of the daemon's own, the health rules, and the HTTP endpoint on a free port."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from forecastd.errors import ConfigError
from forecastd.metrics import Health, Metrics, MetricsServer, input_kind


def _report(**kw):
    base = dict(model_version=3, series=2, rows_read=10, points=9, forecasts_written=54, anomalies_written=9,
                anomalies_flagged=1, repairs={"NaN kept as missing": 1, "late (at or before the watermark), rejected": 2,
                                              "future-stamped, deferred to a later read": 1,
                                              "rejected: bad timestamp": 1})
    return SimpleNamespace(**{**base, **kw})


def _value(m: Metrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels or None)


def test_each_daemon_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.tick_ok(_report(), 0.1, 1700000000.0)
    assert _value(a, "forecastd_ticks_total", outcome="ok") == 1
    assert _value(b, "forecastd_ticks_total", outcome="ok") == 0
    assert REGISTRY.get_sample_value("forecastd_ticks_total", {"outcome": "ok"}) is None


def test_tick_figures():
    m = Metrics()
    m.tick_ok(_report(), 0.2, 1700000000.0)
    m.tick_ok(_report(rows_read=5, repairs={}), 0.3, 1700000060.0)
    m.tick_failed(5.0, 1)
    assert _value(m, "forecastd_rows_read_total") == 15
    assert _value(m, "forecastd_rows_written_total", table="forecasts") == 108
    assert _value(m, "forecastd_rows_written_total", table="anomalies") == 18
    assert _value(m, "forecastd_anomalies_flagged_total") == 2
    assert _value(m, "forecastd_input_rows_total", kind="late",
                  reason="late (at or before the watermark), rejected") == 2
    assert _value(m, "forecastd_input_rows_total", kind="repaired", reason="NaN kept as missing") == 1
    assert _value(m, "forecastd_ticks_total", outcome="error") == 1
    assert _value(m, "forecastd_tick_duration_seconds_count") == 3
    assert _value(m, "forecastd_last_success_timestamp_seconds") == 1700000060.0
    assert _value(m, "forecastd_consecutive_tick_failures") == 1
    assert _value(m, "forecastd_live_model_version") == 3


@pytest.mark.parametrize("reason, kind", [
    ("late (at or before the watermark), rejected", "late"),
    ("future-stamped, deferred to a later read", "future"),
    ("rejected: null series_id", "rejected"),
    ("snapped to grid", "repaired"),
    ("duplicate timestamp resolved by 'last'", "repaired"),
])
def test_input_kinds(reason, kind):
    assert input_kind(reason) == kind


def test_health_rules():
    h = Health(interval=10.0, unhealthy_after=3, tick_timeout=60.0, started=1000.0)
    assert h.check(1000.0)[0]  # just started
    assert h.check(1029.0)[0]
    assert not h.check(1031.0)[0]  # no success for 3 intervals since start
    h.tick_ends(True)
    h.last_success = 1040.0
    assert h.check(1041.0)[0]
    h.tick_ends(False, "database is locked")
    h.tick_ends(False, "database is locked")
    h.last_success = 1040.0
    ok, reason = h.check(1042.0)
    assert ok and "2 tick(s) failed" in reason  # not yet unhealthy_after
    h.tick_ends(False, "database is locked")
    ok, reason = h.check(1042.0)
    assert not ok and "3 ticks failed in a row" in reason and "database is locked" in reason
    h.tick_ends(True)
    assert h.check()[0]
    h.tick_begins()
    h.tick_started -= 61.0
    assert h.hung() and not h.check()[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_http_endpoint():
    m = Metrics()
    h = Health(interval=10.0, unhealthy_after=1, tick_timeout=0.0)
    port = _free_port()
    server = MetricsServer("127.0.0.1", port, m, h).start()
    try:
        m.tick_ok(_report(), 0.1, 1700000000.0)
        h.tick_ends(True)
        code, headers, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200 and headers["Content-Type"].startswith("text/plain")
        text = body.decode()
        assert 'forecastd_ticks_total{outcome="ok"} 1.0' in text
        assert "forecastd_tick_duration_seconds_bucket" in text and "forecastd_healthy 1.0" in text
        code, _, body = _get(f"http://127.0.0.1:{port}/healthz")
        assert code == 200 and json.loads(body)["status"] == "ok"
        h.tick_ends(False, "sink unreachable")
        code, _, body = _get(f"http://127.0.0.1:{port}/healthz")
        assert code == 503 and "sink unreachable" in json.loads(body)["reason"]
        assert "forecastd_healthy 0.0" in _get(f"http://127.0.0.1:{port}/metrics")[2].decode()
        assert _get(f"http://127.0.0.1:{port}/nope")[0] == 404
        with pytest.raises(ConfigError, match="http_port"):  # the port is taken
            MetricsServer("127.0.0.1", port, m, h)
    finally:
        server.close()
