"""The TCP connection state machine, as data.

Following h11's rule, everything that decides a transition lives in this file: how a segment is
classified into an `Event` (`classify`, `check_rst`) and the `TRANSITIONS` table. The tracker feeds
events in and acts on the state that comes out; it never decides a transition itself.

The machine tracks the connection as seen from the middle, not one endpoint's socket, so its states are
about both sides at once:

=============  =====================================================================================
SYN_SENT       the client's SYN passed
BOTH_SYN       the server answered with a SYN of its own (simultaneous open, split handshake): both SYNs
               passed, neither is acknowledged
SYN_RECV       the server acknowledged the client's SYN (its SYN-ACK passed); the client's ACK of the
               server's SYN is awaited
CLIENT_SYNACK  after BOTH_SYN, the client acknowledged the server's SYN (its SYN-ACK passed); the
               server's ACK of the client's SYN is awaited
ESTABLISHED    both SYNs are acknowledged
CLIENT_FIN     the client sent FIN, the server did not yet
SERVER_FIN     the server sent FIN, the client did not yet
BOTH_FIN       both sent FIN, not both acknowledged yet
TIME_WAIT      both FINs acknowledged: the connection is over; late retransmissions still pass
CLOSED         an acceptable RST passed: the connection is over
=============  =====================================================================================

A missing table entry means "no change"; `INVALID` entries are segments that no correct endpoint sends
in that state and the engine drops them. `REOPEN` means a SYN reuses the addresses and ports of a
finished connection: the tracker ends the old connection and starts a new one. `OLDER_CONNECTION` is the
server's ACK of a connection it still holds on these ports, in answer to a new SYN: it passes without a
transition when it is a bare ACK that does not acknowledge the SYN (`tracker.older_connection_ack`), and
so does the client's RST answering it (`check_rst`).

Simultaneous open and the split handshake (RFC 793 section 3.4, RFC 9293 3.5 figure 7): a SYN-SENT stack
that receives a SYN without ACK moves to SYN-RECEIVED and answers with a SYN-ACK that repeats its own
ISN; Linux, the BSDs and Windows all complete such a connection, so the gateway tracks it as they do
(BOTH_SYN, then SYN_RECV or CLIENT_SYNACK according to which side acknowledged first, then ESTABLISHED).
The split handshake (Beardsley and Qian, 2010) is the same exchange driven by a server: it answers the
client's SYN with a bare SYN, the client answers with a SYN-ACK, the server ends with an ACK. Devices that
name the SYN-ACK's sender the server then see the roles swapped and scan the server's download as the
client's upload. Here the roles never move after the first SYN: the client (`flow.srcip`) is the sender
of the first SYN the gateway saw, in a simultaneous open as in the split handshake, so 'up' is always
what reaches the host the client connected to, and rules keyed on direction or on `dstport` read the
same bytes as in a plain handshake. A segment without SYN from a side whose own SYN is not acknowledged
yet is invalid (an endpoint in SYN-RECEIVED sends no data before it is synchronised, and answers the
peer's SYN with a SYN-ACK, not a bare ACK); Linux's SYN-SENT also discards a bare ACK of its SYN, which
is what keeps the five-step variant of the split handshake (ACK first, then SYN) on this path.
"""

from __future__ import annotations

import enum
from typing import Final

from tcpguard.core.packet import ACK, FIN, RST, SYN

UP: Final = 0  # client to server
DOWN: Final = 1  # server to client


class State(enum.IntEnum):
    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    CLIENT_FIN = 4
    SERVER_FIN = 5
    BOTH_FIN = 6
    TIME_WAIT = 7
    CLOSED = 8
    BOTH_SYN = 9
    CLIENT_SYNACK = 10


