"""Every row of the state machine's tables, driven through the engine (tcpguard.core.state).

For each row of `TRANSITIONS` a playbook brings a connection into the row's state with real segments,
sends one segment (or, for ABORT, ends the connection from outside) that stands for the row's event
from the row's direction, and checks what the engine did: the new state, a drop for INVALID, a new
connection for REOPEN, the pass-through for OLDER_CONNECTION. The signing table is walked the same way
where a segment can reach a row, and checked for completeness where none can.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tcpguard.core.conntrack import Action as FlowAction
from tcpguard.core.conntrack import Connection
from tcpguard.core.decision import Verdict
from tcpguard.core.packet import ACK, RST, SYN
from tcpguard.core.state import (
    DOWN,
    REFUSE,
    SIGNING,
    TRANSITIONS,
    UP,
    Action,
    Event,
    Sig,
    Signing,
    State,
    sig_event,
    signing_step,
    transition,
)

from .playbook import Playbook

S = State


def _syn_sent(pb: Playbook) -> None:
    pb.client("S")


def _syn_recv(pb: Playbook) -> None:
    pb.client("S")
    pb.server("SA")


def _established(pb: Playbook) -> None:
    pb.handshake()


def _both_syn(pb: Playbook) -> None:
    pb.client("S")
    pb.server("S")  # a bare SYN answering the client's: simultaneous open or split handshake


def _client_synack(pb: Playbook) -> None:
    _both_syn(pb)
    pb.client("SA", seq=pb.cisn, ack=pb.sisn + 1)


def _client_fin(pb: Playbook) -> None:
    pb.handshake()
    pb.client("FA")


def _server_fin(pb: Playbook) -> None:
    pb.handshake()
    pb.server("FA")


def _both_fin(pb: Playbook) -> None:
    _client_fin(pb)
    pb.server("FA")


def _time_wait(pb: Playbook) -> None:
    _both_fin(pb)
    pb.client("A")


def _closed(pb: Playbook) -> None:
    pb.handshake()
    pb.client("R")


# How to bring a fresh playbook's connection into each state, with the segments real endpoints send.
REACH: dict[State, Callable[[Playbook], None]] = {
    S.SYN_SENT: _syn_sent,
    S.SYN_RECV: _syn_recv,
    S.ESTABLISHED: _established,
    S.BOTH_SYN: _both_syn,
    S.CLIENT_SYNACK: _client_synack,
    S.CLIENT_FIN: _client_fin,
    S.SERVER_FIN: _server_fin,
    S.BOTH_FIN: _both_fin,
    S.TIME_WAIT: _time_wait,
    S.CLOSED: _closed,
}


def _both_fin_server_first(pb: Playbook) -> None:
    # The server's FIN first, then the client's, which acknowledges it: the server's next ACK is the one
    # after which both FINs are acknowledged (FINS_ACKED from the server's side).
    _server_fin(pb)
    pb.client("FA")


def conn_of(pb: Playbook) -> Connection:
    conns = list(pb.engine.table)
    assert len(conns) == 1, conns
    return conns[0]


def send_event(pb: Playbook, state: State, d: int, event: Event) -> Verdict:
    """One segment from direction `d` that stands for `event` in `state` (or, for ABORT, an operator
    drop). Returns the engine's verdict."""
    side = pb.client if d == UP else pb.server
    isn = pb.cisn if d == UP else pb.sisn
    peer_isn = pb.sisn if d == UP else pb.cisn
    if event == Event.ABORT:
        out = pb.engine.act(conn_of(pb).id, FlowAction.DROP, pb.now)
        assert out is not None
        return Verdict.DROP
    if event == Event.SYN:
        return side("S", seq=isn).verdict
    if event == Event.SYNACK:
        return side("SA", seq=isn, ack=peer_isn + 1).verdict
    if event == Event.FIN:
        return side("FA").verdict
    if event == Event.RST:
        if state is S.SYN_SENT:
            # The server refusing the SYN (RST/ACK of exactly the SYN); the client aborting its own SYN
            # (an RST/ACK whose ACK is the server's next, which is 0 while the server has no ISN).
            return side("RA", ack=pb.cisn + 1 if d == DOWN else 0).verdict
        fin_sent = (d == UP and state in (S.CLIENT_FIN, S.BOTH_FIN)) or (
            d == DOWN and state in (S.SERVER_FIN, S.BOTH_FIN)
        )
        if fin_sent:
            # The receiver has not acknowledged the sender's FIN: it expects the FIN's own number.
            return side("RA", seq=(pb.cnext if d == UP else pb.snext) - 1).verdict
        return side("RA").verdict
    if event == Event.FINS_ACKED:
        return side("A").verdict
    assert event == Event.ACK
    if state is S.SYN_SENT and d == DOWN:
        return side("A", ack=pb.cisn + 1000).verdict  # the ACK of an older connection on these ports
    if state is S.SYN_RECV and d == UP:
        return side("A").verdict  # the client's ACK of the server's SYN
    if state is S.CLIENT_SYNACK and d == DOWN:
        return side("A", ack=pb.cisn + 1).verdict
    return side("A", data=b"x" if state in (S.ESTABLISHED,) else b"").verdict


