"""Property tests of the core (hypothesis).

* Reassembly: any segmentation, reordering, duplication and overlap of a client byte stream gives the
  rules exactly that stream, and the packets the engine lets through give an independent receiver model
  the same stream, never a byte the rules had not seen yet. Also across the 2**32 sequence wrap, and with
  conflicting overlaps (first copy wins, for the rules and the receiver alike).
* Streamed rules: `read(n)` in fixed pieces and `find(pattern)` see the same stream as a plain rule.
* `find_any(patterns)`: streamed, it stops at the first pattern to complete in the stream; plain, it
  reports the first to complete of what a `find` per pattern reports.
* Robustness: random and mutated packets give `decode` a Packet or DecodeError and the engine a Decision.
* Bounds: with tiny limits, random traffic never grows the table or a stream beyond its limit.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, IPOption_LSRR, IPOption_NOP, IPOption_RR
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)

from tcpguard.core.conntrack import Connection
from tcpguard.core.cursor import Cursor
from tcpguard.core.decision import Decision, Verdict
from tcpguard.core.engine import Engine
from tcpguard.core.errors import DecodeError
from tcpguard.core.packet import Packet, TcpOptions, checksums_ok, decode
from tcpguard.core.rules import RuleSet, rule, tcp_connection
from tcpguard.core.settings import EngineSettings, Limits, Policies
from tcpguard.core.stream import HalfStream

from .playbook import Playbook

ACCEPT, DROP, HOLD = Verdict.ACCEPT, Verdict.DROP, Verdict.HOLD
EV = tcp_connection.events
MASK = 0xFFFFFFFF


# ============================================================================================ harness
class ClientStream:
    """One connection through an Engine, driven by a Playbook: the client sends segments of a byte stream
    at explicit sequence numbers, a plain rule records what it reads of the client's stream, and a
    receiver model plays the server: it takes the first byte it gets at each offset and reads in order.

    Every client packet gets a distinct token; `apply` maps each ACCEPT verdict and each ACCEPT release
    back to the bytes that leave (the rewritten packet when the engine gives one) and feeds the receiver,
    checking that the rule had already seen every byte that leaves."""

    def __init__(
        self,
        cisn: int = 1000,
        extra_rules: tuple[Callable[..., Any], ...] = (),
        settings_: EngineSettings | None = None,
    ) -> None:
        self.seen = bytearray()  # what the plain rule read from the client's stream, in order

        @rule(on=EV.receive_data)
        def record(flow: Connection, stream: HalfStream, current: Cursor, direction: str) -> None:
            if direction == "up":
                assert current.pos == len(self.seen), "receive_data did not start at the new bytes"
                self.seen += current.read()

        self.pb = Playbook(RuleSet.of(record, *extra_rules), settings_, cisn=cisn)
        self.pb.handshake()
        self.base = (cisn + 1) & MASK  # sequence number of stream offset 0
        self.raw: dict[int, bytes] = {}
        self.held: set[int] = set()
        self.final: dict[int, Verdict] = {}
        self.rx: dict[int, int] = {}  # receiver: offset -> first byte received there
        self.wire: list[bytes] = []  # every client packet that left the engine, in the adapter's order
        self.acked = 0  # the highest offset the server acknowledged
        self.fin_token: int | None = None
        self.arrivals: list[tuple[int, bytes, Verdict]] = []  # (offset, payload, verdict at arrival)
        self._token = 0

    def send(self, off: int, payload: bytes, flags: str = "PA") -> Decision:
        self._token += 1
        token = self._token
        seq = (self.base + off) & MASK
        raw = self.pb._seg(True, flags, payload, seq, None, 65535, b"", 0)
        self.raw[token] = raw
        if "F" in flags:
            self.fin_token = token
        dec = self.pb.feed(raw, token)
        self.arrivals.append((off, payload, dec.verdict))
        self.apply(dec, token)
        return dec

    def server_ack(self) -> Decision:
        """The server acknowledges what the receiver model has read in order."""
        self.acked = len(self.delivered())
        dec = self.pb.server("A", ack=(self.base + self.acked) & MASK)
        self.apply(dec, None)
        return dec

    def apply(self, dec: Decision, token: int | None) -> None:
        """Apply a decision the way the adapter contract says: the verdict, then the releases in order.
        `token` None: the decision is about a server packet, only its releases concern the client."""
        if token is None:
            pass
        elif dec.verdict == HOLD:
            self.held.add(token)
        else:
            self.final[token] = dec.verdict
            if dec.verdict == ACCEPT:
                self.forward(dec.packet if dec.packet is not None else self.raw[token])
        for rel in dec.releases:
            assert rel.token in self.held, f"release of a packet that is not held: {rel.token}"
            token = rel.token
            assert isinstance(token, int)
            self.held.remove(token)
            self.final[token] = rel.verdict
            if rel.verdict == ACCEPT:
                self.forward(rel.packet if rel.packet is not None else self.raw[token])

    def forward(self, raw: bytes) -> None:
        self.wire.append(raw)
        pkt = decode(raw)
        assert checksums_ok(pkt)
        assert pkt.sport == self.pb.cport
        off = (pkt.seq - self.base) & MASK
        for i, b in enumerate(pkt.payload):
            o = off + i
            assert o < len(self.seen), f"byte at offset {o} forwarded before the rules saw it"
            # Never a second value for an offset the receiver may still take: only bytes below its
            # acknowledgement (which it discards) may differ from what the rules saw.
            assert o < self.acked or b == self.seen[o], f"byte at offset {o} differs from the rules' byte"
            self.rx.setdefault(o, b)

    def rule_errors(self) -> list[dict[str, Any]]:
        """Rule errors the engine caught (an assertion inside a rule lands here, not in the test)."""
        return self.pb.names("rule_error")

    def delivered(self) -> bytes:
        out = bytearray()
        while len(out) in self.rx:
            out.append(self.rx[len(out)])
        return bytes(out)


@dataclass
class Schedule:
    data: bytes
    segments: list[tuple[int, bytes]]  # (offset, payload), in sending order
    acks: list[bool] = field(default_factory=list)  # server ACK after segment i?
    fin_at: int | None = None  # the client's FIN is sent before segment fin_at (len(segments): last)


@st.composite
def schedules(draw: st.DrawFn, max_len: int = 5000, conflicting: bool = False) -> Schedule:
    """A stream cut at random points (so every byte is covered), plus duplicates of those pieces and
    random overlapping ranges, all sent in a random order. Overlapping copies carry the same bytes
    unless `conflicting`, where each extra range carries different bytes."""
    # Lengths spread over the whole range (long streams make the engine trim its retained bytes), filled
    # with seeded random bytes so that a byte out of place shows.
    n = draw(st.one_of(st.integers(1, 64), st.integers(1, max_len)), label="length")
    data = random.Random(draw(st.integers(0, 2**32 - 1), label="seed")).randbytes(n)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, n - 1)), max_size=20)))) if n > 1 else []
    bounds = [0, *cuts, n]
    segs = [(a, data[a:b]) for a, b in itertools.pairwise(bounds) if b > a]
    dups = draw(st.lists(st.sampled_from(segs), max_size=5))
    extra = []
    for a, length in draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(1, 600)), max_size=10)):
        b = min(n, a + length)
        if conflicting:
            mask = draw(st.integers(1, 255))
            extra.append((a, bytes(x ^ mask for x in data[a:b])))
        else:
            extra.append((a, data[a:b]))
    allsegs = segs + dups + extra
    order = draw(st.permutations(range(len(allsegs))))
    acks = draw(st.lists(st.booleans(), min_size=len(allsegs), max_size=len(allsegs)))
    fin_at = draw(st.none() | st.integers(0, len(allsegs)), label="fin_at")
    return Schedule(data, [allsegs[i] for i in order], acks, fin_at)


def play(h: ClientStream, sched: Schedule, fin: bool = False) -> None:
    """Send the schedule; the FIN (a bare FIN at the end of the stream, possibly out of order) where the
    schedule puts it, or last if `fin` asks for one the schedule has not got."""
    n = len(sched.data)
    for i, ((off, payload), ack) in enumerate(zip(sched.segments, sched.acks, strict=True)):
        if sched.fin_at == i:
            h.send(n, b"", "FA")
        h.send(off, payload)
        if ack:
            h.server_ack()
    if sched.fin_at == len(sched.segments) or (fin and sched.fin_at is None):
        h.send(n, b"", "FA")


def run(sched: Schedule, cisn: int) -> ClientStream:
    h = ClientStream(cisn)
    play(h, sched)
    return h


ISNS = st.one_of(st.integers(0, MASK), st.integers(MASK - 4000, MASK))


# ============================================================================================ reassembly
@settings(max_examples=150, deadline=None)
@given(sched=schedules(), cisn=ISNS)
def test_any_segmentation_gives_the_rules_and_the_receiver_the_original_stream(
    sched: Schedule, cisn: int
) -> None:
    h = run(sched, cisn)
    assert h.rule_errors() == []
    assert bytes(h.seen) == sched.data
    assert not h.held, "packets still held after every byte arrived"
    assert h.delivered() == sched.data
    assert max(h.rx) == len(sched.data) - 1
    if h.fin_token is not None:  # and the end of the stream reaches the receiver too
        assert h.final[h.fin_token] == ACCEPT


@settings(max_examples=100, deadline=None)
@given(sched=schedules(), data=st.data())
def test_any_segmentation_across_the_sequence_wrap(sched: Schedule, data: st.DataObject) -> None:
    # Put the 2**32 -> 0 wrap at a chosen offset inside the stream.
    wrap_at = data.draw(st.integers(0, len(sched.data) - 1), label="wrap_at")
    cisn = (MASK - wrap_at) & MASK  # offset 0 has sequence number 2**32 - wrap_at
    h = run(sched, cisn)
    assert (h.base + wrap_at) & MASK == 0
    assert h.rule_errors() == []
    assert bytes(h.seen) == sched.data
    assert not h.held
    assert h.delivered() == sched.data


def first_accepted_copy(h: ClientStream, n: int) -> bytes:
    """At each offset, the byte of the earliest-arriving segment the engine did not drop on arrival."""
    first: dict[int, int] = {}
    for off, payload, verdict in h.arrivals:
        if verdict == DROP:
            continue
        for i, b in enumerate(payload):
            first.setdefault(off + i, b)
    return bytes(first[i] for i in range(n))


@settings(max_examples=150, deadline=None)
@given(sched=schedules(conflicting=True), cisn=ISNS)
def test_conflicting_overlaps_first_accepted_copy_wins_for_rules_and_receiver(
    sched: Schedule, cisn: int
) -> None:
    h = run(sched, cisn)
    n = len(sched.data)
    assert h.rule_errors() == []
    assert len(h.seen) == n
    assert not h.held
    assert h.delivered() == bytes(h.seen)
    assert bytes(h.seen) == first_accepted_copy(h, n)


# ============================================================================================ streamed rules
@settings(max_examples=100, deadline=None)
@given(sched=schedules(max_len=1500), piece=st.integers(1, 64), cisn=ISNS)
def test_streamed_read_n_sees_the_same_stream_as_a_plain_rule(sched: Schedule, piece: int, cisn: int) -> None:
    pieces: list[bytes] = []

    @rule(on=EV.receive_data, streamed=True)
    def reader(flow: Connection, stream: HalfStream, current: Cursor, direction: str) -> None:
        if direction != "up":
            return
        while True:
            chunk = current.read(piece)
            if not chunk:
                return
            pieces.append(chunk)

    h = ClientStream(cisn, (reader,))
    play(h, sched, fin=True)  # the end of the stream flushes the last short piece
    assert h.rule_errors() == []
    assert not h.held
    assert b"".join(pieces) == bytes(h.seen) == sched.data
    assert all(len(p) == piece for p in pieces[:-1])
    assert 1 <= len(pieces[-1]) <= piece


@st.composite
def pattern_streams(draw: st.DrawFn) -> tuple[bytes, bytes, int]:
    pattern = draw(st.binary(min_size=1, max_size=24), label="pattern")
    # Long prefixes too, so that acknowledged bytes get trimmed before the pattern completes.
    prefix = draw(st.one_of(st.binary(max_size=300), st.integers(0, 4000).map(lambda k: b"\x00" * k)))
    suffix = draw(st.binary(max_size=100), label="suffix")
    stream = prefix + pattern + suffix
    return stream, pattern, stream.find(pattern)


@settings(max_examples=150, deadline=None)
@given(ps=pattern_streams(), data=st.data(), shuffle=st.booleans())
def test_streamed_find_finds_a_pattern_however_it_is_split(
    ps: tuple[bytes, bytes, int], data: st.DataObject, shuffle: bool
) -> None:
    stream, pattern, where = ps
    found: list[tuple[int, int] | None] = []

    @rule(on=EV.receive_data, streamed=True)
    def finder(flow: Connection, s: HalfStream, current: Cursor, direction: str) -> None:
        m = current.find(pattern)
        found.append(None if m is None else (m.start, current.pos))

    n = len(stream)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=30), label="cuts"))) if n > 1 else []
    bounds = [0, *cuts, n]
    segs = list(itertools.pairwise(bounds))
    if shuffle:
        segs = data.draw(st.permutations(segs), label="order")
    acks = data.draw(st.lists(st.booleans(), min_size=len(segs), max_size=len(segs)), label="acks")
    h = ClientStream(1000, (finder,))
    for (a, b), ack in zip(segs, acks, strict=True):
        h.send(a, stream[a:b])
        if ack:  # acknowledged bytes stay retained while the streamed reader has not passed them
            h.server_ack()
    h.send(n, b"", "FA")
    assert h.rule_errors() == []
    assert found == [(where, where)]  # found once, at its first occurrence, the cursor moved to it


@settings(max_examples=150, deadline=None)
@given(ps=pattern_streams(), data=st.data())
def test_plain_find_finds_a_pattern_split_into_two_segments(
    ps: tuple[bytes, bytes, int], data: st.DataObject
) -> None:
    stream, pattern, where = ps
    found: list[int] = []

    @rule(on=EV.receive_data)
    def finder(flow: Connection, s: HalfStream, current: Cursor, direction: str) -> None:
        m = current.find(pattern)
        if m is not None:
            found.append(m.start)

    # Cut anywhere, typically inside the pattern; the server may acknowledge the first part in between.
    n = len(stream)
    inside = st.integers(where + 1, where + len(pattern) - 1) if len(pattern) > 1 else st.nothing()
    cut = data.draw(st.one_of(inside, st.integers(1, n - 1)), label="cut") if n > 1 else 1
    h = ClientStream(1000, (finder,))
    h.send(0, stream[:cut])
    if data.draw(st.booleans(), label="ack between"):
        h.server_ack()
    if cut < n:
        h.send(cut, stream[cut:])
    assert h.rule_errors() == []
    assert found, "pattern not found"
    assert found[0] == where


@st.composite
def multi_pattern_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A stream and 1-4 patterns, some of them in it (possibly overlapping, one inside another)."""
    alphabet = st.binary(min_size=1, max_size=12).map(lambda b: bytes(x % 4 for x in b))  # many repeats
    patterns = draw(st.lists(alphabet, min_size=1, max_size=4), label="patterns")
    parts = draw(
        st.lists(st.one_of(st.sampled_from(patterns), alphabet), min_size=1, max_size=8), label="parts"
    )
    return b"".join(parts), patterns


