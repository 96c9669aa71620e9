"""Tests of the capture reader and writer.

Files are produced by independent implementations wherever one is available (scapy's writers, tshark,
editcap, tcpdump) and our own reading is checked against tshark's, because a reader only checked against
its own writer can share that writer's misreading of the format. Formats no tool on the machine writes
(big-endian pcapng, SPB, OPB, odd timestamp resolutions) are built by hand and still cross-checked with
tshark.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import (
    ARP,
    CookedLinux,
    CookedLinuxV2,
    Dot1AD,
    Dot1Q,
    Ether,
    Loopback,
    LoopbackOpenBSD,
)
from scapy.packet import Packet as ScapyPacket
from scapy.packet import Raw
from scapy.utils import PcapNgWriter, wrpcap, wrpcapng

from tcpguard.io.pcap import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
    Frame,
    PcapError,
    PcapReader,
    PcapTruncatedError,
    PcapWriter,
    iter_frames,
    strip_link,
)

T0 = 1_700_000_000.0

needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")


# -- helpers ----------------------------------------------------------------------------------------------


def _ip4(payload: bytes = b"hello", sport: int = 1234) -> ScapyPacket:
    return IP(src="192.0.2.1", dst="198.51.100.2") / TCP(sport=sport, dport=80, flags="PA") / Raw(payload)


def _ip6(payload: bytes = b"hello") -> ScapyPacket:
    return IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(sport=4321, dport=443, flags="S") / Raw(payload)


def _eth(etype: int | None = None) -> ScapyPacket:
    # Explicit addresses: with a default destination scapy resolves it over the network while building.
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    if etype is not None:
        eth.type = etype
    return eth


def _arp() -> ScapyPacket:
    return ARP(hwsrc="02:00:00:00:00:01", psrc="192.0.2.1", pdst="192.0.2.2")


def _raw_ip4(payload: bytes, ident: int = 0) -> bytes:
    """A bare IPv4 header and payload, for tests that need thousands of packets (scapy is slow)."""
    head = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, 64, 17, 0, b"\xc0\0\2\1", b"\xc0\0\2\2"
    )
    return head + payload


def _read(path: Path | io.BytesIO, **kwargs: bool) -> list[Frame]:
    return list(iter_frames(path, **kwargs))


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


def _tool_errors(stderr: str) -> list[str]:
    # tshark warns on every start as root; that is not a complaint about the file.
    return [line for line in stderr.splitlines() if line.strip() and "Running as user" not in line]


def _tshark(path: Path, *fields: str) -> list[list[str]]:
    """tshark's view of a file, one row per frame, failing the test if tshark reports any problem."""
    argv = ["tshark", "-n", "-r", str(path), "-T", "fields", "-E", "separator=;"]
    for name in fields:
        argv += ["-e", name]
    proc = _run(*argv)
    assert proc.returncode == 0, proc.stderr
    assert _tool_errors(proc.stderr) == []
    return [line.split(";") for line in proc.stdout.splitlines()]


def _assert_matches_tshark(path: Path) -> list[Frame]:
    """Our frames agree with tshark on number, time, lengths and link type for every frame."""
    frames = _read(path)
    rows = _tshark(path, "frame.number", "frame.time_epoch", "frame.cap_len", "frame.len")
    by_number = {int(row[0]): row[1:] for row in rows}
    # tshark also lists a few non-packet records (journal entries, custom blocks), which we skip.
    assert len(by_number) >= len(frames)
    for frame in frames:
        ts, caplen, wirelen = by_number[frame.number]
        # tshark shows no time for a Simple Packet Block; we give 0.0.
        assert frame.ts == pytest.approx(float(ts or 0.0), abs=1e-6)
        assert len(frame.data) == int(caplen)
        assert frame.orig_len == int(wirelen)
    return frames


# pcapng blocks built by hand, in either byte order.


def _block(order: str, btype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    total = 12 + len(body)
    return struct.pack(order + "II", btype, total) + body + struct.pack(order + "I", total)


def _shb(order: str = "<") -> bytes:
    return _block(order, 0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1))


def _option(order: str, code: int, value: bytes) -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def _idb(order: str, linktype: int, snaplen: int = 0, options: bytes = b"") -> bytes:
    if options:
        options += struct.pack(order + "HH", 0, 0)
    return _block(order, 1, struct.pack(order + "HHI", linktype, 0, snaplen) + options)


def _epb(order: str, ifid: int, ticks: int, data: bytes, orig_len: int | None = None) -> bytes:
    wire = len(data) if orig_len is None else orig_len
    head = struct.pack(order + "IIIII", ifid, ticks >> 32, ticks & 0xFFFFFFFF, len(data), wire)
    return _block(order, 6, head + data)


