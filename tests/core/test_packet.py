"""The decoder against scapy: every field of IPv4/IPv6 (options, extension headers, fragments) and TCP
(every option kind), checksum verification, and the malformed inputs that must raise `DecodeError`.

scapy builds the packets and parses them back; the decoder's answer is compared with scapy's parse, so
the expected values never come from the code under test.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import (
    IP,
    TCP,
    UDP,
    IPOption_EOL,
    IPOption_LSRR,
    IPOption_NOP,
    IPOption_Router_Alert,
    IPOption_RR,
    IPOption_SSRR,
    TCPOptions,
)
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    IPv6ExtHdrSegmentRouting,
)
from scapy.layers.ipsec import AH

from tcpguard.core.errors import DecodeError
from tcpguard.core.packet import Packet, TcpOptions, checksums_ok, decode, sum16_mod, sum16_mod_py

V4_SRC, V4_DST = "192.0.2.1", "198.51.100.7"
V6_SRC, V6_DST = "2001:db8::1", "2001:db8:ffff::2"

# Option kinds scapy has no name for: it keeps them as (kind, bytes), and so do we (skipped).
SCAPY_KNOWN_KINDS = set(TCPOptions[0])
UNKNOWN_KINDS = [k for k in range(6, 254) if k not in SCAPY_KNOWN_KINDS]


# ---------------------------------------------------------------------------------------------- helpers
def assert_decode_error(raw: bytes) -> DecodeError:
    """`decode(raw)` raises exactly `DecodeError` (not a subclass, not another ValueError)."""
    with pytest.raises(DecodeError) as info:
        decode(raw)
    assert type(info.value) is DecodeError
    return info.value


def assert_options_error(pkt: Packet) -> None:
    with pytest.raises(DecodeError) as info:
        pkt.options()
    assert type(info.value) is DecodeError


def scapy_parse(raw: bytes) -> Any:
    return IP(raw) if raw[0] >> 4 == 4 else IPv6(raw)


def expected_options(scapy_opts: list[tuple[Any, Any]]) -> TcpOptions:
    """What the decoder must report for an option list as scapy parsed it."""
    out = TcpOptions()
    for name, value in scapy_opts:
        if name == "EOL":
            break
        if name == "MSS":
            out.mss = value
        elif name == "WScale":
            out.wscale = min(value, 14)  # RFC 7323 section 2.3
        elif name == "SAckOK":
            out.sack_permitted = True
        elif name == "SAck":
            out.sack = [(value[i], value[i + 1]) for i in range(0, len(value), 2)]
        elif name == "Timestamp":
            out.ts_val, out.ts_ecr = value
    return out


def assert_matches_scapy(raw: bytes, pkt: Packet | None = None) -> Packet:
    """Decode `raw` and compare every decoded field with scapy's parse of the same bytes."""
    if pkt is None:
        pkt = decode(raw)
    sc = scapy_parse(raw)
    tcp = sc[TCP]
    ip_bytes = bytes(sc)
    tcp_bytes = bytes(tcp)
    if sc.version == 4:
        assert pkt.version == 4
        assert pkt.ip_hlen == sc.ihl * 4
        assert pkt.proto == sc.proto
        assert pkt.src == bytes(map(int, sc.src.split(".")))
        assert pkt.dst == bytes(map(int, sc.dst.split(".")))
        assert len(pkt.raw) == sc.len
    else:
        import ipaddress

        assert pkt.version == 6
        assert pkt.ip_hlen == len(ip_bytes) - len(tcp_bytes)
        assert pkt.proto == 6
        assert pkt.src == ipaddress.IPv6Address(sc.src).packed
        assert pkt.dst == ipaddress.IPv6Address(sc.dst).packed
        assert len(pkt.raw) == 40 + sc.plen
    assert pkt.is_tcp
    assert not pkt.fragment
    assert pkt.sport == tcp.sport
    assert pkt.dport == tcp.dport
    assert pkt.seq == tcp.seq
    assert pkt.ack == tcp.ack
    assert pkt.flags == int(tcp.flags) & 0xFF
    assert pkt.window == tcp.window
    assert pkt.urgptr == tcp.urgptr
    assert pkt.tcp_hlen == tcp.dataofs * 4
    assert pkt.payload == bytes(tcp.payload)
    assert pkt.options() == expected_options(tcp.options)
    return pkt


