"""Capture files in and out: a classic pcap / pcapng reader and a classic pcap writer.

Replaying captures is how tcpguard is tested and how rule modules are tried offline, so reading is on
the hot path of every replay and is written by hand with `struct`: scapy and dpkt build an object per
header and are an order of magnitude slower. The reader makes one `Frame` per packet record and nothing
else; the IP packet inside is found by `strip_link`, which slices the frame once and leaves every IP and
TCP field to `tcpguard.core.packet.decode`.

Choices made here:

* Frame numbers are Wireshark's `frame.number`, so a frame a test or a log names can be looked up in
  Wireshark directly: packet records count from 1 across the whole file, sections included, and so do
  the few non-packet pcapng blocks Wireshark also lists as frames (systemd journal entries, sysdig
  events, custom blocks), which are otherwise skipped and leave a gap in the numbers.
* Timestamps are float seconds. A float holds about 0.2 microsecond at current epoch values, so
  nanosecond captures are rounded; nothing in tcpguard needs better. Simple Packet Blocks carry no time
  and get 0.0.
* A malformed file raises `PcapError` with the byte offset of the offending record, nothing else, so a
  broken capture is reported as data and not as a crash. Frames before the bad record have been yielded
  by then.
* A file that ends inside a record (a capture cut off while tcpdump was still writing it) yields every
  complete frame and then raises `PcapTruncatedError`, a `PcapError`, because silently dropping the tail
  can hide the very packet a test is about. Pass `allow_truncated=True` to stop quietly instead; the
  reader then records where the file was cut in `PcapReader.truncated_at`.
* The offline tools read a damaged capture the way tcpdump and tshark do: every whole record up to the
  damage, then a warning. `stop_at_damage=True` gives them that: any `PcapError` after the file header
  (a record cut short, junk where a record should start, an implausible length) ends the iteration
  quietly and is kept in `PcapReader.damage`, so the caller can finish its work and then say where the
  file went wrong. A file that is not a capture at all still fails in the constructor: there is nothing
  to process, and the caller must not pretend otherwise.
* Compressed captures are rejected with a clear message rather than decompressed: replay fixtures are
  stored uncompressed and the gzip path would be several times slower.
* The writer only writes classic microsecond pcap: every tool reads it, and tcpguard's timestamps do not
  need more.
"""

from __future__ import annotations

import math
import os
import struct
import sys
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import BinaryIO

# Link types (https://www.tcpdump.org/linktypes.html) that `strip_link` understands.
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW_BSD = 12  # DLT_RAW on most BSDs, as written by some old tools
LINKTYPE_RAW_OPENBSD = 14  # DLT_RAW on OpenBSD
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

_IP_ETHERTYPES = frozenset({0x0800, 0x86DD})
_VLAN_TPIDS = frozenset({0x8100, 0x88A8, 0x9100})
# Address families in NULL / LOOP headers. AF_INET is 2 everywhere; AF_INET6 differs per OS: Linux 10,
# Windows (Npcap loopback) 23, NetBSD/OpenBSD 24, FreeBSD 28, macOS 30.
_AF_INET = 2
_AF_INET6 = frozenset({10, 23, 24, 28, 30})

# Records larger than this are taken as corruption, not as a packet: no link type Wireshark knows allows
# more, and it keeps a garbage length from making the reader swallow the rest of the file as "truncated".
_MAX_RECORD = 64 * 1024 * 1024
_CHUNK = 1 << 20

# The stored time of the classic format; pcapng stores its resolution per interface.
_MAGIC_US_LE = b"\xd4\xc3\xb2\xa1"
_MAGIC_US_BE = b"\xa1\xb2\xc3\xd4"
_MAGIC_NS_LE = b"\x4d\x3c\xb2\xa1"
_MAGIC_NS_BE = b"\xa1\xb2\x3c\x4d"
# Alexey Kuznetsov's patched libpcap: same header, 8 more bytes (ifindex, protocol, pkttype) per record.
_MAGIC_MOD_LE = b"\x34\xcd\xb2\xa1"
_MAGIC_MOD_BE = b"\xa1\xb2\xcd\x34"
_MAGIC_PCAPNG = b"\x0a\x0d\x0d\x0a"
_BOM_LE = b"\x4d\x3c\x2b\x1a"
_BOM_BE = b"\x1a\x2b\x3c\x4d"

