"""The sd_notify protocol, against a datagram socket the test owns (no systemd needed)."""

from __future__ import annotations

import socket
from pathlib import Path

from tcpguard.app.notify import Notifier


def _listener(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    return s, path


def test_messages_reach_the_socket(tmp_path: Path) -> None:
    sock, path = _listener(tmp_path)
    n = Notifier({"NOTIFY_SOCKET": path})
    n.ready("up")
    n.reloading()
    n.stopping()
    msgs = [sock.recv(4096).decode() for _ in range(3)]
    assert msgs[0].splitlines() == ["READY=1", "STATUS=up"]
    assert msgs[1].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert msgs[2].splitlines() == ["STOPPING=1", "STATUS=stopping"]


def test_watchdog_pings_at_half_the_interval(tmp_path: Path) -> None:
    sock, path = _listener(tmp_path)
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    n.watchdog(100.0)
    n.watchdog(100.5)  # too soon: no second ping
    n.watchdog(101.0)
    assert sock.recv(100) == b"WATCHDOG=1"
    assert sock.recv(100) == b"WATCHDOG=1"
    sock.settimeout(0.2)
    try:
        extra = sock.recv(100)
    except TimeoutError:
        extra = b""
    assert extra == b""


def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier({})
    assert not n.enabled and n.send(READY=1) is False