class Event(enum.IntEnum):
    SYN = 1  # SYN without ACK
    SYNACK = 2  # SYN with ACK
    ACK = 3  # anything else without FIN or RST (pure ACK or data)
    FIN = 4  # FIN (with or without ACK and data)
    RST = 5  # an RST that closes (see check_rst)
    FINS_ACKED = 6  # an ACK after which both FINs are acknowledged
    ABORT = 7  # the gateway ended the connection itself (a rule, a limit, a timeout, eviction, shutdown)


class Action(enum.Enum):
    INVALID = 1
    REOPEN = 2
    OLDER_CONNECTION = 3


class Signing(enum.IntEnum):
    """What the gateway knows of TCP-MD5/AO signatures (RFC 2385, RFC 5925) on a connection.

    A receiver without a key for its peer discards a signed segment, so on a connection that did not
    negotiate signing a signed segment must not reach the rules, the streams or the state machine
    (adversarial E13, E18). tcpguard holds no keys: on a negotiated connection signatures are not
    verified, and signed segments are inspected like any other.
    """

    NONE = 0  # nothing negotiated (or unknown): a signed segment is one the receiver discards
    OFFERED = 1  # the client's SYN was signed; negotiated once the server's SYN or SYN-ACK is signed too
    NEGOTIATED = 2  # both sides sign
    # Picked up mid-stream with a signed segment from one side: tentative until the other side shows
    # whether it signs. An attacker can make the gateway forget a connection (idle timeout, eviction) and
    # then speak first with a signature; trusting that alone would switch the check off.
    UP_SIGNS = 3
    DOWN_SIGNS = 4


class Sig(enum.IntEnum):
    """What one segment says about signing (`sig_event`). Each exists per direction: index + d."""

    SYN = 0  # a signed SYN without ACK
    CROSSING_SYN = 2  # a signed SYN without ACK from the server while the client's SYN waits (SYN_SENT)
    SYNACK = 4  # a signed SYN-ACK
    EARLY = 6  # a signed segment without SYN while the client's SYN waits (the server's RST refusing it)
    SEGMENT = 8  # any other signed segment but an RST
    RST = 10  # a signed RST
    FIRST = 12  # the first segment of a connection picked up mid-stream, signed (not a bare SYN)
    UNSIGNED = 14  # a segment without a signature


#: The outcome of a signed segment no receiver takes: the engine drops it (`unexpected_signature` policy).
REFUSE: Final = -1

_G = Signing
# (signing, sig event + direction) -> new signing or REFUSE. Complete: `SIGNING` has every pair, built
# from the rows below and the two defaults after them, and `signing_step` raises on anything else.
_SIGNING_ROWS: dict[tuple[Signing, int], int] = {
    # A bare SYN is judged by the SYN path: it never changes or refuses signing here (a new connection
    # records its own, `OFFERED` if the client's SYN is signed).
    **{(g, Sig.SYN + d): g for g in Signing for d in (UP, DOWN)},
    **{(g, Sig.CROSSING_SYN + DOWN): g for g in Signing},
    (_G.OFFERED, Sig.CROSSING_SYN + DOWN): _G.NEGOTIATED,  # a signed SYN answering a signed SYN
    (_G.OFFERED, Sig.SYNACK + DOWN): _G.NEGOTIATED,  # a signed SYN-ACK answering a signed SYN
    (_G.OFFERED, Sig.SYNACK + UP): _G.OFFERED,  # the client's in a simultaneous open: still its offer
    (_G.OFFERED, Sig.EARLY + UP): _G.OFFERED,
    (_G.OFFERED, Sig.EARLY + DOWN): _G.OFFERED,  # e.g. the server's signed RST refusing the signed SYN
    # Picked up signed: tentative for the side that signed.
    **{(g, Sig.FIRST + UP): _G.UP_SIGNS for g in (_G.NONE, _G.OFFERED)},
    **{(g, Sig.FIRST + DOWN): _G.DOWN_SIGNS for g in (_G.NONE, _G.OFFERED)},
    # Tentative: the other side signing too settles it; the same side again is inspected as usual, but
    # its signed RST could be one the endpoint discards (E18); the other side not signing shows that
    # nothing was negotiated.
    **{
        (tentative, ev + other): _G.NEGOTIATED
        for tentative, other in ((_G.UP_SIGNS, DOWN), (_G.DOWN_SIGNS, UP))
        for ev in (Sig.SYNACK, Sig.EARLY, Sig.SEGMENT, Sig.RST, Sig.FIRST)
    },
    **{
        (tentative, ev + same): tentative
        for tentative, same in ((_G.UP_SIGNS, UP), (_G.DOWN_SIGNS, DOWN))
        for ev in (Sig.SYNACK, Sig.EARLY, Sig.SEGMENT, Sig.FIRST)
    },
    (_G.UP_SIGNS, Sig.UNSIGNED + DOWN): _G.NONE,
    (_G.DOWN_SIGNS, Sig.UNSIGNED + UP): _G.NONE,
    # Negotiated: signed segments are inspected like any other.
    **{(_G.NEGOTIATED, ev + d): _G.NEGOTIATED for ev in Sig for d in (UP, DOWN)},
}
SIGNING: Final[dict[tuple[Signing, int], int]] = {
    (g, ev + d): _SIGNING_ROWS.get((g, ev + d), g if ev == Sig.UNSIGNED else REFUSE)
    for g in Signing
    for ev in Sig
    for d in (UP, DOWN)
}