_CLASSIC_MAGICS: dict[bytes, tuple[str, float, int]] = {
    # magic: (struct byte order, ticks per second, record header size)
    _MAGIC_US_LE: ("<", 1e6, 16),
    _MAGIC_US_BE: (">", 1e6, 16),
    _MAGIC_NS_LE: ("<", 1e9, 16),
    _MAGIC_NS_BE: (">", 1e9, 16),
    _MAGIC_MOD_LE: ("<", 1e6, 24),
    _MAGIC_MOD_BE: (">", 1e6, 24),
}

# pcapng block types.
_BT_SHB = 0x0A0D0D0A
_BT_IDB = 0x00000001
_BT_OPB = 0x00000002
_BT_SPB = 0x00000003
_BT_EPB = 0x00000006
# Blocks that are not packets but that Wireshark still lists, and numbers, as frames: systemd journal
# entries, sysdig events and custom blocks. They are skipped but counted so frame numbers stay Wireshark's.
_BT_NUMBERED = frozenset({0x00000009, 0x204, 0x208, 0x216, 0x217, 0x221, 0x222, 0x00000BAD, 0x40000BAD})
# Minimum total length of each block we parse: type + length + fixed body + trailing length.
_MIN_SHB = 28
_MIN_IDB = 20
_MIN_OPB = 32
_MIN_SPB = 16
_MIN_EPB = 32
_OPT_ENDOFOPT = 0
_OPT_IF_TSRESOL = 9
_OPT_IF_TSOFFSET = 14

_WRITE_HEADER = struct.Struct("<IHHiIII")
_WRITE_RECORD = struct.Struct("<IIII")


class PcapError(Exception):
    """A capture file is malformed: `path` names it, `offset` is the byte where the bad record starts."""

    def __init__(self, path: str, offset: int, message: str) -> None:
        self.path = path
        self.offset = offset
        self.message = message
        super().__init__(f"{path}: offset {offset}: {message}")


class PcapTruncatedError(PcapError):
    """The file ends inside a record, as when a capture is read while still being written or is cut short.

    Its own type so that a caller replaying a live capture can accept the frames it got and carry on.
    """


class Frame:
    """One captured frame. `ip` is the IPv4/IPv6 packet inside it, or None if the frame carries neither.

    Slotted and built positionally because a replay makes one per packet.
    """

    __slots__ = ("data", "interface", "ip", "linktype", "number", "orig_len", "ts")

    def __init__(
        self,
        number: int,
        ts: float,
        linktype: int,
        data: bytes,
        orig_len: int,
        ip: bytes | None,
        interface: int = 0,
    ) -> None:
        self.number = number
        self.ts = ts
        self.linktype = linktype
        self.data = data
        self.orig_len = orig_len
        self.ip = ip
        self.interface = interface

    def __repr__(self) -> str:
        ip = "none" if self.ip is None else f"{len(self.ip)} bytes"
        return (
            f"<Frame #{self.number} ts={self.ts:.6f} linktype={self.linktype} if={self.interface} "
            f"len={len(self.data)}/{self.orig_len} ip={ip}>"
        )


# -- link layers ----------------------------------------------------------------------------------------