def _first_in_stream(stream: bytes, patterns: list[bytes]) -> tuple[int, bytes] | None:
    """The model of find_any over a whole stream: the match that ends first (each pattern's first
    occurrence is its first to end); of equal ends the longer, then the first listed."""
    hits = [(i + len(p), i, k) for k, p in enumerate(patterns) if (i := stream.find(p)) >= 0]
    if not hits:
        return None
    _, i, k = min(hits)
    return i, patterns[k]


def test_find_any_takes_any_iterable_and_no_patterns_finds_nothing() -> None:
    streamed_saw: list[object] = []
    plain_saw: list[object] = []

    @rule(on=EV.receive_data, streamed=True)
    def streamed(flow: Connection, s: HalfStream, current: Cursor, direction: str) -> None:
        streamed_saw.append(current.find_any([]))
        m = current.find_any(p for p in (b"zz", b"sh"))  # a generator, read once
        streamed_saw.append(None if m is None else (m.start, m.pattern, current.pos))

    @rule(on=EV.receive_data)
    def plain(flow: Connection, s: HalfStream, current: Cursor, direction: str) -> None:
        m = current.find_any(p for p in (b"zz", b"sh"))
        plain_saw.append(None if m is None else (m.start, m.pattern))
        plain_saw.append(current.find_any(()))

    h = ClientStream(1000, (streamed, plain))
    h.send(0, b"/bin/")
    h.send(5, b"sh")
    assert h.rule_errors() == []
    assert streamed_saw == [None, (5, b"sh", 5)]  # no patterns: None at once; then it waits for "sh"
    assert plain_saw == [None, None, (5, b"sh"), None]


