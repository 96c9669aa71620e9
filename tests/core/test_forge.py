"""Forged and rewritten packets, checked by scapy: they parse, carry the requested fields, and their
checksums are the ones scapy computes when the checksum fields are deleted and the packet rebuilt."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import (
    IP,
    TCP,
    IPOption_LSRR,
    IPOption_NOP,
    IPOption_Router_Alert,
    IPOption_RR,
    IPOption_SSRR,
)
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    IPv6ExtHdrSegmentRouting,
)

from tcpguard.core import forge
from tcpguard.core.packet import ACK, RST, URG, checksums_ok, decode

V4 = (ipaddress.ip_address("192.0.2.10").packed, ipaddress.ip_address("203.0.113.20").packed)
V6 = (ipaddress.ip_address("2001:db8::a").packed, ipaddress.ip_address("2001:db8:1::b").packed)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


def parse(raw: bytes) -> Any:
    return IP(raw) if raw[0] >> 4 == 4 else IPv6(raw)


def assert_scapy_checksums(raw: bytes) -> Any:
    """scapy parses `raw`, and deleting the checksum fields and rebuilding gives the same checksums
    (so the same bytes). Returns scapy's parse."""
    sc = parse(raw)
    tcp = sc[TCP]
    rebuilt = sc.copy()
    if sc.version == 4:
        del rebuilt.chksum
        del rebuilt.len
    else:
        del rebuilt.plen
    del rebuilt[TCP].chksum
    again = parse(bytes(rebuilt))
    if sc.version == 4:
        assert again.chksum == sc.chksum, "IPv4 header checksum"
        assert again.len == sc.len == len(raw)
    else:
        assert again.plen == sc.plen == len(raw) - 40
    assert again[TCP].chksum == tcp.chksum, "TCP checksum"
    assert bytes(rebuilt) == raw
    return sc


def addresses(sc: Any) -> tuple[bytes, bytes]:
    return ipaddress.ip_address(sc.src).packed, ipaddress.ip_address(sc.dst).packed


# -------------------------------------------------------------------------------------------- build_tcp
@settings(max_examples=150, deadline=None)
@given(
    ipv6=st.booleans(),
    sport=u16,
    dport=u16,
    seq=u32,
    ack=u32,
    flags=st.integers(0, 255),
    window=u16,
    urgptr=u16,
    payload=st.binary(max_size=200),
    nopts=st.integers(0, 10),
)
def test_build_tcp_parses_with_correct_checksums(
    ipv6, sport, dport, seq, ack, flags, window, urgptr, payload, nopts
) -> None:
    options = b"\x01" * (4 * nopts)
    src, dst = V6 if ipv6 else V4
    raw = forge.build_tcp(
        6 if ipv6 else 4, src, dst, sport, dport, seq, ack, flags, window, payload, options, urgptr
    )
    sc = assert_scapy_checksums(raw)
    tcp = sc[TCP]
    assert addresses(sc) == (src, dst)
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack) == (sport, dport, seq, ack)
    assert (int(tcp.flags), tcp.window, tcp.urgptr) == (flags, window, urgptr)
    assert tcp.dataofs == 5 + nopts
    assert bytes(tcp.payload) == payload
    if ipv6:
        assert sc.nh == 6
    else:
        assert (sc.ihl, sc.proto, sc.flags.DF, sc.frag) == (5, 6, True, 0)
    assert checksums_ok(decode(raw))


def test_build_tcp_with_real_options() -> None:
    options = b"\x02\x04\x05\xb4\x01\x03\x03\x07\x04\x02\x01\x01"
    raw = forge.build_tcp(4, *V4, 1, 2, 3, 4, 0x02, 1000, b"", options)
    sc = assert_scapy_checksums(raw)
    assert sc[TCP].options == [
        ("MSS", 1460),
        ("NOP", None),
        ("WScale", 7),
        ("SAckOK", b""),
        ("NOP", None),
        ("NOP", None),
    ]


def test_build_tcp_rejects_unpadded_options() -> None:
    with pytest.raises(ValueError):
        forge.build_tcp(4, *V4, 1, 2, 3, 4, 0x10, options=b"\x01\x01\x01")


# -------------------------------------------------------------------------------------------- build_rst
@settings(max_examples=100, deadline=None)
@given(ipv6=st.booleans(), sport=u16, dport=u16, seq=u32, ack=st.none() | u32)
def test_build_rst(ipv6: bool, sport: int, dport: int, seq: int, ack: int | None) -> None:
    src, dst = V6 if ipv6 else V4
    raw = forge.build_rst(6 if ipv6 else 4, src, dst, sport, dport, seq, ack)
    sc = assert_scapy_checksums(raw)
    tcp = sc[TCP]
    assert addresses(sc) == (src, dst)
    assert (tcp.sport, tcp.dport, tcp.seq) == (sport, dport, seq)
    if ack is None:
        assert int(tcp.flags) == RST
        assert tcp.ack == 0
    else:
        assert int(tcp.flags) == RST | ACK
        assert tcp.ack == ack
    assert bytes(tcp.payload) == b""
    pkt = decode(raw)
    assert pkt.rst and checksums_ok(pkt)


# -------------------------------------------------------------------------------------------- rewrite
TCP_OPTS = [("MSS", 1200), ("NOP", None), ("WScale", 5), ("SAckOK", b""), ("Timestamp", (11, 22))]


