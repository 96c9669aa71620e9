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
* Sockets are non-blocking and every error (ENOBUFS when the qdisc is full, EHOSTUNREACH, EPERM from a
  firewall, a malformed packet) is counted per errno and never raised: a lost RST is a degraded verdict,
  a crashed packet loop would be an outage. The sockets are opened lazily, once per family.

Needs CAP_NET_RAW (raw sockets) and CAP_NET_ADMIN (SO_MARK).
"""

from __future__ import annotations

import errno
import logging
import socket
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["RawSender", "SendStats"]

log = logging.getLogger(__name__)

# socket.SO_MARK only exists from Python 3.12; the value is Linux's and stable.
SO_MARK = getattr(socket, "SO_MARK", 36)
_EINVAL_PACKET = "invalid"


@dataclass(slots=True)
class SendStats:
    """Counters of the raw sender. `errors` maps an errno name (or 'invalid') to its count."""

    sent: int = 0
    bytes: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        return {"sent": self.sent, "bytes": self.bytes, "failed": self.failed, "errors": dict(self.errors)}


class RawSender:
    """Sends raw IP packets (bytes) with `SO_MARK` = `mark` (0: leave unmarked). Never raises on send."""

    def __init__(self, mark: int = 0) -> None:
        self.mark = mark
        self.stats = SendStats()
        self._socks: dict[int, socket.socket] = {}

    def send(self, packet: bytes) -> bool:
        """Send one packet; True if the kernel took it. Failures are counted in `stats`, never raised."""
        try:
            family, dest = self._destination(packet)
            sock = self._socket(family)
            sock.sendto(packet, dest)
        except ValueError as exc:
            self._fail(_EINVAL_PACKET, exc)
            return False
        except OSError as exc:
            name = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else "OSError"
            self._fail(name, exc)
            return False
        self.stats.sent += 1
        self.stats.bytes += len(packet)
        return True

    def send_all(self, packets: list[bytes]) -> int:
        """Send packets in order; returns how many the kernel took."""
        return sum(1 for p in packets if self.send(p))

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()

    def __enter__(self) -> RawSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers
    def _fail(self, name: str, exc: Exception) -> None:
        self.stats.failed += 1
        self.stats.errors[name] += 1
        # Rate-limited by nature: only the first of each kind is logged at warning level.
        level = logging.WARNING if self.stats.errors[name] == 1 else logging.DEBUG
        log.log(level, "raw send failed (%s): %s", name, exc)

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
