"""systemd's notification protocol (sd_notify): readiness, status, reload, stop and watchdog.

Written against the protocol rather than through systemd-python's `systemd.daemon.notify`, and tcpguard
does not install that library: the protocol is one datagram of `KEY=VALUE` lines sent to the socket named
by `NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace), a few lines of Python, where the
library is a C extension that needs libsystemd's headers and a compiler to install, for the same datagram.
It is tested against a datagram socket the test owns, and under real systemd in tests/systemd. Without
`NOTIFY_SOCKET` every call is a no-op, so the daemon runs unchanged outside systemd.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if addr:
            self.address = b"\0" + addr[1:].encode() if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog_for_us = usec.isdigit() and (not pid or pid == str(os.getpid()))
        # Ping at half the interval, as systemd recommends.
        self.watchdog_interval = int(usec) / 2e6 if watchdog_for_us else None
        self._last_ping = 0.0
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send one notification, e.g. `send(READY=1, STATUS="running")`. False if it could not go out."""
        if self.address is None:
            return False
        msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(msg, self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd (>= 253, Type=notify-reload) match the reload to this message.
        self.send(RELOADING=1, MONOTONIC_USEC=int(time.monotonic() * 1e6), STATUS="reloading")

    def stopping(self) -> None:
        self.send(STOPPING=1, STATUS="stopping")

    def status(self, text: str) -> None:
        self.send(STATUS=text)

    def watchdog(self, now: float) -> None:
        """Called from the packet loop: a loop that hangs stops pinging and systemd restarts it."""
        if self.watchdog_interval is not None and now - self._last_ping >= self.watchdog_interval:
            self._last_ping = now
            self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