def sig_event(flags: int, signed: bool, d: int, first: bool, syn_sent: bool) -> int:
    """The signing event of a segment from direction `d` (an index of `SIGNING`'s second key)."""
    if not signed:
        return Sig.UNSIGNED + d
    if flags & SYN:
        if flags & ACK:
            return Sig.SYNACK + d if not first else Sig.FIRST + d
        return Sig.CROSSING_SYN + d if syn_sent and d == DOWN else Sig.SYN + d
    if first:
        return Sig.FIRST + d
    if syn_sent:
        return Sig.EARLY + d
    return Sig.RST + d if flags & RST else Sig.SEGMENT + d


def signing_step(signing: int, event: int) -> int:
    """The signing after `event`, or `REFUSE`. Every pair is in the table: a missing one is our bug."""
    return SIGNING[(Signing(signing), event)]


_S = State
_E = Event

# (state, direction, event) -> new state or action.
TRANSITIONS: Final[dict[tuple[State, int, Event], State | Action]] = {
    # Handshake.
    (_S.SYN_SENT, UP, _E.SYN): _S.SYN_SENT,  # retransmitted SYN
    (_S.SYN_SENT, DOWN, _E.SYNACK): _S.SYN_RECV,
    (_S.SYN_SENT, DOWN, _E.SYN): _S.BOTH_SYN,  # simultaneous open or split handshake
    (_S.SYN_SENT, UP, _E.ACK): Action.INVALID,  # data before the handshake
    # A server still holding an older connection on these ports (TIME_WAIT, half-open) answers the SYN
    # with an ACK of it; the client answers that with an RST, which clears it (RFC 9293 figures 9-11).
    (_S.SYN_SENT, DOWN, _E.ACK): Action.OLDER_CONNECTION,
    (_S.SYN_SENT, UP, _E.FIN): Action.INVALID,
    (_S.SYN_SENT, DOWN, _E.FIN): Action.INVALID,
    (_S.SYN_SENT, UP, _E.RST): _S.CLOSED,
    (_S.SYN_SENT, DOWN, _E.RST): _S.CLOSED,  # connection refused
    (_S.SYN_RECV, UP, _E.SYN): _S.SYN_RECV,  # retransmitted SYN: SYN-ACK was lost after us
    (_S.SYN_RECV, DOWN, _E.SYNACK): _S.SYN_RECV,
    (_S.SYN_RECV, UP, _E.ACK): _S.ESTABLISHED,
    (_S.SYN_RECV, UP, _E.FIN): _S.CLIENT_FIN,
    (_S.SYN_RECV, DOWN, _E.ACK): Action.INVALID,  # the server cannot send data before the client's ACK
    (_S.SYN_RECV, DOWN, _E.FIN): Action.INVALID,
    (_S.SYN_RECV, UP, _E.RST): _S.CLOSED,
    (_S.SYN_RECV, DOWN, _E.RST): _S.CLOSED,
    # The client's SYN-ACK after both SYNs (the server acknowledged first). After a plain handshake no
    # client sends one; the engine still requires it to repeat the client's ISN and acknowledge exactly
    # the server's SYN, so at worst it counts as the client's ACK a step early.
    (_S.SYN_RECV, UP, _E.SYNACK): _S.ESTABLISHED,
    # Both SYNs passed, none acknowledged (see the module docstring). Retransmitted SYNs stay here; each
    # side's SYN-ACK acknowledges the other's SYN.
    (_S.BOTH_SYN, UP, _E.SYN): _S.BOTH_SYN,
    (_S.BOTH_SYN, DOWN, _E.SYN): _S.BOTH_SYN,
    (_S.BOTH_SYN, UP, _E.SYNACK): _S.CLIENT_SYNACK,
    (_S.BOTH_SYN, DOWN, _E.SYNACK): _S.SYN_RECV,
    (_S.BOTH_SYN, UP, _E.ACK): Action.INVALID,
    (_S.BOTH_SYN, DOWN, _E.ACK): Action.INVALID,
    (_S.BOTH_SYN, UP, _E.FIN): Action.INVALID,
    (_S.BOTH_SYN, DOWN, _E.FIN): Action.INVALID,
    (_S.BOTH_SYN, UP, _E.RST): _S.CLOSED,
    (_S.BOTH_SYN, DOWN, _E.RST): _S.CLOSED,
    # The client acknowledged the server's SYN; the server's ACK (the split handshake's last step, or the
    # SYN-ACK of a simultaneous open) completes the connection.
    (_S.CLIENT_SYNACK, UP, _E.SYN): _S.CLIENT_SYNACK,
    (_S.CLIENT_SYNACK, UP, _E.SYNACK): _S.CLIENT_SYNACK,
    (_S.CLIENT_SYNACK, DOWN, _E.SYN): _S.CLIENT_SYNACK,
    (_S.CLIENT_SYNACK, DOWN, _E.SYNACK): _S.ESTABLISHED,
    (_S.CLIENT_SYNACK, DOWN, _E.ACK): _S.ESTABLISHED,
    (_S.CLIENT_SYNACK, DOWN, _E.FIN): _S.SERVER_FIN,
    (_S.CLIENT_SYNACK, UP, _E.ACK): Action.INVALID,  # the client's SYN is not acknowledged yet
    (_S.CLIENT_SYNACK, UP, _E.FIN): Action.INVALID,
    (_S.CLIENT_SYNACK, UP, _E.RST): _S.CLOSED,
    (_S.CLIENT_SYNACK, DOWN, _E.RST): _S.CLOSED,
    # Data transfer.
    (_S.ESTABLISHED, UP, _E.FIN): _S.CLIENT_FIN,
    (_S.ESTABLISHED, DOWN, _E.FIN): _S.SERVER_FIN,
    (_S.ESTABLISHED, UP, _E.RST): _S.CLOSED,
    (_S.ESTABLISHED, DOWN, _E.RST): _S.CLOSED,
    (_S.ESTABLISHED, DOWN, _E.SYNACK): _S.ESTABLISHED,  # SYN-ACK retransmitted after the client's ACK
    # Closing.
    (_S.CLIENT_FIN, DOWN, _E.FIN): _S.BOTH_FIN,
    (_S.CLIENT_FIN, UP, _E.RST): _S.CLOSED,
    (_S.CLIENT_FIN, DOWN, _E.RST): _S.CLOSED,
    (_S.SERVER_FIN, UP, _E.FIN): _S.BOTH_FIN,
    (_S.SERVER_FIN, UP, _E.RST): _S.CLOSED,
    (_S.SERVER_FIN, DOWN, _E.RST): _S.CLOSED,
    (_S.BOTH_FIN, UP, _E.FINS_ACKED): _S.TIME_WAIT,
    (_S.BOTH_FIN, DOWN, _E.FINS_ACKED): _S.TIME_WAIT,
    (_S.BOTH_FIN, UP, _E.RST): _S.CLOSED,
    (_S.BOTH_FIN, DOWN, _E.RST): _S.CLOSED,
    # After the end: a new SYN from either side reuses the ports for a new connection.
    (_S.TIME_WAIT, UP, _E.SYN): Action.REOPEN,
    (_S.TIME_WAIT, DOWN, _E.SYN): Action.REOPEN,
    (_S.CLOSED, UP, _E.SYN): Action.REOPEN,
    (_S.CLOSED, DOWN, _E.SYN): Action.REOPEN,
    (_S.TIME_WAIT, UP, _E.RST): _S.CLOSED,
    (_S.TIME_WAIT, DOWN, _E.RST): _S.CLOSED,
}