def _spb(order: str, data: bytes, orig_len: int | None = None) -> bytes:
    return _block(order, 3, struct.pack(order + "I", len(data) if orig_len is None else orig_len) + data)


def _opb(order: str, ifid: int, ticks: int, data: bytes) -> bytes:
    head = struct.pack(order + "HHIIII", ifid, 0, ticks >> 32, ticks & 0xFFFFFFFF, len(data), len(data))
    return _block(order, 2, head + data)


def _pcap_header(order: str = "<", magic: int = 0xA1B2C3D4, linktype: int = LINKTYPE_RAW) -> bytes:
    return struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)


def _pcap_record(order: str, sec: int, frac: int, data: bytes) -> bytes:
    return struct.pack(order + "IIII", sec, frac, len(data), len(data)) + data


# -- writer round trips -----------------------------------------------------------------------------------


def test_writer_round_trip_raw_ip(tmp_path: Path) -> None:
    packets = [bytes(_ip4(bytes([i]) * i, sport=1000 + i)) for i in range(50)] + [bytes(_ip6())]
    times = [T0 + i * 0.001001 for i in range(len(packets))]
    path = tmp_path / "raw.pcap"
    with PcapWriter(path) as writer:
        for data, ts in zip(packets, times, strict=True):
            writer.write(data, ts)
    frames = _read(path)
    assert [f.data for f in frames] == packets
    assert [f.ip for f in frames] == packets
    assert [f.number for f in frames] == list(range(1, len(packets) + 1))
    assert all(f.linktype == LINKTYPE_RAW and f.orig_len == len(f.data) for f in frames)
    for frame, ts in zip(frames, times, strict=True):
        assert frame.ts == pytest.approx(ts, abs=1e-6)


def test_writer_round_trip_ethernet_and_snaplen(tmp_path: Path) -> None:
    frame = bytes(_eth() / _ip4(b"x" * 200))
    path = tmp_path / "eth.pcap"
    with PcapWriter(path, linktype=LINKTYPE_ETHERNET, snaplen=100) as writer:
        writer.write(frame, T0)
        writer.write(frame[:60], T0 + 1, orig_len=len(frame))
    first, second = _read(path)
    assert first.data == frame[:100] and first.orig_len == len(frame)
    assert second.data == frame[:60] and second.orig_len == len(frame)
    assert first.ip == frame[14:100]
    assert first.linktype == LINKTYPE_ETHERNET


def test_writer_rounds_microseconds_without_overflow(tmp_path: Path) -> None:
    path = tmp_path / "round.pcap"
    with PcapWriter(path) as writer:
        writer.write(bytes(_ip4()), T0 + 0.9999996)  # rounds up into the next second
        writer.write(bytes(_ip4()), 0.0)
    raw = path.read_bytes()
    sec, usec = struct.unpack_from("<II", raw, 24)
    assert (sec, usec) == (int(T0) + 1, 0)
    assert [f.ts for f in _read(path)] == [T0 + 1, 0.0]


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="snap length"):
        PcapWriter(tmp_path / "x.pcap", snaplen=0)
    with PcapWriter(tmp_path / "y.pcap") as writer:
        for bad in (-1.0, float("nan"), float("inf"), 2.0**32):
            with pytest.raises(ValueError, match="timestamp"):
                writer.write(b"E", bad)
    with pytest.raises(ValueError, match="closed"):
        writer.write(b"E", T0)


def test_writer_and_reader_on_file_objects() -> None:
    out = io.BytesIO()
    writer = PcapWriter(out)
    writer.write(bytes(_ip4()), T0)
    writer.close()
    assert not out.closed  # the caller owns it
    out.seek(0)
    (frame,) = _read(out)
    assert frame.ip == bytes(_ip4())
    with PcapReader(io.BytesIO(out.getvalue())) as reader:
        assert reader.format == "pcap" and reader.linktype == LINKTYPE_RAW
        assert len(list(reader)) == 1


@needs_tshark
@pytest.mark.parametrize("linktype", [LINKTYPE_RAW, LINKTYPE_ETHERNET])
def test_tshark_reads_what_we_write(tmp_path: Path, linktype: int) -> None:
    path = tmp_path / "w.pcap"
    with PcapWriter(path, linktype=linktype) as writer:
        for i in range(20):
            pkt = _ip4(b"payload %d" % i, sport=2000 + i) if i % 2 else _ip6(b"six %d" % i)
            if linktype == LINKTYPE_ETHERNET:
                pkt = _eth() / pkt
            writer.write(bytes(pkt), T0 + i / 7)
    frames = _assert_matches_tshark(path)
    assert len(frames) == 20
    ports = _tshark(path, "tcp.srcport")
    assert [row[0] for row in ports][1::2] == [str(2000 + i) for i in range(1, 20, 2)]


