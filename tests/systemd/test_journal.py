"""The journal handler, against a datagram socket the test owns in place of journald's (no systemd needed).

The wire format is decoded here independently of the encoder, following journald's documented native
protocol, so a mistake in the handler cannot be mirrored by the test. The same handler writing to the
real journald, read back with journalctl, is in test_service.py.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcpguard.app.daemon import logsetup
from tcpguard.app.daemon.config import Config
from tcpguard.app.daemon.logsetup import (
    JournalHandler,
    encode,
    journal_fields,
    setup_logging,
    stderr_is_journal,
)


def decode(data: bytes) -> dict[str, str]:
    """journald's native format: `KEY=value\\n`, or `KEY\\n` + u64le length + bytes + `\\n`."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            i = nl + 1
        else:
            key = line
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            value = data[nl + 9 : nl + 9 + size]
            assert data[nl + 9 + size : nl + 10 + size] == b"\n"
            i = nl + 10 + size
        fields[key.decode()] = value.decode()
    return fields


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "journal.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    yield s, path
    s.close()


def receive(sock: socket.socket, via_memfd: bool = False) -> dict[str, str]:
    """One entry; `via_memfd`: it must have come as a memfd descriptor, else inline."""
    fds = array.array("i")
    data, anc, _flags, _addr = sock.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    assert bool(fds) == via_memfd, f"entry came {'as a memfd' if fds else 'inline'}"
    if fds:
        assert data == b""
        fd = fds[0]
        try:
            data = os.pread(fd, 1 << 24, 0)
        finally:
            os.close(fd)
    return decode(data)


def engine_logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger("tcpguard.test.journal")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger


FLOW_FIELDS = {
    "TCPGUARD_FLOW": "10.0.0.1:40000 > 10.0.0.2:80",
    "TCPGUARD_FLOW_ID": "7",
    "TCPGUARD_RULE": "shellcode.no_shellcode",
    "TCPGUARD_VERDICT": "reset",
}


def test_extra_fields_become_journal_fields(journal: tuple[socket.socket, str]) -> None:
    sock, path = journal
    h = JournalHandler(path)
    engine_logger(h).warning("alert on %s", "a flow", extra={**FLOW_FIELDS, "lower": "x"})
    f = receive(sock)
    h.close()
    assert {k: f[k] for k in FLOW_FIELDS} == FLOW_FIELDS
    assert f["MESSAGE"] == "alert on a flow"
    assert f["PRIORITY"] == "4" and f["SYSLOG_IDENTIFIER"] == "tcpguard"
    assert (
        f["LOGGER"] == "tcpguard.test.journal" and f["CODE_FUNC"] == "test_extra_fields_become_journal_fields"
    )
    # Only valid journal field names travel: no LogRecord internals, no lower-case extras.
    assert all(k.isupper() for k in f), sorted(f)
    assert "lower" not in f and "MSG" not in f


def test_a_traceback_travels_in_the_binary_form(journal: tuple[socket.socket, str]) -> None:
    sock, path = journal
    h = JournalHandler(path)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        engine_logger(h).exception("rule failed", extra={"TCPGUARD_RULE": "r.f"})
    f = receive(sock)
    h.close()
    assert f["PRIORITY"] == "3" and f["TCPGUARD_RULE"] == "r.f"
    assert f["MESSAGE"].startswith("rule failed\nTraceback") and "RuntimeError: boom" in f["MESSAGE"]


def test_an_entry_too_large_for_a_datagram_goes_in_a_sealed_memfd(journal: tuple[socket.socket, str]) -> None:
    sock, path = journal
    h = JournalHandler(path)
    big = "x" * 4_000_000  # beyond any datagram the socket takes
    engine_logger(h).info(big, extra={"TCPGUARD_FLOW_ID": "1"})
    f = receive(sock, via_memfd=True)
    h.close()
    assert f["MESSAGE"] == big and f["TCPGUARD_FLOW_ID"] == "1"


def test_extras_cannot_replace_the_message_or_priority() -> None:
    rec = logging.LogRecord("tcpguard.x", logging.ERROR, __file__, 1, "real", None, None)
    rec.MESSAGE = "forged"
    rec.PRIORITY = "7"
    rec.TCPGUARD_VERDICT = "drop"
    f = journal_fields(rec, "real")
    assert f["MESSAGE"] == "real" and f["PRIORITY"] == "3" and f["TCPGUARD_VERDICT"] == "drop"


@pytest.mark.parametrize(
    ("level", "prio"),
    [(logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3), (logging.CRITICAL, 2)],
)
def test_priorities(level: int, prio: int) -> None:
    assert logsetup.priority(level) == prio


def test_encode_round_trips_values_with_newlines() -> None:
    fields = {"MESSAGE": "two\nlines", "A": "", "B": "=equals=", "C": "ünïcode"}
    assert decode(encode(fields)) == fields


def test_stderr_is_journal_compares_device_and_inode(tmp_path: Path) -> None:
    with open(tmp_path / "f", "w") as fh:
        st = os.fstat(fh.fileno())
        match = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert stderr_is_journal(match, fh.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, fh.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, fh.fileno())
        assert not stderr_is_journal({}, fh.fileno())


def _config(target: str) -> Config:
    cfg = Config()
    cfg.logging.target = target  # type: ignore[assignment]
    return cfg


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    yield root
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    for h in saved:
        root.addHandler(h)
    root.setLevel(level)


def test_auto_logs_to_the_journal_when_stderr_is_the_journal_stream(
    journal: tuple[socket.socket, str], root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = journal
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    monkeypatch.setattr(logsetup, "JOURNAL_SOCKET", path)
    setup_logging(_config("auto"))
    (handler,) = root_logger.handlers
    assert isinstance(handler, JournalHandler)
    logging.getLogger("tcpguard.daemon").info("running", extra={"TCPGUARD_FLOW": "f"})
    assert receive(sock)["TCPGUARD_FLOW"] == "f"


def test_auto_logs_to_stderr_outside_systemd(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    setup_logging(_config("auto"))
    (handler,) = root_logger.handlers
    assert type(handler) is logging.StreamHandler


def test_journal_target_without_journald_falls_back_to_stderr_and_says_so(
    tmp_path: Path,
    root_logger: logging.Logger,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(logsetup, "JOURNAL_SOCKET", str(tmp_path / "none"))
    setup_logging(_config("journal"))
    (handler,) = root_logger.handlers
    assert type(handler) is logging.StreamHandler
    assert "no journal at" in capsys.readouterr().err