def _cut(stream: bytes, data: st.DataObject) -> list[tuple[int, int]]:
    """The stream cut into in-order segments at random places: (start, end) of each."""
    n = len(stream)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=20), label="cuts"))) if n > 1 else []
    return list(itertools.pairwise([0, *cuts, n]))


@settings(max_examples=150, deadline=None)
@given(sp=multi_pattern_streams(), data=st.data())
def test_streamed_find_any_stops_at_the_first_pattern_to_complete(
    sp: tuple[bytes, list[bytes]], data: st.DataObject
) -> None:
    stream, patterns = sp
    found: list[tuple[int, int, bytes] | None] = []

    @rule(on=EV.receive_data, streamed=True)
    def finder(flow: Connection, s: HalfStream, current: Cursor, direction: str) -> None:
        m = current.find_any(patterns)
        found.append(None if m is None else (m.start, current.pos, m.pattern))
        assert m is None or m.end == m.start + len(m.pattern)

    h = ClientStream(1000, (finder,))
    for a, b in _cut(stream, data):
        h.send(a, stream[a:b])
        h.server_ack()
    h.send(len(stream), b"", "FA")
    assert h.rule_errors() == []
    want = _first_in_stream(stream, patterns)
    assert found == [None if want is None else (want[0], want[0], want[1])]