# -- files written by other tools ------------------------------------------------------------------------


def _scapy_packets() -> list[ScapyPacket]:
    packets: list[ScapyPacket] = [_eth() / _ip4(b"a" * i, sport=3000 + i) for i in range(10)]
    packets.append(_eth() / _ip6(b"v6"))
    packets.append(_eth() / _arp())
    for i, pkt in enumerate(packets):
        pkt.time = T0 + i * 0.25 + 0.000123
    return packets


def test_scapy_pcap(tmp_path: Path) -> None:
    packets = _scapy_packets()
    path = tmp_path / "scapy.pcap"
    wrpcap(str(path), packets)
    frames = _read(path)
    assert [f.data for f in frames] == [bytes(p) for p in packets]
    assert [f.ip for f in frames] == [bytes(p.payload) for p in packets[:-1]] + [None]
    for frame, pkt in zip(frames, packets, strict=True):
        assert frame.ts == pytest.approx(float(pkt.time), abs=1e-6)


def test_scapy_pcapng(tmp_path: Path) -> None:
    packets = _scapy_packets()
    path = tmp_path / "scapy.pcapng"
    wrpcapng(str(path), packets)
    with PcapReader(path) as reader:
        frames = list(reader)
        assert reader.format == "pcapng"
    assert [f.data for f in frames] == [bytes(p) for p in packets]
    assert [f.ts for f in frames] == pytest.approx([float(p.time) for p in packets], abs=1e-6)
    assert frames[-1].ip is None


def test_scapy_pcapng_with_interfaces_of_different_link_types(tmp_path: Path) -> None:
    eth = _eth() / _ip4(b"eth")
    eth.sniffed_on = "eth0"
    cooked = CookedLinux() / _ip6(b"any")
    cooked.sniffed_on = "any"
    path = tmp_path / "multi.pcapng"
    with PcapNgWriter(str(path)) as writer:
        for i, pkt in enumerate([eth, cooked, eth]):
            pkt.time = T0 + i
            writer.write(pkt)
    frames = _read(path)
    assert [f.linktype for f in frames] == [LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_ETHERNET]
    assert frames[0].interface == frames[2].interface != frames[1].interface
    assert frames[0].ip == bytes(_ip4(b"eth"))
    assert frames[1].ip == bytes(_ip6(b"any"))


@needs_tshark
def test_tshark_and_editcap_conversions(tmp_path: Path) -> None:
    packets = _scapy_packets()
    source = tmp_path / "source.pcap"
    wrpcap(str(source), packets)
    expected = [bytes(p) for p in packets]
    converted = {
        "tshark.pcapng": ["tshark", "-r", str(source), "-F", "pcapng", "-w"],
        "editcap.pcapng": ["editcap", "-F", "pcapng", str(source)],
        "editcap-nsec.pcap": ["editcap", "-F", "nsecpcap", str(source)],
        "editcap-mod.pcap": ["editcap", "-F", "modpcap", str(source)],
    }
    for name, argv in converted.items():
        if shutil.which(argv[0]) is None:
            continue
        out = tmp_path / name
        proc = _run(*argv, str(out))
        assert proc.returncode == 0, proc.stderr
        frames = _assert_matches_tshark(out)
        assert [f.data for f in frames] == expected, name
        assert [f.number for f in frames] == list(range(1, len(expected) + 1))


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump is not installed")
def test_tcpdump_rewrites(tmp_path: Path) -> None:
    packets = _scapy_packets()
    source = tmp_path / "source.pcap"
    wrpcap(str(source), packets)
    for precision in ("micro", "nano"):
        out = tmp_path / f"tcpdump-{precision}.pcap"
        proc = _run("tcpdump", "-r", str(source), f"--time-stamp-precision={precision}", "-w", str(out))
        assert proc.returncode == 0, proc.stderr
        magic = out.read_bytes()[:4]
        assert magic == (b"\xd4\xc3\xb2\xa1" if precision == "micro" else b"\x4d\x3c\xb2\xa1")
        frames = _read(out)
        assert [f.data for f in frames] == [bytes(p) for p in packets]
        assert [f.ts for f in frames] == pytest.approx([float(p.time) for p in packets], abs=1e-6)


