"""The connection table: flows keyed independently of direction, their timeouts and the size bound.

A `Connection` is also the `flow` object rule writers get: its public attributes and the action methods
(`drop`, `reset`, `halfreset`, `send`, `alert`) are the rule API; attributes starting with `_` and the
`up`/`down` streams' internals are not.

Timeouts are filed with lazy updates: a packet only moves `expires` forward, and the entry is re-filed
when it comes due, so the per-packet cost is one assignment. The same order gives the eviction order when
the table is full: the connection closest to its timeout goes first (ties: the older connection), which
favours half-open and closing connections (short timeouts) over established ones.

The entries live in a timing wheel of one-second buckets (`_wheel`: tick -> list of connections, with a
heap of the ticks), not in one heap of (expiry, id, connection) tuples: a list slot costs 8 bytes per
connection where a tuple cost 64, and an idle table is mostly these entries. Only the earliest bucket
ever needs its exact order; when expiry or eviction reaches it, its connections move into `_front`, a
heap of (expiry, id, connection) tuples, so the order (and which connection is evicted) is exactly that
of a single heap, and each step stays O(log n).
"""

from __future__ import annotations

import heapq
import ipaddress
import math
from collections.abc import Callable, Iterator
from typing import Any, Final

from tcpguard.core.state import UP, State
from tcpguard.core.stream import HalfStream

FlowKey = tuple[bytes, int, bytes, int]

DIRECTION_NAMES: Final = ("up", "down")


def flow_key(src: bytes, sport: int, dst: bytes, dport: int) -> FlowKey:
    """The same key for both directions of a connection."""
    if src < dst or (src == dst and sport <= dport):
        return (src, sport, dst, dport)
    return (dst, dport, src, sport)


class Action:
    """What a rule asked for, strongest last: NONE < SEND < DROP < HALFRESET < RESET."""

    NONE: Final = 0
    DROP: Final = 1
    HALFRESET: Final = 2
    RESET: Final = 3
    NAMES: Final = ("none", "drop", "halfreset", "reset")


