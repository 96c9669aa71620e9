"""The engine with GRO/GSO aggregates: segments of up to 64 KB, as NFQUEUE delivers them once the adapter
asks for NFQA_CFG_F_GSO (issue 21).

Nothing in the engine is specific to the size of a segment, and these playbook tests hold it to that: the
rules see exactly the bytes the receiver will read whether they come as one aggregate or as forty
segments; an aggregate that overlaps earlier data keeps the first copy of every offset; held and
out-of-order aggregates leave in order; a pattern that completes in the middle of an aggregate, or across
two, stops the aggregate that completes it (the receiver never reads the pattern) and the forged RSTs
carry the sequence number the server expects, which is the aggregate's own.

An aggregate the kernel queues with a partial checksum (NFQA_SKB_CSUMNOTREADY: its TCP checksum field
holds only the pseudo-header sum, filled in on the way out) must pass when the adapter says the kernel
vouches for it (`checksum_trusted=True`), and is a bad checksum otherwise.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from typing import Any

import pytest

from tcpguard.core.conntrack import Connection
from tcpguard.core.decision import Verdict
from tcpguard.core.packet import checksums_ok, decode, sum16_mod
from tcpguard.core.rules import RuleSet, rule, tcp_connection
from tcpguard.core.settings import EngineSettings

from .playbook import Playbook
from .test_engine import Recorder

ACCEPT, DROP, HOLD = Verdict.ACCEPT, Verdict.DROP, Verdict.HOLD
EV = tcp_connection.events
#: The payload of a typical GRO aggregate: 45 segments of 1,448 bytes (MSS 1460 less the timestamps).
AGG = 45 * 1448
#: The largest TCP payload one IPv4 packet can hold (65,535 less 20 bytes of IP and 20 of TCP header).
MAX4 = 65535 - 40


def blob(n: int, seed: bytes = b"gso") -> bytes:
    return hashlib.shake_256(seed).digest(n)


def opened(pb: Playbook) -> Playbook:
    """The handshake, then an ACK from the server: a SYN-ACK's window is never scaled (RFC 7323), so
    the client may only send 65,535 bytes before the server's first scaled window (8 MB here)."""
    pb.handshake()
    pb.server("A")
    return pb


@pytest.mark.parametrize("family", ["4", "6"])
def test_aggregates_and_segments_reassemble_to_the_same_stream(family: str) -> None:
    """Aggregates of every size up to the largest, mixed with wire-sized segments, in both directions."""
    rec = Recorder()
    client, server = ("10.0.0.1", "10.0.0.2") if family == "4" else ("fd00::1", "fd00::2")
    pb = Playbook(rec.rules, client=client, server=server)
    opened(pb)
    largest = MAX4 if family == "4" else 65535 - 20  # IPv6: the payload length field covers TCP only
    up = blob(AGG + 1448 + largest + 7, b"up")
    cuts = [0, AGG, AGG + 1448, AGG + 1448 + largest, len(up)]
    pieces = [up[a:b] for a, b in itertools.pairwise(cuts)]
    for piece in pieces:
        d = pb.client("PA", piece)
        assert d.verdict == ACCEPT and d.packet is None, d
    down = blob(3 * AGG, b"down")
    for i in range(3):
        d = pb.server("A", down[i * AGG : (i + 1) * AGG])
        assert d.verdict == ACCEPT and d.packet is None, d
    assert rec.data("up") == up
    assert rec.data("down") == down
    assert pb.engine.stats.bad_checksum == 0


def test_an_aggregate_overlapping_earlier_data_keeps_the_first_copy() -> None:
    """A retransmitted aggregate whose first half conflicts with what passed: rewritten to the first copy
    there, its new half kept; same length and sequence number, valid checksums (the kernel segments a
    rewritten GSO packet in software and fills each segment's checksum itself, but a packet that is not
    GSO leaves as we wrote it)."""
    rec = Recorder()
    pb = Playbook(rec.rules)
    opened(pb)
    base = pb.cnext
    half = AGG // 2
    first = blob(half, b"first")
    assert pb.client("PA", first).verdict == ACCEPT
    evil = blob(AGG, b"evil")
    d = pb.client("PA", evil, seq=base)
    assert d.verdict == ACCEPT and d.packet is not None
    p = decode(d.packet)
    assert p.seq == base and len(p.payload) == AGG
    assert p.payload == first + evil[half:]
    assert checksums_ok(p)
    assert rec.data() == first + evil[half:]