# A SYN (new ISN) in any live state is not a new connection: the endpoint answers it with a challenge
# ACK (RFC 5961), so an injected SYN must not make us forget the connection.
for _st in (_S.ESTABLISHED, _S.CLIENT_FIN, _S.SERVER_FIN, _S.BOTH_FIN):
    for _d in (UP, DOWN):
        TRANSITIONS[(_st, _d, _E.SYN)] = Action.INVALID

# The gateway's own end of a connection (Engine._finish): every state not over yet closes, whichever
# direction's packet (or the timer) caused it; the entry stays a while so the connection's late packets
# are still recognised and dropped.
for _st in State:
    if _st not in (_S.TIME_WAIT, _S.CLOSED):
        for _d in (UP, DOWN):
            TRANSITIONS[(_st, _d, _E.ABORT)] = _S.CLOSED

# States before both SYNs are acknowledged: a segment without SYN that completes the handshake must
# acknowledge the peer's SYN exactly (engine: `_handshake_ack`).
HANDSHAKE: Final = frozenset({State.SYN_SENT, State.BOTH_SYN, State.SYN_RECV, State.CLIENT_SYNACK})

# States in which the connection is over: `end_connection` has fired and no data is delivered.
FINISHED: Final = frozenset({State.TIME_WAIT, State.CLOSED})

