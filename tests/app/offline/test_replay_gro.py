"""Replay of captures taken on a host with GRO/TSO (issue 21): frames larger than the MTU whose TCP
checksum holds only the pseudo-header sum (never filled in: the NIC or the segmentation was to do it).

Replay takes such a frame as an aggregate and does not check its checksum, counts it and says so in the
summary; a frame that fits the MTU with the same unfilled checksum, and a frame over the MTU with any
other bad checksum, are dropped as bad checksums as before (the receiver would have dropped them)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from tcpguard.app.offline.replay import replay, unfilled_checksum
from tcpguard.core.conntrack import Connection
from tcpguard.core.packet import checksums_ok, decode, sum16_mod
from tcpguard.core.rules import RuleSet, rule, tcp_connection
from tcpguard.io.pcap import LINKTYPE_RAW, PcapWriter
from tests.core.playbook import Playbook

AGG = 45 * 1448


def unfill(raw: bytes) -> bytes:
    """`raw` with its TCP checksum as a GRO host captures it: the folded pseudo-header sum."""
    out = bytearray(raw)
    v4 = out[0] >> 4 == 4
    hl = (out[0] & 0x0F) * 4 if v4 else 40
    total = sum16_mod(bytes(out), 12, 20) if v4 else sum16_mod(bytes(out), 8, 40)
    total += 6 + len(out) - hl
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    struct.pack_into("!H", out, hl + 16, total)
    return bytes(out)


def capture(path: Path, family: str = "4") -> tuple[list[bytes], bytes]:
    """A connection whose client sends: an aggregate with an unfilled checksum (taken), a wire-sized
    segment with an unfilled checksum (dropped), an aggregate with a plainly wrong checksum (dropped),
    then a good segment. Returns the frames and the bytes the rules must see."""
    client, server = ("10.0.0.1", "10.0.0.2") if family == "4" else ("fd00::1", "fd00::2")
    pb = Playbook(client=client, server=server)
    seg = pb._seg
    frames = [
        seg(True, "S", b"", None, None, 65535, b"", 0),
        seg(False, "SA", b"", None, None, 65535, b"", 0),
    ]
    frames.append(seg(True, "A", b"", None, None, 65535, b"", 0))
    frames.append(seg(False, "A", b"", None, None, 65535, b"", 0))  # a scaled window: room for 64 KB
    agg = b"G" * AGG
    frames.append(unfill(seg(True, "A", agg, None, None, 65535, b"", 0)))
    at = pb.cnext
    frames.append(unfill(seg(True, "PA", b"small", at, None, 65535, b"", 0)))
    wrong = bytearray(seg(True, "A", b"W" * AGG, at, None, 65535, b"", 0))
    wrong[-1] ^= 0xFF
    frames.append(bytes(wrong))
    frames.append(seg(True, "PA", b"tail", at, None, 65535, b"", 0))
    with PcapWriter(path, LINKTYPE_RAW) as w:
        for i, f in enumerate(frames):
            w.write(f, 1.0 + i / 100)
    return frames, agg + b"tail"


def recorder() -> tuple[RuleSet, list[bytes]]:
    seen: list[bytes] = []

    @rule(on=tcp_connection.events.receive_data)
    def record(flow: Connection, stream: Any, current: Any, direction: str) -> None:
        if direction == "up":
            seen.append(current.read())

    return RuleSet.of(record), seen


def test_unfilled_checksum_recognises_only_the_pseudo_header_sum() -> None:
    frames, _ = capture(Path("/dev/null"))
    agg, small, wrong, tail = frames[4:]
    assert unfilled_checksum(agg) and unfilled_checksum(small)
    assert not checksums_ok(decode(agg))
    assert not unfilled_checksum(wrong) and not unfilled_checksum(tail)
    assert not unfilled_checksum(b"\x45" + bytes(19))  # not TCP


def test_replay_takes_aggregates_with_unfilled_checksums_and_says_so(tmp_path: Path) -> None:
    for family in ("4", "6"):
        path = tmp_path / f"gro{family}.pcap"
        _, want = capture(path, family)
        rules, seen = recorder()
        s = replay(path, rules, out=tmp_path / f"out{family}.pcap")
        assert b"".join(seen) == want
        assert s.unfilled == 1
        assert s.stats["bad_checksum"] == 2  # the small unfilled one, the wrong one
        text = "\n".join(s.lines())
        assert "frames over the MTU (1500) with their TCP checksum left to the NIC" in text
        assert "not checked: 1" in text