@settings(max_examples=150, deadline=None)
@given(sp=multi_pattern_streams(), data=st.data())
def test_plain_find_any_reports_what_single_finds_report(
    sp: tuple[bytes, list[bytes]], data: st.DataObject
) -> None:
    """On every segment, `find_any` is the first to end of the matches `find` reports for each pattern (of
    equal ends the longer, then the one listed first): the same look-back, only matches ending in the new
    bytes."""
    stream, patterns = sp
    calls: list[tuple[tuple[int, int, bytes] | None, tuple[int, int, bytes] | None]] = []

    @rule(on=EV.receive_data)
    def finder(flow: Connection, s: HalfStream, current: Cursor, direction: str) -> None:
        singles = [
            (m.end, m.start, k, m) for k, p in enumerate(patterns) if (m := current.find(p)) is not None
        ]
        want = None
        if singles:
            m = min(singles, key=lambda t: t[:3])[3]
            want = (m.start, m.end, m.pattern)
        got = current.find_any(patterns)
        calls.append((None if got is None else (got.start, got.end, got.pattern), want))

    h = ClientStream(1000, (finder,))
    segments = _cut(stream, data)
    for a, b in segments:
        h.send(a, stream[a:b])
        if data.draw(st.booleans(), label="ack"):
            h.server_ack()
    assert h.rule_errors() == []
    assert len(calls) == len(segments)
    assert all(got == want for got, want in calls), calls
    # The first report is the pattern that completes first; nothing is reported if no pattern is there.
    reports = [got for got, _ in calls if got is not None]
    first = _first_in_stream(stream, patterns)
    if first is None:
        assert reports == []
    else:
        assert reports[:1] == [(first[0], first[0] + len(first[1]), first[1])]


