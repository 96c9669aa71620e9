"""Decoding of IPv4/IPv6 + TCP packets from raw bytes.

This is the per-packet hot path: fixed offsets, read by indexing (native byte reads once compiled) for
the TCP header, IPv6 and the common IPv4 header without options, and with `struct.unpack_from` for the
general IPv4 header and the TCP options; never an object per header field. scapy is roughly a hundred
times slower and is kept for tests and tools.

Contract: `decode(raw)` returns a `Packet` or raises `DecodeError`, and nothing else, for any input.
Choices made here:

* A buffer longer than the IP total length (Ethernet padding) is trimmed to the IP length; a shorter one
  is truncated and rejected.
* IPv4 fragments and IPv6 packets with a Fragment header are returned with `fragment=True` and no TCP
  fields: the engine's fragment policy decides what to do with them (a TCP header or payload split over
  fragments is never parsed piecemeal).
* Packets that are not TCP are returned with `proto` set and no TCP fields (`is_tcp` is False).
* TCP options are validated eagerly only on SYN segments (where the engine needs MSS and window scale);
  on other segments `options()` parses them lazily and may raise `DecodeError` then.
* Checksums are not checked by `decode`; `checksums_ok` does it, so an adapter can skip it by policy.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final
from zlib import adler32

from tcpguard.core import MODE as CORE_MODE
from tcpguard.core.errors import DecodeError

# TCP flag bits.
FIN: Final = 0x01
SYN: Final = 0x02
RST: Final = 0x04
PSH: Final = 0x08
ACK: Final = 0x10
URG: Final = 0x20
ECE: Final = 0x40
CWR: Final = 0x80

PROTO_TCP: Final = 6

_IPV4: Final = struct.Struct("!BBHHHBBH4s4s")

# IPv6 extension headers that carry a generic (next header, length) prefix.
_V6_EXT_GENERIC: Final = frozenset({0, 43, 60, 135, 139, 140})
_V6_FRAGMENT: Final = 44
_V6_ROUTING: Final = 43
_V6_AH: Final = 51
_V6_MAX_EXT: Final = 16


@dataclass(slots=True)
class TcpOptions:
    """The TCP options tcpguard understands; unknown kinds are skipped (they are legal)."""

    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    sack: list[tuple[int, int]] = field(default_factory=list)
    ts_val: int | None = None
    ts_ecr: int | None = None


class Packet:
    """One decoded IP packet. TCP fields are meaningful only when `is_tcp` is true."""

    __slots__ = (
        "_options",
        "ack",
        "dport",
        "dst",
        "flags",
        "fragment",
        "ip_hlen",
        "is_tcp",
        "payload",
        "pdst",
        "proto",
        "raw",
        "seq",
        "sport",
        "src",
        "tcp_hlen",
        "urgptr",
        "version",
        "window",
    )

    def __init__(self, raw: bytes, version: int, src: bytes, dst: bytes, proto: int, ip_hlen: int) -> None:
        self.raw = raw
        self.version = version
        self.src = src
        self.dst = dst
        self.proto = proto
        self.ip_hlen = ip_hlen
        self.fragment = False
        self.is_tcp = False
        self.sport = self.dport = self.seq = self.ack = self.flags = 0
        self.window = self.urgptr = self.tcp_hlen = 0
        self.payload = b""
        self._options: TcpOptions | None = None
        # Destination for the TCP pseudo-header: the final one of a source-routed packet, else dst.
        self.pdst = dst

    # -- convenience views, not used on the hot path --------------------------------------------------
    @property
    def syn(self) -> bool:
        return bool(self.flags & SYN)

    @property
    def fin(self) -> bool:
        return bool(self.flags & FIN)

    @property
    def rst(self) -> bool:
        return bool(self.flags & RST)

    @property
    def srcport(self) -> int:
        return self.sport

    @property
    def dstport(self) -> int:
        return self.dport

    def options(self) -> TcpOptions:
        """Parsed TCP options (cached). Raises `DecodeError` if they are malformed."""
        if self._options is None:
            start = self.ip_hlen + 20
            self._options = parse_options(self.raw[start : self.ip_hlen + self.tcp_hlen])
        return self._options

    def signed(self) -> bool:
        """Whether the segment carries a TCP-MD5 (kind 19, RFC 2385) or TCP-AO (kind 29, RFC 5925) option.

        A receiver that did not negotiate them discards such a segment (Linux: TCPMD5Unexpected,
        TCPAOKeyNotFound), so the engine must not inspect it. Called on every segment with options, hence
        cheap: two C-level byte scans of the option block (int membership in bytes is a memchr, faster
        than `find` with bounds), and the option walk only when one of the two kind bytes occurs anywhere
        in it (it may be data of another option, e.g. a timestamp). Never raises: a malformed option
        block ends the walk (no signature found), as in the kernel's parser.
        """
        if self.tcp_hlen <= 20:
            return False
        start = self.ip_hlen + 20
        opts = self.raw[start : start + self.tcp_hlen - 20]
        if 19 not in opts and 29 not in opts:
            return False
        return _has_signature(opts, 0, len(opts))

    def flag_names(self) -> str:
        return flags_text(self.flags)

    def __repr__(self) -> str:
        if not self.is_tcp:
            return f"<Packet v{self.version} proto={self.proto} fragment={self.fragment}>"
        return (
            f"<Packet {format_addr(self.src)}:{self.sport} > {format_addr(self.dst)}:{self.dport} "
            f"[{self.flag_names()}] seq={self.seq} ack={self.ack} win={self.window} len={len(self.payload)}>"
        )


def flags_text(flags: int) -> str:
    names = "FSRPAUEC"
    return "".join(n for i, n in enumerate(names) if flags & (1 << i)) or "."


def format_addr(addr: bytes) -> str:
    import ipaddress

    return str(ipaddress.ip_address(addr))


def decode(raw: bytes) -> Packet:
    """Decode one IP packet (no link-layer header). See the module docstring for the contract."""
    n = len(raw)
    if n < 1:
        raise DecodeError("empty packet")
    version = raw[0] >> 4
    if version == 4:
        # Fast path for the common case, IPv4 without options carrying an unfragmented TCP segment:
        # one read of both fixed headers and one object filled once.
        if raw[0] == 0x45 and n >= 40 and raw[9] == PROTO_TCP and not raw[6] & 0x3F and not raw[7]:
            return _decode_v4_tcp(raw, n)
        return _decode_v4(raw, n)
    if version == 6:
        return _decode_v6(raw, n)
    raise DecodeError(f"IP version {version} is not 4 or 6")


def _decode_v4(raw: bytes, n: int) -> Packet:
    if n < 20:
        raise DecodeError(f"IPv4 header truncated ({n} bytes)")
    vihl, _tos, total, _ident, frag, _ttl, proto, _csum, src, dst = _IPV4.unpack_from(raw, 0)
    ihl = (vihl & 0x0F) * 4
    if ihl < 20:
        raise DecodeError(f"IPv4 header length {ihl} below 20")
    if total < ihl:
        raise DecodeError(f"IPv4 total length {total} below header length {ihl}")
    if total > n:
        raise DecodeError(f"IPv4 packet truncated: total length {total}, have {n} bytes")
    if total < n:
        raw = raw[:total]
    pkt = Packet(raw, 4, src, dst, proto, ihl)
    if ihl > 20:
        pkt.pdst = _v4_route_final(raw, ihl, dst)
    if frag & 0x3FFF:  # MF set or offset non-zero
        pkt.fragment = True
        return pkt
    if proto == PROTO_TCP:
        _decode_tcp(pkt, raw, ihl, total)
    return pkt


def _decode_v4_tcp(raw: bytes, n: int) -> Packet:
    total = raw[2] << 8 | raw[3]
    if total < 40 or total > n:
        return _decode_v4(raw, n)  # let the general path name the problem
    if total < n:
        raw = raw[:total]
    pkt = Packet(raw, 4, raw[12:16], raw[16:20], PROTO_TCP, 20)
    _decode_tcp(pkt, raw, 20, total)
    return pkt


def _decode_v6(raw: bytes, n: int) -> Packet:
    if n < 40:
        raise DecodeError(f"IPv6 header truncated ({n} bytes)")
    plen = raw[4] << 8 | raw[5]
    nxt = raw[6]
    src = raw[8:24]
    dst = raw[24:40]
    total = 40 + plen
    if plen == 0:
        raise DecodeError("IPv6 payload length 0 (jumbograms are not supported)")
    if total > n:
        raise DecodeError(f"IPv6 packet truncated: total length {total}, have {n} bytes")
    if total < n:
        raw = raw[:total]
    off = 40
    fragment = False
    final_dst = dst
    # One pass per extension header, plus one to read the header that ends the chain.
    for _ in range(_V6_MAX_EXT + 1):
        if nxt in _V6_EXT_GENERIC:
            if off + 8 > total:
                raise DecodeError(f"IPv6 extension header {nxt} truncated")
            nxt_new = raw[off]
            hlen = (raw[off + 1] + 1) * 8
            if nxt == _V6_ROUTING and raw[off + 3] and off + hlen <= total:
                final_dst = _v6_route_final(raw, off, hlen, final_dst)
            off += hlen
            nxt = nxt_new
        elif nxt == _V6_FRAGMENT:
            if off + 8 > total:
                raise DecodeError("IPv6 fragment header truncated")
            nxt_new = raw[off]
            fo = (raw[off + 2] << 8) | raw[off + 3]
            # An atomic fragment (offset 0, M=0, RFC 6946) is a whole packet; anything else is a fragment.
            if fo & 0xFFF9:
                fragment = True
            off += 8
            nxt = nxt_new
        elif nxt == _V6_AH:
            if off + 8 > total:
                raise DecodeError("IPv6 authentication header truncated")
            nxt_new = raw[off]
            off += (raw[off + 1] + 2) * 4
            nxt = nxt_new
        else:
            break
    else:
        raise DecodeError(f"IPv6 extension header chain longer than {_V6_MAX_EXT}")
    if off > total:
        raise DecodeError("IPv6 extension header runs past the packet")
    pkt = Packet(raw, 6, src, dst, nxt, off)
    pkt.pdst = final_dst
    if fragment:
        pkt.fragment = True
        return pkt
    if nxt == PROTO_TCP:
        _decode_tcp(pkt, raw, off, total)
    return pkt


def _v4_route_final(raw: bytes, ihl: int, dst: bytes) -> bytes:
    """The final destination of a source-routed IPv4 packet (LSRR/SSRR), which the TCP pseudo-header
    uses (RFC 1122 4.2.3.1); `dst` for any other packet. Malformed options raise DecodeError."""
    i = 20
    final = dst
    while i < ihl:
        kind = raw[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= ihl or raw[i + 1] < 2 or i + raw[i + 1] > ihl:
            raise DecodeError(f"IPv4 option {kind} has a bad length")
        length = raw[i + 1]
        # The last address is still ahead while the pointer is within the option; once the route is
        # used up (pointer past the end, RFC 791) the header's destination is the final one.
        if kind in (131, 137) and length >= 7 and (length - 3) % 4 == 0 and raw[i + 2] <= length:
            final = raw[i + length - 4 : i + length]
        i += length
    return final


def _v6_route_final(raw: bytes, off: int, hlen: int, dst: bytes) -> bytes:
    """The final destination named by a Routing header with segments left (RFC 8200 8.1)."""
    rtype = raw[off + 2]
    if rtype in (0, 2) and hlen >= 24:  # type 0 (deprecated) and 2: the last address listed
        return raw[off + hlen - 16 : off + hlen]
    if rtype == 4 and hlen >= 24:  # segment routing: segment list [0] is the final segment
        return raw[off + 8 : off + 24]
    return dst


def _decode_tcp(pkt: Packet, raw: bytes, off: int, total: int) -> None:
    if total - off < 20:
        raise DecodeError(f"TCP header truncated ({total - off} bytes)")
    # Fields by indexing, not `struct.unpack_from`: compiled by mypyc, `raw[i]` is a native byte read,
    # where the unpack is a generic method call that builds a tuple and boxes every field (82 against
    # 419 ns for the IPv4 and TCP headers in a micro-benchmark; the unpack is faster only interpreted).
    sport = raw[off] << 8 | raw[off + 1]
    dport = raw[off + 2] << 8 | raw[off + 3]
    seq = raw[off + 4] << 24 | raw[off + 5] << 16 | raw[off + 6] << 8 | raw[off + 7]
    ack = raw[off + 8] << 24 | raw[off + 9] << 16 | raw[off + 10] << 8 | raw[off + 11]
    doff = raw[off + 12]
    flags = raw[off + 13]
    window = raw[off + 14] << 8 | raw[off + 15]
    urg = raw[off + 18] << 8 | raw[off + 19]
    hlen = (doff >> 4) * 4
    if hlen < 20:
        raise DecodeError(f"TCP data offset {hlen} below 20")
    if off + hlen > total:
        raise DecodeError(f"TCP header length {hlen} runs past the packet")
    pkt.is_tcp = True
    pkt.sport = sport
    pkt.dport = dport
    pkt.seq = seq
    pkt.ack = ack
    pkt.flags = flags
    pkt.window = window
    pkt.urgptr = urg
    pkt.tcp_hlen = hlen
    pkt.payload = raw[off + hlen : total]
    if flags & SYN and hlen > 20:
        pkt.options()


def _has_signature(raw: bytes, i: int, end: int) -> bool:
    """Walk the options in raw[i:end] like Linux's `tcp_parse_auth_options`: True at the first MD5 or AO
    option; False at the end-of-list option, a truncated or malformed length, or the end of the block."""
    while i < end:
        kind = raw[i]
        if kind == 0:
            return False
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end:
            return False
        length = raw[i + 1]
        if length < 2 or i + length > end:
            return False
        if kind in (19, 29):
            return True
        i += length
    return False


def parse_options(opts: bytes) -> TcpOptions:
    """Parse a TCP option block. Unknown kinds are skipped; a broken length is a `DecodeError`."""
    out = TcpOptions()
    i = 0
    n = len(opts)
    while i < n:
        kind = opts[i]
        if kind == 0:  # end of option list
            break
        if kind == 1:  # NOP
            i += 1
            continue
        if i + 1 >= n:
            raise DecodeError(f"TCP option {kind} has no length byte")
        length = opts[i + 1]
        if length < 2 or i + length > n:
            raise DecodeError(f"TCP option {kind} has bad length {length}")
        body = opts[i + 2 : i + length]
        if kind == 2:
            if length != 4:
                raise DecodeError(f"TCP MSS option length {length}, want 4")
            out.mss = (body[0] << 8) | body[1]
        elif kind == 3:
            if length != 3:
                raise DecodeError(f"TCP window scale option length {length}, want 3")
            out.wscale = min(body[0], 14)  # RFC 7323: larger shifts are treated as 14
        elif kind == 4:
            if length != 2:
                raise DecodeError(f"TCP SACK-permitted option length {length}, want 2")
            out.sack_permitted = True
        elif kind == 5:
            if (length - 2) % 8 or length == 2:
                raise DecodeError(f"TCP SACK option length {length} is not 2 + 8n")
            out.sack = [struct.unpack_from("!II", body, j) for j in range(0, length - 2, 8)]
        elif kind == 8:
            if length != 10:
                raise DecodeError(f"TCP timestamp option length {length}, want 10")
            out.ts_val, out.ts_ecr = struct.unpack_from("!II", body, 0)
        i += length
    return out


# -- checksums ---------------------------------------------------------------------------------------------
#
# The one's-complement sum of 16-bit words equals the whole buffer read as one big-endian integer, modulo
# 0xFFFF (because 2**16 is 1 modulo 0xFFFF). `int.from_bytes` and `%` run in C, which makes this an order
# of magnitude faster than summing words in a Python loop.


_SPLIT_AT: Final = 224  # below it the single big integer is faster (measured, see sum16_mod_py)


def ones_sum(data: bytes) -> int:
    """One's-complement sum of `data` as 16-bit words, folded into 1..0xFFFF (0 only for all-zero input)."""
    r = sum16_mod(data, 0, len(data))
    if r == 0 and any(data):
        return 0xFFFF
    return r


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    return (~ones_sum(data)) & 0xFFFF


