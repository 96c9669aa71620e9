"""A hand-driven TCP client for the attacks: raw sockets opened inside the lab's client namespace, every
segment built with scapy exactly as the attack needs it.

Why it works this way:

* The sockets are created from this test process by switching the calling thread into the client
  namespace (`setns`) just for the `socket()` calls: a socket stays in the namespace it was created in, so
  no helper process and no per-case interpreter start-up are needed.
* Sending uses raw IP sockets (`IPPROTO_RAW`, header included): the kernel routes the packet and resolves
  the gateway's MAC, and leaves the TCP header (checksum included) exactly as built. For IPv4 it does
  rewrite the total length and the header checksum, which no case here needs to forge.
* Our packets carry the firewall mark `MARK`. The client namespace drops every *other* outgoing RST
  (`install_rst_filter`): the client kernel knows none of our hand-made connections and would answer the
  server's SYN-ACK with an RST that tears them down.
* Receiving is one `AF_PACKET` socket on the client's interface read by a thread; it keeps the TCP
  segments addressed to ports a `Conn` registered, so floods do not fill memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from tests.netns import CLIENT_V4, CLIENT_V6, Lab

MARK = 0x5151
MASK = 0xFFFFFFFF
_CLONE_NEWNET = 0x40000000
_ETH_P_ALL = 0x0003
_PACKET_OUTGOING = 4
_SO_MARK = getattr(socket, "SO_MARK", 36)

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def netns(name: str) -> Iterator[None]:
    """Run the block with this thread in network namespace `name` (only sockets care)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)


def install_rst_filter(lab: Lab) -> None:
    """Drop the client kernel's own RSTs (ours carry MARK and pass)."""
    for tool in ("iptables", "ip6tables"):
        lab.run(
            "client",
            [
                tool,
                "-w",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "--tcp-flags",
                "RST",
                "RST",
                "-m",
                "mark",
                "!",
                "--mark",
                str(MARK),
                "-j",
                "DROP",
            ],
        )


@dataclass(frozen=True)
class Seg:
    """A TCP segment the client namespace received."""

    src: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes
    tsval: int | None
    when: float

    def has(self, flags: str) -> bool:
        return all(self.flags & FLAG_BITS[f] for f in flags)


FLAG_BITS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10, "U": 0x20, "E": 0x40, "C": 0x80}