# ======================================================================================== forwarding order
class TcpReceiver:
    """The server's TCP receive side, as far as order matters: in-order bytes are read, an RST closes
    only at exactly the next expected sequence number (RFC 5961; anything else gets a challenge ACK)."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.data = bytearray()
        self.closed = False

    def receive(self, raw: bytes) -> None:
        pkt = decode(raw)
        off = (pkt.seq - self.base) & MASK
        if self.closed:
            return
        if pkt.rst:
            self.closed = off == len(self.data)
            return
        if off <= len(self.data) < off + len(pkt.payload):
            self.data += pkt.payload[len(self.data) - off :]


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=5))
def test_a_closing_rst_reaches_the_receiver_after_the_data_the_rules_saw(sizes: list[int]) -> None:
    """A rule holds the client's data (mark); the client then aborts with an RST at its next sequence
    number. Applying the decisions in the adapter's order, the server must read every byte the rules saw
    and then accept the RST, as the engine (which ends the connection) assumes."""

    @rule(on=EV.receive_data)
    def hold(flow: Connection, stream: HalfStream, current: Cursor, direction: str) -> None:
        if direction == "up" and stream.hold_from < 0:
            current.mark()

    h = ClientStream(1000, (hold,))
    off = 0
    for n in sizes:
        dec = h.send(off, random.Random(n).randbytes(n))
        assert dec.verdict == HOLD, dec.reason
        off += n
    h.send(off, b"", "R")
    (conn,) = h.pb.engine.table
    assert conn.ended  # the engine took the RST as closing the connection
    server = TcpReceiver(h.base)
    for raw in h.wire:
        server.receive(raw)
    assert bytes(server.data) == bytes(h.seen)
    assert server.closed


# ============================================================================================ robustness
CISN, SISN = 100, 5000
SYN_OPTS = [("MSS", 1460), ("NOP", None), ("WScale", 7), ("SAckOK", b""), ("Timestamp", (1, 0))]


def _tcp(
    ip: Any, up: bool, flags: str, seq: int, data: bytes = b"", opts: Any = (), ack: int = 0, **kw: Any
) -> bytes:
    sport, dport, first = (40000, 80, SISN + 1) if up else (80, 40000, CISN + 1)
    ack = ack or first
    tcp = TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, options=list(opts), **kw)
    return bytes(ip / tcp / data)


def _scapy_packets() -> list[bytes]:
    """Valid TCP packets of one flow (both directions, handshake to close), built by scapy."""
    out: list[bytes] = []
    c2s: Any
    s2c: Any
    for ipv6 in (False, True):
        if ipv6:
            c2s = IPv6(src="2001:db8::1", dst="2001:db8::2")
            s2c = IPv6(src="2001:db8::2", dst="2001:db8::1")
        else:
            c2s = IP(
                src="10.0.0.1", dst="10.0.0.2", options=[IPOption_NOP(), IPOption_RR(routers=["1.2.3.4"])]
            )
            s2c = IP(src="10.0.0.2", dst="10.0.0.1")
        out += [
            _tcp(c2s, True, "S", CISN, opts=SYN_OPTS),
            _tcp(s2c, False, "SA", SISN, opts=SYN_OPTS),
            _tcp(c2s, True, "A", CISN + 1),
            _tcp(c2s, True, "PA", CISN + 1, b"GET / HTTP/1.1\r\n"),
            _tcp(
                c2s, True, "PA", CISN + 17, b"Host: example\r\n\r\n", [("NOP", None), ("Timestamp", (5, 6))]
            ),
            _tcp(c2s, True, "PA", CISN + 50, b"out of order"),
            _tcp(c2s, True, "PA", CISN + 1, b"GET / HTTP/1.0\r\n"),  # conflicting retransmission
            _tcp(s2c, False, "PA", SISN + 1, b"HTTP/1.1 200 OK\r\n\r\nbody"),
            _tcp(s2c, False, "A", SISN + 1, opts=[("SAck", (CISN + 50, CISN + 62))]),
            _tcp(c2s, True, "PAU", CISN + 34, b"urgent", urgptr=3),
            _tcp(c2s, True, "FA", CISN + 40),
            _tcp(s2c, False, "FA", SISN + 25),
            _tcp(c2s, True, "A", CISN + 41, ack=SISN + 26),
            _tcp(c2s, True, "R", CISN + 41),
            _tcp(s2c, False, "RA", SISN + 26),
            _tcp(c2s, True, "S", CISN, b"syn data", SYN_OPTS),
        ]
        if ipv6:
            ext = IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
            out.append(_tcp(c2s / ext, True, "PA", CISN + 1, b"ext"))
            out.append(_tcp(c2s / IPv6ExtHdrFragment(m=1), True, "PA", CISN + 1, b"frag"))
            routed = IPv6ExtHdrRouting(addresses=["2001:db8::9", "2001:db8::2"])
            out.append(_tcp(IPv6(src="2001:db8::1", dst="2001:db8::9") / routed, True, "PA", CISN + 1, b"rh"))
        else:
            out.append(_tcp(IP(src="10.0.0.1", dst="10.0.0.2", flags="MF"), True, "A", CISN + 1))
            lsrr = [IPOption_LSRR(routers=["10.0.0.9", "10.0.0.2"])]
            out.append(_tcp(IP(src="10.0.0.1", dst="10.0.0.9", options=lsrr), True, "PA", CISN + 1, b"lsrr"))
    return out


VALID = _scapy_packets()


@st.composite
def mutated_packets(draw: st.DrawFn) -> bytes:
    """A valid packet with a few bytes flipped, inserted or deleted, or truncated."""
    raw = bytearray(draw(st.sampled_from(VALID), label="packet"))
    for _ in range(draw(st.integers(1, 4), label="mutations")):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "set"]))
        if not raw:
            break
        i = draw(st.integers(0, len(raw) - 1))
        if kind == "flip":
            raw[i] ^= draw(st.integers(1, 255))
        elif kind == "set":
            raw[i] = draw(st.sampled_from([0x00, 0xFF, 0x01, 0x7F, 0x80, 0x45, 0x60, 0x06]))
        elif kind == "insert":
            raw[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del raw[i : i + draw(st.integers(1, 8))]
        else:
            del raw[i:]
    return bytes(raw)


def decode_or_decode_error(raw: bytes) -> Packet | None:
    """The decoder's contract: a Packet (whose lazy options also follow it) or DecodeError, nothing else."""
    try:
        pkt = decode(raw)
    except DecodeError as e:
        assert type(e) is DecodeError
        return None
    assert isinstance(pkt, Packet)
    if pkt.is_tcp:
        try:
            assert isinstance(pkt.options(), TcpOptions)
        except DecodeError as e:
            assert type(e) is DecodeError
        assert isinstance(checksums_ok(pkt), bool)
    return pkt


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200))
def test_random_bytes_decode_to_a_packet_or_decode_error(raw: bytes) -> None:
    decode_or_decode_error(raw)