def v4(payload: bytes = b"", ip_options: list[Any] | None = None, **tcp: Any) -> bytes:
    tcp.setdefault("sport", 40000)
    tcp.setdefault("dport", 80)
    return bytes(IP(src=V4_SRC, dst=V4_DST, options=ip_options or []) / TCP(**tcp) / payload)


def v6(payload: bytes = b"", ext: Any = None, **tcp: Any) -> bytes:
    tcp.setdefault("sport", 40000)
    tcp.setdefault("dport", 443)
    base = IPv6(src=V6_SRC, dst=V6_DST)
    if ext is not None:
        base = base / ext
    return bytes(base / TCP(**tcp) / payload)


# ---------------------------------------------------------------------------------------------- strategies
@st.composite
def tcp_option_lists(draw: st.DrawFn) -> list[tuple[Any, Any]]:
    """A scapy option list of at most 40 bytes mixing every kind the decoder knows, NOPs, unknown kinds
    and possibly an EOL (after which anything is ignored)."""
    u32 = st.integers(0, 2**32 - 1)
    choices = st.one_of(
        st.tuples(st.just("MSS"), st.integers(0, 65535)),
        st.tuples(st.just("WScale"), st.integers(0, 255)),
        st.tuples(st.just("SAckOK"), st.just(b"")),
        st.lists(u32, min_size=2, max_size=8)
        .filter(lambda v: len(v) % 2 == 0)
        .map(lambda v: ("SAck", tuple(v))),
        st.tuples(st.just("Timestamp"), st.tuples(u32, u32)),
        st.tuples(st.just("NOP"), st.none()),
        st.tuples(st.sampled_from(UNKNOWN_KINDS), st.binary(max_size=6)),
        st.tuples(st.just("EOL"), st.none()),
    )
    sizes = {"MSS": 4, "WScale": 3, "SAckOK": 2, "Timestamp": 10, "NOP": 1, "EOL": 1}
    out: list[tuple[Any, Any]] = []
    used = 0
    for opt in draw(st.lists(choices, max_size=10)):
        name, value = opt
        if name == "SAck":
            size = 2 + 4 * len(value)
        elif isinstance(name, int):
            size = 2 + len(value)
        else:
            size = sizes[name]
        if used + size > 40:
            continue
        used += size
        out.append(opt)
    return out


# ---------------------------------------------------------------------------------------------- IPv4
def test_ipv4_plain_fields_match_scapy() -> None:
    raw = v4(b"hello", seq=123456789, ack=987654321, flags="PA", window=4321, urgptr=0)
    assert_matches_scapy(raw)


def test_ipv4_with_ip_options_fields_match_scapy() -> None:
    opts = [IPOption_NOP(), IPOption_RR(routers=["10.1.1.1", "10.2.2.2"]), IPOption_Router_Alert()]
    raw = v4(b"payload!", ip_options=opts, seq=1, ack=2, flags="A")
    pkt = assert_matches_scapy(raw)
    assert pkt.ip_hlen > 20


def test_ipv4_with_options_ending_in_eol() -> None:
    raw = v4(b"x", ip_options=[IPOption_NOP(), IPOption_EOL()], flags="A")
    pkt = assert_matches_scapy(raw)
    assert pkt.ip_hlen == 24


@settings(max_examples=150, deadline=None)
@given(
    opts=tcp_option_lists(),
    flags=st.integers(0, 255),
    seq=st.integers(0, 2**32 - 1),
    ack=st.integers(0, 2**32 - 1),
    window=st.integers(0, 65535),
    urgptr=st.integers(0, 65535),
    ports=st.tuples(st.integers(0, 65535), st.integers(0, 65535)),
    payload=st.binary(max_size=64),
    ip=st.sampled_from(["v4", "v4 with IP options", "v6"]),
)
def test_tcp_every_option_and_field_matches_scapy(
    opts, flags, seq, ack, window, urgptr, ports, payload, ip
) -> None:
    """The three ways to the TCP header: IPv4 without options (the decoder's fast path), IPv4 with
    options and IPv6 (the general TCP decoder, at offset 24 and 40)."""
    tcp = {
        "sport": ports[0],
        "dport": ports[1],
        "seq": seq,
        "ack": ack,
        "flags": flags,
        "window": window,
        "urgptr": urgptr,
        "options": opts,
    }
    if ip == "v6":
        raw = v6(payload, **tcp)
    else:
        raw = v4(payload, [IPOption_Router_Alert()] if ip == "v4 with IP options" else None, **tcp)
    pkt = assert_matches_scapy(raw)
    assert pkt.ip_hlen == {"v4": 20, "v4 with IP options": 24, "v6": 40}[ip]
    assert checksums_ok(pkt)


