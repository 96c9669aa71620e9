"""Flow tracing: PyPCAPKit's `traceflow` for TCP, done on tcpguard's own connection tracker.

`tcpguard trace CAPTURE -o DIR [--format pcap|json] [--payload]` splits a capture into TCP flows: one
flow per connection, both directions, with its frame numbers, counters, an output file per flow and
`DIR/index.json`. The Python API keeps the seed's concepts (a `TCP` tracer with `dump`, `trace` and
`submit`; `Packet`, `Buffer`/`BufferID` and `Index` records with the seed's field names) so that code
written against `pcapkit.foundation.traceflow.tcp` ports over.

Why the daemon's `Engine` is the tracker. PyPCAPKit's tracer keys a buffer on the sorted address/port
strings, ends a flow at the first FIN (so the last ACK opens a spurious flow), ignores RST and opens a new
flow on any SYN. The engine already knows what a connection is: its state machine ends a connection
when both FINs are acknowledged or an acceptable RST passes, keeps the ended connection around so late
ACKs and retransmissions still belong to it, and starts a new connection when a SYN reuses the ports of
an ended one. Tracing with it means a trace and the daemon can never disagree about connection
boundaries, and every fix to the tracker fixes both. The engine runs with observation settings
(`TraceSettings.engine_settings`): checksums are not verified (a capture taken on a sending host holds
offloaded, unfilled checksums), connections first seen mid-stream are tracked, out-of-order segments are
held until the gap fills, and a buffer limit fails open (stop reassembling, keep tracking) instead of
resetting the connection.

Frames to flows. The engine answers each frame with a `Decision` whose `flow_id` names its connection,
whatever the verdict: the tracer records every frame of a flow, including the ones the engine would
drop inline (retransmissions after the end, segments outside the window, a second SYN). A frame the
engine rejects before it looks the connection up (a frame cut short by the snap length, for instance)
is mapped by the direction-independent flow key to the flow that owns those addresses and ports. A TCP
frame the engine leaves untracked with no flow to join (a stray RST, SYN+FIN) becomes an "untracked"
flow of its own, which ends after `closed_timeout` seconds without frames or when the tracker opens a
connection on the same ports. Frames that carry no TCP header (other protocols, later IP fragments) are
counted and not traced.

Who is the client. The SYN sender. When the SYN is not in the capture, the engine's mid-stream rule
decides: the sender of a SYN-ACK is the server; otherwise the side with the lower port is taken to be the
server (a service port is almost always below the ephemeral range), and on equal ports the sender of
the first frame seen is the client. Such flows say `"syn_seen": false` in the index.

How a flow ends (`Index.reason`): `fin` (both FINs acknowledged), `rst`, `timeout` (idle longer than
the engine's timeout for its state), `evicted` (the table was full: `max_flows`), `superseded` (a SYN
with a new ISN reused the ports before the tracker saw the connection end; see `TCP._supersede`),
`capture-end` (still open when the capture ended), `untracked` (see above). A flow that ended by FIN or
RST keeps its later frames (the last ACK, retransmissions) until the tracker forgets the connection
(`closed_timeout`) or a new SYN reuses its ports, which starts a new flow.

Labels are `<first frame>_<client>.<port>_<server>.<port>`, the first frame number zero-padded to six
digits, IPv6 colons written as dashes: `000042_fd00-98--1.40002_fd00-98--2.8080`. Every frame belongs to
exactly one flow, so the first frame number alone makes labels unique (port reuse, the same pair of
hosts twice) without a table of labels already used, and it is what Wireshark shows as `frame.number`.
Only `[0-9a-f.-_]` appear: safe on every file system, in shells and URLs.

Bounded memory, whatever the capture's length: the engine bounds connections (`max_flows`, evicting the
connection nearest its timeout) and buffered bytes; per-flow output is spooled in memory in small
chunks and appended to its file (`flush_bytes` per flow, `max_pending_bytes` over all flows), through at
most `max_open_files` open file handles (least recently used closed first); ended flows are written out
and forgotten. What grows with the capture is only the index: the frame numbers of the flows still open
(4 bytes a frame) and, for `DIR/index.json`, a spool file plus 24 bytes per flow to sort it by first frame.

Payload (`--payload`): each direction's byte stream as the engine reassembled it (first copy of
retransmitted bytes wins, data after FIN or outside the window is not part of it), written as
`LABEL.forward.bin` (client to server) and `LABEL.reverse.bin`. A gap that never filled (a segment the
capture lost) is not zero-filled: the bytes after it follow directly in the file, and the index lists
each gap with its stream offset, its length and where in the file the bytes after it start.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ipaddress
import json
import logging
import math
import mmap
import os
import re
import socket
import struct
import sys
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tcpguard.app.eventlog import EventLog
from tcpguard.app.offline.replay import (
    EXIT_DAMAGED,
    PROGRESS_EVERY,
    RECORD_OVERHEAD,
    damage_warning,
    progress_bar,
)
from tcpguard.core.conntrack import Action, Connection, FlowKey, flow_key
from tcpguard.core.cursor import Cursor
from tcpguard.core.decision import Decision, Verdict
from tcpguard.core.engine import Engine
from tcpguard.core.errors import DecodeError
from tcpguard.core.packet import ACK, FIN, SYN, decode, flags_text
from tcpguard.core.packet import Packet as TcpPacket
from tcpguard.core.rules import EventName, Rule, RuleSet
from tcpguard.core.settings import EngineSettings
from tcpguard.core.stream import HalfStream, Held
from tcpguard.io.pcap import LINKTYPE_RAW, Frame, PcapError, PcapReader

log = logging.getLogger("tcpguard.trace")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: The seed's buffer key: (client address, client port, server address, server port) of a live flow.
BufferID = tuple[IPAddress, int, IPAddress, int]
Format = Literal["pcap", "json"]
Container = Literal["pcap", "pcapng"]

DIRECTIONS = ("forward", "reverse")
_HOLD = Verdict.HOLD
_DROP = Verdict.DROP
_PCAP_HEADER = struct.Struct("<IHHiIII")
_PCAP_RECORD = struct.Struct("<IIII")
_NG_EPB = struct.Struct("<IIIIIII")
_pack_record = _PCAP_RECORD.pack
_pack_epb = _NG_EPB.pack
_PADS = (b"", b"\0", b"\0\0", b"\0\0\0")
_CLASSIC, _PCAPNG, _JSON = 0, 1, 2
_NG_SHB = struct.pack("<IIIHHqI", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1, 28)


# ================================================================================== settings


@dataclass(slots=True)
class TraceSettings:
    """Bounds and timeouts of a trace. The engine part maps onto `EngineSettings`."""

    #: Idle timeout of an established connection, seconds of capture time.
    idle_timeout: float = 3600.0
    #: Idle timeout while the handshake or the close is in progress.
    handshake_timeout: float = 120.0
    #: How long an ended connection (FIN or RST) keeps collecting late frames; also the idle timeout of
    #: untracked flows.
    closed_timeout: float = 120.0
    #: Connections tracked at once; past it the one nearest its timeout is ended as `evicted`.
    max_flows: int = 65536
    #: Output files open at once.
    max_open_files: int = 64
    #: A flow's spooled output is appended to its file when it reaches this size.
    flush_bytes: int = 65536
    #: All flows' spooled output together; past it every spool is written out.
    max_pending_bytes: int = 32 * 1024 * 1024
    #: Out-of-order bytes and segments held per direction while waiting for a gap to fill. A capture that
    #: lost a segment holds everything after it until the connection ends; past these bounds later
    #: segments are not reassembled (they are still traced, and the gap is reported).
    max_ooo_bytes: int = 4 * 1024 * 1024
    max_ooo_segments: int = 4096
    #: All bytes buffered by the reassembler, over all connections.
    max_total_buffer: int = 512 * 1024 * 1024

    def engine_settings(self) -> EngineSettings:
        """Observation settings for the tracker; see the module docstring for why each one."""
        s = EngineSettings()
        t = s.timeouts
        t.established = self.idle_timeout
        t.syn_sent = t.syn_recv = t.fin_wait = self.handshake_timeout
        t.time_wait = t.closed = self.closed_timeout
        lim = s.limits
        lim.max_connections = self.max_flows
        lim.max_ooo_bytes = self.max_ooo_bytes
        lim.max_ooo_segments = self.max_ooo_segments
        lim.max_total_buffer = self.max_total_buffer
        lim.max_stream_buffer = max(lim.max_stream_buffer, self.max_ooo_bytes)
        # Nothing is ever released to a network, so held packets cost only their Held record.
        lim.max_held_packets = max(lim.max_held_packets, self.max_ooo_segments * 16)
        p = s.policies
        p.verify_checksums = False
        p.verify_acks = False  # a capture may miss the data an ACK acknowledges
        p.midstream = "track"
        p.out_of_order = "hold"
        p.limit = "accept"
        p.rule_error = "accept"
        p.table_full = "evict"
        p.malformed = "drop"
        p.fragments = "drop"
        return s


# ================================================================================== records


@dataclass(frozen=True, slots=True)
class Packet:
    """The seed's `trace.tcp.packet`: what the tracer needs to know about one frame.

    `protocol` is the frame's link type (the seed's data link), `frame` the frame itself (number, time,
    bytes, original length, the IP packet inside). Build one with `from_frame` (a capture) or `from_ip`
    (a raw IP packet, as the daemon gets from NFQUEUE).
    """

    protocol: int
    index: int
    frame: Frame
    syn: bool
    fin: bool
    src: IPAddress
    dst: IPAddress
    srcport: int
    dstport: int
    timestamp: float

    @classmethod
    def from_frame(cls, frame: Frame) -> Packet | None:
        """The record of a captured frame, or None if it carries no TCP header to trace."""
        ip = frame.ip
        if ip is None:
            return None
        peek = _peek(ip)
        if peek is None:
            return None
        src, sport, dst, dport, off = peek
        flags = ip[off + 13] if len(ip) > off + 13 else 0
        return cls(
            frame.linktype,
            frame.number,
            frame,
            bool(flags & SYN),
            bool(flags & FIN),
            ipaddress.ip_address(src),
            ipaddress.ip_address(dst),
            sport,
            dport,
            frame.ts,
        )

    @classmethod
    def from_ip(cls, raw: bytes, timestamp: float, number: int) -> Packet | None:
        """The record of a raw IP packet (link type RAW), numbered by the caller (numbers must increase)."""
        return cls.from_frame(Frame(number, timestamp, LINKTYPE_RAW, raw, len(raw), raw))


@dataclass(frozen=True, slots=True)
class Gap:
    """Bytes of a stream that never arrived: `length` bytes from stream offset `offset`. The bytes after
    the gap start at `file_offset` in the payload file (the gap is not filled with anything)."""

    offset: int
    length: int
    file_offset: int


@dataclass(frozen=True, slots=True)
class Payload:
    """One direction's reassembled byte stream of a finished flow."""

    fpout: str | None
    bytes: int
    gaps: tuple[Gap, ...]
    #: True when the stream reached its FIN: everything the sender sent is in the file (gaps aside).
    complete: bool