@settings(max_examples=200, deadline=None)
@given(head=st.sampled_from([b"\x45", b"\x46", b"\x4f", b"\x60", b"\x6f"]), rest=st.binary(max_size=120))
def test_random_bytes_with_an_ip_version_nibble_decode_to_a_packet_or_decode_error(
    head: bytes, rest: bytes
) -> None:
    decode_or_decode_error(head + rest)


@settings(max_examples=200, deadline=None)
@given(raw=mutated_packets())
def test_mutated_packets_decode_to_a_packet_or_decode_error(raw: bytes) -> None:
    decode_or_decode_error(raw)


def _fuzz_rules() -> RuleSet:
    """Rules that exercise every cursor call, plain and streamed, and every event."""

    @rule(on=EV.new_connection)
    def new(flow: Connection, tcp: Packet) -> None:
        flow.store["n"] = 0

    @rule(on=EV.receive_data)
    def plain(flow: Connection, stream: HalfStream, current: Cursor, direction: str) -> None:
        current.peek(3)
        current.find(b"HTTP")
        current.read()
        if current.find(b"Host"):
            flow.alert("host seen")

    @rule(on=EV.receive_data, streamed=True)
    def streamed(flow: Connection, stream: HalfStream, current: Cursor, direction: str) -> None:
        current.readline()
        current.find(b"\r\n\r\n")
        current.skip(2)
        for _chunk in current:
            pass

    @rule(on=EV.end_connection)
    def end(flow: Connection) -> None:
        flow.store["ended"] = True

    return RuleSet.of(new, plain, streamed, end)