class ClientNet:
    """Raw sockets in the lab's client namespace: a marked sender per IP version and a receiver thread."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        with netns(lab.name("client")):
            self._tx4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self._tx6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self._rx = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(_ETH_P_ALL))
            self._rx.bind(("eth0", _ETH_P_ALL))
        for s in (self._tx4, self._tx6, self._rx):
            s.setsockopt(socket.SOL_SOCKET, _SO_MARK, MARK)
        self._gw_mac: bytes | None = None
        # Source ports of hand-made connections: unique within the lab (the rule's records are kept per
        # client port) and below the kernel's ephemeral range, which the real clients use.
        self._next_port = random.randint(20000, 24000)
        self._tx4.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        self._rx.settimeout(0.1)
        self._lock = threading.Condition()
        self._segs: dict[int, list[Seg]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._receive, name="client-rx", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=5)
        for s in (self._tx4, self._tx6, self._rx):
            s.close()

    def __enter__(self) -> ClientNet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def new_port(self) -> int:
        port = self._next_port
        self._next_port += 1
        return port

    # ------------------------------------------------------------------ sending
    def send(self, raw: bytes) -> None:
        """Send one complete IP packet as built."""
        if raw[0] >> 4 == 4:
            self._tx4.sendto(raw, (socket.inet_ntop(socket.AF_INET, raw[16:20]), 0))
        else:
            self._tx6.sendto(raw, (socket.inet_ntop(socket.AF_INET6, raw[24:40]), 0, 0, 0))

    def send_via_gateway(self, raw: bytes) -> None:
        """Send an IP packet straight to the gateway's MAC, whatever its destination address: how a host
        on the client's network makes the gateway forward a packet that claims to come from the server."""
        if self._gw_mac is None:
            out = self.lab.run("gw", ["cat", "/sys/class/net/c0/address"]).stdout.strip()
            self._gw_mac = bytes.fromhex(out.replace(":", ""))
        proto = 0x0800 if raw[0] >> 4 == 4 else 0x86DD
        self._rx.sendto(raw, ("eth0", proto, 0, 0, self._gw_mac))

    def blast(self, packets: list[bytes], rate: float | None = None) -> int:
        """Send many packets as fast as possible (or at `rate` per second); returns how many were sent."""
        sent = 0
        start = time.monotonic()
        for i, raw in enumerate(packets):
            if rate is not None:
                due = start + i / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            try:
                self.send(raw)
                sent += 1
            except OSError:  # ENOBUFS when the qdisc is full: a flood is allowed to lose packets
                time.sleep(0.001)
        return sent

    # ------------------------------------------------------------------ receiving
    def watch(self, port: int) -> None:
        with self._lock:
            self._segs.setdefault(port, [])

    def segments(self, port: int) -> list[Seg]:
        with self._lock:
            return list(self._segs.get(port, []))

    def wait(self, port: int, pred: Callable[[Seg], bool], timeout: float) -> Seg | None:
        """The first segment to `port` matching `pred` (already received or arriving within `timeout`)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for seg in self._segs.get(port, []):
                    if pred(seg):
                        return seg
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._lock.wait(left)

    def _receive(self) -> None:
        while not self._stop:
            try:
                data, addr = self._rx.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] == _PACKET_OUTGOING:
                continue
            seg = _parse(data)
            if seg is None:
                continue
            with self._lock:
                lst = self._segs.get(seg.dport)
                if lst is not None:
                    lst.append(seg)
                    self._lock.notify_all()


def _parse(data: bytes) -> Seg | None:
    try:
        pkt: Any = IP(data) if data[0] >> 4 == 4 else IPv6(data)
    except Exception:
        return None
    tcp = pkt.getlayer(TCP)
    if tcp is None:
        return None
    tsval = None
    for name, value in tcp.options:
        if name == "Timestamp":
            tsval = value[0]
    return Seg(
        src=pkt.src,
        sport=tcp.sport,
        dport=tcp.dport,
        seq=tcp.seq,
        ack=tcp.ack,
        flags=int(tcp.flags),
        window=tcp.window,
        payload=bytes(tcp.payload),
        tsval=tsval,
        when=time.monotonic(),
    )


class Conn:
    """One hand-made TCP connection from the client namespace to `dst`:`dport`.

    Stream offsets count data bytes from 0 (the byte after the SYN), as the engine's do. Every segment
    acknowledges the server's SYN (and its FIN once seen) unless told otherwise.
    """

    def __init__(
        self,
        net: ClientNet,
        dst: str,
        dport: int,
        sport: int | None = None,
        isn: int | None = None,
        timestamps: bool = False,
        wscale: int | None = 7,
    ) -> None:
        self.net = net
        self.v6 = ":" in dst
        self.src = CLIENT_V6 if self.v6 else CLIENT_V4
        self.dst = dst
        self.dport = dport
        self.sport = sport if sport is not None else net.new_port()
        self.isn = isn if isn is not None else random.randint(0, MASK)
        self.timestamps = timestamps
        self.wscale = wscale
        self.ts = random.randint(1_000_000, 2_000_000)
        self.server_isn: int | None = None
        self.server_fin = False
        net.watch(self.sport)

    # ------------------------------------------------------------------ building
    def seq_at(self, off: int) -> int:
        return (self.isn + 1 + off) & MASK

    @property
    def ack_value(self) -> int:
        if self.server_isn is None:
            return 0
        return (self.server_isn + 1 + (1 if self.server_fin else 0)) & MASK

    def ip(self, **kw: Any) -> Any:
        if self.v6:
            return IPv6(src=self.src, dst=self.dst, **kw)
        return IP(src=self.src, dst=self.dst, **kw)

    def tcp(
        self,
        flags: str = "PA",
        off: int = 0,
        data: bytes = b"",
        *,
        seq: int | None = None,
        ack: int | None = None,
        window: int = 65535,
        urgptr: int = 0,
        chksum: int | None = None,
        tsval: int | None = None,
        options: list[Any] | None = None,
        ip: dict[str, Any] | None = None,
    ) -> Any:
        """A scapy packet; `seq` overrides the offset-derived sequence number."""
        opts = list(options or [])
        if self.timestamps:
            self.ts += 1
            opts.append(("Timestamp", (tsval if tsval is not None else self.ts, self._last_tsval())))
        seg = TCP(
            sport=self.sport,
            dport=self.dport,
            seq=self.seq_at(off) if seq is None else seq,
            ack=self.ack_value if ack is None else ack,
            flags=flags,
            window=window,
            urgptr=urgptr,
            options=opts,
        )
        if chksum is not None:
            seg.chksum = chksum
        pkt = self.ip(**(ip or {})) / seg
        if data:
            pkt = pkt / data
        return pkt

    def raw(self, *args: Any, **kw: Any) -> bytes:
        return bytes(self.tcp(*args, **kw))

    def send(self, *args: Any, **kw: Any) -> None:
        self.net.send(self.raw(*args, **kw))

    def _last_tsval(self) -> int:
        for seg in reversed(self.net.segments(self.sport)):
            if seg.tsval is not None:
                return seg.tsval
        return 0

    # ------------------------------------------------------------------ the connection
    def syn_packet(self, payload: bytes = b"") -> bytes:
        opts: list[Any] = [("MSS", 1460), ("SAckOK", b"")]
        if self.wscale is not None:
            opts.append(("WScale", self.wscale))
        if self.timestamps:
            opts.append(("Timestamp", (self.ts, 0)))
        pkt = self.ip() / TCP(
            sport=self.sport, dport=self.dport, seq=self.isn, flags="S", window=65535, options=opts
        )
        if payload:
            pkt = pkt / payload
        return bytes(pkt)

    def handshake(self, syn_payload: bytes = b"", timeout: float = 3.0) -> None:
        """SYN, wait for the SYN-ACK, ACK it. Raises AssertionError if no SYN-ACK comes."""
        self.net.send(self.syn_packet(syn_payload))
        synack = self.net.wait(self.sport, lambda s: s.has("SA"), timeout)
        assert synack is not None, f"no SYN-ACK for port {self.sport}"
        self.server_isn = synack.seq
        self.send("A")

    def acked(self) -> int:
        """Highest stream offset the server acknowledged (-1 before any ACK)."""
        best = -1
        for seg in self.net.segments(self.sport):
            if seg.has("A") and not seg.has("R"):
                off = (seg.ack - self.isn - 1) & MASK
                if off < 1 << 30:
                    best = max(best, off)
        return best

    def wait_acked(self, off: int, timeout: float = 2.0) -> bool:
        """Wait until the server acknowledged every byte before `off`."""

        def pred(seg: Seg) -> bool:
            if not seg.has("A") or seg.has("R"):
                return False
            d = (seg.ack - self.seq_at(off)) & MASK
            return d < 1 << 30

        return self.net.wait(self.sport, pred, timeout) is not None

    def reset_seen(self, timeout: float = 0.0) -> bool:
        return self.net.wait(self.sport, lambda s: s.has("R"), timeout) is not None

    def finish(self, end_off: int, timeout: float = 3.0) -> bool:
        """FIN at `end_off`; wait for the server's FIN (it closes after reading EOF) and ACK it.
        False if the server's FIN did not come (the connection was blocked, or the stream has a gap)."""
        self.send("FA", end_off)
        fin = self.net.wait(self.sport, lambda s: s.has("F") or s.has("R"), timeout)
        if fin is None or fin.has("R"):
            return False
        self.server_fin = True
        self.send("A", end_off + 1)
        return True

    def abort(self, off: int) -> None:
        """An exact-sequence RST from our side, to leave nothing half-open at the server."""
        self.send("RA", off)


# ---------------------------------------------------------------------- fast packets for floods
def _csum(data: bytes) -> int:
    if len(data) & 1:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def fast_ipv4_tcp(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    payload: bytes = b"",
    window: int = 65535,
    options: bytes = b"",
) -> bytes:
    """An IPv4/TCP packet as bytes with valid checksums, without scapy (floods build tens of thousands)."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    hl = 20 + len(options)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & MASK, ack & MASK, (hl // 4) << 4, flags, window, 0, 0)
    seg = tcp + options + payload
    c = _csum(s + d + struct.pack("!BBH", 0, 6, len(seg)) + seg)
    seg = seg[:16] + struct.pack("!H", c) + seg[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(seg), random.getrandbits(16), 0x4000, 64, 6, 0, s, d)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return ip + seg
