"""Logging of the daemon: to the journal with structured fields under systemd, to stderr otherwise.

Log records of the engine carry journald-style fields in `extra` (TCPGUARD_FLOW, TCPGUARD_FLOW_ID,
TCPGUARD_RULE, TCPGUARD_VERDICT, TCPGUARD_SEVERITY, TCPGUARD_DIRECTION); `JournalHandler` stores each of
them as a journal field, so an operator can ask
`journalctl -u tcpguard TCPGUARD_RULE=shellcode.no_shellcode` or `-o json` and get them separately.

Why a handler of our own rather than systemd-python's `systemd.journal.JournalHandler` (tcpguard does not
install systemd-python at all; notify.py covers the rest of what it would be for): that one passes
the whole `record.__dict__` to the journal (every LogRecord attribute: `msg`, `args`, `levelname`, ...,
which journald then has to discard as invalid field names) and needs the C extension. Ours speaks
journald's native protocol directly: one datagram to /run/systemd/journal/socket holding the fields,
`KEY=value\\n` each, or, for a value with a newline (a traceback), `KEY\\n`, its length as 64-bit
little-endian, the bytes, `\\n`. A message too large for one datagram goes in a sealed memfd whose
descriptor is sent instead, as sd_journal_send() does. It forwards exactly the record attributes that
are valid journal field names (upper case letters, digits, underscores, not starting with `_`), so any
`extra={"SOME_FIELD": ...}` becomes a field, and nothing else does.

Where logs go (`logging.target` in the config): `journal`, `stderr`, or `auto`, which means the journal
when stderr *is* the journal stream, as systemd sets it up for a service: systemd exports
JOURNAL_STREAM=device:inode of that stream, and we compare it with stderr's, because a child of a
service inherits the variable even when its stderr goes elsewhere (a test runner started by a unit, a
shell script logging to a file).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Mapping

from tcpguard.app.daemon.config import Config

__all__ = ["JOURNAL_SOCKET", "JournalHandler", "journal_fields", "setup_logging", "stderr_is_journal"]

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "tcpguard"

# journald accepts field names of upper case letters, digits and underscores, at most 64 characters, not
# starting with a digit; a leading underscore marks the trusted fields journald adds itself.
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}\Z")

# Python levels to syslog priorities (journald's PRIORITY field).
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def priority(levelno: int) -> int:
    for level, prio in _PRIORITY:
        if levelno >= level:
            return prio
    return 7


def journal_fields(record: logging.LogRecord, message: str, identifier: str = IDENTIFIER) -> dict[str, str]:
    """The journal fields of one record: the standard ones, then every upper-case `extra` attribute."""
    fields = {
        "MESSAGE": message,
        "PRIORITY": str(priority(record.levelno)),
        "SYSLOG_IDENTIFIER": identifier,
        "LOGGER": record.name,
        "CODE_FILE": record.pathname,
        "CODE_LINE": str(record.lineno),
        "CODE_FUNC": record.funcName,
    }
    for key, value in record.__dict__.items():
        # An `extra` field never replaces one of the above (a rule cannot forge another MESSAGE).
        if _FIELD_NAME.match(key) and value is not None and key not in fields:
            fields[key] = str(value)
    return fields


def encode(fields: Mapping[str, str]) -> bytes:
    """journald's native wire format for one entry (see the module docstring)."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", errors="replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Sends each record to journald with its structured fields (journald's native protocol)."""

    def __init__(self, address: str | None = None, identifier: str = IDENTIFIER) -> None:
        super().__init__()
        self.address = JOURNAL_SOCKET if address is None else address
        self.identifier = identifier
        self._sock: socket.socket | None = None
        self.setFormatter(logging.Formatter("%(message)s"))

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        return self._sock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = encode(journal_fields(record, self.format(record), self.identifier))
            self.send(data)
        except Exception:
            self.handleError(record)

    def send(self, data: bytes) -> None:
        sock = self._socket()
        try:
            sock.sendto(data, self.address)
        except OSError as e:
            # EMSGSIZE: bigger than a datagram may be; ENOBUFS: bigger than the socket buffer allows.
            if e.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(sock, data)

    def _send_memfd(self, sock: socket.socket, data: bytes) -> None:
        """A large entry: journald reads it from a sealed memory file whose descriptor we pass."""
        fd = os.memfd_create("tcpguard-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))], 0, self.address)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        super().close()


def stderr_is_journal(environ: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """True if `fd` is the journal stream systemd connected (JOURNAL_STREAM=dev:ino matches it)."""
    env = os.environ if environ is None else environ
    dev, _, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def setup_logging(cfg: Config, verbose: int = 0) -> None:
    """Replace the root logger's handlers with the journal or stderr handler the config asks for."""
    level = getattr(logging, cfg.logging.level.upper())
    if verbose:
        level = min(level, logging.DEBUG if verbose > 1 else logging.INFO)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    target = cfg.logging.target
    use_journal = target == "journal" or (target == "auto" and stderr_is_journal())
    handler: logging.Handler
    if use_journal and os.path.exists(JOURNAL_SOCKET):
        handler = JournalHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    if use_journal and not isinstance(handler, JournalHandler):
        logging.getLogger("tcpguard").warning("no journal at %s: logging to stderr", JOURNAL_SOCKET)
