"""Writes samples/evasion.pcap: classic IDS-evasion segment tricks against the shellcode rule, one connection
each, crafted with scapy with fixed sequence numbers and timestamps so the file is reproducible.

    .venv/bin/python tools/make_evasion_capture.py [OUT]

Each connection is a full handshake, the client's trick, the server's ACKs, and a FIN exchange, as the
client and server would send it (the capture is what arrives at the gateway, before any filtering).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from scapy.all import IP, TCP, IPv6, Raw  # type: ignore[attr-defined]

from tcpguard.io.pcap import PcapWriter

T0 = 1_700_000_000.0


class Conn:
    def __init__(self, out: list[tuple[float, bytes]], cport: int, v6: bool = False) -> None:
        self.out = out
        self.cport = cport
        self.v6 = v6
        self.c_isn = 1000 * cport
        self.s_isn = 7000 * cport
        self.cseq = self.c_isn + 1
        self.sseq = self.s_isn + 1

    def ip(self, from_client: bool) -> Any:
        if self.v6:
            a, b = "fd00:99::1", "fd00:99::2"
            return IPv6(src=a, dst=b) if from_client else IPv6(src=b, dst=a)
        a, b = "10.99.0.1", "10.99.0.2"
        return IP(src=a, dst=b) if from_client else IP(src=b, dst=a)

    def emit(self, pkt: Any) -> None:
        self.out.append((T0 + len(self.out) * 0.001, bytes(pkt)))

    def c(self, data: bytes = b"", flags: str = "PA", seq: int | None = None, **tcp: Any) -> None:
        s = self.cseq if seq is None else seq
        pkt = self.ip(True) / TCP(sport=self.cport, dport=80, seq=s, ack=self.sseq, flags=flags, **tcp)
        self.emit(pkt / Raw(data) if data else pkt)

    def s_ack(self, upto: int | None = None) -> None:
        ack = self.cseq if upto is None else upto
        self.emit(self.ip(False) / TCP(sport=80, dport=self.cport, seq=self.sseq, ack=ack, flags="A"))

    def handshake(self, syn_data: bytes = b"") -> None:
        syn = self.ip(True) / TCP(
            sport=self.cport,
            dport=80,
            seq=self.c_isn,
            flags="S",
            window=64240,
            options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 7)],
        )
        self.emit(syn / Raw(syn_data) if syn_data else syn)
        self.emit(
            self.ip(False)
            / TCP(
                sport=80,
                dport=self.cport,
                seq=self.s_isn,
                ack=self.c_isn + 1,
                flags="SA",
                window=65160,
                options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 7)],
            )
        )
        self.emit(self.ip(True) / TCP(sport=self.cport, dport=80, seq=self.cseq, ack=self.sseq, flags="A"))

    def send(self, data: bytes) -> None:
        self.c(data)
        self.cseq += len(data)

    def close(self) -> None:
        self.c(flags="FA")
        self.cseq += 1
        self.emit(self.ip(False) / TCP(sport=80, dport=self.cport, seq=self.sseq, ack=self.cseq, flags="FA"))
        self.sseq += 1
        self.c(flags="A")


def build() -> list[tuple[float, bytes]]:
    out: list[tuple[float, bytes]] = []
    # 1. The pattern one byte per segment.
    k = Conn(out, 41001)
    k.handshake()
    for ch in b"run /bin/sh now":
        k.send(bytes([ch]))
    k.close()
    # 2. Out of order: the second half first.
    k = Conn(out, 41002)
    k.handshake()
    k.c(b"in/sh!", seq=k.cseq + 6)
    k.c(b"cmd /b", seq=k.cseq)
    k.cseq += 12
    k.s_ack()
    k.close()
    # 3. Conflicting retransmission: the first copy is harmless; the retransmission carries the pattern.
    k = Conn(out, 41003)
    k.handshake()
    k.c(b"cmd /bin/XX;")
    k.c(b"cmd /bin/sh;")
    k.cseq += 12
    k.s_ack()
    k.close()
    # 4. Bad TCP checksum on the segment with the pattern, then the harmless real one.
    k = Conn(out, 41004)
    k.handshake()
    k.c(b"cmd /bin/sh;", chksum=0x1234)
    k.send(b"cmd /bin/ls;")
    k.s_ack()
    k.close()
    # 5. Urgent pointer on the pattern's last byte (a receiver without SO_OOBINLINE would pull it out).
    k = Conn(out, 41005)
    k.handshake()
    k.c(b"x /bin/sh", flags="PAU", urgptr=9)
    k.cseq += 9
    k.s_ack()
    k.close()
    # 6. Blind RST with seq 0 and an out-of-window RST before the payload: must not end the connection.
    k = Conn(out, 41006)
    k.handshake()
    k.c(flags="R", seq=0)
    k.c(flags="R", seq=k.cseq + 5_000_000)
    k.send(b"hello /bin/sh")
    k.close()
    # 7. The pattern as data on the SYN (stripped; the client would send it again after the handshake).
    k = Conn(out, 41007)
    k.handshake(syn_data=b"/bin/sh")
    k.send(b"GET / HTTP/1.0\r\n\r\n")
    k.s_ack()
    k.close()
    # 8. IPv6, the pattern in three segments.
    k = Conn(out, 41008, v6=True)
    k.handshake()
    for part in (b"a /bi", b"n/", b"sh b"):
        k.send(part)
    k.close()
    return out


def main() -> None:
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "samples/evasion.pcap")
    with PcapWriter(target) as w:
        for ts, raw in build():
            w.write(raw, ts)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