@dataclass(frozen=True, slots=True)
class Index:
    """The seed's `trace.tcp.index` record of one finished flow: `fpout`, `index` and `label` as in the
    seed (output file, frame numbers, label), then what the seed lacks."""

    fpout: str | None
    index: tuple[int, ...]
    label: str
    forward: tuple[int, ...]
    reverse: tuple[int, ...]
    client: IPAddress
    client_port: int
    server: IPAddress
    server_port: int
    syn_seen: bool
    start: float
    end: float
    reason: str
    state: str
    packets: tuple[int, int]
    bytes: tuple[int, int]
    stream_bytes: tuple[int, int]
    payload: tuple[Payload, Payload] | None
    tracker: dict[str, int] = field(default_factory=dict)

    def as_dict(self, root: Path | None = None) -> dict[str, Any]:
        """The JSON form used in index.json; file names relative to `root` when given."""

        prefix = None if root is None else os.path.join(root, "")

        def rel(p: str | None) -> str | None:
            if p is None or prefix is None:
                return p
            if p.startswith(prefix) and ".." not in p:
                return p[len(prefix) :]  # the common case, a file under root, without relpath's walk
            return os.path.relpath(p, prefix)

        d: dict[str, Any] = {
            "label": self.label,
            "client": str(self.client),
            "client_port": self.client_port,
            "server": str(self.server),
            "server_port": self.server_port,
            "syn_seen": self.syn_seen,
            "start": self.start,
            "end": self.end,
            "reason": self.reason,
            "state": self.state,
            "packets": dict(zip(DIRECTIONS, self.packets, strict=True)),
            "bytes": dict(zip(DIRECTIONS, self.bytes, strict=True)),
            "stream_bytes": dict(zip(DIRECTIONS, self.stream_bytes, strict=True)),
            "fpout": rel(self.fpout),
        }
        if self.payload is not None:
            d["payload"] = {
                name: {
                    "fpout": rel(p.fpout),
                    "bytes": p.bytes,
                    "complete": p.complete,
                    "gaps": [
                        {"offset": g.offset, "length": g.length, "file_offset": g.file_offset} for g in p.gaps
                    ],
                }
                for name, p in zip(DIRECTIONS, self.payload, strict=True)
            }
        d["tracker"] = self.tracker
        d["index"] = list(self.index)
        d["forward"] = list(self.forward)
        d["reverse"] = list(self.reverse)
        return d


# ================================================================================== output spools


class _Spool:
    """One output file written in chunks: bytes wait in `buf` until `_Files.flush` appends them."""

    __slots__ = ("buf", "created", "header", "path")

    def __init__(self, path: str, header: bytes) -> None:
        self.path = path
        self.header = header
        self.buf = bytearray()
        self.created = False


