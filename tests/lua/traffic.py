"""Captures of whole TCP connections built with scapy, for the Lua tests and the cost figures.

Each connection is a real exchange: handshake, client segments (split as given), a server reply, and
a FIN exchange, with consistent sequence numbers and correct checksums, so the engine treats it as a
receiver would."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Conn:
    client: str = "10.0.0.1"
    server: str = "10.0.0.2"
    cport: int = 40000
    sport: int = 80
    pieces: list[bytes] = field(default_factory=list)
    reply: bytes = b"HTTP/1.0 200 OK\r\n\r\n"


def packets(conns: Iterable[Conn], start: float = 1_000_000.0) -> list[Any]:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    out: list[Any] = []
    t = start
    for c in conns:
        ip = IPv6 if ":" in c.client else IP
        # Explicit MACs: without them scapy looks the destination up (ARP, neighbour discovery) per packet.
        up = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip(src=c.client, dst=c.server)
        down = Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / ip(src=c.server, dst=c.client)
        cs, ss = 1000, 5000

        def add(p: Any) -> None:
            nonlocal t
            t += 0.001
            p.time = t
            out.append(p)

        add(up / TCP(sport=c.cport, dport=c.sport, flags="S", seq=cs - 1))
        add(down / TCP(sport=c.sport, dport=c.cport, flags="SA", seq=ss - 1, ack=cs))
        add(up / TCP(sport=c.cport, dport=c.sport, flags="A", seq=cs, ack=ss))
        for piece in c.pieces:
            add(up / TCP(sport=c.cport, dport=c.sport, flags="PA", seq=cs, ack=ss) / piece)
            cs += len(piece)
        add(down / TCP(sport=c.sport, dport=c.cport, flags="A", seq=ss, ack=cs))
        if c.reply:
            add(down / TCP(sport=c.sport, dport=c.cport, flags="PA", seq=ss, ack=cs) / c.reply)
            ss += len(c.reply)
        add(up / TCP(sport=c.cport, dport=c.sport, flags="FA", seq=cs, ack=ss))
        add(down / TCP(sport=c.sport, dport=c.cport, flags="FA", seq=ss, ack=cs + 1))
        add(up / TCP(sport=c.cport, dport=c.sport, flags="A", seq=cs + 1, ack=ss + 1))
    return out


def write(path: Path, conns: Iterable[Conn]) -> Path:
    from scapy.utils import wrpcap

    wrpcap(str(path), packets(conns))
    return path


def bench_capture(path: Path, n: int = 2000) -> Path:
    """`n` connections to a few ports and addresses, a third of them refused by the sample firewall,
    each client sending a request in three segments, one in twenty carrying a shell-code pattern."""
    conns = []
    for i in range(n):
        server = "10.0.0.2" if i % 3 else "8.8.8.8"
        body = b"GET /index.html?q=%d HTTP/1.1\r\nHost: example\r\n" % i
        if i % 20 == 7:
            body += b"x=/bin/sh\r\n"
        body += b"User-Agent: bench\r\n\r\n"
        third = len(body) // 3
        conns.append(
            Conn(
                client=f"10.1.{i // 250}.{i % 250 + 1}",
                server=server,
                cport=20000 + i,
                sport=(80, 443, 8080, 22, 23)[i % 5],
                pieces=[body[:third], body[third : 2 * third], body[2 * third :]],
            )
        )
    return write(path, conns)
