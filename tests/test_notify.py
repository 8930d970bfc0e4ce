"""sd_notify against real AF_UNIX datagram sockets: a path, the abstract namespace, none, a full queue."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from forecastd.notify import Notifier, watchdog_interval


@pytest.fixture
def listener():
    directory = Path(tempfile.mkdtemp(prefix="fdn"))  # short: socket paths are limited to ~107 bytes
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(directory / "notify"))
    sock.settimeout(2)
    yield str(directory / "notify"), sock
    sock.close()
    shutil.rmtree(directory, ignore_errors=True)


def _fields(data: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in data.decode().split("\n"))


def test_one_datagram_with_every_field(listener):
    path, sock = listener
    n = Notifier(path)
    assert n.enabled
    assert n.ready("serving: model v3\nsecond line")
    assert _fields(sock.recv(4096)) == {"READY": "1", "STATUS": "serving: model v3 second line"}
    assert n.watchdog() and sock.recv(4096) == b"WATCHDOG=1"
    assert n.stopping("bye") and _fields(sock.recv(4096)) == {"STOPPING": "1", "STATUS": "bye"}


def test_notify_socket_from_the_environment(listener, monkeypatch):
    path, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert Notifier().status("hello")
    assert sock.recv(4096) == b"STATUS=hello"


def test_abstract_namespace_socket():
    name = f"forecastd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        assert Notifier("@" + name).ready("ok")
        assert _fields(sock.recv(4096)) == {"READY": "1", "STATUS": "ok"}


def test_without_a_socket_every_call_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled and not n.ready("x") and not n.watchdog()
    assert not Notifier("relative/path").enabled


def test_a_listener_that_stops_reading_never_blocks_the_sender(listener, caplog):
    path, _ = listener  # bound, never read: its queue fills up
    n = Notifier(path)
    started = time.monotonic()
    sent = [n.status(f"tick {i}") for i in range(2000)]
    assert time.monotonic() - started < 5
    assert sent[0] and not sent[-1]
    assert len([r for r in caplog.records if "cannot notify" in r.getMessage()]) == 1


def test_a_socket_that_went_away_is_a_warning(tmp_path, caplog):
    n = Notifier(str(tmp_path / "gone"))
    assert not n.ready("x") and not n.watchdog()
    assert len([r for r in caplog.records if "cannot notify" in r.getMessage()]) == 1


def test_watchdog_interval_is_half_of_watchdog_sec(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # inherited, meant for another process
    assert watchdog_interval() is None
