"""The tracker: does this segment belong to the connection as its receiver sees it, and what does it do
to the connection's TCP state?

The engine asks, in order, for every segment of a tracked connection: its signing (`signing`), then for
a SYN `judge_syn` and `take_syn`, for an RST `judge_rst`, for anything else `judge_segment`. Each
answer is a state (or a `state.Action`) from the tables in `tcpguard.core.state`, plus the reason to
drop when the receiving stack would discard the segment. Nothing here touches the streams' bytes, the
rules or the verdict: the engine does, with these answers.

The principle everywhere: the gateway must not be easier to fool than the endpoints. A segment the
receiver discards must not change what the gateway believes (a forged RST that closes the connection at
the gateway only, a SYN-ACK that fixes the wrong ISN), and one the receiver takes must not be refused
(the connection would stall). Where the stacks differ, the check follows Linux and says so.
"""

from __future__ import annotations

from typing import Final

from tcpguard.core.conntrack import Connection
from tcpguard.core.errors import DecodeError
from tcpguard.core.packet import ACK, FIN, RST, URG, Packet
from tcpguard.core.state import (
    DOWN,
    REFUSE,
    UP,
    Action,
    Event,
    RstCheck,
    State,
    check_rst,
    classify,
    sig_event,
    signing_step,
    transition,
)
from tcpguard.core.stream import HalfStream

_SYN_SENT: Final = State.SYN_SENT


def signing(conn: Connection, pkt: Packet, d: int, first: bool) -> bool:
    """Take a signed segment's effect on the connection's TCP-MD5/AO signing (the `SIGNING` table of
    `tcpguard.core.state`). False: the receiver discards it (no key for its peer), and so must the gateway
    unless the `unexpected_signature` policy passes it; the signing is then unchanged."""
    ev = sig_event(pkt.flags, True, d, first, conn.state is _SYN_SENT)
    nxt = signing_step(conn._auth, ev)
    if nxt == REFUSE:
        return False
    conn._auth = nxt
    return True


def judge_syn(
    conn: Connection, pkt: Packet, d: int, s: HalfStream, o: HalfStream
) -> tuple[State | Action, str]:
    """A segment with SYN from direction `d` (`s` its stream, `o` the other): the state it leads to (or
    REOPEN), and a drop reason when the receiver discards it ("" when it does not)."""
    flags = pkt.flags
    state = conn.state
    if flags & (RST | FIN):
        return Action.INVALID, "invalid flag combination"
    ev = classify(flags, False, False)
    assert ev is not None  # a SYN is always an event
    nxt = transition(state, d, ev)
    if nxt is Action.REOPEN:
        return nxt, ""
    if not isinstance(nxt, State) or pkt.seq != (s.isn if s.isn >= 0 else pkt.seq):
        return Action.INVALID, f"SYN invalid in {state.name}"
    if ev == Event.SYNACK:
        if o.isn >= 0 and pkt.ack != (o.isn + 1) & 0xFFFFFFFF:
            return Action.INVALID, "SYN-ACK acknowledges the wrong ISN"
        if state is _SYN_SENT and not echo_fits(conn, pkt):
            # The client's SYN-SENT discards it (Linux: PAWSActiveRejected) and answers with an RST;
            # taking it would fix the wrong server ISN and refuse the real SYN-ACK.
            return Action.INVALID, "SYN-ACK echoes a timestamp never sent"
    return nxt, ""


def take_syn(conn: Connection, pkt: Packet, d: int, s: HalfStream, o: HalfStream) -> None:
    """Record what an accepted SYN or SYN-ACK fixes: the sender's ISN, the window scales (on when both
    SYNs offered it, RFC 7323), the client's SYN timestamps, the receiver's first window."""
    flags = pkt.flags
    synack = bool(flags & ACK)
    s.isn = pkt.seq
    if d == DOWN:
        wscale = pkt.options().wscale
        if wscale is None or conn.wscale_client < 0:
            conn.wscale_client = conn.wscale_server = 0
        else:
            conn.wscale_server = wscale
        if not conn.midstream:
            conn.up.wscale = conn.wscale_server
            conn.down.wscale = conn.wscale_client
    elif not synack:
        syn_timestamp(conn, pkt)  # a retransmitted SYN: the client's clock moved on
    if not conn.midstream and (d == DOWN or synack):
        # The window in any segment with SYN is never scaled. A bare SYN from the server (a simultaneous
        # open or a split handshake) carries its window as a SYN-ACK does.
        o.ack(0, pkt.window)


def judge_rst(conn: Connection, pkt: Packet, d: int, s: HalfStream, o: HalfStream) -> RstCheck:
    """What an RST from direction `d` does: close the connection, pass without closing, or be dropped
    (`state.check_rst`, fed with what the receiver checks in this state)."""
    flags = pkt.flags
    state = conn.state
    if state == State.SYN_SENT:
        ack_ok = bool(flags & ACK) and pkt.ack == (o.isn + 1) & 0xFFFFFFFF
        # The client's answer to an older connection's ACK (older_connection_ack).
        owed = d == UP and pkt.seq == s.owed_rst and not flags & (ACK | URG) and not pkt.payload
        ts_ok = d == UP or echo_fits(conn, pkt)
        return check_rst(state, 0, 0, 0, ack_ok, owed=owed, ts_ok=ts_ok)
    wnd = s.wnd_end - s.next if s.wnd_end >= 0 else 65535
    fin_acked = 0 <= s.fin_off < s.acked
    ack_ok = ts_ok = True
    if state is State.SYN_RECV and d == UP and not conn.midstream:
        # The server's half-open connection: a listening Linux server hands an RST whose ACK is not its
        # ISS+1 to the listener, which discards it, and applies PAWS to it against the SYN's timestamp
        # (tcp_check_req).
        ack_ok = not flags & ACK or pkt.ack == (o.isn + 1) & 0xFFFFFFFF
        ts_ok = tsval_not_older(conn, pkt)
    return check_rst(state, s.offset(pkt.seq), s.next, wnd, ack_ok, fin_acked, ts_ok=ts_ok)