class _Files:
    """Appends spools to their files through a bounded number of open descriptors (least recently used
    closed first). Plain descriptors (os.open/os.write), not file objects: a spool's chunk is already the
    write unit, and a Python file object per flow costs an fstat, seeks and its own object on every open,
    a fifth of a trace's time with one file per flow (strace: 2 lseek and 1 fstat per flow file)."""

    def __init__(self, max_open: int) -> None:
        self.max_open = max(1, max_open)
        self._open: OrderedDict[_Spool, int] = OrderedDict()
        self.pending = 0

    def flush(self, sp: _Spool) -> None:
        if not sp.buf and sp.created:
            return
        fd = self._open.get(sp)
        if fd is None:
            if sp.created:
                fd = os.open(sp.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            else:
                fd = os.open(sp.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
            self._open[sp] = fd
            if len(self._open) > self.max_open:
                _old, ofd = self._open.popitem(last=False)
                os.close(ofd)
        else:
            self._open.move_to_end(sp)
        if sp.created:
            _write_all(fd, sp.buf)
        else:
            _write_all(fd, sp.header + sp.buf)  # the file's header and first chunk in one write
            sp.created = True
        self.pending -= len(sp.buf)
        sp.buf = bytearray()

    def close(self, sp: _Spool) -> None:
        self.flush(sp)
        fd = self._open.pop(sp, None)
        if fd is not None:
            os.close(fd)

    def close_all(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()


def _write_all(fd: int, data: bytes | bytearray) -> None:
    """os.write until all of `data` is written (a regular file takes it in one call unless interrupted
    or full; a full disk raises OSError)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# ================================================================================== live flows


class Buffer:
    """The seed's `trace.tcp.buffer` entry: a flow still being traced. `fpout`, `index` and `label` are
    the seed's fields; the rest is the tracer's bookkeeping."""

    __slots__ = (
        "client",
        "conn",
        "cport",
        "eid",
        "fbytes",
        "first",
        "fpout",
        "fwd",
        "gaps",
        "held",
        "ifaces",
        "key",
        "label",
        "last",
        "linktype",
        "nwritten",
        "paybytes",
        "payload",
        "rbytes",
        "reason",
        "rev",
        "same_host",
        "server",
        "spool",
        "sport",
        "start",
        "state",
        "syn_seen",
        "tracker",
        "unwritten",
        "version",
    )

    def __init__(
        self,
        first: int,
        ts: float,
        key: FlowKey,
        version: int,
        client: bytes,
        cport: int,
        server: bytes,
        sport: int,
        conn: Connection | None,
    ) -> None:
        self.first = first
        self.start = self.last = ts
        self.key = key
        self.version = version
        self.client = client
        self.cport = cport
        self.server = server
        self.sport = sport
        self.same_host = client == server
        self.conn = conn
        self.eid = conn.id if conn is not None else 0
        self.syn_seen = conn is not None and not conn.midstream
        self.label = _label(first, version, client, cport, server, sport)
        self.fwd = array("I")
        self.rev = array("I")
        self.fbytes = self.rbytes = 0
        self.reason = ""
        self.state = ""
        self.tracker: dict[str, int] = {}
        self.fpout: str | None = None
        self.spool: _Spool | None = None
        self.linktype = -1  # classic pcap output: the file's link type
        self.ifaces: dict[int, int] | None = None  # pcapng output: link type -> interface id
        self.nwritten = 0
        self.unwritten = 0
        self.payload: list[_Spool | None] | None = None
        self.paybytes = [0, 0]
        self.held: tuple[list[Held], list[Held]] | None = None
        self.gaps: tuple[list[Gap], list[Gap]] = ([], [])

    @property
    def index(self) -> list[int]:
        """Frame numbers so far, in capture order."""
        return sorted(self.fwd.tolist() + self.rev.tolist())

    @property
    def bufid(self) -> BufferID:
        return (
            ipaddress.ip_address(self.client),
            self.cport,
            ipaddress.ip_address(self.server),
            self.sport,
        )


def _addr_label(version: int, addr: bytes) -> str:
    if version == 4:
        return socket.inet_ntoa(addr)  # what str(IPv4Address) gives, without making the object
    return str(ipaddress.IPv6Address(addr)).replace(":", "-")


def _label(first: int, version: int, client: bytes, cport: int, server: bytes, sport: int) -> str:
    return f"{first:06d}_{_addr_label(version, client)}.{cport}_{_addr_label(version, server)}.{sport}"


def _peek(ip: bytes) -> tuple[bytes, int, bytes, int, int] | None:
    """(src, sport, dst, dport, TCP header offset) of anything that starts like a TCP/IP packet.

    Lenient on purpose, unlike `decode`: a frame cut short by the snap length, or with a broken TCP
    header, still names its connection, and that is all the tracer needs to attribute it. None for
    non-TCP packets and for IP fragments other than the first (which have no ports).
    """
    n = len(ip)
    if n < 20:
        return None
    v = ip[0] >> 4
    if v == 4:
        ihl = (ip[0] & 0x0F) * 4
        if ihl < 20 or n < ihl + 4 or ip[9] != 6 or (ip[6] & 0x1F) or ip[7]:
            return None
        return ip[12:16], (ip[ihl] << 8) | ip[ihl + 1], ip[16:20], (ip[ihl + 2] << 8) | ip[ihl + 3], ihl
    if v != 6 or n < 40:
        return None
    nxt = ip[6]
    off = 40
    for _ in range(16):
        if nxt == 6:
            break
        if off + 8 > n:
            return None
        if nxt in (0, 43, 60, 135, 139, 140):
            nxt, off = ip[off], off + (ip[off + 1] + 1) * 8
        elif nxt == 44:
            if ((ip[off + 2] << 8) | ip[off + 3]) & 0xFFF8:
                return None  # not the first fragment
            nxt, off = ip[off], off + 8
        elif nxt == 51:
            nxt, off = ip[off], off + (ip[off + 1] + 2) * 4
        else:
            return None
    if nxt != 6 or n < off + 4:
        return None
    return ip[8:24], (ip[off] << 8) | ip[off + 1], ip[24:40], (ip[off + 2] << 8) | ip[off + 3], off


# ================================================================================== the tracer


@dataclass(slots=True)
class TraceStats:
    """Frame counts of a trace: every frame is in exactly one of traced / not_ip / not_tcp."""

    frames: int = 0
    traced: int = 0
    not_ip: int = 0
    not_tcp: int = 0
    flows: int = 0
    untracked_flows: int = 0


class TCP:
    """Traces TCP flows; the seed's `pcapkit.foundation.traceflow.tcp.TCP`.

    `fout` is the output directory (None: trace without writing), `format` the per-flow file format.
    `dump(packet)` traces a packet and writes it to its flow's file; `trace(packet)` only traces it;
    both return the flow's label (None if the packet is not TCP). `submit()` ends every flow and returns
    the `Index` records. `on_flow` is called with each flow's `Index` as the flow ends (that is how the
    command line writes index.json without keeping the records); `keep_index=False` then stops the tracer
    from keeping them too, so memory stays bounded on any capture.

    `container` is the file format of per-flow packet files: "pcap" (classic; one link type per file,
    as in a classic pcap capture) or "pcapng" (one interface per link type the flow uses, so frames
    from several interfaces of a pcapng capture keep their link types).
    """

    __protocol_name__ = "TCP"
    __protocol_type__ = TcpPacket

    def __init__(
        self,
        fout: str | os.PathLike[str] | None = None,
        format: Format = "pcap",
        *,
        payload: bool = False,
        settings: TraceSettings | None = None,
        container: Container = "pcapng",
        on_flow: Callable[[Index], None] | None = None,
        keep_index: bool = True,
    ) -> None:
        if format not in ("pcap", "json"):
            raise ValueError(f"format must be 'pcap' or 'json', not {format!r}")
        if container not in ("pcap", "pcapng"):
            raise ValueError(f"container must be 'pcap' or 'pcapng', not {container!r}")
        self.settings = settings or TraceSettings()
        self.fout = Path(fout) if fout is not None else None
        if self.fout is not None:
            self.fout.mkdir(parents=True, exist_ok=True)
        self.format: Format = format
        self.container: Container = container
        self.payload = payload
        self.on_flow = on_flow
        self.keep_index = keep_index
        self.stats = TraceStats()
        rules = [
            Rule("trace.open", EventName.NEW_CONNECTION, self._on_open),
            Rule("trace.close", EventName.END_CONNECTION, self._on_close),
        ]
        if payload:
            rules.append(Rule("trace.record", EventName.RECEIVE_DATA, self._on_data))
        self.engine = Engine(self.settings.engine_settings(), RuleSet(rules))
        # Limit hits (policy accept), table-full evictions and errors in trace's own listeners are worth a
        # line on stderr: they mean a flow's files are incomplete.
        self.engine.on_event = EventLog()
        self._files = _Files(self.settings.max_open_files)
        self._mode = _JSON if format == "json" else _CLASSIC if container == "pcap" else _PCAPNG
        self._flush_bytes = self.settings.flush_bytes
        self._max_pending = self.settings.max_pending_bytes
        self._by_id: dict[int, Buffer] = {}
        self._by_key: dict[FlowKey, Buffer] = {}  # mirrors the engine's table
        self._ended: dict[int, Buffer] = {}  # ended by FIN/RST, still in the engine's table
        self._orphans: dict[FlowKey, Buffer] = {}  # untracked flows
        self._closing: list[Buffer] = []
        self._index: list[Index] = []
        self._cur = (0, 0.0)  # number and time of the frame being handled
        self._next_tick = -math.inf  # the first frame ticks, which sets the clock going
        self._now = 0.0
        self._submitted = False

    # ------------------------------------------------------------------ the seed's API
    @property
    def name(self) -> str:
        return "Transmission Control Protocol"

    @property
    def protocol(self) -> str:
        return self.__protocol_name__

    @property
    def index(self) -> tuple[Index, ...]:
        """Flows finished so far (empty with `keep_index=False`)."""
        return tuple(self._index)

    @property
    def buffer(self) -> dict[BufferID, Buffer]:
        """Flows still being traced, by `BufferID`. Built on each access; for inspection, not hot paths."""
        live = list(self._by_key.values()) + list(self._orphans.values())
        return {b.bufid: b for b in live}

    def dump(self, packet: Packet) -> str | None:
        """Trace `packet` and write it to its flow's output file; the flow's label."""
        self._not_submitted()
        fr = packet.frame
        b = self._feed(packet.index, packet.timestamp, fr.linktype, fr.data, fr.orig_len, fr.ip, True)
        return b.label if b is not None else None

    def trace(self, packet: Packet) -> str | None:
        """Trace `packet` without writing it anywhere; the flow's label."""
        self._not_submitted()
        fr = packet.frame
        b = self._feed(packet.index, packet.timestamp, fr.linktype, fr.data, fr.orig_len, fr.ip, False)
        return b.label if b is not None else None

    def submit(self) -> tuple[Index, ...]:
        """End every flow (reason `capture-end` for those still open), close every file, and return the
        `Index` records of all flows (those kept: see `keep_index`). Idempotent."""
        if not self._submitted:
            self._submitted = True
            self.engine.shutdown(self._now)
            self._settle()
            for b in list(self._ended.values()) + list(self._by_id.values()) + list(self._orphans.values()):
                self._finalize(b)
            self._files.close_all()
        return tuple(self._index)

    def discard(self) -> None:
        """The run failed: close every output file without writing what is still spooled. No more
        frames (the caller removes the files; see `trace_capture`)."""
        self._submitted = True
        self._files.close_all()

    def advance(self, ts: float) -> None:
        """Let capture time pass without a frame (a frame another job traces): timeouts fire on time."""
        if ts >= self._next_tick:
            self._tick(ts)
            self._now = ts

    # ------------------------------------------------------------------ fast path (no Packet records)
    def feed(self, frame: Frame, write: bool = True) -> Buffer | None:
        """Trace one captured frame (and write it when `write` and `fout`): the flow it joined."""
        self._not_submitted()
        return self._feed(frame.number, frame.ts, frame.linktype, frame.data, frame.orig_len, frame.ip, write)

    def _not_submitted(self) -> None:
        if self._submitted:
            raise RuntimeError("the tracer was submitted; make a new one")

    def _feed(
        self, number: int, ts: float, linktype: int, data: bytes, orig_len: int, ip: bytes | None, write: bool
    ) -> Buffer | None:
        """`feed` on the frame's fields, for callers that checked `_submitted` (the per-frame loop)."""
        st = self.stats
        st.frames += 1
        if ts >= self._next_tick:
            self._tick(ts)
        self._now = ts
        if ip is None:
            st.not_ip += 1
            return None
        self._cur = (number, ts)
        dec = self.engine.handle_packet(ip, ts, number)
        if self._closing:
            self._settle()
        fid = dec.flow_id
        if fid is not None and dec.verdict == _DROP and dec.reason.startswith("SYN invalid"):
            dec = self._supersede(fid, ip, ts, number, dec)
            fid = dec.flow_id
        b = self._by_id.get(fid) if fid is not None else None
        if b is None:
            b = self._unowned(ip, ts, number)
            if b is None:
                st.not_tcp += 1
                return None
        st.traced += 1
        if b.same_host:
            peek = _peek(ip)
            fwd = peek is not None and peek[1] == b.cport
        else:
            fwd = (ip[12:16] if ip[0] < 0x60 else ip[8:24]) == b.client
        if fwd:
            b.fwd.append(number)
            b.fbytes += orig_len
        else:
            b.rev.append(number)
            b.rbytes += orig_len
        b.last = ts
        reason = dec.reason
        if reason:
            b.tracker[reason] = b.tracker.get(reason, 0) + 1
            if dec.verdict == _HOLD and b.held is not None and b.conn is not None:
                self._keep_held(b, fwd, number)
        if write and self.fout is not None:
            self._write_frame(b, number, ts, linktype, data, orig_len, ip, fwd, reason)
        return b

    # ------------------------------------------------------------------ flow bookkeeping
    def _on_open(self, conn: Connection, _pkt: TcpPacket) -> None:
        """Rule at new_connection: a flow starts. A flow still holding the same key is over: its ended
        connection was just replaced (a SYN reused the ports), or an untracked flow had those ports."""
        key = conn.key
        old = self._by_key.get(key)
        if old is not None:
            self._finalize(old)
        orphan = self._orphans.pop(key, None)
        if orphan is not None:
            self._finalize(orphan)
        number, ts = self._cur
        b = Buffer(number, ts, key, conn.version, conn.client, conn.cport, conn.server, conn.sport, conn)
        if self.payload:
            b.payload = [None, None]
            b.held = ([], [])
        self._by_id[conn.id] = b
        self._by_key[key] = b
        self.stats.flows += 1

    def _on_close(self, conn: Connection) -> None:
        """Rule at end_connection: the connection is over for the tracker. The payload is complete now
        (the engine has just dropped what it still held out of order, which the tracer kept)."""
        b = self._by_id.get(conn.id)
        if b is None:
            return
        if b.reason != "superseded":
            b.reason = "capture-end" if conn.end_reason == "shutdown" else conn.end_reason
        if b.payload is not None:
            self._finish_payload(b, conn)
        self._closing.append(b)

    def _on_data(self, conn: Connection, stream: HalfStream, current: Cursor, direction: str) -> None:
        """Rule at receive_data (with --payload): new contiguous bytes of one direction."""
        b = self._by_id.get(conn.id)
        if b is None or b.payload is None:
            return
        data = stream.data(current.pos, stream.next)
        if data:
            self._payload_write(b, 0 if direction == "up" else 1, data)

    def _supersede(self, fid: int, ip: bytes, ts: float, number: int, dec: Decision) -> Decision:
        """A SYN with a new ISN on the ports of a connection the engine still thinks is live.

        Inline, the engine refuses it (an endpoint answers such a SYN with a challenge ACK, RFC 5961, so an
        injected SYN must not end the connection). Seen from a capture it means the opposite: the endpoint
        that sent it has let go of the old connection, whose end the tracker missed (its RST was not
        exactly at the next sequence number because the capture lost segments, or its FIN is missing).
        Wireshark starts a new stream here too. So the old connection ends ("superseded") and the SYN is
        handed to the engine again, which now opens a new connection with it. The engine's own API does
        it: `act` ends the connection (end_connection fires, buffers are released) and the table forgets
        it, which is what its timeout would do later.
        """
        b = self._by_id.get(fid)
        peek = _peek(ip)
        if b is None or b.conn is None or peek is None:
            return dec
        off = peek[4]
        if len(ip) < off + 14 or ip[off + 13] & (SYN | ACK) != SYN:
            return dec
        conn = b.conn
        seq = int.from_bytes(ip[off + 4 : off + 8], "big")
        from_client = peek[0] == conn.client and peek[1] == conn.cport
        if seq == (conn.up.isn if from_client else conn.down.isn):
            return dec  # a retransmitted SYN of this very connection
        self.engine.act(fid, Action.DROP, ts)
        b.reason = "superseded"
        self.engine.table.remove(conn)
        self._settle()
        again = self.engine.handle_packet(ip, ts, number)
        if self._closing:
            self._settle()
        return again

    def _settle(self) -> None:
        """After an engine call: connections that ended either stay in the engine's table (FIN, RST:
        late frames still come) or are gone (timeout, eviction, shutdown): finish those now."""
        closing, self._closing = self._closing, []
        table = self.engine.table.by_key
        for b in closing:
            if b.eid not in self._by_id:
                continue  # already finalized (a SYN reused its ports in the same call)
            if table.get(b.key) is b.conn:
                self._ended[b.eid] = b
            else:
                self._finalize(b)

    def _tick(self, ts: float) -> None:
        """Once a second of capture time: expire idle connections and untracked flows, and finish the
        ended flows the engine has forgotten."""
        self._next_tick = ts + 1.0
        self.engine.handle_timer(ts)
        self._settle()
        table = self.engine.table.by_key
        for b in [b for b in self._ended.values() if table.get(b.key) is not b.conn]:
            self._finalize(b)
        limit = self.settings.closed_timeout
        for b in [b for b in self._orphans.values() if ts - b.last > limit]:
            self._finalize(b)

    def _unowned(self, ip: bytes, ts: float, number: int) -> Buffer | None:
        """A frame the engine did not attribute: join the flow with its key, or an untracked flow."""
        peek = _peek(ip)
        if peek is None:
            return None
        src, sport, dst, dport, _off = peek
        key = flow_key(src, sport, dst, dport)
        b = self._by_key.get(key) or self._orphans.get(key)
        if b is not None:
            return b
        # Client as the engine picks it for a connection seen mid-stream: the lower port is the server.
        if sport < dport:
            src, sport, dst, dport = dst, dport, src, sport
        b = Buffer(number, ts, key, 4 if len(src) == 4 else 6, src, sport, dst, dport, None)
        b.reason = "untracked"
        self._orphans[key] = b
        self.stats.flows += 1
        self.stats.untracked_flows += 1
        return b

    def _finalize(self, b: Buffer) -> None:
        """The flow is over for good: close its files, build its `Index`, forget it."""
        if b.conn is not None:
            if self._by_id.get(b.eid) is not b:
                return
            del self._by_id[b.eid]
            if self._by_key.get(b.key) is b:
                del self._by_key[b.key]
            self._ended.pop(b.eid, None)
            conn = b.conn
            b.state = conn.state.name
            if not b.reason:
                b.reason = conn.end_reason or "capture-end"
            stream = (conn.up.next, conn.down.next)
        else:
            if self._orphans.get(b.key) is b:
                del self._orphans[b.key]
            b.state = "UNTRACKED"
            stream = (0, 0)
        files = self._files
        if b.spool is not None:
            if self.format == "json":
                b.spool.buf += b"\n]}\n" if b.nwritten else b"]}\n"
            files.close(b.spool)
        pay: tuple[Payload, Payload] | None = None
        if b.payload is not None:
            if b.conn is not None and not b.conn.ended:
                # Finalized while open (a reused key): nothing more will come, write out what is held.
                self._finish_payload(b, b.conn)
            infos = []
            for d in (0, 1):
                sp = b.payload[d]
                if sp is not None:
                    files.close(sp)
                infos.append(self._payload_info(b, d))
            pay = (infos[0], infos[1])
        fwd, rev = b.fwd.tolist(), b.rev.tolist()
        idx = Index(
            fpout=b.fpout,
            index=tuple(sorted(fwd + rev)),
            label=b.label,
            forward=tuple(fwd),
            reverse=tuple(rev),
            client=ipaddress.ip_address(b.client),
            client_port=b.cport,
            server=ipaddress.ip_address(b.server),
            server_port=b.sport,
            syn_seen=b.syn_seen,
            start=b.start,
            end=b.last,
            reason=b.reason,
            state=b.state,
            packets=(len(fwd), len(rev)),
            bytes=(b.fbytes, b.rbytes),
            stream_bytes=stream,
            payload=pay,
            tracker=dict(b.tracker),
        )
        if b.unwritten:
            log.warning(
                "%s: %d frames with another link type not written to %s", b.label, b.unwritten, b.fpout
            )
        if self.keep_index:
            self._index.append(idx)
        if self.on_flow is not None:
            self.on_flow(idx)

    # ------------------------------------------------------------------ per-flow packet files
    def _write_frame(
        self,
        b: Buffer,
        number: int,
        ts: float,
        linktype: int,
        data: bytes,
        orig_len: int,
        ip: bytes,
        fwd: bool,
        reason: str,
    ) -> None:
        sp = b.spool
        if sp is None:
            sp = self._open_spool(b, linktype)
        buf = sp.buf
        before = len(buf)
        mode = self._mode
        if mode == _CLASSIC:
            if linktype != b.linktype:
                b.unwritten += 1
                return
            sec, usec = divmod(round(ts * 1e6), 1_000_000)
            buf += _pack_record(sec, usec, len(data), orig_len)
            buf += data
        elif mode == _PCAPNG:
            ifaces = b.ifaces
            assert ifaces is not None
            ifid = ifaces.get(linktype)
            if ifid is None:
                ifid = ifaces[linktype] = len(ifaces)
                buf += _ng_idb(linktype)
            t = round(ts * 1e6)
            n = len(data)
            pad = -n & 3
            size = 32 + n + pad
            buf += _pack_epb(6, size, ifid, t >> 32, t & 0xFFFFFFFF, n, orig_len)
            buf += data
            buf += _PADS[pad] + size.to_bytes(4, "little")
        else:
            buf += _frame_json(number, ts, orig_len, ip, fwd, reason, b.nwritten == 0)
        b.nwritten += 1
        files = self._files
        n = len(buf)
        files.pending += n - before
        if n >= self._flush_bytes:
            files.flush(sp)
        elif files.pending > self._max_pending:
            self._flush_all()

    def _open_spool(self, b: Buffer, linktype: int) -> _Spool:
        assert self.fout is not None
        if self.format == "json":
            ext = "json"
            head = json.dumps({"label": b.label})[:-1].encode() + b', "frames": [\n'
        elif self.container == "pcap":
            ext = "pcap"
            b.linktype = linktype
            head = _PCAP_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, 262144, linktype)
        else:
            ext = "pcapng"
            b.ifaces = {}
            head = _NG_SHB
        path = str(self.fout / f"{b.label}.{ext}")
        b.fpout = path
        sp = b.spool = _Spool(path, head)
        return sp

    def _flush_all(self) -> None:
        """The spools together passed `max_pending_bytes`: write every one out."""
        files = self._files
        for b in list(self._by_id.values()) + list(self._orphans.values()):
            for sp in (b.spool, *(b.payload or ())):
                if sp is not None and sp.buf:
                    files.flush(sp)

    # ------------------------------------------------------------------ payload
    def _payload_write(self, b: Buffer, d: int, data: bytes) -> None:
        assert b.payload is not None
        sp = b.payload[d]
        if sp is None:
            if self.fout is None:
                b.paybytes[d] += len(data)
                return
            sp = b.payload[d] = _Spool(str(self.fout / f"{b.label}.{DIRECTIONS[d]}.bin"), b"")
        sp.buf += data
        b.paybytes[d] += len(data)
        files = self._files
        files.pending += len(data)
        if len(sp.buf) >= self.settings.flush_bytes:
            files.flush(sp)
        elif files.pending > self.settings.max_pending_bytes:
            self._flush_all()

    def _keep_held(self, b: Buffer, fwd: bool, number: int) -> None:
        """The engine holds this frame's segment out of order: keep a reference to its record. If the
        gap never fills, the engine drops it when the connection ends and the tracer writes it after
        the gap instead."""
        assert b.conn is not None and b.held is not None
        s = b.conn.up if fwd else b.conn.down
        for h in reversed(s.ooo):
            if h.token == number:
                b.held[0 if fwd else 1].append(h)
                return

    def _finish_payload(self, b: Buffer, conn: Connection) -> None:
        """Write the held segments that never became contiguous after their gaps, and note the gaps."""
        assert b.held is not None and b.payload is not None
        for d, s in ((0, conn.up), (1, conn.down)):
            held = b.held[d]
            if not held:
                continue
            pos = s.next
            # A record still beyond the stream's end was never pulled into it: its gap never filled.
            for h in sorted((h for h in held if h.start > pos), key=lambda h: h.start):
                if h.start > pos:
                    b.gaps[d].append(Gap(pos, h.start - pos, b.paybytes[d]))
                    pos = h.start
                if h.end > pos:
                    self._payload_write(b, d, h.data[pos - h.start :])
                    pos = h.end
            held.clear()

    def _payload_info(self, b: Buffer, d: int) -> Payload:
        assert b.payload is not None
        sp = b.payload[d]
        complete = b.conn is not None and (b.conn.up if d == 0 else b.conn.down).eof
        return Payload(sp.path if sp is not None else None, b.paybytes[d], tuple(b.gaps[d]), complete)


def _ng_idb(linktype: int) -> bytes:
    """A pcapng Interface Description Block: microsecond timestamps (the default resolution)."""
    return struct.pack("<IIHHII", 1, 20, linktype, 0, 262144, 20)


def _frame_json(
    number: int, ts: float, orig_len: int, ip: bytes, fwd: bool, reason: str, first: bool
) -> bytes:
    """One frame of a JSON flow file: what a reader of a flow needs without a dissector."""
    d: dict[str, Any] = {
        "frame": number,
        "time": ts,
        "direction": "forward" if fwd else "reverse",
        "len": orig_len,
    }
    try:
        p = decode(ip)
    except DecodeError as e:
        d["error"] = str(e)
    else:
        d.update(flags=flags_text(p.flags), seq=p.seq, ack=p.ack, window=p.window, payload=len(p.payload))
    if reason:
        d["tracker"] = reason
    return (b"" if first else b",\n") + json.dumps(d, separators=(",", ":")).encode()


# ================================================================================== the command line


@dataclass(slots=True)
class TraceSummary:
    """What `trace_capture` did, for the command's closing lines and for tests."""

    capture: str
    outdir: str
    stats: TraceStats
    engine: dict[str, int]
    reasons: dict[str, int]
    seconds: float = 0.0
    #: Where the capture is damaged (byte offset, what is wrong) when it is; the trace covers every whole
    #: record before it.
    damage: tuple[int, str] | None = None
    #: Files of an earlier trace into the same directory that this one removed first (see `_clear_previous`).
    cleared: int = 0

    def lines(self) -> list[str]:
        s = self.stats
        rate = s.frames / self.seconds if self.seconds > 0 else 0.0
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items()))
        out = [
            f"{self.capture}: {s.frames} frames ({s.traced} traced, {s.not_ip} not IP, {s.not_tcp} not TCP)"
            f" in {self.seconds:.2f} s ({rate:,.0f} frames/s)",
            f"{s.flows} flows ({reasons or 'none'}) written to {self.outdir}/index.json",
        ]
        if self.cleared:
            out.append(f"removed {self.cleared} files of the earlier trace in {self.outdir} first")
        if self.damage is not None:
            out.append(
                f"capture damaged at byte {self.damage[0]}: {self.damage[1]}; traced the {s.frames} whole "
                "records before it (flows still open there end as capture-end)"
            )
        return out


