"""Listener dispatch: the rules run on connection events, plain or streamed, and their alerts.

The engine decides *when* an event happens (a SYN passed the tracker, bytes became contiguous, a
connection ended); this module decides *how* the rules hear it. It owns the rule set, the greenlets of
streamed listeners, the bookkeeping a rule-time watchdog reads (`in_rule`, `rule_calls`) and the alerts
raised inside a rule call. It never decides a verdict: a rule's action is recorded on the connection
(`flow.drop()` sets `conn.action`), and the engine reads it after each event.

Error isolation: every call is wrapped, whatever the rule raises (`SystemExit` included: a rule's
`sys.exit()` is its bug, not a request to stop the gateway), and `RuleTimeout` from the watchdog. A rule
error is counted and the flow gets the `rule_error` policy's action.

Streamed listeners run as greenlets, one per flow, direction and listener, created on the first bytes
the listener wants; a `Cursor` read suspends the greenlet until more bytes arrive or the stream ends.
Live greenlets are in `conn._greenlets`; finished ones are only a bit in `conn._gdone` (2 * index +
direction), so a connection whose listeners all returned keeps no dict (memory per idle connection).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

import greenlet

from tcpguard.core.conntrack import DIRECTION_NAMES, Action, Connection
from tcpguard.core.cursor import Cursor
from tcpguard.core.errors import RuleTimeout
from tcpguard.core.events import AlertRaised, EventListener, RuleError
from tcpguard.core.packet import Packet
from tcpguard.core.rules import Rule, RuleSet
from tcpguard.core.state import DOWN, UP
from tcpguard.core.stats import Stats
from tcpguard.core.stream import HalfStream

EventSink = Callable[[dict[str, Any]], None]

#: The severities `flow.alert` takes, and the number each has in the alert record: Suricata's scale, on
#: which 1 is the most severe, so that tools reading EVE alerts rank ours with theirs.
SEVERITIES: Final = {"high": 1, "medium": 2, "low": 3, "info": 4}
#: Alerts of one rule call kept until the call returns (to record what the rule then did to the
#: connection); past it they are written at once, saying the action taken so far.
MAX_PENDING_ALERTS: Final = 64


class _Done:
    """Returned by a streamed listener's greenlet when the listener finished (normally or not)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class RuleDispatch:
    """Calls the listeners of a `RuleSet` on one engine's connections."""

    def __init__(self, rules: RuleSet, stats: Stats) -> None:
        self.rules = rules
        self.stats = stats
        # The look-back tail each direction keeps for plain listeners (see `lookbacks`).
        self.lookback = lookbacks(rules)
        # The want bits every connection starts with, and those that depend on its server port.
        self._masks = _want_masks(rules)
        # For a rule-time watchdog outside the core: the rule running now (None between calls) and a
        # counter of calls, so the watchdog can tell one long call from many short ones.
        self.in_rule: Rule | None = None
        self.rule_calls = 0
        self.rule_error_policy = "reset"
        # Engine time, set by the engine before it dispatches anything (alerts are stamped with it).
        self.now = 0.0
        self.sink: EventSink | None = None
        self.alert_hook: Callable[[dict[str, Any]], None] | None = None
        # Unix time for the alerts' timestamps. None: the engine's own time is Unix time (a replayed
        # capture's packet times); the daemon's engine runs on the monotonic clock and sets time.time.
        self.wall_clock: Callable[[], float] | None = None
        # The worker's queue, so that an alert's connection id is the `QUEUE:FLOW` the control commands
        # take; None offline, where the id is the flow number alone.
        self.queue: int | None = None
        # Rule errors and alerts as typed events (tcpguard.core.events); the application logs them.
        self.on_event: EventListener | None = None
        # Alerts raised in the rule call running now, written when it returns (see alert).
        self._pending_alerts: list[tuple[Connection, dict[str, Any], str]] = []
        # One bound method shared by every connection (`flow.alert` calls it): a bound method made per
        # connection would cost 64 bytes on each one.
        self.alert_sink: Callable[..., None] = self.alert

    def replace(self, rules: RuleSet) -> None:
        """Swap the rule set (reload). Streamed listeners already running keep their old code until their
        connection ends. The engine recomputes every connection's want bits (`want_mask`): the new rules
        never said they were done with anything."""
        self.rules = rules
        self.lookback = lookbacks(rules)
        self._masks = _want_masks(rules)

    def want_mask(self, conn: Connection) -> int:
        """The want bits of a new connection: bit 2 * i + d for every receive_data listener i (plain ones
        first, then streamed) that applies to direction d of this connection (its `direction=` and
        `ports=`). A listener that never applies never holds the connection back from bypass."""
        common, by_ports = self._masks
        mask = common
        sport = conn.sport
        for bits, ports in by_ports:
            if sport in ports:
                mask |= bits
        return mask

    # ------------------------------------------------------------------ events
    def new_connection(self, conn: Connection, pkt: Packet) -> None:
        """`new_connection(flow, tcp)`, until a listener blocks the connection."""
        sport = conn.sport
        for r in self.rules.new_connection:
            if r.ports is not None and sport not in r.ports:
                continue
            self._call(conn, r, conn, pkt)
            if conn.action:
                break
        # `flow.done()` means something only to a receive_data listener, which is what it stops calling.
        conn._send &= 3

    def receive_data(self, conn: Connection, s: HalfStream, d: int, start: int) -> None:
        """`receive_data` for the bytes of direction `d` from offset `start` to the stream's end: the plain
        listeners, then the streamed ones (resumed, or started on their first bytes)."""
        dname = DIRECTION_NAMES[d]
        if self.sink is not None:
            self._emit(
                {
                    "event": "receive_data",
                    "flow": conn.id,
                    "direction": dname,
                    "offset": start,
                    "length": s.next - start,
                }
            )
        # Listener i is called for direction d while bit 2 * i + d of `conn._want` is set: the bit says
        # the listener applies (direction, ports) and has not said `flow.done()` or returned.
        bit = 1 << d
        for r in self.rules.receive_data:
            if conn._want & bit:
                self._call(conn, r, conn, s, Cursor(s, start, blocking=False), dname)
                if conn._send & 12:
                    self._take_done(conn, bit >> d)
                if conn.action:
                    return
            bit <<= 2
        streamed = self.rules.streamed
        if not streamed:
            return
        for i, r in enumerate(streamed):
            wanted = conn._want & bit
            bit <<= 2
            if not wanted or conn._gdone >> (2 * i + d) & 1:
                continue  # not for this connection or direction, done, or finished (also before a reload)
            gls = conn._greenlets
            g = gls.get((d, i)) if gls is not None else None
            if g is None:
                cur = Cursor(s, start, blocking=True)
                s.readers = [*s.readers, cur]
                g = greenlet.greenlet(_streamed_runner(r, conn, s, cur, dname))
                if gls is None:
                    gls = conn._greenlets = {}
                gls[(d, i)] = g
            self._switch(conn, r, g, d, i)
            if conn.action:
                return

    def stream_ended(self, conn: Connection, d: int) -> None:
        """The stream of direction `d` ended: let its streamed listeners see the end and finish."""
        gls = conn._greenlets
        if not gls:
            return
        streamed = self.rules.streamed
        for (gd, i), g in list(gls.items()):
            if gd == d and i < len(streamed):
                self._switch(conn, streamed[i], g, gd, i)

    def stream_ended_early(self, conn: Connection, d: int) -> None:
        """The rules stop seeing direction `d` before its end (its depth): its streamed listeners end now,
        by GreenletExit, rather than wait for bytes they will never get."""
        gls = conn._greenlets
        if not gls:
            return
        for (gd, i), g in list(gls.items()):
            if gd == d:
                if not g.dead:
                    g.throw(greenlet.GreenletExit)
                self._retire(conn, gd, i)

    def end_connection(self, conn: Connection, blocked: bool) -> None:
        """Finish every streamed listener (at the end of both streams, or by GreenletExit when the
        connection is blocked), then `end_connection(flow)`."""
        self._end_readers(conn, kill=blocked)
        conn._want = 0
        sport = conn.sport
        for r in self.rules.end_connection:
            if r.ports is None or sport in r.ports:
                self._call(conn, r, conn)
        conn._send &= 3

    # ------------------------------------------------------------------ calls
    def _call(self, conn: Connection, r: Rule, *args: Any) -> None:
        try:
            self.rule_calls += 1
            self.in_rule = r
            r.func(*args)
        except (Exception, RuleTimeout, SystemExit, KeyboardInterrupt) as e:
            # sys.exit() or an argparse error inside a rule is that rule's bug, not a request to stop.
            self.in_rule = None
            self._rule_error(conn, r, e)
        finally:
            self.in_rule = None
            if self._pending_alerts:
                self._flush_alerts()

    def _switch(self, conn: Connection, r: Rule, g: Any, d: int, i: int) -> None:
        """Resume a streamed listener until it blocks for more bytes or finishes."""
        self.rule_calls += 1
        self.in_rule = r
        try:
            result = g.switch()
        finally:
            self.in_rule = None
        base = 1 << 2 * (len(self.rules.receive_data) + i)
        if conn._send & 12:
            # The listener said `flow.done()` (and returned, or waits for more bytes it will not get).
            # Taken here in either case: left in `_send`, the request would be read as the next streamed
            # listener's and end it. Its greenlets of the directions it is done with end now
            # (GreenletExit), which frees their coroutines.
            req = conn._send >> 2 & 3
            self._take_done(conn, base)
            gls = conn._greenlets
            for gd in (UP, DOWN):
                g2 = gls.get((gd, i)) if gls is not None else None
                if req >> gd & 1 and g2 is not None:
                    if not g2.dead:
                        g2.throw(greenlet.GreenletExit)
                    self._retire(conn, gd, i)
                    gls = conn._greenlets
        if isinstance(result, _Done):
            self._retire(conn, d, i)
            conn._want &= ~(base << d)
            if result.error is not None:
                self._rule_error(conn, r, result.error)
        if self._pending_alerts:
            self._flush_alerts()

    def _retire(self, conn: Connection, d: int, i: int) -> None:
        """Streamed listener `i` is finished on direction `d`: forget its greenlet."""
        conn._gdone |= 1 << (2 * i + d)
        gls = conn._greenlets
        if gls is not None:
            gls.pop((d, i), None)
            if not gls:
                conn._greenlets = None

    @staticmethod
    def _take_done(conn: Connection, base: int) -> None:
        """Apply the `flow.done()` of the listener whose up bit is `base`: clear its bits of the
        directions it named."""
        req = conn._send >> 2 & 3
        conn._send &= 3
        conn._want &= ~(req * base)

    def _end_readers(self, conn: Connection, kill: bool) -> None:
        if conn._greenlets is None and not conn._gdone:
            return  # no streamed listener ever started on this connection
        if not kill:
            conn.up.eof = conn.down.eof = True
            self.stream_ended(conn, UP)
            self.stream_ended(conn, DOWN)
        gls = conn._greenlets
        if gls is not None:
            for (d, i), g in gls.items():
                if not g.dead:
                    g.throw(greenlet.GreenletExit)
                conn._gdone |= 1 << (2 * i + d)
            conn._greenlets = None
        conn.up.readers = ()
        conn.down.readers = ()

    def _rule_error(self, conn: Connection, r: Rule, e: BaseException) -> None:
        self.stats.rule_errors += 1
        pol = self.rule_error_policy
        if self.on_event is not None:
            self.on_event(RuleError(conn, r.name, _rule_frame(e, r), e, pol))
        error = f"{type(e).__name__}: {e}"
        self._emit({"event": "rule_error", "flow": conn.id, "rule": r.name, "error": error})
        if pol == "drop":
            conn.action = max(conn.action, Action.DROP)
        elif pol == "reset":
            conn.action = Action.RESET

    # ------------------------------------------------------------------ alerts
    def alert(
        self, conn: Connection, description: str, severity: str, direction: str | None, fields: dict[str, Any]
    ) -> None:
        """Build the alert record, the one place its shape is decided: Suricata's EVE alert, which
        operators' log pipelines already parse, plus a `tcpguard` object with what EVE has no key for.
        docs/observability.md describes every field. Nothing of the payload is added here.

        Rules alert first and act after (`flow.alert(...)` then `flow.reset()`), so an alert raised
        inside a rule call is written when the call returns, with the action the connection then has
        (`_flush_alerts`); the timestamp is the moment of the alert.
        """
        level = SEVERITIES.get(severity)
        if level is None:
            raise ValueError(f"alert severity {severity!r}: expected one of {', '.join(SEVERITIES)}")
        if direction is not None and direction not in DIRECTION_NAMES:
            raise ValueError(f"alert direction {direction!r}: expected 'up', 'down' or None")
        when = self.wall_clock() if self.wall_clock is not None else self.now
        client, server = (str(conn.srcip), conn.cport), (str(conn.dstip), conn.sport)
        # EVE's addresses are the sender's and the receiver's of the alert's direction; an alert about
        # the connection as a whole (no direction) reads client to server.
        src, dest = (server, client) if direction == "down" else (client, server)
        r = self.in_rule
        mine: dict[str, Any] = {
            "id": f"{self.queue}:{conn.id}" if self.queue is not None else str(conn.id),
            "rule": r.name if r is not None else None,
            "severity": severity,
            "action": None,  # set when written
        }
        if fields:
            mine["fields"] = fields
        record: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f%z"),
            "flow_id": conn.id,
            "event_type": "alert",
            "src_ip": src[0],
            "src_port": src[1],
            "dest_ip": dest[0],
            "dest_port": dest[1],
            "proto": "TCP",
            "direction": "to_client" if direction == "down" else "to_server",
            "alert": {"action": None, "signature": description, "severity": level},
            "tcpguard": mine,
        }
        if r is None or len(self._pending_alerts) >= MAX_PENDING_ALERTS:
            self._write_alert(conn, record, direction or "")
        else:
            self._pending_alerts.append((conn, record, direction or ""))

    def _flush_alerts(self) -> None:
        pending = self._pending_alerts
        self._pending_alerts = []
        for conn, record, direction in pending:
            self._write_alert(conn, record, direction)

    def _write_alert(self, conn: Connection, record: dict[str, Any], direction: str) -> None:
        action = conn.action
        record["alert"]["action"] = "blocked" if action >= Action.DROP else "allowed"
        mine = record["tcpguard"]
        mine["action"] = Action.NAMES[action]
        self.stats.alerts += 1
        if self.on_event is not None:
            self.on_event(AlertRaised(conn, record, direction))
        if self.alert_hook is not None:
            self.alert_hook(record)
        if self.sink is not None:
            self._emit({"event": "alert", "flow": conn.id, **record})

    def _emit(self, event: dict[str, Any]) -> None:
        if self.sink is not None:
            event.setdefault("time", self.now)
            self.sink(event)