@settings(max_examples=150, deadline=None)
@given(
    items=st.lists(
        st.one_of(st.sampled_from(VALID), mutated_packets(), st.binary(max_size=80)), min_size=1, max_size=30
    ),
    verify=st.booleans(),
    midstream=st.sampled_from(["track", "accept", "drop"]),
)
def test_engine_gives_a_decision_for_any_mix_of_valid_and_mutated_packets(
    items: list[bytes], verify: bool, midstream: Any
) -> None:
    # Without checksum verification mutated packets reach tracking, reassembly and the rules.
    pol = Policies(verify_checksums=verify, midstream=midstream)
    engine = Engine(EngineSettings(policies=pol), _fuzz_rules())
    now = 0.0
    for token, raw in enumerate(items):
        now += 0.5
        dec = engine.handle_packet(raw, now, token)
        assert isinstance(dec, Decision)
        assert isinstance(dec.verdict, Verdict)
    engine.handle_timer(now + 10_000)
    engine.shutdown(now + 10_001)
    # The rules above cannot fail on their own: an error here is an exception from the engine's side
    # of the rule API (cursor, stream), which the engine would otherwise hide as a rule error.
    assert engine.stats.rule_errors == 0


# ============================================================================================ bounds
OPS = st.tuples(
    st.integers(0, 5),  # connection
    st.sampled_from(
        ["cappend", "cappend", "sappend", "cdata", "sdata", "cack", "sack", "fin", "rst", "syn", "midstream"]
    ),
    st.integers(0, 600),  # offset (for cdata/sdata/cack/sack/fin/rst)
    st.integers(1, 120),  # length
)


def check_bounds(engine: Engine, lim: Limits) -> None:
    assert len(engine.table) <= lim.max_connections
    for conn in engine.table:
        for s in (conn.up, conn.down):
            assert len(s.ooo) <= lim.max_ooo_segments
            assert s.ooo_bytes <= lim.max_ooo_bytes
            # Retained in-order bytes and held out-of-order bytes together: the stream bound is exact.
            assert s.buffered() <= lim.max_stream_buffer
    # The total bound is exact too: held out-of-order bytes count into it and are refused beyond it.
    assert engine.buffered <= lim.max_total_buffer
    # The running totals the bounds are checked against are exactly what the streams hold.
    assert engine.buffered == sum(s.buffered() for conn in engine.table for s in (conn.up, conn.down))
    assert engine.held_packets == sum(
        len(s.held) + len(s.ooo) for conn in engine.table for s in (conn.up, conn.down)
    )
    assert sum(engine.drops.values()) == engine.stats.dropped


