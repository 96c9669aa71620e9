"""The NFQUEUE adapter's GSO part without root (issue 21): the config messages laid out by hand from
linux/netfilter/nfnetlink_queue.h, the reader taking datagrams past NetfilterQueue's 4,096 bytes, the
NFQA_SKB_INFO of each queued packet and which checksums the engine is told to trust, and the fallbacks
when the kernel refuses the copy range or the GSO flag. tests/io/test_gso_live.py runs it for real."""

from __future__ import annotations

import errno
import os
import struct
from typing import Any

import pytest

from tcpguard.core.decision import Decision, Verdict
from tcpguard.io.nfqueue import (
    NFQ_COPY_LIMIT,
    NFQ_MAX_COPY,
    NFQ_RECV_SIZE,
    NfqueueAdapter,
    _BatchReader,
    _copy_range_message,
    _gso_message,
    _info_of,
    _Replay,
    _skb_info,
)
from tests.io.test_nfqueue import FakePacket, FakeSender, Scripted

CSUMNOTREADY, GSO, NOTVERIFIED = 1, 2, 4
PRE_ROUTING, LOCAL_IN, FORWARD, LOCAL_OUT, POST_ROUTING = range(5)


def nla(atype: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), atype) + value + b"\0" * (-len(value) % 4)


def packet_message(
    pid: int,
    payload: bytes,
    flags: int | None,
    hook: int = FORWARD,
    cap_len: int | None = None,
    pad: bool = False,
    before: bytes = b"",
) -> bytes:
    """An NFQNL_MSG_PACKET as nfqnl_build_packet_message writes it: packet header, interfaces, mark,
    timestamp, `before` (more attributes), NFQA_CAP_LEN (when cut short), NFQA_SKB_INFO (when a flag is
    set), the payload last and unpadded (`pad`: padded, as an older kernel might)."""
    attrs = nla(1, struct.pack("!IHB", pid, 0x0800, hook))  # NFQA_PACKET_HDR
    attrs += nla(5, struct.pack("!I", 2)) + nla(6, struct.pack("!I", 3))  # NFQA_IFINDEX_IN/OUTDEV
    attrs += nla(3, struct.pack("!I", 0x10)) + nla(4, struct.pack("!QQ", 1, 2))  # NFQA_MARK, TIMESTAMP
    attrs += before
    if cap_len is not None:
        attrs += nla(13, struct.pack("!I", cap_len))  # NFQA_CAP_LEN
    if flags is not None:
        attrs += nla(14, struct.pack("!I", flags))  # NFQA_SKB_INFO
    payload_attr = nla(10, payload)  # NFQA_PAYLOAD
    attrs += payload_attr if pad else payload_attr[: 4 + len(payload)]
    body = struct.pack("=BBH", 2, 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), 0x0300, 0, 0, 0) + body


class Datagrams:
    """The queue's socket: hands out the datagrams it holds, records the sizes it was asked for."""

    def __init__(self, *datagrams: bytes) -> None:
        self.datagrams = list(datagrams)
        self.asked: list[int] = []

    def recv(self, size: int) -> bytes:
        self.asked.append(size)
        return self.datagrams.pop(0)


def test_config_messages_layout() -> None:
    msg = _gso_message(7, 99)
    length, mtype, flags, seq = struct.unpack_from("=IHHI", msg)
    assert (length, mtype, flags, seq) == (len(msg), 0x0302, 0x5, 99)  # CONFIG, REQUEST|ACK
    assert msg[16:20] == b"\x00\x00\x00\x07"
    # NFQA_CFG_MASK and NFQA_CFG_FLAGS, both NFQA_CFG_F_GSO (1 << 2), big-endian.
    assert msg[20:36] == nla(4, b"\x00\x00\x00\x04") + nla(5, b"\x00\x00\x00\x04")
    msg = _copy_range_message(7, 99, NFQ_COPY_LIMIT)
    # NFQA_CFG_PARAMS: struct nfqnl_msg_config_params {__be32 copy_range; __u8 copy_mode;} packed, padded.
    assert msg[20:32] == struct.pack("=HH", 9, 2) + struct.pack("!IB", 65531, 2) + b"\0" * 3
    assert struct.unpack_from("=I", msg)[0] == len(msg) == 32


def test_skb_info_reads_id_flags_and_hook() -> None:
    big = b"\x45" + bytes(60000)
    assert _skb_info(packet_message(17, big, CSUMNOTREADY | GSO)) == (17, CSUMNOTREADY | GSO, FORWARD)
    assert _skb_info(packet_message(18, b"\x45" + bytes(39), None, LOCAL_OUT)) == (18, 0, LOCAL_OUT)
    # Cut short or garbage: never an exception, never an id it did not read.
    for junk in (packet_message(19, big, GSO)[:30], b"\x00" * 20, b"\xff" * 64):
        pid, _, _ = _skb_info(junk)
        assert pid in (-1, 19)


