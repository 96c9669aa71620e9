"""What goes over the control socket.

A Unix stream socket carrying one JSON object per line (UTF-8) each way: a request
`{"cmd": "status"}` is answered by `{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`. A
client may send several requests on one connection, one at a time. Line-delimited JSON needs nothing but
the standard library on either end and can be typed by hand (`socat - UNIX:/run/tcpguard/control.sock`).

Commands (the table is `tcpguard.app.control.dispatch.COMMANDS`): `ping`; `version`; `status`;
`connections` (`filter`: {key: "value[,value...]"}, `limit`); `drop` and `reset` (`id`: "QUEUE:FLOW");
`reload`. See docs/observability.md for the result documents.

Connection ids are `QUEUE:FLOW` (the queue number of the worker and its engine's flow id), unambiguous
across workers; a bare FLOW is accepted when there is one worker.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

Request = dict[str, Any]
Response = dict[str, Any]

#: Longest request line a server reads; a client sending more is cut off (requests are tiny).
MAX_REQUEST = 64 * 1024
#: How long the control side waits for a worker's timer tick to answer.
WORKER_TIMEOUT = 10.0


def version_info() -> dict[str, str]:
    """The running code: the package version and which core runs (`compiled`, or `pure` with the reason).

    The main process answers for its workers: they are forks of it, so they run the same code, and a
    `version` request must answer even while a worker restarts. The core mode is here because a daemon
    that silently runs the pure-Python core works, at about half the speed, and nothing else says so.
    """
    import tcpguard
    import tcpguard.core

    return {"version": tcpguard.__version__, "core": tcpguard.core.MODE}


class ControlError(Exception):
    """The control socket cannot be served or reached; the message is for the operator."""


def ok(result: Any = None) -> Response:
    return {"ok": True, "result": result}


def error(message: str) -> Response:
    return {"ok": False, "error": message}


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


# ================================================================================== connection rows


#: The state `connections` shows for a connection handed to the kernel (connection bypass, issue 20): not a
#: TCP state, since tcpguard no longer follows the connection, only remembers it for a while.
BYPASSED = "BYPASSED"

_FILTER_KEYS = ("state", "ip", "client", "server", "port", "cport", "sport", "queue")


def _states(items: list[str]) -> frozenset[str]:
    """TCP state names, any case; a name that is not one is an error that lists the valid ones (a
    misspelt state would otherwise match nothing, and an empty table reads as "no such connections")."""
    from tcpguard.core.state import State

    names = [v.upper() for v in items]
    known = [*State.__members__, BYPASSED]
    unknown = [v for v in names if v not in known]
    if unknown:
        raise ValueError(f"filter state: unknown state {', '.join(unknown)} (states: {', '.join(known)})")
    return frozenset(names)


@dataclass(frozen=True, slots=True)
class ConnFilter:
    """`connections --filter`: every given key must match; comma-separated values within a key are
    alternatives. Keys: state (TCP state name), ip (either end), client, server (address or CIDR
    network), port (either end), cport (client port), sport (server port), queue (worker queue)."""

    states: frozenset[str] | None = None
    ip: tuple[Any, ...] | None = None
    client: tuple[Any, ...] | None = None
    server: tuple[Any, ...] | None = None
    port: frozenset[int] | None = None
    cport: frozenset[int] | None = None
    sport: frozenset[int] | None = None
    queue: frozenset[int] | None = None

    @classmethod
    def parse(cls, spec: dict[str, Any] | None) -> ConnFilter:
        """From the request's `filter` mapping; ValueError with an operator-readable message."""
        if not spec:
            return cls()
        if not isinstance(spec, dict):
            raise ValueError("filter must be a mapping of key to value")
        kw: dict[str, Any] = {}
        for key, value in spec.items():
            if key not in _FILTER_KEYS:
                raise ValueError(f"unknown filter key {key!r} (known: {', '.join(_FILTER_KEYS)})")
            items = [v.strip() for v in str(value).split(",") if v.strip()]
            if not items:
                raise ValueError(f"filter {key}: empty value")
            if key == "state":
                kw["states"] = _states(items)
            elif key in ("ip", "client", "server"):
                try:
                    kw[key] = tuple(ipaddress.ip_network(v, strict=False) for v in items)
                except ValueError as exc:
                    raise ValueError(f"filter {key}: {exc}") from None
            else:
                if not all(v.isdigit() for v in items):
                    raise ValueError(f"filter {key}: expected numbers, got {value!r}")
                kw[key] = frozenset(int(v) for v in items)
        return cls(**kw)

    def matches(self, conn: Any, queue: int) -> bool:
        return self._match(conn.state.name, conn.cport, conn.sport, conn.srcip, conn.dstip, queue)

    def matches_bypassed(self, flow: Any, queue: int) -> bool:
        """For a `tcpguard.core.conntrack.BypassedFlow`, whose state is BYPASSED and whose addresses are
        kept as bytes (turned into address objects only when a filter asks for them)."""
        return self._match(BYPASSED, flow.cport, flow.sport, flow.client, flow.server, queue)

    def _match(self, state: str, cport: int, sport: int, c: Any, s: Any, queue: int) -> bool:
        if self.queue is not None and queue not in self.queue:
            return False
        if self.states is not None and state not in self.states:
            return False
        if self.port is not None and cport not in self.port and sport not in self.port:
            return False
        if self.cport is not None and cport not in self.cport:
            return False
        if self.sport is not None and sport not in self.sport:
            return False
        if self.ip is not None or self.client is not None or self.server is not None:
            if isinstance(c, bytes):
                c, s = ipaddress.ip_address(c), ipaddress.ip_address(s)
            if self.ip is not None and not any(c in n or s in n for n in self.ip):
                return False
            if self.client is not None and not any(c in n for n in self.client):
                return False
            if self.server is not None and not any(s in n for n in self.server):
                return False
        return True


