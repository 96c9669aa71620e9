"""Connection bypass: listeners say they are done, the engine hands the connection to the kernel.

Each test is a packet exchange through the engine (tests/core/playbook.py); the decision's `bypass`
flag is what the NFQUEUE adapter turns into the kernel-side mark.
"""

from __future__ import annotations

from typing import Any

from tcpguard import rule, tcp_connection
from tcpguard.core.decision import Verdict
from tcpguard.core.engine import BYPASS_GRACE
from tcpguard.core.events import BypassLeak
from tcpguard.core.rules import RuleSet
from tcpguard.core.settings import EngineSettings

from .playbook import Playbook

ACCEPT, DROP, HOLD = Verdict.ACCEPT, Verdict.DROP, Verdict.HOLD


def settings(bypass: bool = True, depth_up: int = 0, depth_down: int = 0, **limits: Any) -> EngineSettings:
    st = EngineSettings()
    st.inspection.bypass = bypass
    st.inspection.depth_up = depth_up
    st.inspection.depth_down = depth_down
    for k, v in limits.items():
        setattr(st.limits, k, v)
    return st


def allow_all() -> RuleSet:
    @rule(on=tcp_connection.events.new_connection)
    def allow(flow: Any, pkt: Any) -> None:
        pass

    return RuleSet.of(allow)


def ended(pb: Playbook) -> list[str]:
    return [e["reason"] for e in pb.names("end_connection")]


def test_a_new_connection_only_rule_set_is_bypassed_at_the_handshake_ack() -> None:
    pb = Playbook(allow_all(), settings())
    assert not pb.client("S").bypass
    assert not pb.server("SA").bypass
    last = pb.client("A")
    assert last.verdict == ACCEPT and last.bypass
    assert ended(pb) == ["bypassed"]
    assert len(pb.engine.table) == 0 and pb.engine.stats.bypassed == 1
    # A packet queued behind the verdict: accepted uninspected, asking for the bypass again, counted.
    later = pb.client("PA", b"GET /bin/sh")
    assert (later.verdict, later.bypass, later.reason) == (ACCEPT, True, "bypassed")
    assert later.flow_id == last.flow_id
    assert pb.engine.stats.bypass_packets == 1
    assert pb.engine.stats.bypass_bytes == 40 + len(b"GET /bin/sh")
    assert pb.engine.stats.midstream == 0  # not picked up as a new mid-stream connection
    # The trace (replay --events) says which packets carried the bypass request.
    assert [e.get("bypass", False) for e in pb.names("verdict")] == [False, False, True, True]
    assert [e["flow"] for e in pb.names("bypass")] == [last.flow_id]


def test_bypass_off_keeps_tracking() -> None:
    pb = Playbook(allow_all(), settings(bypass=False))
    pb.handshake()
    d = pb.client("PA", b"hello")
    assert d.verdict == ACCEPT and not d.bypass
    assert len(pb.engine.table) == 1 and pb.engine.stats.bypassed == 0 and ended(pb) == []


def test_one_listener_done_does_not_bypass_while_another_still_wants() -> None:
    seen: dict[str, list[bytes]] = {"quick": [], "thorough": []}

    @rule(on=tcp_connection.events.receive_data, direction="up")
    def quick(flow: Any, stream: Any, current: Any, direction: str) -> None:
        seen["quick"].append(current.read())
        flow.done()

    @rule(on=tcp_connection.events.receive_data, direction="up")
    def thorough(flow: Any, stream: Any, current: Any, direction: str) -> None:
        data = current.read()
        seen["thorough"].append(data)
        if data == b"last":
            flow.done("up")

    pb = Playbook(RuleSet.of(quick, thorough), settings())
    pb.handshake()
    assert not pb.client("PA", b"one").bypass
    assert not pb.client("PA", b"two").bypass
    assert seen == {"quick": [b"one"], "thorough": [b"one", b"two"]}  # quick is not called again
    d = pb.client("PA", b"last")
    assert d.verdict == ACCEPT and d.bypass  # the down direction was never wanted (direction='up')
    assert ended(pb) == ["bypassed"]


def test_a_listener_for_other_ports_never_holds_a_connection() -> None:
    @rule(on=tcp_connection.events.receive_data, ports={80})
    def http_only(flow: Any, stream: Any, current: Any, direction: str) -> None:
        raise AssertionError("called on a connection to another port")

    pb = Playbook(RuleSet.of(http_only), settings(), sport=443)
    pb.client("S")
    pb.server("SA")
    assert pb.client("A").bypass
    pb80 = Playbook(RuleSet.of(http_only), settings(), sport=80)
    pb80.client("S")
    pb80.server("SA")
    assert not pb80.client("A").bypass


