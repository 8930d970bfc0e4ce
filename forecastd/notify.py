"""sd_notify: tell systemd (or anything listening on $NOTIFY_SOCKET) what the daemon is doing.

The protocol is one datagram of newline-separated `KEY=value` lines to the AF_UNIX socket named by
$NOTIFY_SOCKET; a name starting with '@' is in the abstract namespace (a leading NUL byte). Without
the variable every call is a no-op, so the daemon runs the same in a terminal, in tests and under
systemd. Implemented here rather than with a library: it is twenty lines and one syscall.

    READY=1      state is recovered; start-up is complete (Type=notify waits for it)
    STATUS=...   one line shown by `systemctl status`
    WATCHDOG=1   the main loop is alive (WatchdogSec=); a missing ping gets the service restarted
    STOPPING=1   shutdown has begun
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["Notifier", "watchdog_interval"]

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify datagrams to `socket_path` (default: $NOTIFY_SOCKET at construction)."""

    def __init__(self, socket_path: str | None = None) -> None:
        self.address = _address(os.environ.get("NOTIFY_SOCKET") if socket_path is None else socket_path)
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """One datagram with every field (`send(READY=1, STATUS="ok")`); False when nothing was sent.

        Never raises or blocks: a notify socket that went away or stopped reading must not take the daemon
        down or hold up a tick; the message is dropped and a warning logged once.
        """
        if self.address is None:
            return False
        message = "\n".join(f"{k}={_one_line(str(v))}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Non-blocking: a datagram to a listener that stopped reading would otherwise block the
                # sending thread (a tick) once the listener's queue is full.
                sock.sendto(message, socket.MSG_DONTWAIT, self.address)
        except OSError as exc:
            if not self._warned:  # once: a broken socket would otherwise log at every watchdog ping
                log.warning("cannot notify %r (%s); systemd will not see readiness or watchdog pings",
                            self.address, exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(STOPPING=1, STATUS=status)


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings: half of systemd's WatchdogSec=, as sd_watchdog_enabled advises.

    None when no watchdog is asked for, or when $WATCHDOG_PID names another process (the variables
    were inherited, not meant for us).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        seconds = int(usec) / 1e6
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number of microseconds; watchdog pings disabled", usec)
        return None
    return seconds / 2 if seconds > 0 else None


def _address(path: str | None) -> str | bytes | None:
    if not path:
        return None
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    if not path.startswith("/"):
        log.warning("NOTIFY_SOCKET=%r is neither an absolute path nor an abstract '@' name; ignoring it", path)
        return None
    return path


def _one_line(value: str) -> str:
    # A newline would start a new KEY=value field; systemd shows STATUS= on one line anyway.
    return " ".join(value.splitlines())