def connection_row(conn: Any, queue: int, now: float) -> dict[str, Any]:
    """One `connections` entry. `now` is the packet loop's monotonic clock, the engine's time base."""
    return {
        "id": f"{queue}:{conn.id}",
        "queue": queue,
        "flow": conn.id,
        "client": str(conn.srcip),
        "cport": conn.cport,
        "server": str(conn.dstip),
        "sport": conn.sport,
        "state": conn.state.name,
        "packets": [conn.pkts_up, conn.pkts_down],
        "bytes": [conn.bytes_up, conn.bytes_down],
        "age": round(max(0.0, now - conn.started), 3),
        "idle": round(max(0.0, now - conn.last_seen), 3),
        "action": ("none", "drop", "halfreset", "reset")[conn.action],
        "ended": conn.end_reason if conn.ended else None,
        "midstream": conn.midstream,
    }


def bypassed_row(flow: Any, queue: int, now: float, wall: float) -> dict[str, Any]:
    """One `connections` entry for a connection handed to the kernel (a `BypassedFlow`): state BYPASSED,
    when (`since`: wall-clock seconds; `age`: seconds ago), and what still reached the daemon after it
    (`late`: packets and bytes, in flight at the verdict, or all of them when the kernel rule is missing).
    `now` is the engine's clock, `wall` the wall clock at the same moment."""
    ago = max(0.0, now - flow.since)
    return {
        "id": f"{queue}:{flow.id}",
        "queue": queue,
        "flow": flow.id,
        "client": str(ipaddress.ip_address(flow.client)),
        "cport": flow.cport,
        "server": str(ipaddress.ip_address(flow.server)),
        "sport": flow.sport,
        "state": BYPASSED,
        "since": round(wall - ago, 3),
        "age": round(ago, 3),
        "late": {"packets": flow.packets, "bytes": flow.bytes},
    }


def parse_conn_id(text: Any, queues: Iterable[int]) -> tuple[int, int]:
    """ "QUEUE:FLOW" (or "FLOW" with a single worker) into (queue, flow); ValueError if invalid."""
    qs = sorted(queues)
    s = str(text).strip()
    q_text, sep, flow_text = s.rpartition(":")
    if not flow_text.isdigit() or (sep and not q_text.isdigit()):
        raise ValueError(f"bad connection id {s!r}: expected QUEUE:FLOW, e.g. 0:17")
    if not sep:
        if len(qs) != 1:
            raise ValueError(f"connection id {s!r} is ambiguous with {len(qs)} workers: use QUEUE:FLOW")
        return qs[0], int(flow_text)
    q = int(q_text)
    if q not in qs:
        raise ValueError(f"no worker serves queue {q} (queues: {', '.join(map(str, qs))})")
    return q, int(flow_text)