def test_a_streamed_listener_that_returns_is_done_with_its_direction() -> None:
    @rule(on=tcp_connection.events.receive_data, streamed=True, direction="up")
    def hello(flow: Any, stream: Any, current: Any, direction: str) -> None:
        flow.store["hello"] = current.read(8)

    pb = Playbook(RuleSet.of(hello), settings())
    pb.handshake()
    assert not pb.client("PA", b"hell").bypass  # waits for 8 bytes
    d = pb.client("PA", b"o, world")
    assert d.bypass


def test_a_streamed_listener_saying_done_while_waiting_is_ended() -> None:
    finished: list[str] = []

    @rule(on=tcp_connection.events.receive_data, streamed=True)
    def reader(flow: Any, stream: Any, current: Any, direction: str) -> None:
        try:
            while True:
                chunk = current.read(4)
                if chunk == b"stop":
                    flow.done()  # both directions; this one waits for nothing more
                if not chunk:
                    return
        finally:
            finished.append(direction)

    pb = Playbook(RuleSet.of(reader), settings())
    pb.handshake()
    assert not pb.server("PA", b"banner").bypass  # the down reader runs and waits
    d = pb.client("PA", b"stop")
    assert d.bypass
    assert sorted(finished) == ["down", "up"]  # both greenlets ended, their `finally` ran
    assert pb.engine.table.by_key == {}


def test_done_outside_receive_data_does_nothing() -> None:
    @rule(on=tcp_connection.events.new_connection)
    def early(flow: Any, pkt: Any) -> None:
        flow.done()

    calls: list[bytes] = []

    @rule(on=tcp_connection.events.receive_data, direction="up")
    def reader(flow: Any, stream: Any, current: Any, direction: str) -> None:
        calls.append(current.read())

    pb = Playbook(RuleSet.of(early, reader), settings())
    pb.handshake()
    assert not pb.client("PA", b"x").bypass
    assert calls == [b"x"]  # the new_connection listener's done() did not silence the reader


def test_held_bytes_keep_a_connection_until_released() -> None:
    @rule(on=tcp_connection.events.receive_data, direction="up")
    def holder(flow: Any, stream: Any, current: Any, direction: str) -> None:
        current.mark()  # hold the packets from here on
        flow.done()  # and never look again: nothing will release them but the connection's end

    pb = Playbook(RuleSet.of(holder), settings())
    pb.handshake()
    d = pb.client("PA", b"wait")
    assert d.verdict == HOLD and not d.bypass  # marked: the packet stays in the queue
    # The listener is done, so nothing will unmark: the connection stays tracked, never bypassed with a
    # packet held; it ends with its held packet released in order at end_connection.
    assert len(pb.engine.table) == 1
    d2 = pb.client("A")
    assert not d2.bypass


def test_a_new_syn_on_the_same_ports_is_a_new_connection() -> None:
    pb = Playbook(allow_all(), settings())
    pb.handshake()
    assert pb.engine.stats.bypassed == 1
    pb.client("FA")
    pb.cisn = pb.cnext = 90000
    d = pb.client("S")
    assert not d.bypass and d.reason != "bypassed"
    assert len(pb.engine.table) == 1 and len(pb.engine.bypassed) == 0
    assert pb.engine.stats.connections == 2


def test_bypassed_entries_expire_and_are_bounded() -> None:
    pb = Playbook(allow_all(), settings(max_connections=2))
    for port in (40001, 40002, 40003):
        pb.cport = port
        pb.handshake()
    assert pb.engine.stats.bypassed == 3
    assert [b.cport for b in pb.engine.bypassed] == [40002, 40003]  # the oldest went first
    closed = pb.engine.settings.timeouts.closed
    pb.engine.handle_timer(pb.now + closed + 11)
    assert len(pb.engine.bypassed) == 0


def test_packets_long_after_the_bypass_say_the_kernel_rule_is_missing() -> None:
    events: list[Any] = []
    pb = Playbook(allow_all(), settings())
    pb.engine.on_event = events.append
    pb.handshake()
    pb.client("PA", b"in flight")
    assert not [e for e in events if isinstance(e, BypassLeak)]
    d = pb.client("PA", b"much later", dt=BYPASS_GRACE + 1)
    assert d.bypass and d.verdict == ACCEPT
    leaks = [e for e in events if isinstance(e, BypassLeak)]
    assert len(leaks) == 1 and leaks[0].seconds > BYPASS_GRACE
    pb.client("PA", b"and again")
    assert len([e for e in events if isinstance(e, BypassLeak)]) == 1  # said once
    # It keeps being recognised while its packets come, beyond the short post-bypass lifetime.
    pb.engine.handle_timer(pb.now + pb.engine.settings.timeouts.closed + 11)
    assert len(pb.engine.bypassed) == 1