class Traffic:
    """Clients 0..5 talking to one server through one engine: handshakes, in-order and out-of-order
    data both ways, acknowledgements, FIN, RST, reopened and mid-stream connections."""

    def __init__(self, engine: Engine, lim: Limits, seed: int) -> None:
        self.engine = engine
        self.lim = lim
        self.rnd = random.Random(seed)
        self.peers = [
            Playbook(
                engine=engine, cport=40000 + i, cisn=self.rnd.randrange(2**32), sisn=self.rnd.randrange(2**32)
            )
            for i in range(6)
        ]
        self.sent = [[0, 0] for _ in range(6)]  # bytes each client / server sent in order so far
        self.opened = [False] * 6
        self.now = 0.0

    def feed(self, pb: Playbook, from_client: bool, flags: str, data: bytes, seq: int, ack: int) -> None:
        self.now += 0.01
        pb.now = self.now
        if from_client:
            pb.client(flags, data, seq=seq & MASK, ack=ack & MASK, dt=0)
        else:
            pb.server(flags, data, seq=seq & MASK, ack=ack & MASK, dt=0)
        check_bounds(self.engine, self.lim)

    def op(self, i: int, kind: str, off: int, length: int) -> None:
        pb = self.peers[i]
        c0, s0 = pb.cisn + 1, pb.sisn + 1
        sent = self.sent[i]
        if kind == "syn" or (not self.opened[i] and kind != "midstream"):
            pb.cisn, pb.sisn = self.rnd.randrange(2**32), self.rnd.randrange(2**32)
            c0, s0 = pb.cisn + 1, pb.sisn + 1
            self.feed(pb, True, "S", b"", pb.cisn, 0)
            self.feed(pb, False, "SA", b"", pb.sisn, c0)
            self.feed(pb, True, "A", b"", c0, s0)
            self.sent[i] = sent = [0, 0]
            self.opened[i] = True
            if kind == "syn":
                return
        payload = self.rnd.randbytes(length)
        if kind in ("cappend", "midstream"):
            self.feed(pb, True, "PA", payload, c0 + sent[0], s0 + sent[1])
            sent[0] += length
        elif kind == "sappend":
            self.feed(pb, False, "PA", payload, s0 + sent[1], c0 + sent[0])
            sent[1] += length
        elif kind == "cdata":
            self.feed(pb, True, "PA", payload, c0 + off, s0 + sent[1])
        elif kind == "sdata":
            self.feed(pb, False, "PA", payload, s0 + off, c0 + sent[0])
        elif kind == "cack":
            self.feed(pb, True, "A", b"", c0 + sent[0], s0 + min(off, sent[1]))
        elif kind == "sack":
            self.feed(pb, False, "A", b"", s0 + sent[1], c0 + min(off, sent[0]))
        elif kind == "fin":
            self.feed(pb, True, "FA", b"", c0 + sent[0], s0 + sent[1])
        else:
            self.feed(pb, False, "RA", b"", s0 + sent[1], c0 + sent[0])


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(OPS, min_size=1, max_size=60),
    max_conn=st.integers(1, 3),
    ooo_bytes=st.integers(1, 400),
    ooo_segs=st.integers(1, 3),
    stream_buf=st.integers(50, 400),
    total_buf=st.integers(100, 2000),
    limit=st.sampled_from(["accept", "drop", "reset"]),
    table_full=st.sampled_from(["evict", "refuse"]),
    hog=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_small_limits_bound_the_table_and_every_stream(
    ops: list[tuple[int, str, int, int]],
    max_conn: int,
    ooo_bytes: int,
    ooo_segs: int,
    stream_buf: int,
    total_buf: int,
    limit: Any,
    table_full: Any,
    hog: bool,
    seed: int,
) -> None:
    lim = Limits(
        max_connections=max_conn,
        max_ooo_bytes=ooo_bytes,
        max_ooo_segments=ooo_segs,
        max_stream_buffer=stream_buf,
        max_total_buffer=total_buf,
    )
    cfg = EngineSettings(limits=lim, policies=Policies(limit=limit, table_full=table_full))

    # What the rules find buffered while they read new bytes: the moment the bytes are in, before the
    # packet's verdict (a bound checked only after taking them would be over here and back by then).
    over: list[tuple[int, int]] = []

    @rule(on=EV.receive_data)
    def plain(flow: Connection, stream: HalfStream, current: Cursor, direction: str) -> None:
        current.read()
        if stream.buffered() > stream_buf or engine.buffered > total_buf:
            over.append((stream.buffered(), engine.buffered))

    @rule(on=EV.receive_data, streamed=True)
    def hog_rule(flow: Connection, stream: HalfStream, current: Cursor, direction: str) -> None:
        current.read(10**9)  # pins every byte it has not read: only the limit stops the growth

    engine = Engine(cfg, RuleSet.of(plain, hog_rule) if hog else RuleSet.of(plain))
    traffic = Traffic(engine, lim, seed)
    for op in ops:
        traffic.op(*op)
        assert not over, f"bounds {stream_buf}/{total_buf} exceeded while the rules ran: {over}"
    engine.handle_timer(traffic.now + 100_000)
    check_bounds(engine, lim)