def _follow_ethertype(data: bytes, type_off: int, payload_off: int) -> bytes | None:
    # VLAN tags sit where the payload would start: 2 bytes of TCI, then the next EtherType. A tag may
    # follow a tag (QinQ), so walk them until an EtherType that is not a TPID.
    n = len(data)
    while n >= payload_off:
        etype = (data[type_off] << 8) | data[type_off + 1]
        if etype in _IP_ETHERTYPES:
            return data[payload_off:]
        if etype not in _VLAN_TPIDS:
            return None
        type_off = payload_off + 2
        payload_off += 4
    return None


def _strip_ethernet(data: bytes) -> bytes | None:
    # Untagged IPv4 is nearly all of any Ethernet capture: test it before the general walk.
    if len(data) >= 14 and data[12] == 0x08 and data[13] == 0x00:
        return data[14:]
    return _follow_ethertype(data, 12, 14)


def _strip_sll(data: bytes) -> bytes | None:
    return _follow_ethertype(data, 14, 16)


def _strip_sll2(data: bytes) -> bytes | None:
    return _follow_ethertype(data, 0, 20)


def _strip_raw(data: bytes) -> bytes | None:
    # Raw link types 12 and 14 are not used consistently across systems; the version nibble is the only
    # reliable signal that the frame really is IP.
    if data and (data[0] >> 4 == 4 or data[0] >> 4 == 6):
        return data
    return None


def _strip_ip_only(data: bytes) -> bytes | None:
    return data or None


def _af_payload(family: int, data: bytes) -> bytes | None:
    if family == _AF_INET or family in _AF_INET6:
        return data[4:]
    return None


def _strip_null(data: bytes) -> bytes | None:
    # The family is in the byte order of the machine that captured, which the file does not record; only
    # one of the two readings is a small number.
    if len(data) < 4:
        return None
    family = int.from_bytes(data[:4], "little")
    if family > 0xFFFF:
        family = int.from_bytes(data[:4], "big")
    return _af_payload(family, data)


def _strip_loop(data: bytes) -> bytes | None:
    if len(data) < 4:
        return None
    return _af_payload(int.from_bytes(data[:4], "big"), data)


def _strip_none(data: bytes) -> bytes | None:
    return None


_STRIPPERS: dict[int, Callable[[bytes], bytes | None]] = {
    LINKTYPE_NULL: _strip_null,
    LINKTYPE_ETHERNET: _strip_ethernet,
    LINKTYPE_RAW_BSD: _strip_raw,
    LINKTYPE_RAW_OPENBSD: _strip_raw,
    LINKTYPE_RAW: _strip_raw,
    LINKTYPE_LOOP: _strip_loop,
    LINKTYPE_LINUX_SLL: _strip_sll,
    LINKTYPE_IPV4: _strip_ip_only,
    LINKTYPE_IPV6: _strip_ip_only,
    LINKTYPE_LINUX_SLL2: _strip_sll2,
}


def strip_link(linktype: int, data: bytes) -> bytes | None:
    """The IPv4/IPv6 packet inside a frame of `linktype`, or None if there is none or the type is unknown.

    Returns a slice that may still carry link-layer padding after the IP packet; `decode` trims it to the
    IP total length, which is the only place that knows it. Never raises, whatever `data` is.
    """
    return _STRIPPERS.get(linktype, _strip_none)(data)


# -- reading ----------------------------------------------------------------------------------------------


def _fill(f: BinaryIO, buf: bytes, pos: int, need: int) -> bytes:
    """`buf[pos:]` extended with reads until it holds `need` bytes or the file ends.

    Reads in large chunks so the per-frame loop almost never gets here; loops because pipes and sockets
    return short reads.
    """
    parts = [buf[pos:]]
    have = len(parts[0])
    while have < need:
        chunk = f.read(max(_CHUNK, need - have))
        if not chunk:
            break
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)


def _source_name(source: object) -> str:
    name = getattr(source, "name", None)
    return os.fsdecode(name) if isinstance(name, str | bytes) else "<stream>"