def test_depth_stops_the_rules_of_a_direction() -> None:
    calls: list[int] = []

    @rule(on=tcp_connection.events.receive_data)
    def reader(flow: Any, stream: Any, current: Any, direction: str) -> None:
        calls.append(len(current.read()))

    pb = Playbook(RuleSet.of(reader), settings(bypass=False, depth_up=10))
    pb.handshake()
    pb.client("PA", b"x" * 6)
    pb.client("PA", b"y" * 6)  # crosses the depth: still seen whole
    pb.client("PA", b"/bin/sh")  # past it: not seen
    assert calls == [6, 6]
    assert pb.engine.stats.depth_reached == 1
    pb.server("PA", b"reply")  # the other direction is still read
    assert calls == [6, 6, 5]
    assert len(pb.engine.table) == 1  # bypass off: still tracked


def test_depth_in_both_directions_with_bypass_hands_the_connection_over() -> None:
    @rule(on=tcp_connection.events.receive_data)
    def reader(flow: Any, stream: Any, current: Any, direction: str) -> None:
        current.read()

    pb = Playbook(RuleSet.of(reader), settings(depth_up=4, depth_down=4))
    pb.handshake()
    assert not pb.client("PA", b"abcd").bypass
    assert not pb.server("PA", b"wxyz").bypass
    assert not pb.client("PA", b"e").bypass  # the down direction is still wanted
    assert pb.server("PA", b"z").bypass


def test_a_reload_makes_the_new_rules_want_existing_connections() -> None:
    calls: list[bytes] = []

    @rule(on=tcp_connection.events.receive_data, direction="up")
    def reader(flow: Any, stream: Any, current: Any, direction: str) -> None:
        calls.append(current.read())

    pb = Playbook(RuleSet(), settings(bypass=False))
    pb.handshake()
    pb.client("PA", b"before")
    pb.engine.replace_rules(RuleSet.of(reader))
    pb.client("PA", b"after")
    assert calls == [b"after"]


def test_a_connection_uninspected_after_a_limit_is_bypassed_too() -> None:
    @rule(on=tcp_connection.events.receive_data, direction="up", streamed=True)
    def hoarder(flow: Any, stream: Any, current: Any, direction: str) -> None:
        current.read(10**9)  # never satisfied: the stream's buffer fills

    st = settings(max_stream_buffer=100)
    st.policies.limit = "accept"
    pb = Playbook(RuleSet.of(hoarder), st)
    pb.handshake()
    d = pb.client("PA", b"x" * 150)
    assert d.verdict == ACCEPT and ended(pb) == ["uninspected"]
    assert pb.client("PA", b"more").bypass


def test_a_trusted_checksum_is_not_verified() -> None:
    pb = Playbook(allow_all(), settings(bypass=False))
    pb.handshake()
    raw = bytearray(pb._seg(True, "PA", b"data", None, None, 65535, b"", 0))
    raw[-1] ^= 0xFF  # the payload changed after the checksum was computed
    pb.now += 0.001
    assert pb.engine.handle_packet(bytes(raw), pb.now, None, checksum_trusted=True).verdict == ACCEPT
    raw2 = bytearray(pb._seg(True, "PA", b"more", None, None, 65535, b"", 0))
    raw2[-1] ^= 0xFF
    d = pb.engine.handle_packet(bytes(raw2), pb.now, None)
    assert (d.verdict, d.reason) == (DROP, "bad checksum")


# ============================================================================================ property
from hypothesis import given  # noqa: E402
from hypothesis import settings as hsettings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from .test_properties import Schedule, schedules  # noqa: E402


def _scanner(seen: bytearray, enough: int) -> RuleSet:
    @rule(on=tcp_connection.events.receive_data, direction="up")
    def scanner(flow: Any, stream: Any, current: Any, direction: str) -> None:
        seen.extend(current.read())
        if len(seen) >= enough:
            flow.done()

    return RuleSet.of(scanner)