def test_an_aggregate_overlapping_a_held_aggregate_keeps_the_held_copy() -> None:
    rec = Recorder()
    pb = Playbook(rec.rules)
    opened(pb)
    base = pb.cnext
    later = blob(AGG, b"later")
    assert pb.client("PA", later, seq=base + AGG // 2, token="ooo").verdict == HOLD
    fill = blob(AGG, b"fill")
    d = pb.client("PA", fill, seq=base, token="fill")
    assert d.verdict == ACCEPT and d.packet is not None
    assert decode(d.packet).payload == fill[: AGG // 2] + later[: AGG - AGG // 2]
    assert [(r.token, r.verdict) for r in d.releases] == [("ooo", ACCEPT)]
    assert rec.data() == fill[: AGG // 2] + later


def test_out_of_order_aggregates_are_held_and_leave_in_order() -> None:
    rec = Recorder()
    pb = Playbook(rec.rules)
    opened(pb)
    base = pb.cnext
    data = blob(3 * AGG)
    assert pb.client("PA", data[2 * AGG :], seq=base + 2 * AGG, token=3).verdict == HOLD
    assert pb.client("PA", data[AGG : 2 * AGG], seq=base + AGG, token=2).verdict == HOLD
    d = pb.client("PA", data[:AGG], seq=base, token=1)
    assert d.verdict == ACCEPT
    assert [(r.token, r.verdict) for r in d.releases] == [(2, ACCEPT), (3, ACCEPT)]
    assert rec.data() == data


def test_a_rule_holds_aggregates_until_it_has_seen_enough() -> None:
    """A rule that marks the stream holds whole aggregates (per byte, whatever the packet size) and
    releases them with the one that completes what it waits for."""
    state: dict[str, Any] = {}

    @rule(on=EV.receive_data)
    def hold_until_end(flow: Connection, stream: Any, current: Any, direction: str) -> None:
        if direction != "up":
            return
        if "marked" not in state:
            current.mark()
            state["marked"] = True
        if current.find(b"END"):
            flow.send("up")

    pb = Playbook(RuleSet.of(hold_until_end))
    opened(pb)
    assert pb.client("PA", blob(AGG, b"a"), token="a").verdict == HOLD
    assert pb.client("PA", blob(AGG, b"b"), token="b").verdict == HOLD
    d = pb.client("PA", blob(AGG - 3, b"c") + b"END", token="c")
    assert d.verdict == ACCEPT
    assert [(r.token, r.verdict) for r in d.releases] == [("a", ACCEPT), ("b", ACCEPT)]
    assert pb.engine.held_packets == 0 and pb.engine.buffered <= 3 * AGG


@pytest.mark.parametrize("action", ["reset", "drop", "halfreset"])
def test_a_pattern_in_the_middle_of_an_aggregate_stops_that_aggregate(action: str) -> None:
    rec = Recorder()
    rec.on_data = (b"/bin/sh", action)
    pb = Playbook(rec.rules)
    opened(pb)
    clean = blob(AGG, b"clean")
    assert pb.client("PA", clean).verdict == ACCEPT
    at = pb.cnext
    bad = blob(AGG // 2, b"x") + b"/bin/sh" + blob(AGG // 2, b"y")
    d = pb.client("PA", bad)
    assert d.verdict == DROP  # the whole aggregate: none of its bytes reach the server
    if action == "drop":
        assert not d.send
    else:
        to_server = [decode(r) for r in d.send if decode(r).dst == pb.saddr.packed]
        assert len(to_server) == 1 and to_server[0].seq == at  # where the server expects the next byte
    # Whatever the client retransmits of it is dropped too.
    assert pb.client("PA", bad, seq=at).verdict == DROP
    assert rec.ends() and rec.ends()[0][2] in ("rule", "reset", "drop", "halfreset")


def test_a_pattern_split_across_two_aggregates_stops_the_second() -> None:
    rec = Recorder()
    rec.on_data = (b"/bin/sh", "reset")
    pb = Playbook(rec.rules)
    opened(pb)
    first = blob(AGG - 4, b"1") + b"/bin"
    assert pb.client("PA", first).verdict == ACCEPT  # "/bin" alone is no pattern yet
    at = pb.cnext
    d = pb.client("PA", b"/sh" + blob(AGG - 3, b"2"))
    assert d.verdict == DROP
    to_server = [decode(r) for r in d.send if decode(r).dst == pb.saddr.packed]
    assert len(to_server) == 1 and to_server[0].seq == at


def test_an_aggregate_past_the_stream_buffer_meets_the_limit_policy() -> None:
    """The per-stream bound is in bytes: one aggregate larger than the room left is refused as a whole
    (fail-closed by default), never taken in part."""
    st = EngineSettings()
    st.limits.max_stream_buffer = AGG + 1000

    @rule(on=EV.receive_data)
    def keep_all(flow: Connection, stream: Any, current: Any, direction: str) -> None:
        current.mark()  # keeps every byte buffered

    pb = Playbook(RuleSet.of(keep_all), settings=st)
    opened(pb)
    assert pb.client("PA", blob(AGG), token=1).verdict == HOLD
    d = pb.client("PA", blob(AGG, b"more"), token=2)
    assert d.verdict == DROP
    assert pb.engine.stats.limit_hits >= 1


def _partial_checksum(raw: bytes) -> bytes:
    """`raw` (IPv4/TCP) as the kernel queues a CHECKSUM_PARTIAL packet: the TCP checksum field holds the
    folded pseudo-header sum only (tcp_v4_send_check / tcp4_gro_complete), to be completed on output."""
    out = bytearray(raw)
    hl = (out[0] & 0x0F) * 4
    seg_len = len(out) - hl
    pseudo = sum16_mod(bytes(out), 12, 20) + 6 + seg_len
    while pseudo > 0xFFFF:
        pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
    struct.pack_into("!H", out, hl + 16, pseudo)
    return bytes(out)


def test_a_partial_checksum_passes_only_when_the_kernel_vouches_for_it() -> None:
    rec = Recorder()
    pb = Playbook(rec.rules)
    opened(pb)
    data = blob(AGG, b"partial")
    raw = _partial_checksum(pb._seg(True, "PA", data, None, None, 65535, b"", 0))
    assert not checksums_ok(decode(raw))
    d = pb.engine.handle_packet(raw, 1.0, "untrusted")
    assert d.verdict == DROP and d.reason == "bad checksum"
    d = pb.engine.handle_packet(raw, 1.1, "trusted", checksum_trusted=True)
    assert d.verdict == ACCEPT and d.packet is None  # passed as is: the kernel fills the checksum in
    assert rec.data() == data
    # The next packet is checked again: trust is per packet.
    bad = bytearray(pb._seg(True, "PA", b"tail", None, None, 65535, b"", 0))
    bad[-1] ^= 0xFF
    assert pb.engine.handle_packet(bytes(bad), 1.2, "bad").verdict == DROP
    assert rec.data() == data