# -- timestamps and byte orders ---------------------------------------------------------------------------


def test_nanosecond_pcap(tmp_path: Path) -> None:
    path = tmp_path / "nano.pcap"
    data = bytes(_ip4())
    path.write_bytes(
        _pcap_header("<", 0xA1B23C4D)
        + _pcap_record("<", int(T0), 123_456_789, data)
        + _pcap_record("<", int(T0) + 1, 999_999_999, data)
    )
    first, second = _read(path)
    assert first.ts == pytest.approx(T0 + 0.123456789, abs=1e-6)
    assert second.ts == pytest.approx(T0 + 1.999999999, abs=1e-6)
    assert first.ip == data


def test_scapy_nanosecond_and_big_endian_pcap(tmp_path: Path) -> None:
    pkt = _eth() / _ip4()
    pkt.time = T0 + 0.5
    nano, big = tmp_path / "nano.pcap", tmp_path / "be.pcap"
    wrpcap(str(nano), [pkt], nano=True)
    wrpcap(str(big), [pkt], endianness=">")
    assert nano.read_bytes()[:4] == b"\x4d\x3c\xb2\xa1"
    assert big.read_bytes()[:4] == b"\xa1\xb2\xc3\xd4"
    for path in (nano, big):
        (frame,) = _read(path)
        assert frame.data == bytes(pkt)
        assert frame.ts == pytest.approx(T0 + 0.5, abs=1e-6)
        assert frame.linktype == LINKTYPE_ETHERNET


@needs_tshark
def test_big_endian_pcap_both_precisions(tmp_path: Path) -> None:
    data = bytes(_ip6())
    for magic, frac, ts in [(0xA1B2C3D4, 250_000, 0.25), (0xA1B23C4D, 250_000_001, 0.250000001)]:
        path = tmp_path / f"be-{magic:x}.pcap"
        path.write_bytes(_pcap_header(">", magic) + _pcap_record(">", int(T0), frac, data) * 3)
        frames = _assert_matches_tshark(path)
        assert [f.ts for f in frames] == pytest.approx([T0 + ts] * 3, abs=1e-6)
        assert all(f.ip == data for f in frames)


@needs_tshark
@pytest.mark.parametrize("order", ["<", ">"])
def test_hand_built_pcapng(tmp_path: Path, order: str) -> None:
    """Both byte orders, per-interface resolution and offset, SPB, OPB and blocks to skip."""
    v4, v6 = bytes(_ip4()), bytes(_ip6())
    eth = bytes(_eth() / _ip4(b"eth"))
    nano = _option(order, 9, b"\x09")
    pow2 = _option(order, 9, b"\x94")  # 2**-20 s
    offset = _option(order, 14, struct.pack(order + "q", 1000))
    name = _option(order, 2, b"eth0")
    isb = _block(order, 5, struct.pack(order + "III", 0, 0, 0))
    nrb = _block(order, 4, struct.pack(order + "HH", 0, 0))
    ns = int(T0) * 10**9 + 123_456_789
    path = tmp_path / f"hand-{'le' if order == '<' else 'be'}.pcapng"
    path.write_bytes(
        _shb(order)
        + _idb(order, LINKTYPE_RAW, 0, name + nano)
        + _epb(order, 0, ns, v4)
        + nrb
        + _idb(order, LINKTYPE_ETHERNET, 128, pow2 + offset)
        + _epb(order, 1, 3 << 20, eth)  # 3 s after the interface's 1000 s offset
        + _spb(order, v6)
        + _opb(order, 1, 1 << 19, eth)
        + isb
        + _block(order, 0x0A, struct.pack(order + "II", 0x544C534B, 4) + b"keys")
        + _epb(order, 0, ns + 1, v6)
    )
    frames = _assert_matches_tshark(path)
    assert [f.number for f in frames] == [1, 2, 3, 4, 5]
    assert [f.interface for f in frames] == [0, 1, 0, 1, 0]
    assert [f.linktype for f in frames] == [101, 1, 101, 1, 101]
    assert [f.ip for f in frames] == [v4, eth[14:], v6, eth[14:], v6]
    assert frames[0].ts == pytest.approx(T0 + 0.123456789, abs=1e-6)
    assert frames[1].ts == 1003.0
    assert frames[2].ts == 0.0  # SPB has no time
    assert frames[3].ts == 1000.5