class Connection:
    """One TCP connection, both directions; also the rule API's `flow`."""

    __slots__ = (
        "_alert",
        "_auth",
        "_gdone",
        "_greenlets",
        "_heap_at",
        "_send",
        "_store",
        "_syn_ts",
        "_want",
        "action",
        "bytes_down",
        "bytes_up",
        "client",
        "cport",
        "down",
        "end_reason",
        "expires",
        "id",
        "last_seen",
        "midstream",
        "passthrough",
        "pkts_down",
        "pkts_up",
        "server",
        "sport",
        "started",
        "state",
        "up",
        "wscale_client",
        "wscale_server",
    )

    def __init__(
        self,
        cid: int,
        client: bytes,
        cport: int,
        server: bytes,
        sport: int,
        now: float,
        up: HalfStream,
        down: HalfStream,
        state: State,
    ) -> None:
        # `key`, `version` and `ended` are derived (properties below) rather than stored: every slot is
        # 8 bytes on each tracked connection, and a table of idle connections is mostly these objects.
        self.id = cid
        self.client = client
        self.cport = cport
        self.server = server
        self.sport = sport
        self.started = now
        self.last_seen = now
        self.expires = now
        self._heap_at = -1.0
        self.state = state
        self.up = up
        self.down = down
        self.action = Action.NONE
        self.end_reason = ""
        self.midstream = False
        self.passthrough = False  # no longer inspected (fail-open after a limit): every packet passes
        # None until a rule asks for `store`; a one-entry store nobody else holds is kept as its (key,
        # value) pair between packets (tcpguard.core.flowstore: 64 bytes instead of a 184-byte dict).
        self._store: dict[str, Any] | tuple[str, Any] | None = None
        self.pkts_up = self.pkts_down = self.bytes_up = self.bytes_down = 0
        self.wscale_client = self.wscale_server = -1
        # Streamed listeners: the live ones by (direction, index), None when there is none; the finished
        # ones as bit 2 * index + direction of `_gdone`.
        self._greenlets: dict[tuple[int, int], Any] | None = None
        self._gdone = 0
        # Requests of the rule call running now, read by the engine and the dispatch after it: bits 0-1
        # `send` (release 'up' / 'down' holds), bits 2-3 `done` ('up' / 'down').
        self._send = 0
        # Which listeners still want bytes of which direction: bit 2 * i + d for the i-th receive_data
        # listener (plain ones first, then streamed) and direction d (RuleDispatch.want_mask). 0: no
        # listener wants anything more, and the connection may be bypassed (Inspection.bypass).
        self._want = 0
        self._alert: Callable[..., None] | None = None
        # TCP-MD5/AO signing: a `tcpguard.core.state.Signing` value, kept as a plain int (native and small).
        self._auth = 0
        # The TSvals of the client's first and latest SYN (first << 32 | last), -1 if its SYN had no
        # timestamp: the RST and SYN-ACK checks of the handshake need them (tracker.syn_timestamp). One
        # int rather than two slots: each slot is 8 bytes on every tracked connection.
        self._syn_ts = -1

    @property
    def key(self) -> FlowKey:
        """The table key (the same for both directions)."""
        return flow_key(self.client, self.cport, self.server, self.sport)

    @property
    def version(self) -> int:
        return 6 if len(self.client) == 16 else 4

    @property
    def ended(self) -> bool:
        return self.end_reason != ""

    # -- the rule API ----------------------------------------------------------------------------------
    @property
    def srcip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """The client's address: the sender of the first SYN tcpguard saw. When the other side sends a
        SYN of its own (a simultaneous open, or a split handshake, where a server answers the SYN with a
        SYN and the client sends the SYN-ACK), the roles stay those of the first SYN, so `'up'` is what
        reaches the host the client connected to, whichever side sent the SYN-ACK."""
        return ipaddress.ip_address(self.client)

    @property
    def dstip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """The server's address."""
        return ipaddress.ip_address(self.server)

    @property
    def srcport(self) -> int:
        return self.cport

    @property
    def dstport(self) -> int:
        return self.sport

    @property
    def store(self) -> dict[str, Any]:
        """Per-flow storage for rules: a dict that lives as long as the connection (made on first use)."""
        st = self._store
        if isinstance(st, dict):
            return st
        d: dict[str, Any] = {} if st is None else {st[0]: st[1]}
        self._store = d
        return d

    @property
    def state_name(self) -> str:
        return self.state.name

    def drop(self) -> None:
        """Drop this packet and every later packet of the connection, silently."""
        self.action = max(self.action, Action.DROP)

    def reset(self) -> None:
        """Send an RST to both ends, then drop like `drop()`."""
        self.action = Action.RESET

    def halfreset(self) -> None:
        """Send an RST to the server only, then drop like `drop()`: the client just sees silence."""
        self.action = max(self.action, Action.HALFRESET)

    def send(self, direction: str | None = None) -> None:
        """Release the packets held in `direction` ('up', 'down', or both when None)."""
        if direction is None:
            self._send = 3
        else:
            self._send |= 1 << DIRECTION_NAMES.index(direction)

    def done(self, direction: str | None = None) -> None:
        """The listener calling this needs no more bytes of `direction` ('up', 'down', or both when None)
        of this connection: it is not called for them again. Once no listener wants either direction,
        the engine may hand the connection to the kernel (bypass). Only a receive_data listener can be
        done; in new_connection and end_connection listeners the call does nothing."""
        if direction is None:
            self._send |= 12
        elif direction in DIRECTION_NAMES:
            self._send |= 4 << DIRECTION_NAMES.index(direction)
        else:
            raise ValueError(f"flow.done({direction!r}): direction is 'up', 'down' or None")

    def wants(self, direction: int) -> bool:
        """True while some listener still wants the bytes of direction `direction` (UP or DOWN)."""
        return bool(self._want & (WANT_UP << direction))

    def alert(
        self, description: str, severity: str = "medium", direction: str | None = None, **fields: Any
    ) -> None:
        """Raise an alert about this connection (logged and written to the alerts file by the daemon).
        `severity`: high, medium, low or info; `direction`: the direction it is about, if one."""
        if self._alert is not None:
            self._alert(self, description, severity, direction, fields)

    @property
    def blocked(self) -> bool:
        return self.action >= Action.DROP

    def describe(self) -> str:
        """`client:port > server:port`, IPv6 addresses in brackets, for logs."""
        c, s = self.srcip, self.dstip
        if self.version == 6:
            return f"[{c}]:{self.cport} > [{s}]:{self.sport}"
        return f"{c}:{self.cport} > {s}:{self.sport}"

    def stream(self, direction: int) -> HalfStream:
        return self.up if direction == UP else self.down

    def __repr__(self) -> str:
        return f"<flow #{self.id} {self.describe()} {self.state.name}>"


#: Want bits of the up direction of the first 64 listeners (bit 2i); the down ones are this << 1. A
#: direction's mask for any number of listeners is built by `direction_mask`.
WANT_UP: Final = 1