def test_tcp_all_known_options_in_one_syn() -> None:
    opts = [
        ("MSS", 1460),
        ("NOP", None),
        ("WScale", 7),
        ("SAckOK", b""),
        ("Timestamp", (0xDEADBEEF, 0x01020304)),
        ("NOP", None),
        ("NOP", None),
        (UNKNOWN_KINDS[0], b"ab"),
        ("EOL", None),
    ]
    pkt = assert_matches_scapy(v4(flags="S", options=opts))
    o = pkt.options()
    assert (o.mss, o.wscale, o.sack_permitted, o.ts_val, o.ts_ecr) == (1460, 7, True, 0xDEADBEEF, 0x01020304)


def test_tcp_sack_blocks() -> None:
    blocks = (1, 2, 0xFFFFFFF0, 0x10, 100, 200, 300, 400)
    pkt = assert_matches_scapy(v4(b"d", flags="A", options=[("NOP", None), ("NOP", None), ("SAck", blocks)]))
    assert pkt.options().sack == [(1, 2), (0xFFFFFFF0, 0x10), (100, 200), (300, 400)]


def test_tcp_wscale_above_14_is_clamped() -> None:
    pkt = assert_matches_scapy(v4(flags="S", options=[("WScale", 200)]))
    assert pkt.options().wscale == 14


def test_tcp_options_after_eol_ignored() -> None:
    # Raw option bytes: EOL, then a broken MSS that must not be looked at.
    opts = b"\x00\x02\x09\x00"
    raw = build_v4_tcp(opts=opts, flags=0x02)
    pkt = decode(raw)
    assert pkt.options() == TcpOptions()


def test_non_tcp_is_not_tcp() -> None:
    pkt = decode(bytes(IP(src=V4_SRC, dst=V4_DST) / UDP(sport=1, dport=2) / b"abc"))
    assert (pkt.is_tcp, pkt.proto, pkt.fragment, pkt.version) == (False, 17, False, 4)
    pkt = decode(bytes(IPv6(src=V6_SRC, dst=V6_DST) / IPv6ExtHdrDestOpt() / UDP() / b"abc"))
    assert (pkt.is_tcp, pkt.proto, pkt.fragment, pkt.version) == (False, 17, False, 6)
    assert pkt.ip_hlen == 48


# ------------------------------------------------------------------------------------- IPv4 fragments
@pytest.mark.parametrize(
    ("flags", "frag", "fragment"),
    [
        ("MF", 0, True),  # first fragment
        ("MF", 3, True),  # middle fragment
        (0, 7, True),  # last fragment
        ("DF", 0, False),  # whole packet, don't fragment
        (0, 0, False),  # whole packet
    ],
)
def test_ipv4_fragments_recognised(flags: Any, frag: int, fragment: bool) -> None:
    raw = bytes(IP(src=V4_SRC, dst=V4_DST, flags=flags, frag=frag) / TCP(flags="A") / b"0123456789")
    pkt = decode(raw)
    assert pkt.fragment is fragment
    assert pkt.is_tcp is (not fragment)
    assert pkt.proto == 6
    if not fragment:
        assert_matches_scapy(raw, pkt)


# ---------------------------------------------------------------------------------------------- IPv6
def test_ipv6_plain_fields_match_scapy() -> None:
    assert_matches_scapy(v6(b"abc", seq=5, ack=6, flags="PA"))