@needs_tshark
def test_pcapng_sections_and_frame_numbers(tmp_path: Path) -> None:
    """Sections in both byte orders in one file, and non-packet blocks that Wireshark still numbers."""
    v4, v6 = bytes(_ip4()), bytes(_ip6())
    journal = _block("<", 9, b"__REALTIME_TIMESTAMP=1\nMESSAGE=hi\n")
    custom = _block("<", 0xBAD, struct.pack("<I", 32473) + b"data")
    first = _shb("<") + _idb("<", LINKTYPE_RAW) + _epb("<", 0, 1_000_000, v4) + journal
    first += _epb("<", 0, 2_000_000, v6) + custom + _epb("<", 0, 3_000_000, v4)
    second = _shb(">") + _idb(">", LINKTYPE_IPV6) + _idb(">", LINKTYPE_IPV4)
    second += _epb(">", 0, 4_000_000, v6) + _epb(">", 1, 5_000_000, v4)
    path = tmp_path / "sections.pcapng"
    path.write_bytes(first + second)
    frames = _assert_matches_tshark(path)
    assert [f.number for f in frames] == [1, 3, 5, 6, 7]
    assert [f.ts for f in frames] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [f.linktype for f in frames] == [101, 101, 101, LINKTYPE_IPV6, LINKTYPE_IPV4]
    assert [f.interface for f in frames] == [0, 0, 0, 0, 1]
    assert [f.ip for f in frames] == [v4, v6, v4, v6, v4]


def test_spb_is_cut_to_the_snap_length() -> None:
    data = bytes(_ip4(b"z" * 100))
    raw = _shb() + _idb("<", LINKTYPE_RAW, snaplen=64) + _spb("<", data[:64], orig_len=len(data))
    (frame,) = _read(io.BytesIO(raw))
    assert frame.data == data[:64] and frame.orig_len == len(data)


# -- link layers ------------------------------------------------------------------------------------------

_V4 = _ip4(b"link")
_V6 = _ip6(b"link")

LINK_CASES: list[tuple[str, int, bytes, bytes | None]] = [
    ("ethernet-v4", 1, bytes(_eth() / _V4), bytes(_V4)),
    ("ethernet-v6", 1, bytes(_eth() / _V6), bytes(_V6)),
    ("ethernet-8021q", 1, bytes(_eth() / Dot1Q(vlan=10) / _V4), bytes(_V4)),
    ("ethernet-qinq", 1, bytes(_eth() / Dot1AD(vlan=5) / Dot1Q(vlan=7) / _V6), bytes(_V6)),
    (
        "ethernet-9100",
        1,
        bytes(_eth(0x9100) / Dot1Q(vlan=3, type=0x8100) / Dot1Q(vlan=4) / _V4),
        bytes(_V4),
    ),
    ("ethernet-arp", 1, bytes(_eth() / _arp()), None),
    ("ethernet-vlan-arp", 1, bytes(_eth() / Dot1Q() / _arp()), None),
    ("ethernet-short", 1, bytes(_eth())[:13], None),
    ("ethernet-cut-vlan", 1, bytes(_eth() / Dot1Q() / _V4)[:16], None),
    ("raw-v4", 101, bytes(_V4), bytes(_V4)),
    ("raw-v6", 101, bytes(_V6), bytes(_V6)),
    ("raw-not-ip", 101, b"\x10\x00\x00\x00", None),
    ("raw-empty", 101, b"", None),
    ("raw-12", 12, bytes(_V4), bytes(_V4)),
    ("raw-14", 14, bytes(_V6), bytes(_V6)),
    ("ipv4", 228, bytes(_V4), bytes(_V4)),
    ("ipv6", 229, bytes(_V6), bytes(_V6)),
    ("sll-v4", 113, bytes(CookedLinux() / _V4), bytes(_V4)),
    ("sll-v6", 113, bytes(CookedLinux(proto=0x86DD) / _V6), bytes(_V6)),
    ("sll-vlan", 113, bytes(CookedLinux(proto=0x8100) / Dot1Q(vlan=9) / _V4), bytes(_V4)),
    ("sll-arp", 113, bytes(CookedLinux(proto=0x0806) / _arp()), None),
    ("sll2-v4", 276, bytes(CookedLinuxV2() / _V4), bytes(_V4)),
    ("sll2-v6", 276, bytes(CookedLinuxV2(proto=0x86DD) / _V6), bytes(_V6)),
    ("sll2-vlan", 276, bytes(CookedLinuxV2(proto=0x8100) / Dot1Q(vlan=9) / _V6), bytes(_V6)),
    ("null-le-v4", 0, struct.pack("<I", 2) + bytes(_V4), bytes(_V4)),
    ("null-be-v4", 0, struct.pack(">I", 2) + bytes(_V4), bytes(_V4)),
    ("null-scapy-v4", 0, bytes(Loopback() / _V4), bytes(_V4)),
    ("null-darwin-v6", 0, struct.pack("<I", 30) + bytes(_V6), bytes(_V6)),
    ("null-freebsd-v6", 0, struct.pack(">I", 28) + bytes(_V6), bytes(_V6)),
    ("null-bsd-v6", 0, struct.pack("<I", 24) + bytes(_V6), bytes(_V6)),
    ("null-other-family", 0, struct.pack("<I", 17) + bytes(_V4), None),
    ("null-short", 0, b"\x02\x00", None),
    ("loop-v4", 108, bytes(LoopbackOpenBSD() / _V4), bytes(_V4)),
    ("loop-v6", 108, struct.pack(">I", 24) + bytes(_V6), bytes(_V6)),
    ("loop-little-endian-is-wrong", 108, struct.pack("<I", 2) + bytes(_V4), None),
    ("unknown-linktype", 147, bytes(_V4), None),
]