def _play(sched: Schedule, bypass: bool, enough: int) -> tuple[list[Any], bytearray]:
    seen = bytearray()
    pb = Playbook(_scanner(seen, enough), settings(bypass=bypass), cisn=7000)
    pb.handshake()
    base = 7001
    out = []
    for (off, payload), ack in zip(sched.segments, sched.acks, strict=True):
        d = pb.client("PA", payload, seq=base + off)
        out.append((d.verdict, d.packet, d.bypass, d.reason, [(r.token, r.verdict) for r in d.releases]))
        if ack:
            pb.server("A", ack=base + len(seen))
    return out, seen


@hsettings(max_examples=120, deadline=None)
@given(sched=schedules(max_len=3000), enough=st.integers(1, 3000))
def test_bypass_changes_no_verdict_before_it_and_accepts_everything_after(
    sched: Schedule, enough: int
) -> None:
    """Any segmentation, reordering and duplication: with bypass on, the rules see exactly what they see
    with it off, every verdict up to the bypass is the same, the bypass rides an ACCEPT, and every later
    packet is accepted uninspected with the bypass request."""
    off_run, seen_off = _play(sched, False, enough)
    on_run, seen_on = _play(sched, True, enough)
    assert seen_on == seen_off
    cut = next((i for i, v in enumerate(on_run) if v[2]), None)
    if cut is None:
        assert on_run == off_run
        assert len(seen_on) < enough or any(v[0] == HOLD for v in on_run)
        return
    assert on_run[:cut] == off_run[:cut]
    # The bypass rides the ACCEPT the packet gets anyway (with any held packets it releases, in order).
    assert on_run[cut][0] == ACCEPT
    assert (on_run[cut][:2], on_run[cut][4]) == (off_run[cut][:2], off_run[cut][4])
    assert all(v[0] == ACCEPT and v[2] and v[3] == "bypassed" for v in on_run[cut + 1 :])
    assert len(seen_on) >= enough


# ============================================================================================ review fixes
def test_a_streamed_listener_that_says_done_and_returns_does_not_end_another() -> None:
    seen: list[bytes] = []

    @rule(on=tcp_connection.events.receive_data, streamed=True, direction="up")
    def quick(flow: Any, stream: Any, current: Any, direction: str) -> None:
        current.read(1)
        flow.done()  # and returns: its request must not be taken as the next listener's

    @rule(on=tcp_connection.events.receive_data, streamed=True, direction="up")
    def patient(flow: Any, stream: Any, current: Any, direction: str) -> None:
        while chunk := current.read(4):
            seen.append(chunk)

    pb = Playbook(RuleSet.of(quick, patient), settings())
    pb.handshake()
    assert not pb.client("PA", b"abcd").bypass  # patient still wants the client's bytes
    assert not pb.client("PA", b"efgh").bypass
    assert seen == [b"abcd", b"efgh"]
    assert len(pb.engine.table) == 1


def test_after_a_reload_a_finished_streamed_listener_does_not_hold_the_connection() -> None:
    @rule(on=tcp_connection.events.receive_data, streamed=True, direction="up")
    def hello(flow: Any, stream: Any, current: Any, direction: str) -> None:
        current.read(2)

    @rule(on=tcp_connection.events.receive_data, direction="down")
    def server(flow: Any, stream: Any, current: Any, direction: str) -> None:
        if current.read() == b"bye":
            flow.done()

    rules = RuleSet.of(hello, server)
    pb = Playbook(rules, settings())
    pb.handshake()
    assert not pb.client("PA", b"hi").bypass  # hello finished; server still wants 'down'
    pb.engine.replace_rules(rules)  # the same rules again (a SIGHUP)
    assert pb.server("PA", b"bye").bypass  # nothing is left wanting


def test_a_syn_ack_on_a_bypassed_connections_ports_is_not_bypassed() -> None:
    pb = Playbook(allow_all(), settings())
    pb.handshake()
    assert len(pb.engine.bypassed) == 1
    d = pb.server("SA", seq=999_000, ack=pb.cnext)  # a new connection's SYN-ACK on the same ports
    assert not d.bypass and d.reason != "bypassed"
    assert len(pb.engine.bypassed) == 0


def test_reaching_the_depth_releases_what_a_mark_held() -> None:
    @rule(on=tcp_connection.events.receive_data, direction="up")
    def marker(flow: Any, stream: Any, current: Any, direction: str) -> None:
        current.mark()  # holds everything from here, never unmarks

    pb = Playbook(RuleSet.of(marker), settings(bypass=False, depth_up=4))
    pb.handshake()
    assert pb.client("PA", b"abcd", token=1).verdict == HOLD
    d = pb.client("PA", b"efgh", token=2)  # past the depth: nobody will lift the mark
    assert d.verdict == ACCEPT
    assert [(r.token, r.verdict) for r in d.releases] == [(1, ACCEPT)]