class _Interface:
    """What an IDB says about its interface, flattened into what the packet loop needs."""

    __slots__ = ("linktype", "offset", "snaplen", "strip", "ticks")

    def __init__(self, linktype: int, snaplen: int, ticks: float, offset: int) -> None:
        self.linktype = linktype
        self.snaplen = snaplen
        self.ticks = ticks
        self.offset = offset
        self.strip = _STRIPPERS.get(linktype, _strip_none)


class PcapReader:
    """Frames of a classic pcap or pcapng file, in file order. Iterate it once.

    The file header is read by the constructor, so a file that is not a capture at all fails there, before
    any frame. Use it as a context manager (or call `close`) when it opened the file itself; a file object
    passed in is left open for its owner.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | BinaryIO,
        *,
        allow_truncated: bool = False,
        stop_at_damage: bool = False,
    ) -> None:
        self.allow_truncated = allow_truncated or stop_at_damage
        self.stop_at_damage = stop_at_damage
        #: Byte offset of the record the file ends inside of, when `allow_truncated` let the reader stop.
        self.truncated_at: int | None = None
        #: With `stop_at_damage`, the error that ended the iteration early (its `offset` is where the
        #: damage starts; every record before it was yielded), or None while the file reads clean.
        self.damage: PcapError | None = None
        #: "pcap" or "pcapng".
        self.format = ""
        #: The file's link type for classic pcap; pcapng has one per interface, see `Frame.linktype`.
        self.linktype: int | None = None
        if isinstance(source, str | os.PathLike):
            self.path = os.fsdecode(source)
            self._file: BinaryIO = open(source, "rb")  # noqa: SIM115 - closed by close()
            self._owned = True
        else:
            self.path = _source_name(source)
            self._file = source
            self._owned = False
        try:
            self._frames = self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> Iterator[Frame]:
        buf = _fill(self._file, b"", 0, 24)
        magic = buf[:4]
        if not buf:
            raise PcapError(self.path, 0, "empty file, not a capture")
        if magic == _MAGIC_PCAPNG:
            self.format = "pcapng"
            if len(buf) < 12:
                raise PcapError(self.path, 0, f"pcapng section header cut short ({len(buf)} bytes)")
            if buf[8:12] not in (_BOM_LE, _BOM_BE):
                raise PcapError(self.path, 0, f"bad section byte-order magic {buf[8:12].hex()}")
            return self._read_pcapng(buf)
        spec = _CLASSIC_MAGICS.get(magic)
        if spec is not None:
            order, ticks, rec_size = spec
            if len(buf) < 24:
                raise PcapError(self.path, 0, f"pcap file header cut short ({len(buf)} of 24 bytes)")
            major, minor, _zone, _sigfigs, _snaplen, network = struct.unpack_from(order + "HHiIII", buf, 4)
            if major != 2:
                raise PcapError(self.path, 4, f"unsupported pcap version {major}.{minor}")
            self.format = "pcap"
            # The upper bits of the link-type field carry FCS information (libpcap's LT_LINKTYPE mask).
            self.linktype = network & 0x03FFFFFF
            return self._read_pcap(buf, order, ticks, rec_size, self.linktype)
        if magic[:2] == b"\x1f\x8b":
            raise PcapError(self.path, 0, "gzip-compressed capture; decompress it first")
        raise PcapError(self.path, 0, f"not a pcap or pcapng file (starts with {magic.hex()})")

    def __iter__(self) -> Iterator[Frame]:
        return self._guarded() if self.stop_at_damage else self._frames

    def _guarded(self) -> Iterator[Frame]:
        # A generator around the generator costs one resumption per frame (a few percent of reading);
        # only the tools that asked for it pay that.
        try:
            yield from self._frames
        except PcapError as e:
            self.damage = e

    def close(self) -> None:
        if self._owned:
            self._file.close()

    def __enter__(self) -> PcapReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _cut(self, offset: int, what: str) -> None:
        """The file ended inside a record: raise, or note it and let the caller stop."""
        error = PcapTruncatedError(self.path, offset, f"file ends inside {what} (capture cut short?)")
        if not self.allow_truncated:
            raise error
        self.truncated_at = offset
        if self.stop_at_damage:
            self.damage = error

    def _read_pcap(
        self, buf: bytes, order: str, ticks: float, rec_size: int, linktype: int
    ) -> Iterator[Frame]:
        strip = _STRIPPERS.get(linktype, _strip_none)
        unpack = struct.Struct(order + "IIII").unpack_from
        f = self._file
        pos = 24
        base = 0  # file offset of buf[0]
        n = len(buf)
        number = 0
        while True:
            if n - pos < rec_size:
                base += pos
                buf = _fill(f, buf, pos, rec_size)
                pos = 0
                n = len(buf)
                if n == 0:
                    return
                if n < rec_size:
                    self._cut(base, "a record header")
                    return
            sec, frac, caplen, orig_len = unpack(buf, pos)
            start = pos + rec_size
            end = start + caplen
            if end > n:
                if caplen > _MAX_RECORD:
                    raise PcapError(self.path, base + pos, f"record length {caplen} is not plausible")
                base += pos
                buf = _fill(f, buf, pos, rec_size + caplen)
                pos = 0
                n = len(buf)
                start = rec_size
                end = start + caplen
                if end > n:
                    self._cut(base, f"a record ({n - rec_size} of {caplen} bytes)")
                    return
            data = buf[start:end]
            number += 1
            yield Frame(number, sec + frac / ticks, linktype, data, orig_len, strip(data), 0)
            pos = end

    def _read_pcapng(self, buf: bytes) -> Iterator[Frame]:
        f = self._file
        path = self.path
        pos = 0
        base = 0
        n = len(buf)
        number = 0
        interfaces: list[_Interface] = []
        # Rebound at every Section Header Block, whose byte-order magic sets the order of its section.
        order = "<"
        head = struct.Struct("<II").unpack_from
        u32 = struct.Struct("<I").unpack_from
        epb = struct.Struct("<IIIII").unpack_from
        # The interface of the previous EPB, unpacked; -1 forces a lookup.
        cur_ifid = -1
        linktype, ticks, offset, strip = 0, 1e6, 0, _strip_none
        while True:
            if n - pos < 12:
                base += pos
                buf = _fill(f, buf, pos, 12)
                pos = 0
                n = len(buf)
                if n == 0:
                    return
                if n < 12:
                    self._cut(base, "a block header")
                    return
            btype, blen = head(buf, pos)
            if btype == _BT_SHB:
                bom = buf[pos + 8 : pos + 12]
                if bom == _BOM_LE:
                    order = "<"
                elif bom == _BOM_BE:
                    order = ">"
                else:
                    raise PcapError(path, base + pos, f"bad section byte-order magic {bom.hex()}")
                head = struct.Struct(order + "II").unpack_from
                u32 = struct.Struct(order + "I").unpack_from
                epb = struct.Struct(order + "IIIII").unpack_from
                btype, blen = head(buf, pos)
            if blen < 12 or blen & 3:
                raise PcapError(path, base + pos, f"bad block length {blen} (block type {btype:#x})")
            if n - pos < blen:
                if blen > _MAX_RECORD:
                    raise PcapError(path, base + pos, f"block length {blen} is not plausible")
                base += pos
                buf = _fill(f, buf, pos, blen)
                pos = 0
                n = len(buf)
                if n < blen:
                    self._cut(base, f"a block of type {btype:#x} ({n} of {blen} bytes)")
                    return
            if u32(buf, pos + blen - 4)[0] != blen:
                raise PcapError(path, base + pos, f"block length {blen} does not match its trailing copy")

            if btype == _BT_EPB:
                if blen < _MIN_EPB:
                    raise PcapError(path, base + pos, f"enhanced packet block too short ({blen} bytes)")
                ifid, ts_high, ts_low, caplen, orig_len = epb(buf, pos + 8)
                if caplen > blen - _MIN_EPB:
                    raise PcapError(path, base + pos, f"captured length {caplen} overruns its block")
                if ifid != cur_ifid:
                    # Nearly every capture has one interface: keep its fields in locals between packets.
                    if ifid >= len(interfaces):
                        raise PcapError(path, base + pos, f"packet on undeclared interface {ifid}")
                    iface = interfaces[ifid]
                    cur_ifid = ifid
                    linktype, ticks, offset, strip = iface.linktype, iface.ticks, iface.offset, iface.strip
                data = buf[pos + 28 : pos + 28 + caplen]
                number += 1
                ts = ((ts_high << 32) | ts_low) / ticks + offset
                yield Frame(number, ts, linktype, data, orig_len, strip(data), ifid)
            elif btype == _BT_IDB:
                interfaces.append(self._parse_idb(buf, pos, blen, order, base))
            elif btype == _BT_SPB:
                if blen < _MIN_SPB:
                    raise PcapError(path, base + pos, f"simple packet block too short ({blen} bytes)")
                if not interfaces:
                    raise PcapError(path, base + pos, "simple packet block before any interface")
                iface = interfaces[0]
                orig_len = u32(buf, pos + 8)[0]
                # The SPB has no captured length: it is the original length cut to the snap length.
                caplen = min(orig_len, blen - _MIN_SPB)
                if iface.snaplen:
                    caplen = min(caplen, iface.snaplen)
                data = buf[pos + 12 : pos + 12 + caplen]
                number += 1
                yield Frame(number, 0.0, iface.linktype, data, orig_len, iface.strip(data), 0)
            elif btype == _BT_OPB:
                if blen < _MIN_OPB:
                    raise PcapError(path, base + pos, f"packet block too short ({blen} bytes)")
                ifid, _drops, ts_high, ts_low, caplen, orig_len = struct.unpack_from(
                    order + "HHIIII", buf, pos + 8
                )
                if caplen > blen - _MIN_OPB:
                    raise PcapError(path, base + pos, f"captured length {caplen} overruns its block")
                try:
                    iface = interfaces[ifid]
                except IndexError:
                    raise PcapError(path, base + pos, f"packet on undeclared interface {ifid}") from None
                data = buf[pos + 28 : pos + 28 + caplen]
                number += 1
                ts = ((ts_high << 32) | ts_low) / iface.ticks + iface.offset
                yield Frame(number, ts, iface.linktype, data, orig_len, iface.strip(data), ifid)
            elif btype == _BT_SHB:
                if blen < _MIN_SHB:
                    raise PcapError(path, base + pos, f"section header block too short ({blen} bytes)")
                major, minor = struct.unpack_from(order + "HH", buf, pos + 12)
                if major != 1:
                    raise PcapError(path, base + pos, f"unsupported pcapng version {major}.{minor}")
                interfaces = []
                cur_ifid = -1
            elif btype in _BT_NUMBERED:
                number += 1
            # Anything else (statistics, name resolution, decryption secrets) is not a frame at all.
            pos += blen

    def _parse_idb(self, buf: bytes, pos: int, blen: int, order: str, base: int) -> _Interface:
        if blen < _MIN_IDB:
            raise PcapError(self.path, base + pos, f"interface description block too short ({blen} bytes)")
        linktype, _reserved, snaplen = struct.unpack_from(order + "HHI", buf, pos + 8)
        ticks = 1e6
        offset = 0
        opt = pos + 16
        end = pos + blen - 4
        opt_head = struct.Struct(order + "HH").unpack_from
        while opt + 4 <= end:
            code, length = opt_head(buf, opt)
            if code == _OPT_ENDOFOPT:
                break
            value = opt + 4
            if value + length > end:
                raise PcapError(self.path, base + opt, f"interface option {code} runs past its block")
            if code == _OPT_IF_TSRESOL and length >= 1:
                resol = buf[value]
                # High bit set: a negative power of two; clear: a negative power of ten.
                ticks = float(2 ** (resol & 0x7F)) if resol & 0x80 else float(10**resol)
            elif code == _OPT_IF_TSOFFSET and length >= 8:
                offset = struct.unpack_from(order + "q", buf, value)[0]
            opt = value + ((length + 3) & ~3)
        return _Interface(linktype, snaplen, ticks, offset)


def iter_frames(
    source: str | os.PathLike[str] | BinaryIO, *, allow_truncated: bool = False
) -> Iterator[Frame]:
    """Frames of a capture file; see `PcapReader` and the module docstring for errors and truncation."""
    with PcapReader(source, allow_truncated=allow_truncated) as reader:
        yield from reader


# -- writing ----------------------------------------------------------------------------------------------


class PcapWriter:
    """Writes classic little-endian microsecond pcap, which every capture tool reads.

    `linktype` defaults to raw IP because that is what the daemon sees from NFQUEUE; pass
    `LINKTYPE_ETHERNET` (1) to write whole Ethernet frames. Frames longer than `snaplen` are cut to it and
    keep their full length as the original length, as a capturing tool would. A file object passed in is
    flushed but not closed by `close`, since its owner may still use it.
    """

    def __init__(
        self,
        dest: str | os.PathLike[str] | BinaryIO,
        linktype: int = LINKTYPE_RAW,
        snaplen: int = 262144,
    ) -> None:
        if not 0 <= linktype <= 0x03FFFFFF:
            raise ValueError(f"link type {linktype} out of range")
        if not 0 < snaplen <= 0xFFFFFFFF:
            raise ValueError(f"snap length {snaplen} out of range")
        self.linktype = linktype
        self.snaplen = snaplen
        if isinstance(dest, str | os.PathLike):
            self._file: BinaryIO = open(dest, "wb")  # noqa: SIM115 - closed by close()
            self._owned = True
        else:
            self._file = dest
            self._owned = False
        self._closed = False
        self._file.write(_WRITE_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, snaplen, linktype))

    def write(self, data: bytes, ts: float, orig_len: int | None = None) -> None:
        """Append one frame captured at `ts` (seconds since the epoch, 0 <= ts < 2**32).

        `orig_len` is the length on the wire when `data` is already cut; it defaults to `len(data)`.
        """
        if self._closed:
            raise ValueError("write to a closed PcapWriter")
        if not (0.0 <= ts < 4294967296.0):  # also rejects NaN
            raise ValueError(f"timestamp {ts!r} does not fit a pcap record")
        # Rounding the whole value once (rather than the fraction) cannot produce 1000000 microseconds.
        sec, usec = divmod(round(ts * 1e6), 1_000_000)
        wire = len(data) if orig_len is None else orig_len
        if len(data) > self.snaplen:
            data = data[: self.snaplen]
        self._file.write(_WRITE_RECORD.pack(sec, usec, len(data), max(wire, len(data))) + data)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owned:
            self._file.close()
        else:
            self._file.flush()

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _main(argv: list[str]) -> int:
    """`python -m tcpguard.io.pcap FILE...`: count frames and time the reader, to measure the hot path."""
    if not argv:
        print("usage: python -m tcpguard.io.pcap FILE...", file=sys.stderr)
        return 2
    status = 0
    for name in argv:
        frames = with_ip = 0
        start = time.perf_counter()
        try:
            for frame in iter_frames(name):
                frames += 1
                if frame.ip is not None:
                    with_ip += 1
        except (OSError, PcapError) as exc:
            print(exc, file=sys.stderr)
            status = 1
        elapsed = time.perf_counter() - start
        rate = frames / elapsed if elapsed > 0 else math.inf
        print(f"{name}: {frames} frames ({with_ip} IP) in {elapsed:.3f} s, {rate:,.0f} frames/s")
    return status


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