def original_v4(payload: bytes, flags: str = "PA", urgptr: int = 0) -> bytes:
    ip = IP(
        src="192.0.2.10",
        dst="203.0.113.20",
        ttl=33,
        id=777,
        tos=0x28,
        options=[IPOption_NOP(), IPOption_RR(routers=["10.0.0.1"]), IPOption_Router_Alert()],
    )
    return bytes(
        ip
        / TCP(sport=1111, dport=2222, seq=5, ack=9, flags=flags, window=999, urgptr=urgptr, options=TCP_OPTS)
        / payload
    )


def original_v6(payload: bytes, flags: str = "PA", urgptr: int = 0) -> bytes:
    ip = IPv6(src="2001:db8::a", dst="2001:db8:1::b", hlim=9, fl=0x12345)
    ext = (
        IPv6ExtHdrHopByHop()
        / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrRouting(addresses=["2001:db8::77"], segleft=0)
        / IPv6ExtHdrFragment(offset=0, m=0, id=42)  # atomic: a whole packet
    )
    return bytes(
        ip
        / ext
        / TCP(sport=1111, dport=2222, seq=5, ack=9, flags=flags, window=999, urgptr=urgptr, options=TCP_OPTS)
        / payload
    )


def headers_except_lengths(sc: Any) -> Any:
    """scapy's parse with the payload, lengths and checksums removed, for comparing everything else."""
    c = sc.copy()
    c[TCP].remove_payload()
    c[TCP].chksum = 0
    if c.version == 4:
        c.len = 0
        c.chksum = 0
    else:
        c.plen = 0
    return bytes(c)


@settings(max_examples=150, deadline=None)
@given(
    ipv6=st.booleans(),
    old=st.binary(max_size=100),
    new=st.none() | st.binary(max_size=300),
    urg=st.booleans(),
    clear_urg=st.booleans(),
    pad=st.integers(0, 20),
)
def test_rewrite_keeps_headers_and_options_and_fixes_lengths(
    ipv6: bool, old: bytes, new: bytes | None, urg: bool, clear_urg: bool, pad: int
) -> None:
    make = original_v6 if ipv6 else original_v4
    raw = make(old, "PAU" if urg else "PA", 7 if urg else 0)
    before = parse(raw)
    # Ethernet padding after the packet must not end up in the rewritten one.
    out = forge.rewrite(decode(raw + b"\x00" * pad), new, clear_urg=clear_urg)
    after = assert_scapy_checksums(out)
    body = old if new is None else new
    assert bytes(after[TCP].payload) == body
    assert len(out) == len(raw) - len(old) + len(body)
    # Everything else is the original, options included; only URG/urgptr change when cleared.
    if clear_urg:
        assert not int(after[TCP].flags) & URG
        assert after[TCP].urgptr == 0
        expected = before.copy()
        expected[TCP].flags = int(expected[TCP].flags) & ~URG
        expected[TCP].urgptr = 0
    else:
        assert int(after[TCP].flags) == int(before[TCP].flags)
        assert after[TCP].urgptr == before[TCP].urgptr
        expected = before
    assert headers_except_lengths(after) == headers_except_lengths(expected)
    assert after[TCP].options == before[TCP].options
    if ipv6:
        assert after[IPv6ExtHdrRouting].addresses == ["2001:db8::77"]
    else:
        assert after.options == before.options
    pkt = decode(out)
    assert checksums_ok(pkt)
    assert pkt.payload == body


def test_rewrite_to_empty_payload() -> None:
    out = forge.rewrite(decode(original_v4(b"some data")), b"")
    sc = assert_scapy_checksums(out)
    assert bytes(sc[TCP].payload) == b""
    assert sc.len == sc.ihl * 4 + sc[TCP].dataofs * 4


def test_rewrite_ipv6_routing_header_with_segments_left() -> None:
    raw = bytes(
        IPv6(src="2001:db8::a", dst="2001:db8:1::b")
        / IPv6ExtHdrRouting(addresses=["2001:db8::77", "2001:db8::78"])
        / TCP(flags="PA")
        / b"data"
    )
    assert_scapy_checksums(forge.rewrite(decode(raw), b"other data"))


@pytest.mark.parametrize(
    "ip",
    [
        IP(src="192.0.2.10", dst="203.0.113.20", options=[IPOption_LSRR(routers=["10.0.0.1", "10.0.0.2"])]),
        IP(
            src="192.0.2.10",
            dst="203.0.113.20",
            options=[IPOption_NOP(), IPOption_SSRR(routers=["10.0.0.3"])],
        ),
        IPv6(src="2001:db8::a", dst="2001:db8:1::b")
        / IPv6ExtHdrSegmentRouting(addresses=["2001:db8::78", "2001:db8::77"], segleft=1),
    ],
    ids=["lsrr", "ssrr", "srh"],
)
def test_rewrite_source_routed_packets(ip: Any) -> None:
    raw = bytes(ip / TCP(flags="PA", options=TCP_OPTS) / b"data")
    out = forge.rewrite(decode(raw), b"rewritten payload")
    sc = assert_scapy_checksums(out)
    assert bytes(sc[TCP].payload) == b"rewritten payload"
    assert sc[TCP].options == parse(raw)[TCP].options