# Timeout class of each state (the names of `tcpguard.core.settings.Timeouts` fields).
TIMEOUT_OF: Final[dict[State, str]] = {
    State.SYN_SENT: "syn_sent",
    State.BOTH_SYN: "syn_sent",
    State.SYN_RECV: "syn_recv",
    State.CLIENT_SYNACK: "syn_recv",
    State.ESTABLISHED: "established",
    State.CLIENT_FIN: "fin_wait",
    State.SERVER_FIN: "fin_wait",
    State.BOTH_FIN: "fin_wait",
    State.TIME_WAIT: "time_wait",
    State.CLOSED: "closed",
}


def opening_state(flags: int, midstream: bool) -> State:
    """The state a new entry starts in: the client's SYN passed, or (picked up mid-stream) a SYN-ACK
    passed, or any other segment, which can only belong to an established connection."""
    if not midstream:
        return State.SYN_SENT
    return State.SYN_RECV if flags & SYN else State.ESTABLISHED


def classify(flags: int, rst_ok: bool, fins_acked: bool) -> Event | None:
    """The event a segment stands for, or None for a segment that changes nothing (a refused RST).

    `rst_ok` is `check_rst(...) == RstCheck.CLOSE` for RST segments; `fins_acked` says that once
    this segment's ACK is taken into account, both directions' FINs are acknowledged.
    """
    if flags & RST:
        return Event.RST if rst_ok else None
    if flags & SYN:
        return Event.SYNACK if flags & ACK else Event.SYN
    if flags & FIN:
        return Event.FIN
    if fins_acked:
        return Event.FINS_ACKED
    return Event.ACK