class _IndexWriter:
    """Writes DIR/index.json with bounded memory: each flow's record goes to a spool file as it ends,
    and only (first frame, offset, length) stays in memory, so that the final file can list the flows
    in the order they started (the order of Wireshark's tcp.stream numbers) by copying from the spools.
    With several jobs each one has its own spool; the first job merges them."""

    def __init__(self, outdir: Path, shard: int = 0) -> None:
        self.outdir = outdir
        self.path = outdir / "index.json"
        self.spool_path = outdir / f".index.spool.{shard}"
        self._spool = open(self.spool_path, "wb")  # noqa: SIM115 - closed by close()
        self._offset = 0
        self.order = array("Q")  # first frame, offset, length, for every flow
        self.reasons: dict[str, int] = {}

    def add(self, idx: Index) -> None:
        raw = json.dumps(idx.as_dict(self.outdir), separators=(",", ":")).encode()
        off = self._offset  # counted, not tell(): a seek per flow
        self._spool.write(raw)
        self._offset += len(raw)
        self.order.extend((idx.index[0] if idx.index else 0, off, len(raw)))
        self.reasons[idx.reason] = self.reasons.get(idx.reason, 0) + 1

    def close(self) -> None:
        self._spool.close()

    @staticmethod
    def finish_from(outdir: Path, header: dict[str, Any], shards: list[tuple[str, array[int]]]) -> None:
        """Write index.json from the spools `shards` (path, order) and remove them."""
        entries = sorted(
            (o[i], s, o[i + 1], o[i + 2]) for s, (_p, o) in enumerate(shards) for i in range(0, len(o), 3)
        )
        # Mapped, not read with seek + read per flow (two system calls each): the entries come back in
        # frame order, not in the order they were spooled.
        maps: list[mmap.mmap | bytes] = []
        path = outdir / "index.json"
        tmp = path.with_suffix(".json.part")
        try:
            for p, _o in shards:
                with open(p, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    # (mmap refuses an empty file; the map keeps its own descriptor)
                    maps.append(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) if size else b"")
            with open(tmp, "wb") as out:
                out.write(json.dumps(header, indent=1)[:-2].encode() + b',\n "flows": [')
                for n, (_first, s, off, length) in enumerate(entries):
                    out.write(b"\n  " if n == 0 else b",\n  ")
                    out.write(maps[s][off : off + length])
                out.write(b"\n ]\n}\n")
        finally:
            for m in maps:
                if isinstance(m, mmap.mmap):
                    m.close()
        os.replace(tmp, path)
        for p, _o in shards:
            os.unlink(p)