def sum16_mod_py(data: bytes, start: int, end: int) -> int:
    """`data[start:end]` as big-endian 16-bit words (an odd last byte padded with zero), summed modulo
    0xFFFF. The Python version of `sum16_mod`, used when the C one (_sum16.c) was not built.

    Up to `_SPLIT_AT` bytes: one big integer and `%`. Longer: CPython 3.11's `%` by a one-digit divisor
    also builds the whole quotient, which made it two thirds of a full-size segment's check, so a long
    buffer is summed in 512-byte chunks instead, each as two byte sums (its even bytes, the words' high
    halves, and its odd bytes) that zlib's Adler-32 computes in C: its A half is 0 plus the byte sum
    modulo 65521, exact for 256 bytes (at most 65,280). Compiled: 3.6 -> 1.6 us on a 1,460-byte segment,
    1.1 -> 0.5 us on 400 bytes; the two paths cost the same at about 220 bytes.
    """
    if start < 0 or end < 0:
        raise ValueError("start and end must not be negative")
    if start or end < len(data):
        # (A compiled slice with start > end fails with SystemError instead of giving b"".)
        data = data[start:end] if start < end else b""
    n = len(data)
    if n < _SPLIT_AT:
        return int.from_bytes(data + b"\x00" if n & 1 else data, "big") % 0xFFFF
    total = 0
    for i in range(0, n, 512):
        chunk = data[i : i + 512]
        total += (adler32(chunk[0::2], 0) & 0xFFFF) * 256 + (adler32(chunk[1::2], 0) & 0xFFFF)
    return total % 0xFFFF