def _want_masks(rules: RuleSet) -> tuple[int, list[tuple[int, frozenset[int]]]]:
    """The want bits of the receive_data listeners (plain, then streamed), split into those of every
    connection and those of listeners limited to some server ports (with the ports)."""
    common = 0
    by_ports: list[tuple[int, frozenset[int]]] = []
    for i, r in enumerate((*rules.receive_data, *rules.streamed)):
        bits = 0
        for d, name in enumerate(DIRECTION_NAMES):
            if r.direction is None or r.direction == name:
                bits |= 1 << (2 * i + d)
        if r.ports is None:
            common |= bits
        else:
            by_ports.append((bits, r.ports))
    return common, by_ports


def lookbacks(rules: RuleSet) -> tuple[int, int]:
    """The look-back tail each direction's stream keeps, by direction index (see HalfStream.trim).

    The tail is for plain `receive_data` listeners (a pattern split across segments); a direction none
    of them reads keeps none, so an idle connection holds no bytes of it once they are acknowledged (a
    request/response connection's response: some 300 bytes). Safe for the receiver: first-copy checks
    only ever compare unacknowledged bytes, which stay; a retransmission of bytes already acknowledged
    is then cut (`Engine._data`) rather than compared and forwarded, and the receiver has those bytes
    anyway. Streamed readers and marks pin their bytes by themselves. A direction's tail is the largest
    look-back its plain listeners declared (`@rule(lookback=N)`, default `LOOKBACK`): one that keeps its
    own state declares 0 and so does not make every idle connection hold the last bytes of its request.
    """
    out = [0, 0]
    for r in rules.receive_data:
        for d, name in enumerate(DIRECTION_NAMES):
            if r.direction is None or r.direction == name:
                out[d] = max(out[d], r.lookback)
    return out[0], out[1]


def _rule_frame(e: BaseException, r: Rule) -> str:
    """`file:line` of the innermost frame of the exception inside the rule's own module."""
    import traceback

    mod_file = getattr(getattr(r.func, "__code__", None), "co_filename", None)
    where = "?"
    for frame in traceback.extract_tb(e.__traceback__):
        if frame.filename == mod_file:
            where = f"{frame.filename}:{frame.lineno}"
    return where


def _streamed_runner(
    r: Rule, conn: Connection, s: HalfStream, cur: Cursor, dname: str
) -> Callable[[], _Done]:
    def run() -> _Done:
        try:
            r.func(conn, s, cur, dname)
        except greenlet.GreenletExit:
            raise
        except (Exception, RuleTimeout, SystemExit, KeyboardInterrupt) as e:
            return _Done(e)
        finally:
            if cur in s.readers:
                # The shared empty tuple, not an empty list, once the last reader is gone: 56 bytes less
                # on every connection whose listener returned.
                s.readers = [r for r in s.readers if r is not cur] or ()
        return _Done(None)

    return run