@pytest.mark.parametrize(
    ("linktype", "frame", "ip"), [case[1:] for case in LINK_CASES], ids=[case[0] for case in LINK_CASES]
)
def test_strip_link(linktype: int, frame: bytes, ip: bytes | None) -> None:
    assert strip_link(linktype, frame) == ip


def test_every_link_type_through_scapy_files(tmp_path: Path) -> None:
    cases: list[tuple[int, ScapyPacket, ScapyPacket]] = [
        (LINKTYPE_ETHERNET, _eth() / Dot1AD(vlan=2) / Dot1Q(vlan=3) / _V4, _V4),
        (LINKTYPE_RAW, _V6, _V6),
        (LINKTYPE_IPV4, _V4, _V4),
        (LINKTYPE_IPV6, _V6, _V6),
        (LINKTYPE_LINUX_SLL, CookedLinux() / _V4, _V4),
        (LINKTYPE_LINUX_SLL2, CookedLinuxV2(proto=0x86DD) / _V6, _V6),
        (LINKTYPE_NULL, Loopback() / _V4, _V4),
        (LINKTYPE_LOOP, LoopbackOpenBSD() / _V4, _V4),
    ]
    for linktype, pkt, ip in cases:
        path = tmp_path / f"lt{linktype}.pcap"
        wrpcap(str(path), [pkt, pkt], linktype=linktype)
        frames = _read(path)
        assert [f.linktype for f in frames] == [linktype, linktype]
        assert [f.ip for f in frames] == [bytes(ip)] * 2, linktype


@given(st.sampled_from([0, 1, 12, 14, 101, 108, 113, 228, 229, 276, 9999]), st.binary(max_size=64))
def test_strip_link_never_raises(linktype: int, data: bytes) -> None:
    ip = strip_link(linktype, data)
    assert ip is None or data.endswith(ip)


# -- malformed and truncated files ------------------------------------------------------------------------


def _three_frame_pcap() -> tuple[bytes, list[int]]:
    """A classic pcap of three frames and the offset at which each record starts."""
    out = _pcap_header()
    starts = []
    for i in range(3):
        starts.append(len(out))
        out += _pcap_record("<", int(T0) + i, 0, bytes(_ip4(b"p" * (10 + i))))
    return out, starts


@pytest.mark.parametrize("cut", [1, 10, 17, 30])
def test_truncated_pcap_yields_complete_frames_then_raises(tmp_path: Path, cut: int) -> None:
    raw, starts = _three_frame_pcap()
    path = tmp_path / "cut.pcap"
    path.write_bytes(raw[: starts[2] + cut])
    got: list[Frame] = []
    with pytest.raises(PcapTruncatedError) as info:
        got.extend(iter_frames(path))
    assert [f.number for f in got] == [1, 2]
    assert info.value.offset == starts[2]
    assert info.value.path == str(path)
    assert "cut short" in str(info.value)

    with PcapReader(path, allow_truncated=True) as reader:
        assert len(list(reader)) == 2
        assert reader.truncated_at == starts[2]


def test_truncated_pcapng(tmp_path: Path) -> None:
    blocks = _shb() + _idb("<", LINKTYPE_RAW) + _epb("<", 0, 1, bytes(_ip4()))
    last = _epb("<", 0, 2, bytes(_ip4()))
    path = tmp_path / "cut.pcapng"
    for cut in (4, 11, len(last) - 1):
        path.write_bytes(blocks + last[:cut])
        got: list[Frame] = []
        with pytest.raises(PcapTruncatedError) as info:
            got.extend(iter_frames(path))
        assert len(got) == 1 and info.value.offset == len(blocks)
        assert len(_read(path, allow_truncated=True)) == 1