def _output_names(flow: Any) -> list[str]:
    """The file names one flow record of index.json lists (packets or JSON, payload per direction),
    relative to the trace's directory. Names that are not a plain file name (a path, '..') are left out:
    an index.json is input here, and whatever it says, only files directly in the directory go."""
    names: list[Any] = []
    if isinstance(flow, dict):
        names.append(flow.get("fpout"))
        payload = flow.get("payload")
        if isinstance(payload, dict):
            names += [d.get("fpout") for d in payload.values() if isinstance(d, dict)]
    return [
        n for n in names if isinstance(n, str) and n and n == os.path.basename(n) and n not in (".", "..")
    ]


def _clear_previous(out: Path) -> int:
    """Make `out` ready for a new trace without mixing in the files of an earlier one; the number of
    files removed.

    Why this and not "clear the directory": the directory is the operator's, and `-o .` or `-o ~` must
    never cost them a file. What an earlier trace wrote is known exactly from its index.json, so those
    files (and index.json, and the spools of an interrupted run) go, and anything else stays. A
    directory that holds files but no index.json (a trace that was killed, or someone's own files) is
    refused: which of its files are stale cannot be known, and guessing by name could delete a file the
    operator keeps.
    """
    if not out.exists():
        return 0
    if not out.is_dir():
        raise NotADirectoryError(f"{out}: not a directory")
    index = out / "index.json"
    leftovers = [*out.glob(".index.spool.*"), out / "index.json.part"]
    names: list[str] = []
    if index.exists():
        try:
            doc = json.loads(index.read_bytes())
            flows = doc["flows"]
            if not isinstance(flows, list):
                raise TypeError("flows is not a list")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FileExistsError(
                f"{index}: not the index of an earlier trace ({e}); give a new or empty directory"
            ) from None
        for flow in flows:
            names += _output_names(flow)
    elif any(p.name not in {q.name for q in leftovers} for p in out.iterdir()):
        raise FileExistsError(
            f"{out}: the directory is not empty and holds no index.json of an earlier trace (one that did "
            "not finish, or other files); give a new or empty directory"
        )
    removed = 0
    for path in [*(out / n for n in names), index, *leftovers]:
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