def transition(state: State, direction: int, event: Event) -> State | Action:
    return TRANSITIONS.get((state, direction, event), state)


class RstCheck(enum.IntEnum):
    CLOSE = 1  # the receiver will accept it: forward it and end the connection
    PASS = 2  # in the window but not exact: the receiver answers with a challenge ACK (RFC 5961)
    DROP = 3  # outside the window: an injection attempt, never forwarded


def check_rst(
    state: State,
    seq_off: int,
    expected_off: int,
    window: int,
    ack_ok: bool,
    fin_acked: bool = False,
    owed: bool = False,
    ts_ok: bool = True,
) -> RstCheck:
    """What an RST does to the connection (RFC 793 and RFC 5961, seen from the middle).

    The rule behind every answer: the gateway closes only on an RST its receiver accepts, and drops one
    the receiver surely discards. Closing on an RST the endpoint ignores is the dangerous mistake: the
    gateway forgets a connection the endpoints keep, and picks it up later mid-stream, where the rules
    have lost its beginning (adversarial E17, E18, H1-H3). Dropping one the receiver would have taken only
    keeps both ends and the gateway agreeing that the connection lives.

    `seq_off` is the RST's sequence number as an offset in the sender's stream and `expected_off` the
    next offset of that stream the receiver expects (the end of what the gateway forwarded).

    `ack_ok`: in SYN_SENT, the RST acknowledges exactly the client's SYN (RFC 9293 3.10.7.3; Linux
    tcp_rcv_synsent_state_process compares it with SND.NXT); elsewhere, false only when the receiver
    also judges the ACK field of an RST: a listening Linux server's half-open connection (SYN_RECV, the
    client's RST) hands a segment whose ACK is not its ISS+1 to the listener, which discards an RST
    (tcp_check_req). `ts_ok`: the timestamp option passes the receiver's check (Linux SYN-SENT: a
    non-zero echo must lie between the first SYN's TSval and now; a half-open server: PAWS against the
    SYN's TSval); the engine judges it (`Engine._rst_timestamp_ok`).

    In SYN_SENT the client's own RST answering a server's ACK of an older connection (`owed`: it carries
    that ACK's acknowledgment number, and no ACK flag) passes without closing, since it clears the
    server's old state, not the new connection.
    Otherwise only an exact match closes; an RST elsewhere in the window passes, since the endpoint
    itself will challenge it and keep the connection, so we keep tracking it too; an RST outside the
    window, including the classic blind seq=0 RST, is an injection attempt and is dropped. (A Linux
    listener's half-open connection takes any in-window RST, not only the exact one; passing it without
    closing errs on the safe side: the server forgets, the gateway keeps an entry until it times out.)
    An RST fails no PAWS check in a synchronised Linux connection (tcp_validate_incoming accepts it
    whatever its timestamp), so timestamps are judged only in the two handshake cases above.

    `fin_acked`: the receiver acknowledged the sender's FIN, which sits at `expected_off`. It then expects
    the number after the FIN, and Linux also takes an RST at the FIN itself (tcp_reset_check, in
    CLOSE_WAIT, LAST_ACK and CLOSING): both close. An endpoint whose socket is gone answers the peer's last
    FIN with such an RST (a server whose TIME_WAIT table is full, or whose FIN_WAIT2 timed out); a
    connection left open here would refuse the client's next SYN on the same ports.
    """
    if not ts_ok:
        return RstCheck.DROP
    if state == State.SYN_SENT:
        if ack_ok:
            return RstCheck.CLOSE
        return RstCheck.PASS if owed else RstCheck.DROP
    if not ack_ok:
        return RstCheck.DROP
    if fin_acked:
        if seq_off == expected_off:
            return RstCheck.CLOSE
        expected_off += 1
    if seq_off == expected_off:
        return RstCheck.CLOSE
    if expected_off < seq_off < expected_off + max(window, 1):
        return RstCheck.PASS
    return RstCheck.DROP
