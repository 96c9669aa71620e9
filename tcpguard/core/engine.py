"""The engine: raw packet and a clock in, `Decision` out. Decode, track, reassemble, dispatch, decide.

The NFQUEUE daemon and the pcap replay both drive this class, so every offline test exercises the
production path. It never reads the wall clock (`now` comes with each call) and never touches a socket.

Per-packet order of work (`_track`): sanity of SYN/RST against the state machine, acknowledgements
(which move retention and window edges), the payload through the reassembler, rule dispatch on the
bytes that became contiguous, then the state transition. Rules always run before the verdict that
forwards their bytes, which is the inline invariant.

Normalisations, each documented where it happens: data on SYN and on RST is stripped (Linux never
delivers it to the application without TCP Fast Open, so passing it would let bytes by that the rules
never saw); the urgent flag and pointer are cleared (a receiver would otherwise pull the urgent byte out
of the stream the application reads); conflicting retransmissions are rewritten to the first copy.
Segments the receiver discards are dropped before they touch any state: no ACK flag after the handshake,
ACKs of data never forwarded, and a TCP-MD5/AO option on a connection that did not negotiate one
(`tracker.signing`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from tcpguard.core import forge, tracker
from tcpguard.core.conntrack import (
    Action,
    BypassedFlow,
    BypassTable,
    Connection,
    ConnTable,
    direction_mask,
    flow_key,
)
from tcpguard.core.decision import Decision, Output, Release, Verdict
from tcpguard.core.dispatch import EventSink, RuleDispatch
from tcpguard.core.errors import DecodeError
from tcpguard.core.events import Blocked, BypassLeak, EventListener, Evicted, Evictions, LimitHit
from tcpguard.core.flowstore import pack_store
from tcpguard.core.limits import Limits
from tcpguard.core.packet import ACK, FIN, RST, SYN, URG, Packet, checksums_ok, decode
from tcpguard.core.rules import Rule, RuleSet
from tcpguard.core.settings import EngineSettings
from tcpguard.core.state import (
    DOWN,
    FINISHED,
    TIMEOUT_OF,
    UP,
    Event,
    RstCheck,
    Sig,
    Signing,
    State,
    classify,
    opening_state,
    signing_step,
    transition,
)
from tcpguard.core.state import (
    Action as StateAction,
)
from tcpguard.core.stats import Stats
from tcpguard.core.stream import DROP as SEG_DROP
from tcpguard.core.stream import HOLD as SEG_HOLD
from tcpguard.core.stream import LIMIT as SEG_LIMIT
from tcpguard.core.stream import HalfStream, Held, Ledger

ACCEPT: Final = Verdict.ACCEPT
DROP: Final = Verdict.DROP
HOLD: Final = Verdict.HOLD
#: Distinct reasons `Engine.drops` counts; past it a new one counts as "other". The engine's reasons come
#: from a fixed set (the text after a colon, which may vary, is not part of the key), so this only guards
#: the bound against a future reason with variable text before its colon.
MAX_DROP_REASONS: Final = 64
#: Seconds after its bypass verdict during which packets of a bypassed connection reaching the engine are
#: expected (they were queued behind that verdict); later ones mean the kernel's rule is missing.
BYPASS_GRACE: Final = 2.0
#: Seconds between sweeps of expired bypassed-connection entries, and at least between two BypassLeak
#: events (one per missing rule is enough; a line per connection would flood the log).
BYPASS_SWEEP: Final = 10.0
BYPASS_LEAK_EVERY: Final = 60.0

# Enum members looked up on the class cost a metaclass call each; the hot path uses module constants.
_ESTABLISHED: Final = State.ESTABLISHED
_SYN_SENT: Final = State.SYN_SENT
_NEGOTIATED: Final = Signing.NEGOTIATED
_UP_SIGNS: Final = Signing.UP_SIGNS


class Engine:
    """The sans-IO TCP filtering engine."""

    def __init__(
        self,
        settings: EngineSettings | None = None,
        rules: RuleSet | None = None,
        sink: EventSink | None = None,
    ) -> None:
        self.settings = settings or EngineSettings()
        self.table = ConnTable()
        self.stats = Stats()
        # The rules and how they are called (plain, streamed, their alerts): tcpguard.core.dispatch.
        self.dispatch = RuleDispatch(rules or RuleSet(), self.stats)
        # Inside the class the callables are called through these private attributes, never through
        # their properties: compiled by mypyc, `self.sink(ev)` on a property calls the getter and drops
        # the result, so nothing is delivered (the replay events were silently empty once).
        self._sink = sink
        self.dispatch.sink = sink
        self._on_event: EventListener | None = None
        self.now = 0.0
        # Bytes buffered and packets held by all streams, which report to it (tcpguard.core.stream).
        self.ledger = Ledger()
        self.limits = Limits(self.ledger)
        # Packets answered DROP at once, by reason (the reason up to its first colon): `stats.dropped`
        # says how many, this says why, for an operator asking why a connection stalls.
        self.drops: dict[str, int] = {}
        self._out: Output | None = None  # releases/sends gathered while handling one input
        self._evicted_unlogged = 0
        # Connections handed to the kernel (Inspection.bypass): what is left of them (conntrack.BypassTable).
        self.bypassed = BypassTable()
        self.bypassed.grace = BYPASS_GRACE
        self._bypass_leak_said = -BYPASS_LEAK_EVERY
        self._read_settings()

    @property
    def buffered(self) -> int:
        """Bytes in all stream buffers (in order and out of order)."""
        return self.ledger.buffered

    @property
    def held_packets(self) -> int:
        """Packets held (out of order, or behind a rule's mark), waiting in the kernel's queue."""
        return self.ledger.held

    # ================================================================ what the dispatch owns
    # The daemon and the offline tools configure these on the engine; they live in the dispatch.
    @property
    def rules(self) -> RuleSet:
        return self.dispatch.rules

    @property
    def sink(self) -> EventSink | None:
        """Receives every event as a dict (replay's `--events`, the golden tests); None: none built."""
        return self._sink

    @sink.setter
    def sink(self, sink: EventSink | None) -> None:
        self._sink = sink
        self.dispatch.sink = sink

    @property
    def in_rule(self) -> Rule | None:
        """The rule running now, for a watchdog in another thread (tcpguard.app.daemon.budget)."""
        return self.dispatch.in_rule

    @property
    def rule_calls(self) -> int:
        return self.dispatch.rule_calls

    @property
    def alert_hook(self) -> Callable[[dict[str, Any]], None] | None:
        """Receives each alert record (the daemon's alerts file)."""
        return self.dispatch.alert_hook

    @alert_hook.setter
    def alert_hook(self, hook: Callable[[dict[str, Any]], None] | None) -> None:
        self.dispatch.alert_hook = hook

    @property
    def wall_clock(self) -> Callable[[], float] | None:
        """Unix time for the alerts' timestamps; None: the engine's own time is Unix time (replay)."""
        return self.dispatch.wall_clock

    @wall_clock.setter
    def wall_clock(self, clock: Callable[[], float] | None) -> None:
        self.dispatch.wall_clock = clock

    @property
    def queue(self) -> int | None:
        """The worker's queue, which alert ids carry (`QUEUE:FLOW`); None offline."""
        return self.dispatch.queue

    @queue.setter
    def queue(self, queue: int | None) -> None:
        self.dispatch.queue = queue

    @property
    def on_event(self) -> EventListener | None:
        """Receives the engine's typed events (tcpguard.core.events): rule errors, limit hits, blocks,
        evictions, alerts. The core logs nothing itself; the application does, from these."""
        return self._on_event

    @on_event.setter
    def on_event(self, listener: EventListener | None) -> None:
        self._on_event = listener
        self.dispatch.on_event = listener

    # ================================================================ public entry points
    def replace_rules(self, rules: RuleSet) -> None:
        """Swap the rule set (reload). Tracked connections keep running; streamed listeners already
        running keep their old code until their connection ends. Every connection is wanted again by the
        new rules' listeners (they never said they were done with it), except past a depth."""
        self.dispatch.replace(rules)
        # A streamed listener that finished on a direction before the reload is not started again there
        # (`_gdone`, as before): its want bit goes too, or the connection could never be bypassed.
        plain = 2 * len(rules.receive_data)
        for conn in self.table:
            if not conn.ended and not conn.passthrough:
                finished = conn._gdone << plain
                conn._want = self.dispatch.want_mask(conn) & ~self._past_depth(conn) & ~finished

    def replace_settings(self, settings: EngineSettings) -> None:
        """Swap limits, timeouts and policies (reload). They apply from the next packet on; a connection's
        current timeout is re-armed with the new values at its next packet."""
        self.settings = settings
        self._read_settings()

    def _read_settings(self) -> None:
        """Copy what every packet reads out of the settings into the engine's own attributes.

        The settings are interpreted dataclasses (the configuration loader introspects them), so from the
        compiled core each attribute read is a generic lookup; the dozen a data segment needs cost 0.3-0.5
        us per packet. Hence the settings are read here, at construction and `replace_settings`: change
        them through `replace_settings`, not in place under a running engine.
        """
        st = self.settings
        self._timeout = {s: float(getattr(st.timeouts, name)) for s, name in TIMEOUT_OF.items()}
        pol, lim = st.policies, st.limits
        self._verify_checksums: bool = pol.verify_checksums
        self._verify_acks: bool = pol.verify_acks
        self._hold_ooo: bool = pol.out_of_order == "hold"
        self._max_ooo_bytes: int = lim.max_ooo_bytes
        self._max_ooo_segments: int = lim.max_ooo_segments
        self.limits.configure(lim.max_stream_buffer, lim.max_total_buffer, lim.max_held_packets)
        self._refuse_unexpected_signature: bool = pol.unexpected_signature != "accept"
        self.dispatch.rule_error_policy = pol.rule_error
        ins = st.inspection
        self._bypass_on: bool = ins.bypass
        self._depth_up: int = ins.depth_up
        self._depth_down: int = ins.depth_down
        byp = self.bypassed
        byp.capacity = lim.max_connections
        byp.linger = st.timeouts.closed
        byp.idle = st.timeouts.established

    def handle_packet(
        self, raw: bytes, now: float, token: object = None, checksum_trusted: bool = False
    ) -> Decision:
        """Judge one raw IP packet. `token` identifies it if the engine holds it. `checksum_trusted`: the
        adapter knows the checksums need no check (the kernel verified them, or fills them in on the way
        out, as for a GSO packet queued whole), so the engine does not verify them."""
        self.now = self.dispatch.now = now
        stats = self.stats
        stats.packets += 1
        size = len(raw)
        stats.bytes += size  # here, so that a packet whose handling raises still counts as received
        self._out = None  # made on demand by _output(): most packets release and send nothing
        try:
            dec = self._handle(raw, token, checksum_trusted)
        finally:
            # Not `out = self._out` here: mypy narrowed `self._out` to None above, and mypyc would check
            # that narrowed type at run time (the rules may have made an Output since).
            out = self._take_output()
        if out is not None:
            dec.releases = out.releases
            dec.send = out.send
            if dec.verdict is DROP and out.send:
                dec.in_place = _same_route(raw, out.send)
        v = dec.verdict
        if v is ACCEPT:
            stats.accepted += 1
            stats.bytes_accepted += size
        elif v is DROP:
            stats.dropped += 1
            stats.bytes_dropped += size
            self._count_drop(dec.reason)
        else:
            stats.held += 1
        if dec.packet is not None:
            stats.rewritten += 1
        if self._sink is not None:
            self._sink_verdict(dec, token, now)
        return dec

    def _sink_verdict(self, dec: Decision, token: object, now: float) -> None:
        """The verdict as an event for the sink (replay --events, golden tests); `bypass` only when set, so
        that traces of runs without bypass stay as they were."""
        assert self._sink is not None
        ev: dict[str, Any] = {
            "event": "verdict",
            "time": now,
            "token": token if isinstance(token, int | str) else None,
            "verdict": dec.verdict.name.lower(),
            "flow": dec.flow_id,
            "reason": dec.reason,
            "rewritten": dec.packet is not None,
            "released": [
                [r.token if isinstance(r.token, int | str) else None, r.verdict.name.lower()]
                for r in dec.releases
            ],
            "sent": len(dec.send),
        }
        if dec.bypass:
            ev["bypass"] = True
        self._sink(ev)

    def _count_drop(self, reason: str) -> None:
        key = reason.split(":", 1)[0] or "unspecified"
        drops = self.drops
        if key not in drops and len(drops) >= MAX_DROP_REASONS:
            key = "other"
        drops[key] = drops.get(key, 0) + 1

    def handle_timer(self, now: float) -> Output:
        """Expire idle connections. Call it periodically (every second is plenty)."""
        self.now = self.dispatch.now = now
        if self._evicted_unlogged:
            if self._on_event is not None:
                self._on_event(Evictions(self._evicted_unlogged, self.settings.limits.max_connections))
            self._evicted_unlogged = 0
        out = self._out = Output()
        try:
            for conn in self.table.expired(now):
                self.stats.timeouts += 1
                self._finish(conn, "timeout")
                self.table.remove(conn)
            self.table.compact()
        finally:
            self._out = None
        self.bypassed.sweep(now, BYPASS_SWEEP)
        return out

    def shutdown(self, now: float) -> Output:
        """End every connection (end_connection with reason 'shutdown') and release every held packet."""
        self.now = self.dispatch.now = now
        out = self._out = Output()
        try:
            for conn in self.table:
                self._finish(conn, "shutdown")
                self.table.remove(conn)
        finally:
            self._out = None
        return out

    def connection(self, cid: int) -> Connection | None:
        for conn in self.table:
            if conn.id == cid:
                return conn
        return None

    def bypassed_flow(self, cid: int) -> BypassedFlow | None:
        """The bypassed connection `cid`, if the engine still remembers it (for the operator's commands:
        it can no longer be reset, the engine no longer knows where its sequence numbers are)."""
        return self.bypassed.find(cid)

    def act(self, cid: int, action: int, now: float) -> Output | None:
        """Apply `Action.DROP`/`RESET`/`HALFRESET` to a live connection from outside (control socket)."""
        conn = self.connection(cid)
        if conn is None:
            return None
        self.now = self.dispatch.now = now
        out = self._out = Output()
        try:
            conn.action = max(conn.action, action)
            self._apply_block(conn, "operator")
        finally:
            self._out = None
        return out

    # ================================================================ per packet
    def _handle(self, raw: bytes, token: object, checksum_trusted: bool) -> Decision:
        try:
            pkt = decode(raw)
        except DecodeError as e:
            self.stats.malformed += 1
            drop = self.settings.policies.malformed == "drop"
            return Decision(DROP if drop else ACCEPT, reason=f"malformed: {e}")
        if not pkt.is_tcp:
            if pkt.fragment:
                self.stats.fragments += 1
                drop = self.settings.policies.fragments == "drop"
                return Decision(DROP if drop else ACCEPT, reason="fragment")
            self.stats.non_tcp += 1
            return Decision(ACCEPT, reason="not tcp")
        if self._verify_checksums and not checksum_trusted and not checksums_ok(pkt):
            self.stats.bad_checksum += 1
            return Decision(DROP, reason="bad checksum")
        key = flow_key(pkt.src, pkt.sport, pkt.dst, pkt.dport)
        conn = self.table.by_key.get(key)
        if conn is None:
            flows = self.bypassed.flows
            if flows:
                b = flows.get(key)
                if b is not None:
                    if not pkt.flags & SYN:
                        return self._bypassed_packet(b, len(raw))
                    # A SYN or SYN-ACK is a new connection on the same ports, never the bypassed one's:
                    # tracked as usual (a SYN-ACK answered with the bypass request would hand the new
                    # connection to the kernel uninspected).
                    del flows[key]
            return self._untracked(pkt, token)
        direction = UP if pkt.sport == conn.cport and pkt.src == conn.client else DOWN
        return self._track(conn, pkt, direction, token)

    def _untracked(self, pkt: Packet, token: object) -> Decision:
        flags = pkt.flags
        if flags & RST:
            # Nothing to tear down; the receiver checks the sequence number itself.
            return Decision(ACCEPT, reason="rst without connection")
        if flags & SYN and flags & (FIN | RST):
            self.stats.invalid += 1
            return Decision(DROP, reason="invalid flag combination")
        if flags & SYN and not flags & ACK:
            return self._open(pkt, token)
        pol = self.settings.policies.midstream
        self.stats.midstream += 1
        if pol == "accept":
            return Decision(ACCEPT, reason="midstream accepted untracked")
        if pol == "drop":
            return Decision(DROP, reason="midstream dropped")
        return self._open(pkt, token, midstream=True)

    def _make_room(self) -> bool:
        """True if a new connection fits, evicting one if the policy allows."""
        lim = self.settings.limits.max_connections
        if len(self.table) < lim:
            return True
        if self.settings.policies.table_full == "refuse":
            self.stats.refused += 1
            return False
        victim = self.table.nearest_expiry()
        if victim is None:
            return False
        self.stats.evicted += 1
        # One line per eviction would let a SYN flood flood the log: evictions are also counted and summed
        # up in one event per timer tick (handle_timer).
        if self._on_event is not None:
            self._on_event(Evicted(victim))
        self._evicted_unlogged += 1
        self._finish(victim, "evicted")
        self.table.remove(victim)
        return True

    def _open(self, pkt: Packet, token: object, midstream: bool = False) -> Decision:
        if not self._make_room():
            return Decision(DROP, reason="connection table full")
        flags = pkt.flags
        if midstream:
            # Who is the client? The SYN-ACK sender is the server; otherwise the lower port is taken to
            # be the service (ties: the sender is the client). Each stream is picked up at the first
            # byte seen (ISN = seq - 1), the other one when its first packet arrives.
            server_sent = bool(flags & SYN) or pkt.sport < pkt.dport
            client, cport, server, sport = (
                (pkt.dst, pkt.dport, pkt.src, pkt.sport)
                if server_sent
                else (pkt.src, pkt.sport, pkt.dst, pkt.dport)
            )
            mine = HalfStream((pkt.seq - (0 if flags & SYN else 1)) & 0xFFFFFFFF)
            # The ACK number is the next byte the sender expects from its peer: that places the peer's
            # stream too, so RSTs forged before the peer speaks carry a sequence number it accepts.
            other = HalfStream((pkt.ack - 1) & 0xFFFFFFFF if flags & ACK else -1)
            up, down = (other, mine) if server_sent else (mine, other)
        else:
            client, cport, server, sport = pkt.src, pkt.sport, pkt.dst, pkt.dport
            up, down = HalfStream(pkt.seq), HalfStream(-1)
        state = opening_state(flags, midstream)
        conn = Connection(self.table.new_id(), client, cport, server, sport, self.now, up, down, state)
        conn.midstream = midstream
        conn._alert = self.dispatch.alert_sink
        conn._want = self.dispatch.want_mask(conn)
        if flags & SYN and not flags & ACK:
            wscale = pkt.options().wscale
            conn.wscale_client = wscale if wscale is not None else -1
            tracker.syn_timestamp(conn, pkt)
            if pkt.tcp_hlen > 20 and pkt.signed():
                conn._auth = Signing.OFFERED
        conn.expires = self.now + self._timeout[state]
        self.table.add(conn)
        self.stats.connections += 1
        if self._sink is not None:  # built only for a sink: two ipaddress objects cost ~2 us per connection
            self._emit(
                {
                    "event": "new_connection",
                    "flow": conn.id,
                    "client": str(conn.srcip),
                    "cport": cport,
                    "server": str(conn.dstip),
                    "sport": sport,
                    "midstream": midstream,
                }
            )
        self.dispatch.new_connection(conn, pkt)
        if conn.action:
            return self._block_now(conn, "rule at new_connection")
        if midstream:
            direction = DOWN if server_sent else UP
            return self._track(conn, pkt, direction, token, fresh=True)
        conn.pkts_up += 1
        if pkt.payload or flags & URG:
            # Data on SYN is stripped: see the module docstring.
            return self._accept(conn, pkt, b"", "syn data stripped")
        return Decision(ACCEPT, flow_id=conn.id)

    def _track(self, conn: Connection, pkt: Packet, d: int, token: object, fresh: bool = False) -> Decision:
        if conn.action:
            return Decision(DROP, flow_id=conn.id, reason="connection blocked")
        if conn.passthrough:
            passed = Decision(ACCEPT, flow_id=conn.id, reason="uninspected after a limit (fail open)")
            if self._bypass_on and not pkt.flags & (SYN | RST | FIN):
                return self._bypass(conn, passed)  # nothing inspects it any more: the kernel may as well
            return passed
        # Only segments with options pay for the signature check, and only a byte scan unless it hits.
        auth = conn._auth
        if pkt.tcp_hlen > 20 and auth != _NEGOTIATED and pkt.signed():
            if not tracker.signing(conn, pkt, d, fresh) and self._refuse_unexpected_signature:
                self.stats.unexpected_signatures += 1
                return Decision(DROP, flow_id=conn.id, reason="unexpected TCP-MD5/AO option")
        elif auth >= _UP_SIGNS:  # tentative: an unsigned segment from the other side settles it
            conn._auth = signing_step(auth, Sig.UNSIGNED + d)
        flags = pkt.flags
        state = conn.state
        s, o = (conn.up, conn.down) if d == UP else (conn.down, conn.up)
        payload = pkt.payload
        if d == UP:
            conn.pkts_up += 1
            conn.bytes_up += len(payload)
        else:
            conn.pkts_down += 1
            conn.bytes_down += len(payload)
        conn.last_seen = self.now
        # Re-arm the idle timeout; the heap entry catches up lazily (see ConnTable).
        conn.expires = self.now + self._timeout[state]
        if s.isn < 0 and not flags & SYN and state is not _SYN_SENT:
            # First packet of a direction picked up mid-stream: this fixes its ISN. A SYN fixes it only
            # once accepted (below), and while the client's SYN waits nothing else from the server side
            # may: a segment the gateway drops must not make the real SYN or SYN-ACK look like one with
            # the wrong sequence number.
            s.isn = (pkt.seq - 1) & 0xFFFFFFFF

        # ---- SYN and SYN-ACK
        if flags & SYN:
            nxt, why = tracker.judge_syn(conn, pkt, d, s, o)
            if nxt is StateAction.REOPEN:
                self._finish(conn, "reopened")
                self.table.remove(conn)
                return self._open(pkt, token)
            if why:
                self.stats.invalid += 1
                return Decision(DROP, flow_id=conn.id, reason=why)
            assert isinstance(nxt, State)
            tracker.take_syn(conn, pkt, d, s, o)
            self._set_state(conn, nxt)
            if pkt.payload or flags & URG:
                return self._accept(conn, pkt, b"", "syn data stripped")
            return Decision(ACCEPT, flow_id=conn.id)

        # ---- RST
        if flags & RST:
            check = tracker.judge_rst(conn, pkt, d, s, o)
            if check == RstCheck.DROP:
                self.stats.rst_injections += 1
                return Decision(DROP, flow_id=conn.id, reason="RST outside the window")
            packet = forge.rewrite(pkt, b"", clear_urg=True) if pkt.payload or flags & URG else None
            held = bool(s.held)
            if held:
                # A rule holds data this sender sent before its RST. The rules saw that data, so it goes
                # first and the RST after it, in one ordered release; otherwise the receiver would get
                # the RST ahead of the data it expects and answer it with a challenge ACK.
                off = s.offset(pkt.seq)
                s.hold(Held(off, off, token, packet, False), self.ledger)
                s.unmark()
            if check == RstCheck.CLOSE:
                closed = transition(state, d, Event.RST)
                assert isinstance(closed, State)  # every state has an RST row or none (no change)
                self._set_state(conn, closed)
                self._finish(conn, "rst")  # releases what is held, in order, unless blocked
            if held:
                self._release_held(s, ACCEPT)
                return Decision(HOLD, flow_id=conn.id, reason="rst after held data")
            if packet is not None:
                return Decision(ACCEPT, packet, flow_id=conn.id, reason="rst data stripped")
            return Decision(ACCEPT, flow_id=conn.id)

        # ---- ACK, data, FIN
        if not flags & ACK and state is not State.SYN_SENT:
            # After the handshake a receiver discards every segment without ACK (RFC 793, 9293 3.10.7.4):
            # passing one would let the rules see bytes the application never reads (insertion).
            self.stats.invalid += 1
            return Decision(DROP, flow_id=conn.id, reason="segment without ACK")
        # Fast path: in ESTABLISHED a segment without FIN is never invalid and changes no state.
        steady = state is _ESTABLISHED and not flags & FIN
        if not steady:
            pre, why = tracker.judge_segment(conn, pkt, d, o, fresh)
            if pre is StateAction.OLDER_CONNECTION:
                why = tracker.older_connection_ack(conn, pkt)
                if not why:
                    return Decision(ACCEPT, flow_id=conn.id, reason="ACK of an older connection")
            if why:
                self.stats.invalid += 1
                return Decision(DROP, flow_id=conn.id, reason=why)
        if flags & ACK and o.isn >= 0:
            ack_off = o.offset(pkt.ack)
            if ack_off > o.sent and self._verify_acks and not self._skip_unseen(conn, o, ack_off):
                # It acknowledges bytes the gateway never forwarded: the receiver drops such a segment
                # (RFC 5961 5.2), so the rules must not see its data (insertion) and it must not move
                # retention either.
                self.stats.invalid += 1
                return Decision(DROP, flow_id=conn.id, reason="acknowledges data never forwarded")
            wscale = conn.wscale_client if d == UP else conn.wscale_server
            o.ack(ack_off, pkt.window << (wscale if wscale > 0 else 0))
            lookback = self.dispatch.lookback[1 - d]
            if len(o.buf) > 2 * lookback:
                o.trim(self.ledger, lookback)
        fin = bool(flags & FIN)
        fin_before = s.fin_off
        dec: Decision
        if state in FINISHED and payload and s.offset(pkt.seq) + len(payload) > s.next:
            return Decision(DROP, flow_id=conn.id, reason="data after the connection ended")
        if payload or fin:
            dec = self._data(conn, pkt, s, d, token)
            if dec.verdict == DROP and conn.action:
                return dec
        elif flags & URG:
            dec = self._accept(conn, pkt, None, "urgent pointer cleared")
        else:
            dec = Decision(ACCEPT, flow_id=conn.id)
        # ---- state transition
        if steady and (fin_before >= 0 or s.fin_off < 0):
            # No FIN was taken in (a held FIN can be taken when a data segment fills the gap).
            if not conn._want and self._bypass_on and dec.verdict is ACCEPT and self._may_bypass(conn):
                return self._bypass(conn, dec)
            return dec
        fins_acked = (
            conn.up.fin_off >= 0
            and conn.down.fin_off >= 0
            and conn.up.acked > conn.up.fin_off
            and conn.down.acked > conn.down.fin_off
        )
        # A FIN counts only once the stream took it in order (an old FIN, or one ahead of missing data, is
        # not one the receiver accepts); a held FIN counts when the gap before it fills.
        fin_taken = s.fin_off >= 0 and fin_before < 0
        event = classify((flags & ~FIN) | (FIN if fin_taken else 0), False, fins_acked)
        if event is not None and conn.state not in FINISHED:
            nxt = transition(conn.state, d, event)
            if isinstance(nxt, State) and nxt != conn.state:
                self._set_state(conn, nxt)
                if nxt in FINISHED:
                    self._finish(conn, "fin")
        if (
            not conn._want
            and self._bypass_on
            and conn.state is _ESTABLISHED
            and dec.verdict is ACCEPT
            and self._may_bypass(conn)
        ):
            return self._bypass(conn, dec)  # e.g. the handshake's last ACK, when no listener reads data
        return dec

    def _data(self, conn: Connection, pkt: Packet, s: HalfStream, d: int, token: object) -> Decision:
        """Run the payload (and FIN) through the reassembler and the rules; decide this packet."""
        off = s.offset(pkt.seq)
        fin = bool(pkt.flags & FIN)
        urg = bool(pkt.flags & URG)
        payload = pkt.payload
        cut = s.buf_start - off
        if cut > 0 and payload:
            # Bytes below what the stream still retains cannot be compared with their first copy: they
            # are never forwarded. The receiver acknowledged them already (retention only moves past
            # acknowledged bytes), so cutting them costs a genuine retransmission nothing.
            cut = min(cut, len(payload))
            payload = payload[cut:]
            off += cut
        else:
            cut = 0
        was_eof = s.eof
        before = s.buffered()
        # The bounds are checked before the bytes are taken (see Bounds in tcpguard.core.stream): the
        # stream takes nothing that would put it over `max_stream_buffer` or the total over
        # `max_total_buffer`.
        ledger = self.ledger
        limits = self.limits
        retried = False
        while True:
            # The room and the held-packet bound, read inline: this runs on every data segment.
            room = min(limits.max_stream_buffer - before, limits.max_total_buffer - ledger.buffered)
            may_hold = ledger.held < limits.max_held_packets
            status, fix, new_start, reason, held = s.receive(
                off,
                payload,
                fin,
                token,
                self._hold_ooo,
                self._max_ooo_bytes,
                self._max_ooo_segments,
                room,
                ledger,
                may_hold,
            )
            if status != SEG_LIMIT or retried:
                break
            retried = True
            # Once more if only the total was short and the connections holding more gave way (their
            # held packets may have left with them): new_start is the room the segment needs.
            if before + new_start > limits.max_stream_buffer or not self._free_largest(conn, new_start):
                break
        if status == SEG_LIMIT:
            if off > s.next:
                # Out of order: refusing the segment is enough (the sender retransmits it), as for the
                # out-of-order bounds themselves; the connection is not blocked for it.
                self.stats.limit_hits += 1
                self.stats.ooo_dropped += 1
                return Decision(DROP, flow_id=conn.id, reason="buffer limit (out of order)")
            return self._limit(conn, s)
        if status == SEG_DROP:
            if reason in ("out of order", "out-of-order buffer full"):
                self.stats.ooo_dropped += 1
            elif reason == "held packet limit":
                self.stats.limit_hits += 1
            return Decision(DROP, flow_id=conn.id, reason=reason)
        if cut:
            # Cut to nothing (and no FIN), the segment keeps its old sequence number: the receiver finds
            # it old and answers with a duplicate ACK, which is what a sender retransmitting acknowledged
            # bytes is waiting for (the first ACK was lost). Moved to `seq + cut` it would be an empty
            # segment at exactly the receiver's next byte, which Linux takes silently: the sender would
            # retransmit until it gives up. A FIN must stay at its own place, so then the seq moves.
            new_seq = (pkt.seq + cut) & 0xFFFFFFFF if payload or fin else pkt.seq
            packet: bytes | None = forge.rewrite(
                pkt, fix if fix is not None else payload, clear_urg=urg, seq=new_seq
            )
        else:
            packet = forge.rewrite(pkt, fix, clear_urg=urg) if fix is not None or urg else None
        if status == SEG_HOLD:
            assert held is not None
            held.packet = packet
            return Decision(HOLD, flow_id=conn.id, reason="out of order")
        if new_start >= 0 and (self._depth_up or self._depth_down):
            self._depth(conn, s, d, new_start)
        if new_start >= 0 and conn._want:
            self.dispatch.receive_data(conn, s, d, new_start)
            if isinstance(conn._store, dict):
                pack_store(conn)  # a one-entry store costs 64 bytes between packets instead of 184
        if s.eof and not was_eof:
            self.dispatch.stream_ended(conn, d)
        # Out-of-order segments that became contiguous leave with this packet, after the rules ran: the
        # reassembler appended them to `s.held`, from `held` on.
        pulled = len(s.held) - s.held.index(held) if held is not None else 0
        if conn.action:
            return self._block_now(conn, "rule")
        end = off + len(payload)
        if s.hold_from >= 0 and end > s.hold_from and not (conn._send >> d) & 1:
            if not self.limits.may_hold():
                # A rule wants to hold more than the kernel queue may keep: the limit policy decides.
                return self._limit(conn, s)
            s.hold(Held(off, end, token, packet, fin), ledger, pulled)
            self._after_rules(conn)
            return Decision(HOLD, flow_id=conn.id, reason="held by rule")
        s.forwarded(end, fin)
        self._after_rules(conn)
        return Decision(ACCEPT, packet, flow_id=conn.id, reason="normalised" if packet else "")

    def _accept(self, conn: Connection, pkt: Packet, payload: bytes | None, reason: str) -> Decision:
        """Accept a normalised copy: new payload and the urgent flag and pointer cleared."""
        return Decision(ACCEPT, forge.rewrite(pkt, payload, clear_urg=True), flow_id=conn.id, reason=reason)

    def _limit(self, conn: Connection, s: HalfStream) -> Decision:
        """A buffer bound was hit on this connection: apply the limit policy."""
        if self._limit_policy(conn, s.buffered(), "buffer limit hit on"):
            return Decision(ACCEPT, flow_id=conn.id, reason="limit: fail open")
        return self._block_now(conn, "limit")

    def _limit_policy(self, conn: Connection, buffered: int, what: str) -> bool:
        """Count, log and start the limit policy on `conn`. True: it fails open (the connection passes
        uninspected from now on); False: `conn.action` is set and the caller blocks the connection."""
        self.stats.limit_hits += 1
        pol = self.settings.policies.limit
        if self._on_event is not None:
            self._on_event(LimitHit(conn, buffered, pol, what))
        self._emit({"event": "limit", "flow": conn.id, "buffered": buffered, "policy": pol})
        if pol == "accept":
            # Fail open: this connection is no longer inspected. The rules get end_connection (reason
            # 'uninspected'), held packets leave, and every later packet passes until the entry times out.
            self._finish(conn, "uninspected")
            conn.passthrough = True
            conn.up.forwarded(conn.up.next, False)
            conn.down.forwarded(conn.down.next, False)
            return True
        conn.action = Action.RESET if pol == "reset" else Action.DROP
        return False

    def _free_largest(self, conn: Connection, need: int) -> bool:
        """`conn` needs `need` bytes more than the total buffer bound leaves: the limit policy goes to the
        connections that hold more (largest first, `Limits.give_way`) until the bytes fit. True if they
        do (then `conn` goes on as usual)."""
        limits = self.limits
        for c in limits.give_way(self.table, conn, need, self.now):
            if limits.fits(need):
                break
            held = c.up.buffered() + c.down.buffered()
            if not self._limit_policy(c, held, "total buffer bound reached, freeing the buffer of"):
                self._apply_block(c, "limit")
        return limits.fits(need)

    def _after_rules(self, conn: Connection) -> None:
        """Apply `flow.send()` requests and marks the rules lifted: held in-order packets leave."""
        # Both directions written out: a loop over ((UP, conn.up), (DOWN, conn.down)) builds three
        # tuples on every data packet.
        send = conn._send
        up = conn.up
        if send & (1 << UP):
            up.unmark()
        if up.held and up.hold_from < 0:
            self._release_held(up, ACCEPT)
        down = conn.down
        if send & (1 << DOWN):
            down.unmark()
        if down.held and down.hold_from < 0:
            self._release_held(down, ACCEPT)
        conn._send = 0

    # ================================================================ bypass
    def _may_bypass(self, conn: Connection) -> bool:
        """Nothing of the connection waits in the engine: no held or out-of-order packet, no rule mark,
        no blocked verdict pending. (Its listeners' want bits the caller checked.)"""
        up, down = conn.up, conn.down
        return not (
            conn.action
            or up.held
            or down.held
            or up.ooo
            or down.ooo
            or up.hold_from >= 0
            or down.hold_from >= 0
        )

    def _bypass(self, conn: Connection, dec: Decision) -> Decision:
        """Hand the connection to the kernel: this packet's ACCEPT carries the bypass request, the rules
        get end_connection (reason 'bypassed'), and the engine keeps only a `BypassedFlow`."""
        self.stats.bypassed += 1
        self._emit({"event": "bypass", "flow": conn.id})
        if not conn.ended:
            self._finish(conn, "bypassed")
        self.table.remove(conn)
        self.bypassed.add(conn, self.now)
        dec.bypass = True
        return dec

    def _bypassed_packet(self, b: BypassedFlow, size: int) -> Decision:
        """A packet of a connection handed to the kernel: accepted uninspected, with the bypass request
        again (it re-marks the connection, harmless when the mark is there)."""
        now = self.now
        self.stats.bypass_packets += 1
        self.stats.bypass_bytes += size
        if self.bypassed.hit(b, size, now) and now - self._bypass_leak_said >= BYPASS_LEAK_EVERY:
            self._bypass_leak_said = now
            if self._on_event is not None:
                self._on_event(BypassLeak(b, now - b.since))
        return Decision(ACCEPT, flow_id=b.id, reason="bypassed", bypass=True)

    def _past_depth(self, conn: Connection) -> int:
        """The want bits of the directions past their depth (Inspection.depth_up/down)."""
        n = len(self.dispatch.rules.receive_data) + len(self.dispatch.rules.streamed)
        mask = 0
        if self._depth_up and conn.up.next >= self._depth_up:
            mask |= direction_mask(UP, n)
        if self._depth_down and conn.down.next >= self._depth_down:
            mask |= direction_mask(DOWN, n)
        return mask

    def _depth(self, conn: Connection, s: HalfStream, d: int, start: int) -> None:
        """Past its depth a direction is wanted by no listener. The segment that crosses the depth is the
        last the rules see whole; streamed listeners of the direction end at once."""
        depth = self._depth_up if d == UP else self._depth_down
        if not depth or start < depth:
            return
        mask = direction_mask(d, len(self.dispatch.rules.receive_data) + len(self.dispatch.rules.streamed))
        if conn._want & mask:
            conn._want &= ~mask
            self.stats.depth_reached += 1
            self.dispatch.stream_ended_early(conn, d)
            # No listener will look again, so none will lift a mark it set: the held packets go (after
            # this segment's rules, with the usual release) instead of waiting for a buffer limit.
            s.unmark()

    # ================================================================ verdict helpers
    def _take_output(self) -> Output | None:
        out = self._out
        self._out = None
        return out

    def _output(self) -> Output:
        out = self._out
        if out is None:
            out = self._out = Output()
        return out

    def _release_held(self, s: HalfStream, verdict: Verdict) -> None:
        """Release the in-order held packets (the rules saw their bytes), in arrival order."""
        if not s.held:
            return
        out = self._output()
        accept = verdict == ACCEPT
        for h in s.release(accept, self.ledger):
            out.releases.append(Release(h.token, verdict, h.packet if accept else None))

    def _skip_unseen(self, conn: Connection, o: HalfStream, ack_off: int) -> bool:
        """On a connection picked up mid-stream, an ACK beyond everything seen moves the peer's stream there.

        A connection tracked from its SYN has had every byte pass through the gateway, so an ACK of bytes
        never forwarded is forged and the segment is dropped. A connection picked up mid-stream (a daemon
        restart, an evicted entry) is different: its sender was ahead of the first segment seen. After a
        restart the receiver holds bytes that passed before, and its ACKs of them were lost while the
        gateway was down, so the sender retransmits from behind the receiver's ACK. Dropping that ACK would
        stall the connection for good (the sender never learns its bytes arrived and retransmits the same
        segment forever). So the stream jumps to the acknowledged offset, as a second pickup: the rules miss
        the bytes in between, which the receiver already has; out-of-order segments are dropped (the
        sender retransmits what the receiver lacks). Nothing is forwarded unchecked: bytes below the new
        offset are cut from later segments. Not done while a rule holds bytes, after the peer's FIN, or
        further than the largest possible TCP window. (A forged ACK within that range still moves the
        stream, and the real sender's bytes below it are then cut: that stalls the connection, it does
        not let bytes through unchecked. The window scale of a connection picked up mid-stream is
        unknown, so the advertised window cannot bound it more tightly.)
        """
        if not conn.midstream or ack_off <= o.next or o.hold_from >= 0 or o.held or o.fin_off >= 0:
            return False
        if ack_off - o.next > 65535 << 14:
            return False  # beyond the largest window TCP can advertise: no sender can have sent it
        self._drop_ooo(o)
        o.skip_to(ack_off, self.ledger)
        self.stats.skipped_gaps += 1
        return True

    def _drop_ooo(self, s: HalfStream) -> None:
        """Drop the out-of-order packets: the rules never saw their bytes, so they never pass."""
        if not s.ooo:
            return
        out = self._output()
        for h in s.drop_ooo(self.ledger):
            out.releases.append(Release(h.token, DROP))

    def _block_now(self, conn: Connection, why: str) -> Decision:
        """A rule (or a limit) blocked the connection while handling this packet."""
        self._apply_block(conn, why)
        return Decision(DROP, flow_id=conn.id, reason=f"{Action.NAMES[conn.action]} by {why}")

    def _apply_block(self, conn: Connection, why: str) -> None:
        act = conn.action
        if self._on_event is not None:
            self._on_event(Blocked(conn, Action.NAMES[act], why))
        if act >= Action.HALFRESET:
            self._forge_resets(conn, both=act == Action.RESET)
        self._emit({"event": "action", "flow": conn.id, "action": Action.NAMES[act], "by": why})
        self._finish(conn, Action.NAMES[act])

    def _forge_resets(self, conn: Connection, both: bool) -> None:
        rsts = forge.connection_resets(conn, both)
        self._output().send.extend(rsts)
        self.stats.resets_sent += len(rsts)

    # ================================================================ lifecycle
    def _set_state(self, conn: Connection, state: State) -> None:
        conn.state = state
        conn.expires = self.now + self._timeout[state]
        self.table.touch(conn)

    def _finish(self, conn: Connection, reason: str) -> None:
        """End the connection for the rules: `end_connection` exactly once, listeners finished, held
        in-order packets released (dropped if the connection is blocked), out-of-order ones dropped."""
        blocked = conn.action != Action.NONE
        for s in (conn.up, conn.down):
            s.unmark()
            self._release_held(s, DROP if blocked else ACCEPT)
            self._drop_ooo(s)
        if conn.ended:
            return
        conn.end_reason = reason  # non-empty: `conn.ended` is true from here on
        self.dispatch.end_connection(conn, blocked)
        if self._sink is not None:
            self._emit(
                {
                    "event": "end_connection",
                    "flow": conn.id,
                    "reason": reason,
                    "packets": [conn.pkts_up, conn.pkts_down],
                    "bytes": [conn.bytes_up, conn.bytes_down],
                }
            )
        conn.up.clear(self.ledger)
        conn.down.clear(self.ledger)
        if conn.state not in FINISHED:
            # Keep the entry for a while so late packets of a blocked connection are still dropped.
            ended = transition(conn.state, UP, Event.ABORT)
            assert isinstance(ended, State)
            self._set_state(conn, ended)

    def _emit(self, event: dict[str, Any]) -> None:
        if self._sink is not None:
            event.setdefault("time", self.now)
            self._sink(event)


def _route(p: bytes) -> bytes:
    """A TCP/IP packet's version, addresses and ports as one key; b"" when it is not plain TCP (IPv6
    extension headers, a truncated header)."""
    if len(p) < 20:
        return b""
    v = p[0] >> 4
    if v == 4:
        ihl = (p[0] & 15) * 4
        if p[9] != 6 or len(p) < ihl + 4:
            return b""
        return p[12:20] + p[ihl : ihl + 4]
    if v == 6 and len(p) >= 44 and p[6] == 6:
        return p[8:44]
    return b""


def _same_route(raw: bytes, send: list[bytes]) -> int:
    """The index of the first packet in `send` that goes where `raw` was going (Decision.in_place)."""
    key = _route(raw)
    if key:
        for i, p in enumerate(send):
            if _route(p) == key:
                return i
    return -1