def test_header_only_and_exact_end_are_not_truncation(tmp_path: Path) -> None:
    path = tmp_path / "empty.pcap"
    path.write_bytes(_pcap_header())
    assert _read(path) == []
    path.write_bytes(_shb() + _idb("<", 1))
    assert _read(path) == []


@pytest.mark.parametrize(
    ("content", "offset", "message"),
    [
        (b"", 0, "empty file"),
        (b"this is not a capture file at all", 0, "not a pcap or pcapng"),
        (bytes(range(256)) * 4, 0, "not a pcap or pcapng"),
        (b"\x1f\x8b\x08\x00" + bytes(20), 0, "gzip"),
        (b"\xd4\xc3\xb2\xa1\x02\x00", 0, "header cut short"),
        (struct.pack("<IHHiIII", 0xA1B2C3D4, 3, 0, 0, 0, 65535, 1), 4, "version 3.0"),
        (_shb()[:8] + b"ABCD" + bytes(16), 0, "byte-order magic"),
        (_shb()[:10], 0, "cut short"),
        (_pcap_header() + struct.pack("<IIII", 0, 0, 0x7FFFFFFF, 0x7FFFFFFF), 24, "not plausible"),
        (_shb() + struct.pack("<II", 6, 13) + bytes(8), 28, "bad block length 13"),
        (_shb() + _idb("<", 1)[:-4] + b"\xff\xff\xff\xff", 28, "trailing copy"),
        (_shb() + _epb("<", 0, 0, b"E" * 20), 28, "undeclared interface 0"),
        (_shb() + _idb("<", 1) + _epb("<", 3, 0, b"E" * 20), 48, "undeclared interface 3"),
        (_shb() + _spb("<", b"E" * 20), 28, "before any interface"),
        (_shb() + _block("<", 6, struct.pack("<IIIII", 0, 0, 0, 500, 500)), 28, "overruns its block"),
        (_shb() + _block("<", 1, b"\x01\x00"), 28, "too short"),
        (
            _shb() + _idb("<", 1, options=struct.pack("<HH", 9, 200)),
            44,
            "runs past its block",
        ),
        (_shb() + _block("<", 0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 2, 0, -1)), 28, "version 2.0"),
    ],
)
def test_malformed_files_raise_pcap_error(tmp_path: Path, content: bytes, offset: int, message: str) -> None:
    path = tmp_path / "bad.cap"
    path.write_bytes(content)
    with pytest.raises(PcapError, match=message) as info:
        _read(path)
    assert info.value.offset == offset
    assert info.value.path == str(path)
    assert not isinstance(info.value, PcapTruncatedError)


def test_error_is_raised_after_the_good_frames(tmp_path: Path) -> None:
    good = _shb() + _idb("<", LINKTYPE_RAW) + _epb("<", 0, 1, bytes(_ip4()))
    path = tmp_path / "bad.pcapng"
    path.write_bytes(good + _epb("<", 7, 1, bytes(_ip4())))
    got: list[Frame] = []
    with pytest.raises(PcapError) as info:
        got.extend(iter_frames(path))
    assert len(got) == 1 and info.value.offset == len(good)


# -- buffering --------------------------------------------------------------------------------------------


class _Trickle(io.BytesIO):
    """A stream that returns at most a few bytes per read, like a pipe or socket under load."""

    def __init__(self, data: bytes, step: int) -> None:
        super().__init__(data)
        self._step = step

    def read(self, size: int | None = -1) -> bytes:
        return super().read(self._step if size is None or size < 0 else min(size, self._step))


def _varied(count: int) -> Iterator[bytes]:
    for i in range(count):
        yield _raw_ip4(bytes([i & 0xFF]) * (i % 1400), ident=i & 0xFFFF)


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_large_files_across_read_chunks(tmp_path: Path, fmt: str) -> None:
    packets = list(_varied(3000))  # about 2 MiB: crosses the reader's 1 MiB chunks mid-record
    path = tmp_path / f"big.{fmt}"
    if fmt == "pcap":
        with PcapWriter(path) as writer:
            for i, data in enumerate(packets):
                writer.write(data, T0 + i)
    else:
        blocks = [_shb(), _idb("<", LINKTYPE_RAW)]
        blocks += [_epb("<", 0, (int(T0) + i) * 10**6, data) for i, data in enumerate(packets)]
        path.write_bytes(b"".join(blocks))
    frames = _read(path)
    assert [f.ip for f in frames] == packets
    assert frames[-1].number == len(packets) and frames[-1].ts == T0 + len(packets) - 1