def direction_mask(d: int, listeners: int) -> int:
    """The want bits of direction `d` for `listeners` receive_data listeners."""
    m = 0
    for i in range(listeners):
        m |= 1 << (2 * i + d)
    return m


class BypassedFlow:
    """What the engine keeps of a connection it handed to the kernel: enough to recognise its packets that
    still arrive (they were queued before the kernel saw the mark, or the kernel's rule is missing), to
    list it for the operator, and to count what it still cost. A few hundred bytes instead of a whole
    `Connection` with its streams."""

    __slots__ = (
        "bytes",
        "client",
        "cport",
        "expires",
        "id",
        "leak_seen",
        "packets",
        "server",
        "since",
        "sport",
    )

    def __init__(
        self, cid: int, client: bytes, cport: int, server: bytes, sport: int, since: float, expires: float
    ) -> None:
        self.id = cid
        self.client = client
        self.cport = cport
        self.server = server
        self.sport = sport
        self.since = since
        self.expires = expires
        self.packets = 0
        self.bytes = 0
        self.leak_seen = False

    def describe(self) -> str:
        c, s = ipaddress.ip_address(self.client), ipaddress.ip_address(self.server)
        if len(self.client) == 16:
            return f"[{c}]:{self.cport} > [{s}]:{self.sport}"
        return f"{c}:{self.cport} > {s}:{self.sport}"

    def __repr__(self) -> str:
        return f"<bypassed flow #{self.id} {self.describe()}>"


class BypassTable:
    """The connections handed to the kernel, by key: what the engine still knows of them, and for how long.

    An entry exists so that packets of the connection that still reach the engine are recognised and
    accepted with the bypass request again, never picked up as a new mid-stream connection (which would
    run the rules on the middle of a stream they said they were done with). Normally that is only the
    packets queued behind the bypass verdict, so an entry lives `linger` seconds; when they keep coming
    (the kernel's rule is missing), it lives `idle` seconds after the latest. Bounded by `capacity`: past
    it the oldest entry goes (its in-flight packets are long gone).
    """

    def __init__(self) -> None:
        self.flows: dict[FlowKey, BypassedFlow] = {}
        self.capacity = 65536
        self.linger = 10.0
        self.idle = 3600.0
        self.grace = 2.0  # seconds after the verdict during which packets are expected (already queued)
        self._swept = 0.0

    def __len__(self) -> int:
        return len(self.flows)

    def __iter__(self) -> Iterator[BypassedFlow]:
        return iter(list(self.flows.values()))

    def add(self, conn: Connection, now: float) -> BypassedFlow:
        flows = self.flows
        if len(flows) >= self.capacity:
            del flows[next(iter(flows))]
        b = BypassedFlow(conn.id, conn.client, conn.cport, conn.server, conn.sport, now, now + self.linger)
        flows[conn.key] = b
        return b

    def hit(self, b: BypassedFlow, size: int, now: float) -> bool:
        """Count a packet of `b` that reached the engine. True the first time one arrives after the grace
        period: the kernel rule is missing (the caller reports it)."""
        b.packets += 1
        b.bytes += size
        if now - b.since <= self.grace:
            return False
        b.expires = now + self.idle
        if b.leak_seen:
            return False
        b.leak_seen = True
        return True

    def find(self, cid: int) -> BypassedFlow | None:
        for b in self.flows.values():
            if b.id == cid:
                return b
        return None

    def sweep(self, now: float, every: float) -> None:
        """Forget expired entries, at most once per `every` seconds (a pass over the whole table)."""
        if not self.flows or now - self._swept < every:
            return
        self._swept = now
        flows = self.flows
        for k in [k for k, b in flows.items() if b.expires <= now]:
            del flows[k]