# The names trace writes: flow files (labels: first frame, client, server), its spools and index.json.
_OURS = re.compile(
    r"(\d{6,}_[0-9a-f.-]+_[0-9a-f.-]+\.(pcap|pcapng|json|forward\.bin|reverse\.bin)"
    r"|\.index\.spool\.\d+|index\.json(\.part)?)"
)


def _remove_ours(out: Path, before: set[str]) -> None:
    """A run failed: remove every file it wrote (named as trace names its files, and not in the
    directory when the run started), so that nothing half-written looks like a result."""
    try:
        names = os.listdir(out)
    except OSError:
        return
    for name in names:
        if name not in before and _OURS.fullmatch(name):
            with contextlib.suppress(OSError):
                os.unlink(out / name)


def _owner(ip: bytes | None, jobs: int) -> int:
    """Which job traces this frame: a symmetric function of the addresses and ports (XOR), so both
    directions of a connection (and frames the engine rejects, which the tracer maps by the same key)
    go to the same job, then a multiplicative hash, since client addresses and ports often rise
    together and a plain sum splits them unevenly. Frames without TCP go to job 0, which counts them."""
    if ip is None:
        return 0
    if ip[0] == 0x45 and ip[9] == 6 and len(ip) >= 24 and not (ip[6] & 0x1F or ip[7]):
        x = int.from_bytes(ip[12:16], "big") ^ int.from_bytes(ip[16:20], "big")
        x ^= int.from_bytes(ip[20:22], "big") ^ int.from_bytes(ip[22:24], "big")
    else:
        peek = _peek(ip)
        if peek is None:
            return 0
        src, sport, dst, dport, _off = peek
        x = int.from_bytes(src[-4:], "big") ^ int.from_bytes(dst[-4:], "big") ^ sport ^ dport
    return (((x * 0x9E3779B1) & 0xFFFFFFFF) >> 16) % jobs


