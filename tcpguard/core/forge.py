"""Building packets as bytes: forged RSTs, and normalised copies of received packets.

Forged RSTs must be accepted by their receiver, or the endpoint never closes: the sequence number is
exactly the next one the receiver expects from its peer (RFC 5961 answers anything else in the window
with a challenge ACK), and an RST to a client still in SYN-SENT carries an ACK of its SYN, which is the
only RST that state accepts.

Normalisation rewrites a received packet in place of the original: a new payload (first copy restored,
data on SYN or RST removed) and/or the urgent flag and pointer cleared. The IP and TCP headers, options
included, are kept; lengths and checksums are recomputed.
"""

from __future__ import annotations

import struct
from typing import Final

from tcpguard.core.conntrack import Connection
from tcpguard.core.packet import ACK, PROTO_TCP, RST, URG, Packet, checksum, tcp_checksum

_TCP_NOOPT: Final = struct.Struct("!HHIIBBHHH")
DEFAULT_TTL: Final = 64


def ip_header(version: int, src: bytes, dst: bytes, payload_len: int, ttl: int = DEFAULT_TTL) -> bytes:
    if version == 4:
        hdr = bytearray(
            struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, 0, 0x4000, ttl, PROTO_TCP, 0, src, dst)
        )
        struct.pack_into("!H", hdr, 10, checksum(bytes(hdr)))
        return bytes(hdr)
    return struct.pack("!IHBB16s16s", 0x60000000, payload_len, PROTO_TCP, ttl, src, dst)


def build_tcp(
    version: int,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int = 0,
    payload: bytes = b"",
    options: bytes = b"",
    urgptr: int = 0,
) -> bytes:
    """A complete IP+TCP packet, checksums filled in. `options` must be padded to a multiple of 4."""
    if len(options) % 4:
        raise ValueError("TCP options must be padded to a multiple of 4 bytes")
    doff = (20 + len(options)) // 4
    seg = bytearray(
        _TCP_NOOPT.pack(sport, dport, seq, ack, doff << 4, flags, window, 0, urgptr) + options + payload
    )
    struct.pack_into("!H", seg, 16, tcp_checksum(src, dst, bytes(seg)))
    return ip_header(version, src, dst, len(seg)) + bytes(seg)


def build_rst(
    version: int, src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int | None
) -> bytes:
    """An RST from (src, sport) to (dst, dport); with `ack` not None it is an RST+ACK."""
    flags = RST | (ACK if ack is not None else 0)
    return build_tcp(version, src, dst, sport, dport, seq, ack or 0, flags)


def rewrite(
    pkt: Packet, payload: bytes | None = None, clear_urg: bool = False, seq: int | None = None
) -> bytes:
    """`pkt` with a new TCP payload, sequence number and/or URG cleared, lengths and checksums recomputed."""
    raw = pkt.raw
    iph = bytearray(raw[: pkt.ip_hlen])
    tcph = bytearray(raw[pkt.ip_hlen : pkt.ip_hlen + pkt.tcp_hlen])
    body = pkt.payload if payload is None else payload
    if seq is not None:
        struct.pack_into("!I", tcph, 4, seq & 0xFFFFFFFF)
    if clear_urg:
        tcph[13] &= ~URG & 0xFF
        tcph[18:20] = b"\x00\x00"
    tcph[16:18] = b"\x00\x00"
    seg_len = len(tcph) + len(body)
    if pkt.version == 4:
        struct.pack_into("!H", iph, 2, len(iph) + seg_len)
        iph[10:12] = b"\x00\x00"
        struct.pack_into("!H", iph, 10, checksum(bytes(iph)))
    else:
        # The payload length covers the extension headers too.
        struct.pack_into("!H", iph, 4, len(iph) - 40 + seg_len)
    seg = bytes(tcph) + body
    struct.pack_into("!H", tcph, 16, tcp_checksum(pkt.src, pkt.pdst, seg))
    return bytes(iph) + bytes(tcph) + body


def connection_resets(conn: Connection, both: bool) -> list[bytes]:
    """The RSTs that end `conn`: to the server, and with `both` to the client too, each with the sequence
    number its receiver expects next (the end of what the gateway forwarded), so the endpoint really
    closes. A server that never answered has no state: then only the client gets one, an RST+ACK of its
    SYN, the only RST its SYN-SENT accepts."""
    up, down = conn.up, conn.down
    v = conn.version
    if down.isn < 0:
        if not both:
            return []
        return [build_rst(v, conn.server, conn.client, conn.sport, conn.cport, 0, (up.isn + 1) & 0xFFFFFFFF)]
    out = []
    if up.isn >= 0:
        out.append(build_rst(v, conn.client, conn.server, conn.cport, conn.sport, up.next_seq, down.next_seq))
    if both:
        out.append(
            build_rst(
                v,
                conn.server,
                conn.client,
                conn.sport,
                conn.cport,
                down.next_seq,
                up.next_seq if up.isn >= 0 else None,
            )
        )
    return out