class ConnTable:
    """Connections by key, with lazy timeouts in a timing wheel (see the module docstring). The engine
    decides policy; this only keeps order."""

    __slots__ = ("_entries", "_front", "_front_tick", "_next_id", "_shared", "_ticks", "_wheel", "by_key")

    def __init__(self) -> None:
        self.by_key: dict[FlowKey, Connection] = {}
        # Entries (possibly stale) by tick, the ticks in a heap, and the exactly ordered front: every entry
        # of a tick <= `_front_tick` is in `_front`, every other one in `_wheel`.
        self._wheel: dict[int, list[Connection]] = {}
        self._ticks: list[int] = []
        self._front: list[tuple[float, int, Connection]] = []
        self._front_tick = -(2**63)
        self._entries = 0  # in `_wheel` and `_front` together, stale ones included (for `compact`)
        self._next_id = 1
        # One object per distinct server address and port, shared by the connections (and table keys)
        # that have it: a gateway's connections go to few servers, and each packet decodes fresh copies
        # (48 and 32 bytes). Rebuilt from the live connections when stale values pile up (`compact`).
        self._shared: dict[bytes | int, Any] = {}

    def __len__(self) -> int:
        return len(self.by_key)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self.by_key.values()))

    def new_id(self) -> int:
        cid = self._next_id
        self._next_id += 1
        return cid

    def add(self, conn: Connection) -> None:
        shared = self._shared
        conn.server = shared.setdefault(conn.server, conn.server)
        conn.sport = shared.setdefault(conn.sport, conn.sport)
        self.by_key[conn.key] = conn  # the key is made of the shared objects
        self._push(conn)

    def remove(self, conn: Connection) -> None:
        if self.by_key.get(conn.key) is conn:
            del self.by_key[conn.key]

    def _push(self, conn: Connection) -> None:
        at = conn._heap_at = conn.expires
        self._entries += 1
        tick = _tick(at)
        if tick <= self._front_tick:
            heapq.heappush(self._front, (at, conn.id, conn))
            return
        bucket = self._wheel.get(tick)
        if bucket is None:
            self._wheel[tick] = [conn]
            heapq.heappush(self._ticks, tick)
        else:
            bucket.append(conn)

    def _head(self) -> tuple[float, int, Connection] | None:
        """The earliest entry (possibly stale), moving the next bucket to the front when it is empty."""
        front = self._front
        while not front:
            ticks = self._ticks
            if not ticks:
                return None
            tick = heapq.heappop(ticks)
            self._front_tick = tick
            bucket = self._wheel.pop(tick)
            # A connection re-filed since (to another tick) has its live entry there: this one is stale.
            front.extend((c._heap_at, c.id, c) for c in bucket if _tick(c._heap_at) == tick)
            self._entries -= len(bucket) - len(front)
            heapq.heapify(front)
        return front[0]

    def _pop(self) -> None:
        heapq.heappop(self._front)
        self._entries -= 1

    def touch(self, conn: Connection) -> None:
        """`conn.expires` changed. Earlier than its entry needs a new entry; later is lazy."""
        if conn.expires < conn._heap_at:
            self._push(conn)

    def expired(self, now: float) -> Iterator[Connection]:
        """Connections whose timeout passed; the caller removes each one it is given."""
        while True:
            if not self._front and (not self._ticks or self._ticks[0] > now):
                return  # every entry of a later tick expires after `now`
            head = self._head()
            if head is None or head[0] > now:
                return
            at, _cid, conn = head
            self._pop()
            if self.by_key.get(conn.key) is not conn or at != conn._heap_at:
                continue  # stale entry: removed, or re-filed with another expiry
            if conn.expires > now:
                self._push(conn)
                continue
            yield conn

    def nearest_expiry(self) -> Connection | None:
        """The live connection with the earliest expiry (the eviction candidate)."""
        while True:
            head = self._head()
            if head is None:
                return None
            at, _cid, conn = head
            if self.by_key.get(conn.key) is not conn or at != conn._heap_at:
                self._pop()
                continue
            if conn.expires > at:
                self._pop()
                self._push(conn)
                continue
            return conn

    def compact(self) -> None:
        """Drop stale timeout entries when they outnumber live ones (bounds them at 2x the table), and
        shared values no live connection uses when they outnumber the connections."""
        if len(self._shared) > 2 * len(self.by_key) + 1024:
            shared: dict[bytes | int, Any] = {}
            for conn in self.by_key.values():
                shared.setdefault(conn.server, conn.server)
                shared.setdefault(conn.sport, conn.sport)
            self._shared = shared
        if self._entries > 2 * len(self.by_key) + 1024:
            by_key = self.by_key
            self._front = [e for e in self._front if by_key.get(e[2].key) is e[2] and e[0] == e[2]._heap_at]
            heapq.heapify(self._front)
            wheel: dict[int, list[Connection]] = {}
            for tick, bucket in self._wheel.items():
                live = [c for c in bucket if by_key.get(c.key) is c and _tick(c._heap_at) == tick]
                if live:
                    wheel[tick] = live
            self._wheel = wheel
            self._ticks = list(wheel)
            heapq.heapify(self._ticks)
            self._entries = len(self._front) + sum(len(b) for b in wheel.values())


def _tick(at: float) -> int:
    """The wheel bucket of an expiry: its whole second (an infinite one goes last)."""
    try:
        return math.floor(at)
    except (OverflowError, ValueError):
        return 2**63