def _pick_sum16() -> Callable[[bytes, int, int], int]:
    """The C word sum when it was built (setup.py; 5-20 times faster), else the Python one. A pure core
    (TCPGUARD_PURE=1, or a build older than its sources: see tcpguard/core/__init__.py) is pure here too."""
    if CORE_MODE != "compiled":
        return sum16_mod_py
    try:
        from tcpguard.core._sum16 import sum16_mod as fast
    except ImportError:
        return sum16_mod_py
    return fast


# sum16_mod(data, start, end): `data[start:end]` as 16-bit words summed modulo 0xFFFF (see sum16_mod_py).
sum16_mod: Final = _pick_sum16()
SUM16_IMPL: Final = "python" if sum16_mod is sum16_mod_py else "c"


def _pseudo_sum(src: bytes, dst: bytes, length: int) -> int:
    """The word sum of the TCP pseudo-header, modulo 0xFFFF, computed without building it: the addresses
    read as one integer equal their word sum (2**16 is 1 modulo 0xFFFF), and protocol and length add as
    themselves in both the IPv4 and the IPv6 layout."""
    return int.from_bytes(src + dst, "big") + PROTO_TCP + length


def checksums_ok(pkt: Packet) -> bool:
    """True if the IPv4 header checksum (if any) and the TCP checksum verify."""
    raw = pkt.raw
    hl = pkt.ip_hlen
    n = len(raw)
    if pkt.version == 4:
        if sum16_mod(raw, 0, hl) != 0:
            return False
        first, end = 12, 20  # source and destination addresses in the IPv4 header
    else:
        first, end = 8, 40  # in the IPv6 header
    if pkt.pdst == pkt.dst:
        # The pseudo-header's addresses are the header's own: summed where they are, in one call, so that
        # every sum stays a small integer (no concatenation, no 64- or 256-bit integer to reduce).
        pseudo = sum16_mod(raw, first, end) + PROTO_TCP + n - hl
    else:
        pseudo = _pseudo_sum(pkt.src, pkt.pdst, n - hl)  # source-routed: the final destination counts
    return (pseudo + sum16_mod(raw, hl, n)) % 0xFFFF == 0


def tcp_checksum(src: bytes, dst: bytes, segment: bytes) -> int:
    """TCP checksum for `segment` (header with a zero checksum field, plus payload), IPv4 or IPv6."""
    r = (_pseudo_sum(src, dst, len(segment)) + sum16_mod(segment, 0, len(segment))) % 0xFFFF
    # r == 0: the sum is a non-zero multiple of 0xFFFF (the protocol word is never 0), which folds to
    # 0xFFFF, whose complement is 0.
    return (~r) & 0xFFFF if r else 0