def _shard_settings(settings: TraceSettings, jobs: int) -> TraceSettings:
    """Each of `jobs` jobs gets its share of the bounds, so that together they keep to them."""
    if jobs == 1:
        return settings
    s = copy.copy(settings)
    s.max_flows = max(1, settings.max_flows // jobs)
    s.max_open_files = max(1, settings.max_open_files // jobs)
    s.max_pending_bytes = max(1, settings.max_pending_bytes // jobs)
    s.max_total_buffer = max(1, settings.max_total_buffer // jobs)
    return s


@dataclass(slots=True)
class _ShardResult:
    stats: TraceStats
    engine: dict[str, int]
    reasons: dict[str, int]
    spool: str
    order: array[int]
    container: Container
    damage: tuple[int, str] | None  # (offset, message): a PcapError itself does not survive pickling


def _run_shard(
    capture: str,
    out: Path,
    format: Format,
    payload: bool,
    settings: TraceSettings,
    shard: int,
    jobs: int,
    progress: bool | None,
) -> _ShardResult:
    """Trace the flows of `capture` that belong to job `shard` of `jobs` (all of them when jobs == 1).

    Every job reads the whole capture (reading costs a tenth of tracing) and skips the frames of other
    jobs; it still advances its clock on them so timeouts fire at the same capture times.
    """
    index = _IndexWriter(out, shard)
    reader = PcapReader(capture, stop_at_damage=True)
    bar = None
    tracer: TCP | None = None
    try:
        container: Container = "pcapng" if reader.format == "pcapng" else "pcap"
        tracer = TCP(
            out,
            format,
            payload=payload,
            settings=settings,
            container=container,
            on_flow=index.add,
            keep_index=False,
        )
        bar = progress_bar(reader.path, progress, "trace") if shard == 0 else None
        overhead = RECORD_OVERHEAD[container]
        feed = tracer._feed  # one call per frame instead of two: this loop runs 100,000 times a second
        done = 0
        for n, frame in enumerate(reader, 1):
            if jobs == 1 or _owner(frame.ip, jobs) == shard:
                feed(frame.number, frame.ts, frame.linktype, frame.data, frame.orig_len, frame.ip, True)
            else:
                tracer.advance(frame.ts)
            if bar is not None:
                done += len(frame.data) + overhead
                if not n % PROGRESS_EVERY:
                    bar.update(done)
                    done = 0
                    bar.set_postfix(frames=n, flows=tracer.stats.flows, refresh=False)
        tracer.submit()
    except BaseException:
        # Release the descriptors; trace_capture removes what this run wrote.
        with contextlib.suppress(OSError):
            index.close()  # its last flush may be what failed (a full disk)
        if tracer is not None:
            tracer.discard()
        raise
    finally:
        if bar is not None:
            bar.close()
        reader.close()
        index.close()
    damage = reader.damage
    return _ShardResult(
        tracer.stats,
        tracer.engine.stats.as_dict(),
        index.reasons,
        str(index.spool_path),
        index.order,
        container,
        None if damage is None else (damage.offset, damage.message),
    )


def trace_capture(
    capture: str | os.PathLike[str],
    outdir: str | os.PathLike[str],
    format: Format = "pcap",
    payload: bool = False,
    settings: TraceSettings | None = None,
    progress: bool | None = None,
    jobs: int = 1,
) -> TraceSummary:
    """Trace every TCP flow of `capture` into `outdir` (see the module docstring); what the command runs.

    Per-flow packet files use the capture's own container (pcap or pcapng) so that every frame keeps its
    link type. `progress`: True or False forces the bar on or off; None shows it on a terminal.

    `jobs` > 1 splits the connections over that many processes by a hash of their addresses and ports.
    Connections are independent in the tracker, so the flows, frames and files are the same as with one
    job; only what depends on the whole table (which connection `max_flows` evicts) can differ, since
    each job gets its share of the bounds. It pays on captures big enough to amortise starting the
    processes: the tracker is pure Python and one process uses one core.
    """
    import time

    t0 = time.perf_counter()
    out = Path(outdir)
    cap = os.fspath(capture)
    # A file that is not a capture fails here, before the directory is made or an earlier trace cleared.
    PcapReader(cap).close()
    cleared = _clear_previous(out)
    out.mkdir(parents=True, exist_ok=True)
    # What is in the directory now is not this run's: if the run fails, everything of ours but these goes.
    before = set(os.listdir(out))
    jobs = max(1, jobs)
    shard_settings = _shard_settings(settings or TraceSettings(), jobs)
    results: list[_ShardResult] = []
    try:
        if jobs == 1:
            results.append(_run_shard(cap, out, format, payload, shard_settings, 0, 1, progress))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            with ProcessPoolExecutor(jobs - 1, mp_context=ctx) as pool:
                futures = [
                    pool.submit(_run_shard, cap, out, format, payload, shard_settings, k, jobs, False)
                    for k in range(1, jobs)
                ]
                results.append(_run_shard(cap, out, format, payload, shard_settings, 0, jobs, progress))
                results += [f.result() for f in futures]
    except BaseException:
        _remove_ours(out, before)
        raise
    stats = TraceStats()
    engine: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for r in results:
        for name in TraceStats.__slots__:
            setattr(stats, name, getattr(stats, name) + getattr(r.stats, name))
        for name, v in r.engine.items():
            engine[name] = engine.get(name, 0) + v
        for name, v in r.reasons.items():
            reasons[name] = reasons.get(name, 0) + v
    container = results[0].container
    damage = results[0].damage  # every job reads the whole capture: the first one speaks for all
    header = {
        "capture": os.path.abspath(cap),
        "damage": None if damage is None else {"offset": damage[0], "error": damage[1]},
        "format": format,
        "container": container if format == "pcap" else None,
        "payload": payload,
        "frames": stats.frames,
        "traced": stats.traced,
        "not_ip": stats.not_ip,
        "not_tcp": stats.not_tcp,
        "flow_count": stats.flows,
        "reasons": reasons,
        "tracker": engine,
    }
    try:
        _IndexWriter.finish_from(out, header, [(r.spool, r.order) for r in results])
    except BaseException:
        _remove_ours(out, before)
        raise
    return TraceSummary(cap, str(out), stats, engine, reasons, time.perf_counter() - t0, damage, cleared)


def cmd_trace(args: argparse.Namespace) -> int:
    settings = TraceSettings(
        idle_timeout=args.idle_timeout, max_flows=args.max_flows, max_open_files=args.max_open_files
    )
    try:
        summary = trace_capture(
            args.capture,
            args.output,
            args.format,
            args.payload,
            settings,
            progress=False if args.no_progress else None,
            jobs=args.jobs if args.jobs > 0 else (os.cpu_count() or 1),
        )
    except (PcapError, OSError) as e:
        print(f"tcpguard trace: {e}", file=sys.stderr)
        return 1
    for line in summary.lines():
        print(line)
    if summary.damage is not None:
        offset, message = summary.damage
        damage = PcapError(summary.capture, offset, message)
        done = f"traced the {summary.stats.frames} whole records before it"
        print(damage_warning("trace", damage, done), file=sys.stderr)
        return EXIT_DAMAGED
    return 0


_DEFAULTS = TraceSettings()


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `tcpguard trace` on the command line's subparsers."""
    t = sub.add_parser(
        "trace",
        help="split a capture into TCP flows (per-flow pcap/json, index, reassembled payload)",
        description="One flow per TCP connection, tracked by the daemon's engine; see docs/trace.md.",
    )
    t.add_argument("capture", help="pcap or pcapng file")
    t.add_argument("-o", "--output", required=True, help="output directory (created if missing)")
    t.add_argument("--format", choices=("pcap", "json"), default="pcap", help="per-flow file format")
    t.add_argument(
        "--payload",
        action="store_true",
        help="also write each direction's reassembled byte stream (LABEL.forward.bin, .reverse.bin)",
    )
    t.add_argument(
        "--idle-timeout",
        type=float,
        default=_DEFAULTS.idle_timeout,
        metavar="SECONDS",
        help="end an established connection idle this long (capture time; default %(default)s)",
    )
    t.add_argument(
        "--max-flows",
        type=int,
        default=_DEFAULTS.max_flows,
        metavar="N",
        help="connections tracked at once; past it the oldest idle one ends (default %(default)s)",
    )
    t.add_argument(
        "--max-open-files",
        type=int,
        default=_DEFAULTS.max_open_files,
        metavar="N",
        help="output files open at once (default %(default)s)",
    )
    t.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="trace with N processes, connections split between them (0: one per CPU; default 1)",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")
    t.set_defaults(func=cmd_trace)


def main(argv: Iterable[str] | None = None) -> int:
    """`python -m tcpguard.app.offline.trace CAPTURE -o DIR ...`: the subcommand on its own."""
    p = argparse.ArgumentParser(prog="tcpguard")
    sub = p.add_subparsers(dest="command", required=True)
    add_subparser(sub)
    args = p.parse_args(["trace", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