def test_ipv6_extension_chain_fields_match_scapy() -> None:
    ext = (
        IPv6ExtHdrHopByHop()
        / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrRouting(addresses=["2001:db8::99", V6_DST], segleft=0)
        / IPv6ExtHdrDestOpt()
    )
    raw = v6(b"chain", ext=ext, flags="PA", options=[("Timestamp", (1, 2))])
    pkt = assert_matches_scapy(raw)
    assert pkt.ip_hlen == 40 + 8 + 8 + (8 + 32) + 8
    assert checksums_ok(pkt)


def test_ipv6_authentication_header_skipped() -> None:
    raw = v6(b"ah", ext=IPv6ExtHdrHopByHop() / AH(nh=6, payloadlen=4, icv=b"\x00" * 12), flags="A", seq=77)
    pkt = decode(raw)
    assert pkt.ip_hlen == 40 + 8 + 24
    # scapy does not dissect past AH: compare the TCP fields with scapy's parse of the segment alone.
    tcp = TCP(raw[pkt.ip_hlen :])
    assert (pkt.is_tcp, pkt.proto, pkt.fragment) == (True, 6, False)
    assert (pkt.sport, pkt.dport, pkt.seq, pkt.ack) == (tcp.sport, tcp.dport, tcp.seq, tcp.ack)
    assert (pkt.flags, pkt.window, pkt.tcp_hlen) == (int(tcp.flags), tcp.window, tcp.dataofs * 4)
    assert pkt.payload == bytes(tcp.payload) == b"ah"


@pytest.mark.parametrize(
    ("offset", "m", "res", "fragment"),
    [
        (0, 1, 0, True),  # first fragment
        (100, 1, 0, True),  # middle fragment
        (100, 0, 0, True),  # last fragment
        (0, 0, 0, False),  # atomic fragment (RFC 6946): a whole packet
        (0, 0, 3, False),  # atomic, reserved bits set: still whole
    ],
)
def test_ipv6_fragment_header(offset: int, m: int, res: int, fragment: bool) -> None:
    ext = IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment(offset=offset, m=m, res2=res, id=0x1234)
    raw = v6(b"fragment data", ext=ext, flags="PA")
    pkt = decode(raw)
    assert pkt.fragment is fragment
    assert pkt.is_tcp is (not fragment)
    assert pkt.version == 6
    if not fragment:
        assert_matches_scapy(raw, pkt)
        assert pkt.ip_hlen == 40 + 8 + 8


def test_ipv6_fifteen_extension_headers_decode() -> None:
    ext: Any = IPv6ExtHdrDestOpt()
    for _ in range(14):
        ext = ext / IPv6ExtHdrDestOpt()
    assert_matches_scapy(v6(b"x", ext=ext, flags="A"))


def test_ipv6_too_long_extension_chain_rejected() -> None:
    ext: Any = IPv6ExtHdrDestOpt()
    for _ in range(19):
        ext = ext / IPv6ExtHdrDestOpt()
    assert_decode_error(v6(b"x", ext=ext, flags="A"))


def test_ipv6_sixteen_extension_headers_decode() -> None:
    ext: Any = IPv6ExtHdrDestOpt()
    for _ in range(15):
        ext = ext / IPv6ExtHdrDestOpt()
    assert_matches_scapy(v6(b"x", ext=ext, flags="A"))


# ---------------------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("ipv6", [False, True])
@pytest.mark.parametrize("pad", [1, 6, 30])
def test_ethernet_padding_trimmed(ipv6: bool, pad: int) -> None:
    raw = v6(b"ab", flags="PA") if ipv6 else v4(b"ab", flags="PA")
    pkt = decode(raw + b"\x00" * pad)
    assert pkt.raw == raw
    assert pkt.payload == b"ab"
    assert checksums_ok(pkt)
    assert_matches_scapy(raw, pkt)


# ---------------------------------------------------------------------------------------------- checksums
@settings(max_examples=100, deadline=None)
@given(payload=st.binary(max_size=301), ipv6=st.booleans(), with_options=st.booleans())
def test_checksums_ok_for_scapy_packets(payload: bytes, ipv6: bool, with_options: bool) -> None:
    opts = [("MSS", 1400), ("NOP", None), ("WScale", 3)] if with_options else []
    if ipv6:
        raw = v6(payload, ext=IPv6ExtHdrHopByHop() if with_options else None, flags="PA", options=opts)
    else:
        ip_opts = [IPOption_RR(routers=["10.9.8.7"])] if with_options else None
        raw = v4(payload, ip_options=ip_opts, flags="PA", options=opts)
    assert checksums_ok(decode(raw))


