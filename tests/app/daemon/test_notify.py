"""The sd_notify protocol, against a datagram socket the test owns (no systemd needed)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from tcpguard.app.daemon.notify import Notifier


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


def test_abstract_socket_address() -> None:
    """systemd may name an abstract socket ('@name'): the leading '@' stands for a NUL byte."""
    name = f"tcpguard-test-{os.getpid()}-{time.monotonic_ns()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(2)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.send(STATUS="abstract") is True
        assert s.recv(100) == b"STATUS=abstract"
    finally:
        s.close()


def test_watchdog_is_off_without_watchdog_usec_or_for_another_pid(tmp_path: Path) -> None:
    sock, path = _listener(tmp_path)
    sock.settimeout(0.2)
    for env in ({}, {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}):
        n = Notifier({"NOTIFY_SOCKET": path, **env})
        assert n.watchdog_interval is None
        n.watchdog(100.0)
        with pytest.raises(TimeoutError):
            sock.recv(100)
    mine = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_interval == 1.0


def test_a_vanished_socket_is_reported_not_raised(tmp_path: Path) -> None:
    """The daemon must keep running if systemd's socket goes away (daemon-reexec, a test harness)."""
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.enabled
    assert n.send(READY=1) is False
    n.ready("up")
    n.watchdog(1.0)
    n.stopping()
    n.close()