@pytest.mark.parametrize("flags", [None, 0, CSUMNOTREADY, CSUMNOTREADY | GSO, NOTVERIFIED, NOTVERIFIED | GSO])
@pytest.mark.parametrize(
    "layout",
    [
        {},
        {"cap_len": 70000},
        {"pad": True},  # not where the fast path looks: the walk
        {"before": nla(16, b"\0\0\0\1") + nla(17, b"\0\0\0\2")},  # NFQA_UID, NFQA_GID
        # NFQA_HWADDR whose address reads like an NFQA_SKB_INFO header: never a flag it does not have.
        {"before": nla(9, struct.pack("!HH", 6, 0) + struct.pack("=HH", 8, 14) + b"\x05\x05\0\0")},
    ],
)
def test_the_fast_lookup_agrees_with_the_walk(flags: int | None, layout: dict[str, Any]) -> None:
    for size in (1, 3, 40, 1500, NFQ_COPY_LIMIT):
        payload = b"\x45" + bytes(size - 1)
        msg = packet_message(77, payload, flags, PRE_ROUTING, **layout)
        assert _skb_info(msg) == (77, flags or 0, PRE_ROUTING)
        got = _info_of(msg, 77, size)
        assert got[1] == PRE_ROUTING
        if "before" in layout and flags is None:
            assert not got[0] & (CSUMNOTREADY | NOTVERIFIED)
        else:
            assert got[0] == (flags or 0)
        assert _info_of(msg, 78, size)[1] == -1  # another packet's datagram


def test_the_reader_takes_datagrams_past_4096_bytes() -> None:
    """NetfilterQueue asks for 4,096 bytes; the reader reads NFQ_RECV_SIZE, enough for the largest packet
    the kernel copies, and notes its NFQA_SKB_INFO."""
    dgram = packet_message(5, b"\x45" + bytes(NFQ_COPY_LIMIT - 1), CSUMNOTREADY | GSO)
    assert len(dgram) > NFQ_COPY_LIMIT
    sock = Datagrams(dgram)
    reader = _BatchReader(sock, NfqueueAdapter(Scripted()).stats, info=True)  # type: ignore[arg-type]
    reader.left = 1
    assert reader.recv(4096) == dgram
    assert sock.asked == [NFQ_RECV_SIZE] and len(dgram) <= NFQ_RECV_SIZE
    assert reader.data == dgram


def _gso_adapter(*decisions: Decision) -> tuple[NfqueueAdapter, Scripted, _BatchReader]:
    h = Scripted(*decisions)
    a = NfqueueAdapter(h, clock=lambda: 1.0)
    a.gso_on = True
    reader = a._reader = _BatchReader(Datagrams(), a.stats, info=True)  # type: ignore[arg-type]
    return a, h, reader


@pytest.mark.parametrize(
    ("flags", "hook", "trusted"),
    [
        (CSUMNOTREADY | GSO, FORWARD, True),  # a GRO aggregate: completed on the way out
        (CSUMNOTREADY, LOCAL_OUT, True),  # a local sender's offloaded checksum
        (None, FORWARD, True),  # no flag: the driver verified it
        (None, PRE_ROUTING, True),
        (NOTVERIFIED, FORWARD, False),  # nobody verified it: the engine must
        (NOTVERIFIED | GSO, FORWARD, False),
        (None, LOCAL_OUT, False),  # the kernel never says NOTVERIFIED here: no flag proves nothing
        (None, POST_ROUTING, False),
    ],
)
def test_which_checksums_the_engine_is_told_to_trust(flags: int | None, hook: int, trusted: bool) -> None:
    a, h, reader = _gso_adapter(Decision(Verdict.ACCEPT))
    pkt = FakePacket()
    reader.data = packet_message(pkt.id, pkt.payload, flags, hook)
    a.process(pkt)
    assert h.trusted == [trusted]
    assert a.stats.csum_trusted == int(trusted)
    assert a.stats.gso_packets == int(bool(flags and flags & GSO))
    assert a.stats.csum_partial == int(bool(flags and flags & CSUMNOTREADY))


def test_nothing_is_trusted_for_another_id_or_with_gso_off() -> None:
    a, h, reader = _gso_adapter(Decision(Verdict.ACCEPT), Decision(Verdict.ACCEPT))
    pkt = FakePacket()
    reader.data = packet_message(pkt.id + 1, pkt.payload, CSUMNOTREADY)
    a.process(pkt)
    a.gso_on = False
    pkt = FakePacket()
    reader.data = packet_message(pkt.id, pkt.payload, CSUMNOTREADY)
    a.process(pkt)
    assert h.trusted == [False, False] and a.stats.csum_trusted == 0


def test_replayed_datagrams_carry_their_info() -> None:
    """Packets read while waiting for a config ack go through _Replay, which notes their info too."""
    reader = _BatchReader(Datagrams(), NfqueueAdapter(Scripted()).stats, info=True)  # type: ignore[arg-type]
    replay = _Replay([packet_message(9, b"\x45", CSUMNOTREADY)], reader)
    assert replay.recv(4096) == reader.data
    assert _info_of(reader.data, 9, 1) == (CSUMNOTREADY, FORWARD)