def _sum16_reference(data: bytes) -> int:
    """RFC 1071's loop: 16-bit big-endian words, odd byte padded, summed, reduced modulo 0xFFFF."""
    padded = data + b"\x00" if len(data) & 1 else data
    return sum((padded[i] << 8) | padded[i + 1] for i in range(0, len(padded), 2)) % 0xFFFF


# Both word sums: the one in use (C when the core is compiled) and the Python one it falls back to.
SUM16 = pytest.mark.parametrize("sum16", [sum16_mod, sum16_mod_py], ids=["in-use", "python"])


@SUM16
@settings(max_examples=300, deadline=None)
@given(data=st.one_of(st.binary(max_size=3000), st.integers(0, 3000).map(lambda n: b"\xff" * n)))
def test_sum16_mod_equals_the_word_sum_at_every_length(sum16: Any, data: bytes) -> None:
    """The chunked path (long buffers) and the big-integer path (short ones) agree with the plain word sum,
    also for all-0xFF buffers, whose chunk byte sums are the largest possible."""
    assert sum16(data, 0, len(data)) == _sum16_reference(data)


@SUM16
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600), start=st.integers(0, 700), end=st.integers(0, 700))
def test_sum16_mod_of_a_range_is_the_sum_of_that_slice(sum16: Any, data: bytes, start: int, end: int) -> None:
    """start/end behave like a slice's bounds (clamped to the buffer; start past end is empty)."""
    assert sum16(data, start, end) == _sum16_reference(data[start:end])


@SUM16
def test_sum16_mod_refuses_negative_bounds(sum16: Any) -> None:
    for start, end in ((-1, 4), (0, -1)):
        with pytest.raises(ValueError, match="negative"):
            sum16(b"abcd", start, end)


@SUM16
@pytest.mark.parametrize("start", [3, 4, 2**31, 2**62, 2**63 - 1, 2**64])
def test_sum16_mod_clamps_bounds_past_the_buffer_like_a_slice(sum16: Any, start: int) -> None:
    """Huge bounds (past the buffer, past a C long) are an empty range, not an overflow or a crash."""
    assert sum16(b"abc", start, 2**64) == 0
    assert sum16(b"abc", 0, 2**64) == _sum16_reference(b"abc")