@pytest.mark.parametrize("step", [1, 7, 4096])
def test_short_reads(step: int) -> None:
    packets = list(_varied(40))
    out = io.BytesIO()
    with PcapWriter(out) as writer:
        for data in packets:
            writer.write(data, T0)
    frames = list(iter_frames(_Trickle(out.getvalue(), step)))
    assert [f.ip for f in frames] == packets
    ng = _shb() + _idb("<", LINKTYPE_RAW) + b"".join(_epb("<", 0, 0, data) for data in packets)
    frames = list(iter_frames(_Trickle(ng, step)))
    assert [f.ip for f in frames] == packets


def test_frame_repr_and_udp_passthrough() -> None:
    data = bytes(_eth() / IP(src="192.0.2.1", dst="192.0.2.2") / UDP())
    out = io.BytesIO()
    with PcapWriter(out, linktype=LINKTYPE_ETHERNET) as writer:
        writer.write(data, T0)
    (frame,) = _read(io.BytesIO(out.getvalue()))
    assert frame.ip == data[14:]  # any IP protocol, not only TCP: decode() decides what to do with it
    assert "#1" in repr(frame) and "linktype=1" in repr(frame)


# -- damaged captures, read up to the damage (stop_at_damage) -------------------------------------------

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def _tshark_count(path: Path) -> tuple[int, str]:
    """Frames tshark reads from `path`, and what it says on stderr."""
    r = subprocess.run(["tshark", "-r", str(path)], capture_output=True, text=True, timeout=60, check=False)
    return len(r.stdout.splitlines()), r.stderr


@needs_tshark
@pytest.mark.parametrize("sample", ["demo.pcap", "trace.pcapng"])
@pytest.mark.parametrize("fraction", [0.13, 0.5, 0.97])
def test_a_cut_capture_reads_as_many_frames_as_tshark_and_says_where(
    tmp_path: Path, sample: str, fraction: float
) -> None:
    """A capture cut mid-record (tcpdump killed while writing): every whole record, then the offset."""
    raw = (SAMPLES / sample).read_bytes()
    cut = tmp_path / f"cut-{sample}"
    cut.write_bytes(raw[: int(len(raw) * fraction)])
    with PcapReader(cut, stop_at_damage=True) as reader:
        frames = list(reader)
        damage = reader.damage
    count, stderr = _tshark_count(cut)
    assert "cut short" in stderr  # tshark agrees the file is damaged ...
    assert len(frames) == count  # ... and reads the same whole records
    assert isinstance(damage, PcapTruncatedError)
    assert damage.path == str(cut) and "cut short" in str(damage)
    # The damage starts right after the last whole record, which is inside the file.
    whole = list(iter_frames(SAMPLES / sample))
    assert [f.data for f in frames] == [f.data for f in whole[: len(frames)]]
    assert damage.offset < len(raw) * fraction


@pytest.mark.parametrize("junk", [b"\xff" * 40, b"garbage at the end of the file", bytes(range(7))])
def test_junk_after_the_records_is_damage_at_its_offset(tmp_path: Path, junk: bytes) -> None:
    raw, _starts = _three_frame_pcap()
    path = tmp_path / "junk.pcap"
    path.write_bytes(raw + junk)
    with PcapReader(path, stop_at_damage=True) as reader:
        assert [f.number for f in reader] == [1, 2, 3]
        assert reader.damage is not None and reader.damage.offset == len(raw)
    ng = _shb() + _idb("<", LINKTYPE_RAW) + _epb("<", 0, 1, bytes(_ip4()))
    path = tmp_path / "junk.pcapng"
    path.write_bytes(ng + junk)
    with PcapReader(path, stop_at_damage=True) as reader:
        assert [f.number for f in reader] == [1]
        assert reader.damage is not None and reader.damage.offset == len(ng)
    with pytest.raises(PcapError):  # without the flag, the same file still raises
        _read(path)


def test_a_clean_file_has_no_damage_and_a_non_capture_still_fails_at_once(tmp_path: Path) -> None:
    raw, _starts = _three_frame_pcap()
    path = tmp_path / "ok.pcap"
    path.write_bytes(raw)
    with PcapReader(path, stop_at_damage=True) as reader:
        assert len(list(reader)) == 3 and reader.damage is None
    path.write_bytes(b"this is not a capture file at all")
    with pytest.raises(PcapError, match="not a pcap"):
        PcapReader(path, stop_at_damage=True)