class Kernel:
    """The queue's netlink socket as `_configure` uses it: acks every config message with the errno the
    test chose for its kind (copy range: NFQA_CFG_PARAMS; gso/fail-open: NFQA_CFG_FLAGS)."""

    def __init__(self, refuse: dict[str, int]) -> None:
        self.refuse = refuse
        self.answers: list[bytes] = []
        self.sent: list[str] = []
        self._r, self._w = os.pipe()
        os.write(self._w, b"x")  # always readable for select()

    def fileno(self) -> int:
        return self._r

    def sendto(self, msg: bytes, addr: Any) -> int:
        seq = struct.unpack_from("=I", msg, 8)[0]
        atype = struct.unpack_from("=H", msg, 22)[0]
        kind = "copy" if atype == 2 else {1: "fail-open", 4: "gso"}[msg[35]]
        self.sent.append(kind)
        code = -self.refuse.get(kind, 0)
        self.answers.append(struct.pack("=IHHII", 36, 2, 0, seq, 0) + struct.pack("=i", code) + msg[:16])
        return len(msg)

    def recv(self, size: int) -> bytes:
        return self.answers.pop(0)

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


@pytest.mark.parametrize(
    ("refuse", "gso_on", "copy"),
    [
        ({}, True, NFQ_COPY_LIMIT),
        ({"gso": errno.EOPNOTSUPP}, False, NFQ_COPY_LIMIT),  # a kernel before 3.10
        ({"gso": errno.EINVAL}, False, NFQ_COPY_LIMIT),
        ({"copy": errno.EINVAL}, False, NFQ_MAX_COPY),  # no GSO without a range that holds an aggregate
    ],
)
def test_fallbacks_when_the_kernel_refuses(
    refuse: dict[str, int], gso_on: bool, copy: int, caplog: pytest.LogCaptureFixture
) -> None:
    kernel = Kernel(refuse)
    try:
        a = NfqueueAdapter(Scripted(), fail_open=True)
        assert a._configure_queue(kernel) == []  # type: ignore[arg-type]
    finally:
        kernel.close()
    assert (a.gso_on, a.stats.gso, a.copy_range, a.stats.copy_range) == (gso_on, int(gso_on), copy, copy)
    assert kernel.sent == ["copy", "fail-open", "gso"] if copy == NFQ_COPY_LIMIT else ["copy", "fail-open"]
    if refuse:
        assert "GSO packets off" in caplog.text or "does not queue GSO packets whole" in caplog.text


def test_a_small_configured_copy_range_keeps_gso_off() -> None:
    kernel = Kernel({})
    try:
        a = NfqueueAdapter(Scripted(), copy_range=1500)
        a._configure_queue(kernel)  # type: ignore[arg-type]
    finally:
        kernel.close()
    assert kernel.sent == ["copy"] and not a.gso_on and a.copy_range == 1500


def test_gso_can_be_turned_off() -> None:
    kernel = Kernel({})
    try:
        a = NfqueueAdapter(Scripted(), gso=False)
        a._configure_queue(kernel)  # type: ignore[arg-type]
    finally:
        kernel.close()
    assert kernel.sent == ["copy"] and not a.gso_on


class OldHandler:
    """A handler written before checksum_trusted existed."""

    def handle_packet(self, raw: bytes, now: float, token: object) -> Decision:
        return Decision(Verdict.ACCEPT)


def test_a_handler_without_checksum_trusted_keeps_gso_off(caplog: pytest.LogCaptureFixture) -> None:
    """Its aggregates' partial checksums would all be dropped as bad: the adapter does not ask for them."""
    a = NfqueueAdapter(OldHandler())  # type: ignore[arg-type]
    assert not a.gso and "takes no checksum_trusted" in caplog.text
    assert NfqueueAdapter(Scripted()).gso


def test_no_rst_rides_the_verdict_of_a_gso_packet() -> None:
    """Decision.in_place names the RST that goes where the dropped packet was going; a GSO packet is
    dropped and that RST sent by the raw sender instead (tcpguard.io.nfqueue: the receiver did not take
    an RST put in place of an aggregate). A packet that is not GSO still carries it."""
    rst = b"rst"
    a, _, reader = _gso_adapter(
        Decision(Verdict.DROP, send=[rst], in_place=0), Decision(Verdict.DROP, send=[rst], in_place=0)
    )
    sender = FakeSender()
    a.sender = sender
    agg = FakePacket(b"\x45" + bytes(5000))
    reader.data = packet_message(agg.id, agg.payload, CSUMNOTREADY | GSO)
    a.process(agg)
    assert agg.verdict == "drop" and agg.new_payload is None and sender.sent == [rst]
    one = FakePacket()
    reader.data = packet_message(one.id, one.payload, CSUMNOTREADY)
    a.process(one)
    assert one.verdict == "accept" and one.new_payload == rst and sender.sent == [rst]
    assert a.stats.sent_in_place == 1 and a.stats.sent == 2
