"""Sends the packets the engine forges (RSTs) as complete raw IP packets.

The engine hands over finished IPv4 or IPv6 packets, headers and checksums included, so this module only
picks the socket by IP version and the destination from the header. Choices:

* IPv4: `AF_INET/SOCK_RAW/IPPROTO_RAW` with `IP_HDRINCL` (implied by IPPROTO_RAW, set explicitly anyway).
  Linux fills in the total length and the header checksum itself and keeps our source address, which
  is how a RST can claim to come from the other endpoint.
* IPv6: `AF_INET6/SOCK_RAW/IPPROTO_RAW`, which on Linux means "header included" too. Link-local
  destinations would need a scope id the packet does not carry; tcpguard never forges to those (a
  gateway forwards only routable traffic), and such a send simply fails and is counted.
* `SO_MARK` is set to the configured mark on both sockets so the tcpguard iptables chain RETURNs the
  forged packets instead of queueing them to ourselves again (matters when OUTPUT is hooked).
* Sockets are non-blocking and every error (EHOSTUNREACH, EPERM from a firewall, a malformed packet) is
  counted per errno and never raised: a lost RST is a degraded verdict, a crashed packet loop would be an
  outage. The sockets are opened lazily, once per family.
* Transient errors are retried, boundedly. EAGAIN (the socket's send buffer is full: its packets wait in
  a congested qdisc; 17-23% of the RSTs behind a 40 Mbit/s link, issue 18), ENOBUFS and EINTR say "not
  now", and an RST sent late still closes its connection (it carries the next sequence number the
  receiver expects, and the gateway drops everything else of a reset connection meanwhile). So such a
  packet waits in a queue that `retry()` works through, oldest first, stopping at the first packet the
  socket refuses again. The bounds: at most `max_pending` packets wait (1024, about 80 KiB; beyond it a
  new failure is lost at once), each for at most `retry_for` seconds (3 s: several times the half-second a
  deep qdisc queues) and `max_attempts` sends in all (30); `retry()` makes one round at most every
  `retry_every` seconds (0.05 s), which the adapter calls from its timer tick and after each batch of
  queued packets. Past a bound the packet is lost: counted in `stats.lost` and logged with its connection
  (addresses and ports; at most `LOST_LOG_PER_SECOND` lines a second, the rest summed in the next one).

Needs CAP_NET_RAW (raw sockets) and CAP_NET_ADMIN (SO_MARK).
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["LOST", "SENT", "WAITING", "RawSender", "SendStats"]

log = logging.getLogger(__name__)

# socket.SO_MARK only exists from Python 3.12; the value is Linux's and stable.
SO_MARK = getattr(socket, "SO_MARK", 36)
_EINVAL_PACKET = "invalid"
#: What `RawSender.send` says of a packet: the kernel took it; it waits for a retry; it is lost.
SENT, WAITING, LOST = 1, 0, -1
_TRANSIENT = frozenset({errno.EAGAIN, errno.ENOBUFS, errno.EINTR})
LOST_LOG_PER_SECOND = 10


@dataclass(slots=True)
class SendStats:
    """Counters of the raw sender. sent/bytes: packets the kernel took (at once or on a retry); failed:
    send attempts that failed, by errno name (or 'invalid') in `errors`; retried: packets sent on a later
    attempt; lost: packets given up (a permanent error, or a retry bound reached); pending: waiting now."""

    sent: int = 0
    bytes: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    retried: int = 0
    lost: int = 0
    pending: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "sent": self.sent,
            "bytes": self.bytes,
            "failed": self.failed,
            "errors": dict(self.errors),
            "retried": self.retried,
            "lost": self.lost,
            "pending": self.pending,
        }


class _Waiting:
    """A packet waiting for a retry: since when, and how many sends it had."""

    __slots__ = ("attempts", "first", "packet")

    def __init__(self, packet: bytes, first: float) -> None:
        self.packet = packet
        self.first = first
        self.attempts = 1


class RawSender:
    """Sends raw IP packets (bytes) with `SO_MARK` = `mark` (0: leave unmarked). Never raises on send;
    retries transient failures within the bounds the module docstring gives."""

    def __init__(
        self,
        mark: int = 0,
        *,
        max_pending: int = 1024,
        retry_for: float = 3.0,
        max_attempts: int = 30,
        retry_every: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_pending < 0 or retry_for < 0 or max_attempts < 1 or retry_every < 0:
            raise ValueError("retry bounds must not be negative, and max_attempts at least 1")
        self.mark = mark
        self.max_pending = max_pending
        self.retry_for = retry_for
        self.max_attempts = max_attempts
        self.retry_every = retry_every
        self.clock = clock
        self.stats = SendStats()
        self._socks: dict[int, socket.socket] = {}
        self._waiting: deque[_Waiting] = deque()
        self._last_round = -math.inf
        self._log_second = -math.inf
        self._log_lines = 0
        self._log_skipped = 0

    def send(self, packet: bytes) -> int:
        """Send one packet: SENT if the kernel took it, WAITING if it failed for now and waits for
        `retry()`, LOST if it failed for good. Counted in `stats`, never raised."""
        err = self._try(packet)
        if err is None:
            return SENT
        if err in _TRANSIENT and len(self._waiting) < self.max_pending and self.max_attempts > 1:
            self._waiting.append(_Waiting(packet, self.clock()))
            self.stats.pending = len(self._waiting)
            return WAITING
        self._lose(packet, 1, 0.0, err)
        return LOST

    def retry(self) -> tuple[int, int]:
        """One round of retries (at most one per `retry_every`): (sent, lost) in it."""
        if not self._waiting:
            return 0, 0
        now = self.clock()
        if 0 <= now - self._last_round < self.retry_every:
            return 0, 0
        self._last_round = now
        sent = lost = 0
        waiting = self._waiting
        while waiting:
            w = waiting[0]
            age = now - w.first
            if age > self.retry_for:
                waiting.popleft()
                self._lose(w.packet, w.attempts, age, None)
                lost += 1
                continue
            err = self._try(w.packet)
            if err is None:
                waiting.popleft()
                self.stats.retried += 1
                sent += 1
                continue
            w.attempts += 1
            if err not in _TRANSIENT or w.attempts >= self.max_attempts:
                waiting.popleft()
                self._lose(w.packet, w.attempts, age, err)
                lost += 1
                continue
            break  # the socket is still full: the rest waits for the next round
        self.stats.pending = len(waiting)
        return sent, lost

    @property
    def pending(self) -> int:
        """Packets waiting for a retry."""
        return len(self._waiting)

    def send_all(self, packets: list[bytes]) -> int:
        """Send packets in order; returns how many the kernel took at once."""
        return sum(1 for p in packets if self.send(p) == SENT)

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()

    def __enter__(self) -> RawSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers
    def _try(self, packet: bytes) -> int | None:
        """One send: None if the kernel took it, else the errno (0 for a packet we cannot send at all)."""
        try:
            family, dest = self._destination(packet)
            sock = self._socket(family)
            sock.sendto(packet, dest)
        except ValueError as exc:
            self._fail(_EINVAL_PACKET, exc)
            return 0
        except OSError as exc:
            name = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else "OSError"
            self._fail(name, exc)
            return exc.errno or 0
        self.stats.sent += 1
        self.stats.bytes += len(packet)
        return None

    def _fail(self, name: str, exc: Exception) -> None:
        self.stats.failed += 1
        self.stats.errors[name] += 1
        # Rate-limited by nature: only the first of each kind is logged at warning level.
        level = logging.WARNING if self.stats.errors[name] == 1 else logging.DEBUG
        log.log(level, "raw send failed (%s): %s", name, exc)

    def _lose(self, packet: bytes, attempts: int, age: float, err: int | None) -> None:
        """Give a packet up: count it, and log it with its connection (rate-limited)."""
        self.stats.lost += 1
        now = self.clock()
        if now - self._log_second >= 1.0:
            self._log_second, self._log_lines = now, 0
        if self._log_lines >= LOST_LOG_PER_SECOND:
            self._log_skipped += 1
            return
        self._log_lines += 1
        why = (
            "retry time up"
            if err is None
            else (errno.errorcode.get(err, "invalid packet") if err else "invalid packet")
        )
        skipped = f" ({self._log_skipped} more lost, not logged)" if self._log_skipped else ""
        self._log_skipped = 0
        log.warning(
            "forged packet %s not sent, lost after %d attempt%s in %.2f s (%s)%s",
            describe(packet),
            attempts,
            "" if attempts == 1 else "s",
            age,
            why,
            skipped,
        )

    @staticmethod
    def _destination(packet: bytes) -> tuple[int, tuple[str, int] | tuple[str, int, int, int]]:
        if not packet:
            raise ValueError("empty packet")
        version = packet[0] >> 4
        if version == 4:
            if len(packet) < 20:
                raise ValueError("IPv4 packet shorter than its header")
            return socket.AF_INET, (socket.inet_ntop(socket.AF_INET, packet[16:20]), 0)
        if version == 6:
            if len(packet) < 40:
                raise ValueError("IPv6 packet shorter than its header")
            return socket.AF_INET6, (socket.inet_ntop(socket.AF_INET6, packet[24:40]), 0, 0, 0)
        raise ValueError(f"IP version {version}")

    def _socket(self, family: int) -> socket.socket:
        sock = self._socks.get(family)
        if sock is None:
            sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            try:
                if family == socket.AF_INET:
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
                if self.mark:
                    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
            self._socks[family] = sock
        return sock


def describe(packet: bytes) -> str:
    """A forged packet as the connection it belongs to: 'RST 10.0.0.1:40000 > 10.0.0.2:80' (for a log
    line; '?' for what is not TCP/IP)."""
    try:
        v = packet[0] >> 4
        if v == 4:
            ihl = (packet[0] & 15) * 4
            src, dst = (
                socket.inet_ntop(socket.AF_INET, packet[12:16]),
                socket.inet_ntop(socket.AF_INET, packet[16:20]),
            )
            tcp = packet[ihl:] if packet[9] == 6 else b""
        elif v == 6:
            src = "[" + socket.inet_ntop(socket.AF_INET6, packet[8:24]) + "]"
            dst = "[" + socket.inet_ntop(socket.AF_INET6, packet[24:40]) + "]"
            tcp = packet[40:] if packet[6] == 6 else b""
        else:
            return "?"
    except (IndexError, ValueError, OSError):
        return "?"
    if len(tcp) < 14:
        return f"{src} > {dst}"
    flags = "RST" if tcp[13] & 0x04 else f"flags {tcp[13]:#x}"
    sport, dport = int.from_bytes(tcp[0:2], "big"), int.from_bytes(tcp[2:4], "big")
    return f"{flags} {src}:{sport} > {dst}:{dport}"