def judge_segment(
    conn: Connection, pkt: Packet, d: int, o: HalfStream, fresh: bool
) -> tuple[State | Action, str]:
    """A segment without SYN or RST outside the steady ESTABLISHED path: the transition its flags stand
    for before its data is taken (INVALID, OLDER_CONNECTION or a state), with a drop reason when the
    receiver discards it. `fresh`: the first segment of a connection picked up mid-stream, which is taken
    whatever the state guessed for it says."""
    flags = pkt.flags
    state = conn.state
    pre = transition(state, d, Event.FIN if flags & FIN else Event.ACK)
    if pre is Action.INVALID and not fresh:
        return pre, f"segment invalid in {state.name}"
    if state is State.CLIENT_SYNACK and d == DOWN and o.offset(pkt.ack) < 0:
        # The server's ACK that would end a simultaneous open or split handshake must acknowledge the
        # client's SYN, or the client (in SYN-RECEIVED) does not take it.
        return Action.INVALID, "ACK does not acknowledge the SYN"
    return pre, ""


def older_connection_ack(conn: Connection, pkt: Packet) -> str:
    """A segment from the server while the client's SYN waits for its SYN-ACK, neither SYN, RST nor FIN
    (state.py: `OLDER_CONNECTION`): "" (forward it) if it is a bare ACK of an older connection, else the
    drop reason.

    A server that still holds an older connection on these ports (in TIME_WAIT, or half-open after a
    crash) answers a new SYN with an ACK of that connection (RFC 9293 3.5, figures 9-11; Linux does so
    for a SYN that TIME_WAIT does not accept). The client in SYN-SENT answers an ACK that does not
    acknowledge its SYN with an RST whose sequence number is that ACK's acknowledgment number, and keeps
    waiting; the RST clears the server's old state and the client's next SYN connects. A router forwards
    both. Dropping the ACK would leave the client retransmitting its SYN into the old state until it
    times out (a minute for TIME_WAIT): the gateway forwards it, remembers its number for the client's
    RST, and changes nothing else. It carries no data the client could take: one with data or URG,
    without ACK, or that does acknowledge the SYN without being a SYN-ACK, is dropped."""
    o = conn.up
    if pkt.payload or pkt.flags & (ACK | URG) != ACK or pkt.ack == (o.isn + 1) & 0xFFFFFFFF:
        return "segment invalid in SYN_SENT"
    o.owed_rst = pkt.ack
    return ""


def syn_timestamp(conn: Connection, pkt: Packet) -> None:
    """Note the TSval of a client SYN (the first one and the latest, as `_syn_ts`: first << 32 | last).

    Linux's SYN-SENT takes an RST/ACK or a SYN-ACK whose timestamp echo is non-zero only if the echo lies
    between the time it first sent the SYN and now (tcp_rcv_synsent_state_process: the
    PAWSActiveRejected check); a peer echoes the TSval of a SYN it received, so the SYNs the gateway
    forwarded bound every echo the client takes from an honest peer. The options of a SYN were validated
    by `decode`.
    """
    tsv = pkt.options().ts_val
    if tsv is None:
        return
    ts = conn._syn_ts
    if ts < 0:
        conn._syn_ts = tsv << 32 | tsv
        return
    first, last = ts >> 32, ts & 0xFFFFFFFF
    if (tsv - first) & 0xFFFFFFFF > (last - first) & 0xFFFFFFFF:
        conn._syn_ts = first << 32 | tsv


def echo_fits(conn: Connection, pkt: Packet) -> bool:
    """Whether the client in SYN-SENT accepts this segment's timestamp echo (see `syn_timestamp`).

    No option, or an echo of 0 (Linux checks only a non-zero one): it fits. An echo when the client's SYN
    carried no timestamp cannot be one the client sent: it does not fit. A malformed option block does
    not fit either: the gateway cannot tell what the client parses, and dropping an RST or SYN-ACK that no
    correct peer sends is the side that cannot desynchronise the two."""
    if pkt.tcp_hlen <= 20:
        return True
    try:
        ecr = pkt.options().ts_ecr
    except DecodeError:
        return False
    if not ecr:
        return True
    ts = conn._syn_ts
    if ts < 0:
        return False
    first, last = ts >> 32, ts & 0xFFFFFFFF
    return (ecr - first) & 0xFFFFFFFF <= (last - first) & 0xFFFFFFFF


def tsval_not_older(conn: Connection, pkt: Packet) -> bool:
    """PAWS as a Linux server's half-open connection applies it to the client's RST: a TSval older than
    the latest SYN's is refused (tcp_check_req, tcp_paws_reject). A SYN whose TSval was 0 turns the check
    off (tcp_paws_check)."""
    ts = conn._syn_ts
    if ts < 0 or pkt.tcp_hlen <= 20 or not ts & 0xFFFFFFFF:
        return True
    try:
        tsv = pkt.options().ts_val
    except DecodeError:
        return False
    return tsv is None or (tsv - (ts & 0xFFFFFFFF)) & 0xFFFFFFFF < 0x80000000