ROWS = sorted(TRANSITIONS.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2]))


@pytest.mark.parametrize(
    ("key", "outcome"),
    ROWS,
    ids=[f"{s.name}-{'up' if d == UP else 'down'}-{e.name}" for (s, d, e), _ in ROWS],
)
def test_every_transition_row_is_what_the_engine_does(
    key: tuple[State, int, Event], outcome: State | Action
) -> None:
    state, d, event = key
    pb = Playbook()
    server_first = (state, d, event) == (S.BOTH_FIN, DOWN, Event.FINS_ACKED)
    (_both_fin_server_first if server_first else REACH[state])(pb)
    before = conn_of(pb)
    assert before.state is state, f"could not reach {state.name}: in {before.state.name}"
    verdict = send_event(pb, state, d, event)
    if outcome is Action.INVALID:
        assert verdict == Verdict.DROP
        assert conn_of(pb) is before and before.state is state
    elif outcome is Action.REOPEN:
        assert verdict == Verdict.ACCEPT
        after = conn_of(pb)
        assert after is not before and after.state is S.SYN_SENT
    elif outcome is Action.OLDER_CONNECTION:
        assert verdict == Verdict.ACCEPT
        assert conn_of(pb).state is state
    else:
        assert isinstance(outcome, State)
        assert conn_of(pb).state is outcome


def test_a_missing_row_changes_nothing() -> None:
    for state in State:
        for d in (UP, DOWN):
            for event in Event:
                if (state, d, event) not in TRANSITIONS:
                    assert transition(state, d, event) is state


def test_every_live_state_can_be_ended_by_the_gateway() -> None:
    live = [s for s in State if s not in (S.TIME_WAIT, S.CLOSED)]
    assert {s for (s, _, e) in TRANSITIONS if e == Event.ABORT} == set(live)


# ------------------------------------------------------------------------------------- signing


def test_the_signing_table_is_complete_and_only_refuses_signed_segments() -> None:
    assert set(SIGNING) == {(g, ev + d) for g in Signing for ev in Sig for d in (UP, DOWN)}
    for (g, ev), nxt in SIGNING.items():
        if ev - ev % 2 == Sig.UNSIGNED:
            assert nxt != REFUSE
        if g == Signing.NEGOTIATED:
            assert nxt == Signing.NEGOTIATED


@pytest.mark.parametrize(
    ("flags", "d", "first", "syn_sent", "event"),
    [
        (SYN, UP, False, False, Sig.SYN + UP),
        (SYN, DOWN, False, True, Sig.CROSSING_SYN + DOWN),
        (SYN, DOWN, False, False, Sig.SYN + DOWN),
        (SYN | ACK, DOWN, False, True, Sig.SYNACK + DOWN),
        (SYN | ACK, DOWN, True, False, Sig.FIRST + DOWN),
        (RST | ACK, DOWN, False, True, Sig.EARLY + DOWN),
        (ACK, UP, True, False, Sig.FIRST + UP),
        (RST, UP, False, False, Sig.RST + UP),
        (ACK, DOWN, False, False, Sig.SEGMENT + DOWN),
    ],
)
def test_a_signed_segment_is_classified(flags: int, d: int, first: bool, syn_sent: bool, event: int) -> None:
    assert sig_event(flags, True, d, first, syn_sent) == event
    assert sig_event(flags, False, d, first, syn_sent) == Sig.UNSIGNED + d


@pytest.mark.parametrize(
    ("start", "event", "after"),
    [
        (Signing.OFFERED, Sig.SYNACK + DOWN, Signing.NEGOTIATED),
        (Signing.OFFERED, Sig.CROSSING_SYN + DOWN, Signing.NEGOTIATED),
        (Signing.OFFERED, Sig.EARLY + DOWN, Signing.OFFERED),
        (Signing.OFFERED, Sig.SEGMENT + UP, REFUSE),
        (Signing.NONE, Sig.SEGMENT + DOWN, REFUSE),
        (Signing.NONE, Sig.FIRST + DOWN, Signing.DOWN_SIGNS),
        (Signing.DOWN_SIGNS, Sig.SEGMENT + UP, Signing.NEGOTIATED),
        (Signing.DOWN_SIGNS, Sig.SEGMENT + DOWN, Signing.DOWN_SIGNS),
        (Signing.DOWN_SIGNS, Sig.RST + DOWN, REFUSE),
        (Signing.DOWN_SIGNS, Sig.UNSIGNED + UP, Signing.NONE),
        (Signing.UP_SIGNS, Sig.UNSIGNED + UP, Signing.UP_SIGNS),
    ],
)
def test_signing_rows(start: Signing, event: int, after: int) -> None:
    assert signing_step(start, event) == after
