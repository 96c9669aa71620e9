"""The NFQUEUE adapter's side of connection bypass (issue 20), driven with fake packets (no root).

A bypass decision must leave as NF_REPEAT with the bypass bit in the mark (the chain's CONNMARK rule needs
the bit on that very packet), never inside a batch verdict (which carries one mark for all), and after the
accepts decided before it. A packet that comes back already carrying the bit must not reach the engine a
second time: an operator chain that does not exempt the bit would otherwise loop it for ever. The live
side (the kernel really stops queueing the connection) is in tests/io/test_iptables_bypass.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from tcpguard.core.decision import Decision, Release, Verdict
from tcpguard.io.nfqueue import NfqueueAdapter, QueueStats
from tests.io.test_nfqueue import (
    AcceptAll,
    FakePacket,
    IdPacket,
    Scripted,
    _adapter,
    _batching,
    _verdict_batch,
)

BYPASS = 0x40000000


def bypass_decision(packet: bytes | None = None, **kw: Any) -> Decision:
    """`Decision(ACCEPT, bypass=True)` as the core makes it."""
    return Decision(Verdict.ACCEPT, packet=packet, bypass=True, **kw)


def marked(mark: int, log: list[str], name: str) -> FakePacket:
    pkt = FakePacket(log=log, name=name)
    pkt.mark = mark
    return pkt


def test_a_bypass_accept_is_repeated_with_the_bit_added_to_the_packets_mark() -> None:
    log: list[str] = []
    a, _ = _adapter(Scripted(bypass_decision(), Decision(Verdict.ACCEPT)), bypass_mark=BYPASS)
    a.process(marked(0x5, log, "p1"))  # an operator's mark bit is kept
    a.process(marked(0x5, log, "p2"))  # a plain accept stays a plain accept
    assert log == [f"repeat mark={BYPASS | 0x5:#x} p1", "accept p2"]
    s = a.stats
    assert (s.accepted, s.bypass_marked, s.bypass_looped) == (2, 1, 0)


def test_in_repeat_mode_the_mark_is_the_repeat_mark_with_the_bit() -> None:
    log: list[str] = []
    h = Scripted(bypass_decision(), Decision(Verdict.ACCEPT))
    a, _ = _adapter(h, bypass_mark=BYPASS, repeat_mark=0x7467)
    a.process(marked(0, log, "p1"))
    a.process(marked(0, log, "p2"))
    assert log == [f"repeat mark={0x7467 | BYPASS:#x} p1", "repeat mark=0x7467 p2"]


def test_a_rewritten_bypass_packet_carries_its_new_bytes() -> None:
    a, _ = _adapter(Scripted(bypass_decision(b"new")), bypass_mark=BYPASS)
    p = FakePacket()
    a.process(p)
    assert p.new_payload == b"new"
    assert p.verdict == f"repeat mark={BYPASS:#x}"
    assert (a.stats.rewritten, a.stats.bypass_marked) == (1, 1)


def test_a_bypass_accept_is_never_batched_and_goes_after_the_accepts_before_it() -> None:
    log: list[str] = []
    a, nl = _batching(
        Scripted(*[Decision(Verdict.ACCEPT)] * 2, bypass_decision(), Decision(Verdict.ACCEPT)),
        log,
        queue_num=2,
        bypass_mark=BYPASS,
    )
    for i in (1, 2, 3, 4):
        a.process(IdPacket(i, log))
    # p1 and p2 leave in one batch message first (no per-packet verdict), then p3 on its own with the bit.
    assert nl.sent == [_verdict_batch(2, 1, 2)]
    assert log == [f"repeat mark={BYPASS:#x} p3"]
    a._flush()
    assert log == [f"repeat mark={BYPASS:#x} p3", "accept p4"]  # a single pending accept: its own verdict


def test_releases_and_sends_of_a_bypass_decision_are_still_applied() -> None:
    log: list[str] = []
    held = FakePacket(log=log, name="held")
    h = Scripted(
        Decision(Verdict.HOLD), bypass_decision(releases=[Release(held, Verdict.ACCEPT)], send=[b"rst"])
    )
    a, _ = _adapter(h, log, bypass_mark=BYPASS)
    a.process(held)
    a.process(FakePacket(log=log, name="p2"))
    assert log == [f"repeat mark={BYPASS:#x} p2", "accept held", "send rst"]
    assert a.stats.holding == 0


@pytest.mark.parametrize("repeat_mark", [None, 0x7467])
def test_a_packet_arriving_with_the_bit_is_accepted_without_the_engine(
    repeat_mark: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    """The bypass verdict's own packet, queued again by a chain that did not exempt the bit: one plain
    accept, no engine call (a second bypass verdict would repeat it for ever), counted and logged once."""
    log: list[str] = []
    h = Scripted(Decision(Verdict.DROP))
    a, _ = _adapter(h, bypass_mark=BYPASS, repeat_mark=repeat_mark)
    back = (repeat_mark or 0) | BYPASS
    a.process(marked(back, log, "p1"))
    a.process(marked(back, log, "p2"))
    assert h.calls == []
    assert log == ["accept p1", "accept p2"]
    s = a.stats
    assert (s.bypass_looped, s.looped, s.accepted, s.packets) == (2, 0, 2, 2)
    errors = [r for r in caplog.records if "bypass bit" in r.getMessage()]
    assert len(errors) == 1
    assert f"--mark {BYPASS:#x}/{BYPASS:#x} -j CONNMARK" in errors[0].getMessage()
    a.process(marked(0, log, "p3"))  # an unmarked packet still goes to the engine
    assert log[-1] == "drop p3"


def test_an_arrival_with_the_bit_flushes_the_accepts_before_it() -> None:
    log: list[str] = []
    a, nl = _batching(Scripted(Decision(Verdict.ACCEPT), Decision(Verdict.ACCEPT)), log, bypass_mark=BYPASS)
    a.process(IdPacket(1, log))
    a.process(IdPacket(2, log))
    back = IdPacket(3, log)
    back.mark = BYPASS
    a.process(back)
    assert len(nl.sent) == 1 and log == ["accept p3"]


def test_without_a_bypass_mark_a_bypass_decision_is_a_plain_accept() -> None:
    log: list[str] = []
    a, _ = _adapter(Scripted(bypass_decision(), bypass_decision()), repeat_mark=0x7467)
    a.process(marked(0, log, "p1"))
    b, _ = _adapter(Scripted(bypass_decision()))
    b.process(marked(BYPASS, log, "p2"))  # the bit means nothing to an adapter without a bypass mark
    assert log == ["repeat mark=0x7467 p1", "accept p2"]
    assert a.stats.bypass_marked == b.stats.bypass_marked == b.stats.bypass_looped == 0


def test_bad_bypass_marks_are_refused() -> None:
    with pytest.raises(ValueError, match="single bit"):
        NfqueueAdapter(AcceptAll(), bypass_mark=0x3)
    with pytest.raises(ValueError, match="single bit"):
        NfqueueAdapter(AcceptAll(), bypass_mark=1 << 32)
    with pytest.raises(ValueError, match="repeat_mark"):
        NfqueueAdapter(AcceptAll(), bypass_mark=0x2, repeat_mark=0x7467)


def test_the_counters_are_in_the_stats_dict() -> None:
    assert {"bypass_marked", "bypass_looped"} <= set(QueueStats().as_dict())