@SUM16
@pytest.mark.parametrize(
    "n", [0, 1, 2, 223, 224, 225, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 1460, 1461]
)
def test_sum16_mod_at_the_chunk_and_path_boundaries(sum16: Any, n: int) -> None:
    for data in (b"\xff" * n, bytes(range(256)) * (n // 256) + bytes(range(n % 256))):
        assert sum16(data, 0, n) == _sum16_reference(data)


def _flipped_rejected(raw: bytes, index: int, mask: int) -> bool:
    """True if `raw` with byte `index` XORed by `mask` is refused: undecodable or failing checksums."""
    bad = bytearray(raw)
    bad[index] ^= mask
    try:
        pkt = decode(bytes(bad))
    except DecodeError:
        return True
    return not checksums_ok(pkt)


# Odd and even payload lengths, IP options or not.
FLIP_V4 = [
    v4(b"", flags="S", options=[("MSS", 1460)]),
    v4(b"a", flags="PA"),
    v4(b"odd-length payload", flags="PA"),
    v4(b"even-length payload!", ip_options=[IPOption_NOP(), IPOption_RR(routers=["1.1.1.1"])], flags="PA"),
    v4(bytes(range(255)), flags="PA", options=[("Timestamp", (7, 8))]),
]
FLIP_V6 = [
    v6(b"a", flags="PA"),
    v6(b"even", flags="PA", ext=IPv6ExtHdrDestOpt()),
    v6(bytes(range(201)), flags="PA"),
]


@settings(max_examples=200, deadline=None)
@given(which=st.integers(0, len(FLIP_V4) - 1), data=st.data(), mask=st.integers(1, 255))
def test_ipv4_any_flipped_byte_fails_checksum(which: int, data: st.DataObject, mask: int) -> None:
    raw = FLIP_V4[which]
    assert checksums_ok(decode(raw))
    index = data.draw(st.integers(0, len(raw) - 1), label="index")
    assert _flipped_rejected(raw, index, mask)


@settings(max_examples=200, deadline=None)
@given(which=st.integers(0, len(FLIP_V6) - 1), data=st.data(), mask=st.integers(1, 255))
def test_ipv6_flipped_address_or_segment_byte_fails_checksum(
    which: int, data: st.DataObject, mask: int
) -> None:
    raw = FLIP_V6[which]
    pkt = decode(raw)
    assert checksums_ok(pkt)
    # Addresses (covered by the pseudo-header) and the whole TCP segment.
    index = data.draw(st.one_of(st.integers(8, 39), st.integers(pkt.ip_hlen, len(raw) - 1)), label="index")
    assert _flipped_rejected(raw, index, mask)


def test_every_single_byte_flip_detected_exhaustively() -> None:
    """The same property without sampling: every byte, a few masks, on odd and even payloads."""
    for raw in FLIP_V4:
        for index in range(len(raw)):
            for mask in (0x01, 0x80, 0xFF):
                assert _flipped_rejected(raw, index, mask), (raw.hex(), index, mask)


def test_ipv6_checksum_with_routing_header_uses_final_destination() -> None:
    ext = IPv6ExtHdrRouting(addresses=["2001:db8::99", "2001:db8::100"])  # segleft = 2
    raw = v6(b"routed", ext=ext, flags="PA")
    assert IPv6(raw)[IPv6ExtHdrRouting].segleft == 2
    assert checksums_ok(decode(raw))


@pytest.mark.parametrize("option", [IPOption_LSRR, IPOption_SSRR])
@pytest.mark.parametrize("pointer", [4, 8])  # route not started; one hop done: the last entry is final
def test_ipv4_checksum_with_source_route_uses_final_destination(option: Any, pointer: int) -> None:
    opt = option(routers=["10.0.0.9", "10.0.0.10"], pointer=pointer)
    raw = v4(b"routed", ip_options=[IPOption_NOP(), opt], flags="PA")
    pkt = decode(raw)
    assert pkt.pdst == bytes([10, 0, 0, 10])
    assert checksums_ok(pkt)


def tcp_checksum_for(dst: str, payload: bytes, **tcp: Any) -> int:
    """The TCP checksum scapy computes with `dst` in the pseudo-header."""
    return int(IP(bytes(IP(src=V4_SRC, dst=dst) / TCP(**tcp) / payload))[TCP].chksum)


@pytest.mark.parametrize("option", [IPOption_LSRR, IPOption_SSRR])
def test_ipv4_checksum_with_exhausted_source_route_uses_header_destination(option: Any) -> None:
    # The last listed router swapped the final destination into dst and recorded its own address.
    tcp: dict[str, Any] = {"sport": 40000, "dport": 80, "flags": "PA"}
    opt = option(routers=["10.0.0.9", "10.0.0.10"], pointer=12)  # length 11: nothing left to route
    chk = tcp_checksum_for(V4_DST, b"routed", **tcp)
    raw = bytes(IP(src=V4_SRC, dst=V4_DST, options=[opt]) / TCP(chksum=chk, **tcp) / b"routed")
    assert checksums_ok(decode(raw))


@pytest.mark.parametrize("rtype", [0, 2])
def test_ipv6_routing_header_types_0_and_2_use_the_last_address(rtype: int) -> None:
    addrs = ["2001:db8::99"] if rtype == 2 else ["2001:db8::99", "2001:db8::100"]
    raw = v6(b"routed", ext=IPv6ExtHdrRouting(type=rtype, addresses=addrs), flags="PA")
    pkt = assert_matches_scapy(raw)
    assert checksums_ok(pkt)


def test_ipv6_segment_routing_header_uses_the_final_segment() -> None:
    # SRH (type 4): segment list [0] is the final segment; scapy computes the checksum with it.
    srh = IPv6ExtHdrSegmentRouting(addresses=["2001:db8::100", "2001:db8::99"], segleft=1)
    raw = v6(b"segment routed", ext=srh, flags="PA")
    pkt = assert_matches_scapy(raw)
    assert pkt.pdst == bytes.fromhex("20010db8000000000000000000000100")
    assert checksums_ok(pkt)


def test_ipv6_routing_header_without_segments_left_uses_the_header_destination() -> None:
    raw = v6(b"arrived", ext=IPv6ExtHdrRouting(addresses=["2001:db8::99"], segleft=0), flags="PA")
    pkt = decode(raw)
    assert pkt.pdst == pkt.dst
    assert checksums_ok(pkt)


# ---------------------------------------------------------------------------------------------- malformed
def build_v4_tcp(
    opts: bytes = b"",
    payload: bytes = b"",
    flags: int = 0x10,
    doff: int | None = None,
    ihl: int = 5,
    total: int | None = None,
    ip_opts: bytes = b"",
) -> bytes:
    """A hand-built IPv4+TCP packet, to set header fields to values scapy would correct."""
    d = (20 + len(opts)) // 4 if doff is None else doff
    tcp = struct.pack("!HHIIBBHHH", 1234, 80, 1, 2, d << 4, flags, 1000, 0, 0) + opts + payload
    length = 20 + len(ip_opts) + len(tcp) if total is None else total
    ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, length, 0, 0, 64, 6, 0, b"\x01" * 4, b"\x02" * 4)
    return ip + ip_opts + tcp


def build_v6(nxt: int, body: bytes, plen: int | None = None) -> bytes:
    length = len(body) if plen is None else plen
    return struct.pack("!IHBB16s16s", 0x60000000, length, nxt, 64, b"\x01" * 16, b"\x02" * 16) + body


TCP20 = struct.pack("!HHIIBBHHH", 1, 2, 3, 4, 5 << 4, 0x10, 100, 0, 0)


def ext_hdr(nxt: int, length_units: int = 0) -> bytes:
    return bytes([nxt, length_units]) + b"\x01\x04\x00\x00\x00\x00" + b"\x00" * (8 * length_units)


MALFORMED: dict[str, bytes] = {
    "empty": b"",
    "version 0": b"\x00" * 40,
    "version 5": b"\x50" + b"\x00" * 39,
    "version 15": b"\xf0" * 60,
    "ipv4 one byte": b"\x45",
    "ipv4 19 bytes": build_v4_tcp()[:19],
    "ipv4 ihl 4": build_v4_tcp(ihl=4),
    "ipv4 ihl 0": build_v4_tcp(ihl=0),
    "ipv4 ihl beyond total length": build_v4_tcp(ihl=15, total=40),
    "ipv4 total length below header": build_v4_tcp(total=19),
    "ipv4 total length beyond buffer": build_v4_tcp(total=41),
    "ipv4 total length 65535": build_v4_tcp(total=65535),
    "ipv4 buffer cut short": build_v4_tcp(payload=b"abcdef")[:-1],
    "ipv4 tcp header truncated": build_v4_tcp(total=30),
    "ipv4 tcp header absent": build_v4_tcp(total=20),
    "ipv4 option length 0": build_v4_tcp(ip_opts=b"\x83\x00\x00\x00", ihl=6),
    "ipv4 option length 1": build_v4_tcp(ip_opts=b"\x07\x01\x00\x00", ihl=6),
    "ipv4 option length past header": build_v4_tcp(ip_opts=b"\x07\x09\x04\x00", ihl=6),
    "ipv4 option without length byte": build_v4_tcp(ip_opts=b"\x01\x01\x01\x89", ihl=6),
    "ipv4 source route past header": build_v4_tcp(ip_opts=b"\x01\x83\x0b\x04" + b"\x0a" * 4, ihl=7),
    "ipv4 tcp header truncated after options": build_v4_tcp(ip_opts=b"\x01" * 8, ihl=7, total=28 + 19),
    "tcp data offset 4": build_v4_tcp(doff=4),
    "tcp data offset 0": build_v4_tcp(doff=0),
    "tcp data offset beyond packet": build_v4_tcp(doff=15),
    "tcp data offset beyond packet with payload": build_v4_tcp(doff=10, payload=b"x" * 19),
    "ipv6 one byte": b"\x60",
    "ipv6 39 bytes": build_v6(6, TCP20)[:39],
    "ipv6 payload length 0": build_v6(6, TCP20, plen=0),
    "ipv6 payload length beyond buffer": build_v6(6, TCP20, plen=21),
    "ipv6 buffer cut short": build_v6(6, TCP20)[:-1],
    "ipv6 tcp header truncated": build_v6(6, TCP20[:19]),
    "ipv6 tcp data offset 3": build_v6(6, TCP20[:12] + b"\x30" + TCP20[13:]),
    "ipv6 tcp data offset beyond packet": build_v6(6, TCP20[:12] + b"\x60" + TCP20[13:]),
    "ipv6 hop-by-hop truncated": build_v6(0, b"\x06\x00\x01\x04\x00"),
    "ipv6 hop-by-hop length past packet": build_v6(0, b"\x06\x05" + b"\x00" * 6 + TCP20),
    "ipv6 destination options truncated": build_v6(60, ext_hdr(6)[:7]),
    "ipv6 routing header truncated": build_v6(0, ext_hdr(43) + b"\x06\x02\x00\x00"),
    "ipv6 fragment header truncated": build_v6(44, b"\x06\x00\x00\x00"),
    "ipv6 atomic fragment then tcp truncated": build_v6(44, b"\x06\x00\x00\x00\x00\x00\x00\x01" + TCP20[:8]),
    "ipv6 ah truncated": build_v6(51, b"\x06\x04\x00\x00\x00\x00"),
    "ipv6 ah length past packet": build_v6(51, b"\x06\x10" + b"\x00" * 10 + TCP20),
    "ipv6 extension chain of 17": build_v6(60, b"".join(ext_hdr(60) for _ in range(16)) + ext_hdr(6) + TCP20),
    "ipv6 extension chain of 40": build_v6(60, b"".join(ext_hdr(60) for _ in range(39)) + ext_hdr(6) + TCP20),
    "ipv6 extension header past the end, no tcp": build_v6(60, b"\x3b\x03" + b"\x00" * 6),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_raises_decode_error(name: str) -> None:
    assert_decode_error(MALFORMED[name])


# Option blocks with a broken length. On a SYN they fail `decode`; on other segments `options()`.
BAD_OPTIONS: dict[str, bytes] = {
    "length 0": b"\x2a\x00\x00\x00",
    "length 1": b"\x2a\x01\x00\x00",
    "length past block": b"\x2a\x08\x00\x00",
    "kind without length": b"\x01\x01\x01\x2a",
    "mss length 3": b"\x02\x03\x00\x00",
    "mss length 5": b"\x02\x05\x00\x00\x00\x00\x00\x00",
    "wscale length 2": b"\x03\x02\x00\x00",
    "wscale length 4": b"\x03\x04\x00\x00",
    "sack-permitted length 3": b"\x04\x03\x00\x00",
    "sack length 2": b"\x05\x02\x00\x00",
    "sack length 12": b"\x05\x0c" + b"\x00" * 10,
    "sack length 9": b"\x05\x09" + b"\x00" * 7 + b"\x00\x00\x00",
    "timestamp length 8": b"\x08\x08" + b"\x00" * 6,
    "timestamp length 12": b"\x08\x0c" + b"\x00" * 10,
    "mss past block": b"\x01\x01\x01\x02",
}


@pytest.mark.parametrize("name", list(BAD_OPTIONS))
def test_bad_option_lengths_on_syn_raise_decode_error(name: str) -> None:
    assert_decode_error(build_v4_tcp(opts=BAD_OPTIONS[name], flags=0x02))
    assert_decode_error(build_v6(6, build_v4_tcp(opts=BAD_OPTIONS[name], flags=0x12)[20:]))


@pytest.mark.parametrize("name", list(BAD_OPTIONS))
def test_bad_option_lengths_on_other_segments_raise_lazily(name: str) -> None:
    pkt = decode(build_v4_tcp(opts=BAD_OPTIONS[name], payload=b"data", flags=0x18))
    assert pkt.is_tcp
    assert pkt.payload == b"data"
    assert_options_error(pkt)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=120))
def test_random_bytes_decode_or_decode_error(raw: bytes) -> None:
    try:
        pkt = decode(raw)
    except DecodeError as e:
        assert type(e) is DecodeError
        return
    assert isinstance(pkt, Packet)
