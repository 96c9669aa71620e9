"""The control socket: `tcpguard version`, `status`, `connections`, `drop`, `reset` and `reload` on a
running daemon.

Protocol. A Unix stream socket carrying one JSON object per line (UTF-8) each way: a request
`{"cmd": "status"}` is answered by `{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`. A
client may send several requests on one connection, one at a time. Line-delimited JSON needs nothing but
the standard library on either end and can be typed by hand (`socat - UNIX:/run/tcpguard/control.sock`).

Commands: `ping`; `version`; `status`; `connections` (`filter`: {key: "value[,value...]"}, `limit`);
`drop` and `reset` (`id`: "QUEUE:FLOW"); `reload`. See docs/observability.md for the result documents.

Who may connect. Root, the daemon's own user, and members of `control.group`; nobody else. The file
system enforces it first (the socket is 0600, or 0660 with the group; a directory tcpguard creates, or
the one systemd made for it in $RUNTIME_DIRECTORY, is 0700/0750 with the same group), and the server
checks the peer's credentials again with SO_PEERCRED on every connection, so a socket file that an
operator loosened by hand, or a descriptor passed on to another process, still cannot be used by others.

Where requests run. The engine belongs to the packet loop: no other thread may touch it while a packet is
being processed. So socket I/O happens in small server threads, and every request that needs the engine
is put in the worker's `Inbox` and executed in the adapter's timer tick (every 0.5 s at the latest), in
the packet-loop thread, between packets; the server thread waits for the answer. Forged RSTs from
`reset` are returned by that tick like any timer output, so the adapter sends them.

Several workers. The main process (the supervisor) serves the one public socket and fans requests out to
the workers over a private socket pair per worker (made at fork, so no file system path and no
permission question); it also serves the metrics endpoint from the same fan-out. One socket and one
endpoint per gateway keep operators' tools and Prometheus targets independent of the worker count.
`status` and `connections` merge every worker's answer (a worker that is restarting is reported with an
error instead of failing the whole request). Connection ids are `QUEUE:FLOW` (the queue number of the
worker and its engine's flow id), unambiguous across workers; a bare FLOW is accepted when there is one
worker.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import ipaddress
import json
import logging
import os
import pwd
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tcpguard.app.metrics import rss_bytes

__all__ = [
    "AccessPolicy",
    "ChannelLinks",
    "ChannelServer",
    "ConnFilter",
    "ControlClient",
    "ControlError",
    "ControlServer",
    "Dispatcher",
    "Inbox",
    "InboxLinks",
    "WorkerChannel",
    "add_subparser",
    "connection_row",
    "parse_conn_id",
]

log = logging.getLogger("tcpguard.control")

Request = dict[str, Any]
Response = dict[str, Any]

#: Longest request line a server reads; a client sending more is cut off (requests are tiny).
MAX_REQUEST = 64 * 1024
#: How long the control side waits for a worker's timer tick to answer.
WORKER_TIMEOUT = 10.0
COMMANDS = ("ping", "version", "status", "connections", "drop", "reset", "reload")


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


# ================================================================================== who may connect


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def supplementary_groups(pid: int) -> set[int]:
    """The peer's supplementary groups, from /proc (SO_PEERCRED only gives the primary gid)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:] if g.isdigit()}
    except OSError:
        pass
    return set()


def resolve_group(group: str | None) -> int | None:
    """The gid of `control.group` (a name or a number); ControlError if the group does not exist."""
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ControlError(f"control.group: no group named {group!r}") from None


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Root, the daemon's own user, and (when set) members of one group."""

    gid: int | None = None
    owner: int = field(default_factory=os.geteuid)

    def allows(self, pid: int, uid: int, gid: int) -> bool:
        if uid in (0, self.owner):
            return True
        if self.gid is None:
            return False
        if gid == self.gid or self.gid in supplementary_groups(pid):
            return True
        # /proc may be hidden from the daemon (systemd's ProtectProc): fall back to the group database.
        try:
            name = pwd.getpwuid(uid).pw_name
            return name in grp.getgrgid(self.gid).gr_mem
        except KeyError:
            return False


# ================================================================================== the worker's inbox


class _Pending:
    __slots__ = ("done", "request", "response", "taken")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.response: Response | None = None
        self.done = threading.Event()
        self.taken = False


class Inbox:
    """Requests from control threads, executed in the packet loop's timer tick.

    `submit` (any thread) waits for the answer; `serve` (the packet-loop thread, in the tick) executes
    everything pending. A request not yet taken when `submit` times out is withdrawn and never runs; one
    already taken runs to its end (a reset that the caller stopped waiting for still happens).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[_Pending] = []
        self._closed: str | None = None

    def submit(self, request: Request, timeout: float = WORKER_TIMEOUT) -> Response:
        p = _Pending(request)
        with self._lock:
            if self._closed is not None:
                return error(self._closed)
            self._pending.append(p)
        if p.done.wait(timeout):
            assert p.response is not None
            return p.response
        with self._lock:
            if not p.taken:
                self._pending.remove(p)
                return error(f"the packet loop did not answer within {timeout:g} s")
        p.done.wait()  # taken: it is running now, and the tick finishes what it started
        assert p.response is not None
        return p.response

    def serve(self, execute: Callable[[Request], Response]) -> int:
        """Execute every pending request (call only from the packet-loop thread). Returns how many."""
        with self._lock:
            batch, self._pending = self._pending, []
            for p in batch:
                p.taken = True
        try:
            for p in batch:
                try:
                    p.response = execute(p.request)
                except Exception as exc:
                    log.exception("control request %r failed", p.request.get("cmd"))
                    p.response = error(f"internal error: {type(exc).__name__}: {exc}")
                p.done.set()
        finally:
            # A BaseException (the loop is being stopped) must not leave a caller waiting forever.
            for p in batch:
                if not p.done.is_set():
                    p.response = error("interrupted")
                    p.done.set()
        return len(batch)

    def close(self, reason: str = "the worker is stopping") -> None:
        """Refuse new requests and answer the pending ones with `reason`."""
        with self._lock:
            self._closed = reason
            batch, self._pending = self._pending, []
        for p in batch:
            p.response = error(reason)
            p.done.set()


# ================================================================================== connection rows


_FILTER_KEYS = ("state", "ip", "client", "server", "port", "cport", "sport", "queue")


def _states(items: list[str]) -> frozenset[str]:
    """TCP state names, any case; a name that is not one is an error that lists the valid ones (a
    misspelt state would otherwise match nothing, and an empty table reads as "no such connections")."""
    from tcpguard.core.state import State

    names = [v.upper() for v in items]
    unknown = [v for v in names if v not in State.__members__]
    if unknown:
        raise ValueError(
            f"filter state: unknown state {', '.join(unknown)} (states: {', '.join(State.__members__)})"
        )
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
        if self.queue is not None and queue not in self.queue:
            return False
        if self.states is not None and conn.state.name not in self.states:
            return False
        if self.port is not None and conn.cport not in self.port and conn.sport not in self.port:
            return False
        if self.cport is not None and conn.cport not in self.cport:
            return False
        if self.sport is not None and conn.sport not in self.sport:
            return False
        if self.ip is not None or self.client is not None or self.server is not None:
            c, s = conn.srcip, conn.dstip
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


# ================================================================================== links to workers


class WorkerLinks(Protocol):
    """How the dispatcher reaches the workers: in process (one worker) or over socket pairs."""

    def queues(self) -> list[int]: ...

    def call(self, queues: list[int], request: Request, timeout: float) -> dict[int, Response]: ...


class InboxLinks:
    """The single-process daemon: the one worker's inbox, in this process."""

    def __init__(self, queue: int, inbox: Inbox) -> None:
        self.queue = queue
        self.inbox = inbox

    def queues(self) -> list[int]:
        return [self.queue]

    def call(self, queues: list[int], request: Request, timeout: float) -> dict[int, Response]:
        return {q: self.inbox.submit(request, timeout) for q in queues if q == self.queue}


class WorkerChannel:
    """The supervisor's end of one worker's socket pair. Requests carry an `rid` so that a late answer
    to a request that timed out is recognised and skipped instead of answering the next one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self._buf = bytearray()
        self._rid = 0

    def send(self, request: Request) -> int:
        self._rid += 1
        self.sock.settimeout(5.0)
        self.sock.sendall(encode({**request, "rid": self._rid}))
        return self._rid

    def receive(self, rid: int, deadline: float) -> Response:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if isinstance(msg, dict) and msg.get("rid") == rid:
                    msg.pop("rid", None)
                    return msg
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the worker did not answer in time")
            self.sock.settimeout(left)
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("the worker closed its control channel")
            self._buf += data

    def close(self) -> None:
        # shutdown first: it wakes a fan-out thread blocked in recv() on this socket.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


class ChannelLinks:
    """The supervisor's view of its workers: queue -> channel, replaced when a worker is restarted.
    `queues()` is the configured set, so a worker that is restarting shows up as an error, not as gone."""

    def __init__(self, queues: Iterable[int] = ()) -> None:
        self._lock = threading.Lock()
        self._channels: dict[int, WorkerChannel] = {}
        self._queues = set(queues)

    def set(self, queue: int, sock: socket.socket) -> None:
        with self._lock:
            old = self._channels.get(queue)
            self._channels[queue] = WorkerChannel(sock)
            self._queues.add(queue)
        if old is not None:
            old.close()

    def remove(self, queue: int) -> None:
        with self._lock:
            old = self._channels.pop(queue, None)
        if old is not None:
            old.close()

    def filenos(self) -> list[int]:
        with self._lock:
            return [c.sock.fileno() for c in self._channels.values() if c.sock.fileno() >= 0]

    def queues(self) -> list[int]:
        with self._lock:
            return sorted(self._queues)

    def call(self, queues: list[int], request: Request, timeout: float) -> dict[int, Response]:
        """Send to every worker first, then collect, so N workers answer in one tick, not N ticks.
        Channels are locked in queue order (no deadlock between concurrent fan-outs)."""
        with self._lock:
            chans = [(q, self._channels[q]) for q in sorted(queues) if q in self._channels]
        out: dict[int, Response] = {q: error("the worker is not running (restarting?)") for q in queues}
        with contextlib.ExitStack() as stack:
            for _, ch in chans:
                stack.enter_context(ch.lock)
            sent: list[tuple[int, WorkerChannel, int]] = []
            for q, ch in chans:
                try:
                    sent.append((q, ch, ch.send(request)))
                except OSError as exc:
                    out[q] = error(f"worker unreachable: {exc}")
            deadline = time.monotonic() + timeout
            for q, ch, rid in sent:
                try:
                    out[q] = ch.receive(rid, deadline)
                except (OSError, TimeoutError) as exc:
                    out[q] = error(f"worker for queue {q}: {exc}")
        return out


class ChannelServer:
    """The worker's end of its socket pair: requests from the supervisor, executed through the inbox."""

    def __init__(self, sock: socket.socket, inbox: Inbox) -> None:
        self.sock = sock
        self.inbox = inbox
        self._thread = threading.Thread(target=self._run, name="control-channel", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()

    def _run(self) -> None:
        buf = bytearray()
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return
                buf += data
                while (nl := buf.find(b"\n")) >= 0:
                    line = bytes(buf[:nl])
                    del buf[: nl + 1]
                    try:
                        req = json.loads(line)
                    except ValueError:
                        continue
                    if not isinstance(req, dict):
                        continue
                    rid = req.pop("rid", None)
                    resp = self.inbox.submit(req, WORKER_TIMEOUT)
                    self.sock.sendall(encode({**resp, "rid": rid}))
        except OSError:
            return


# ================================================================================== the dispatcher


_TOTAL_PATHS = (
    ("packets", ("received", "accepted", "dropped", "held")),
    ("bytes", ("received", "accepted", "dropped")),
    ("connections", ("tracked", "opened", "midstream")),
    ("queue_drops", ("kernel_dropped", "kernel_user_dropped", "kernel_waiting", "enobufs")),
    ("memory", ("rss", "buffered")),
    ("adapter", ("sent_in_place", "send_pending", "send_errors", "looped")),
)


_TOTAL_COUNTS = ("resets_sent", "rule_errors", "alerts", "reloads", "reload_failures")


def totals(workers: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum of the workers' counters (workers that answered), in the same shape as one worker's."""
    out: dict[str, Any] = dict.fromkeys(_TOTAL_COUNTS, 0)
    for section, keys in _TOTAL_PATHS:
        out[section] = dict.fromkeys(keys, 0)
    by_state: dict[str, int] = {}
    drops: dict[str, int] = {}
    for w in workers:
        if "error" in w:
            continue
        for key in _TOTAL_COUNTS:
            out[key] += int(w.get(key) or 0)
        for section, keys in _TOTAL_PATHS:
            sub = w.get(section) or {}
            for k in keys:
                out[section][k] += int(sub.get(k) or 0)
        for state, n in (w.get("connections") or {}).get("by_state", {}).items():
            by_state[state] = by_state.get(state, 0) + int(n)
        for reason, n in (w.get("drops") or {}).items():
            drops[reason] = drops.get(reason, 0) + int(n)
    out["connections"]["by_state"] = dict(sorted(by_state.items()))
    out["drops"] = dict(sorted(drops.items()))
    return out


class Dispatcher:
    """Executes control requests against the workers; the same code for one worker and for many."""

    def __init__(
        self,
        links: WorkerLinks,
        mode: str,
        reload_check: Callable[[], str | None] | None = None,
        reload_hooks: tuple[Callable[[], None], Callable[[], None]] | None = None,
        timeout: float = WORKER_TIMEOUT,
        bypassed: Callable[[], int | None] | None = None,
        bypassed_note: str | None = None,
    ) -> None:
        self.links = links
        self.mode = mode
        # Packets that passed uninspected (fail-open), counted for all queues together since one NFQUEUE
        # rule feeds them all (tcpguard.app.metrics.BypassMeter); None when not measured.
        self.bypassed = bypassed
        # Why `bypassed` is not measured, shown where the missing number is (status, docs).
        self.bypassed_note = bypassed_note
        self.reload_check = reload_check
        self.reload_hooks = reload_hooks
        self.timeout = timeout
        self.started = time.monotonic()
        self.started_wall = time.time()
        self._reload_lock = threading.Lock()

    def handle(self, request: Request) -> Response:
        cmd = request.get("cmd")
        if cmd == "ping":
            return ok("pong")
        if cmd == "version":
            return ok({**version_info(), "pid": os.getpid()})
        if cmd == "status":
            return ok(self.status())
        if cmd == "connections":
            return self._connections(request)
        if cmd in ("drop", "reset"):
            return self._act(str(cmd), request)
        if cmd == "reload":
            return self._reload()
        return error(f"unknown command {cmd!r} (commands: {', '.join(COMMANDS)})")

    def status(self) -> dict[str, Any]:
        queues = self.links.queues()
        answers = self.links.call(queues, {"cmd": "status"}, self.timeout)
        workers: list[dict[str, Any]] = []
        for q in queues:
            a = answers.get(q) or error("no answer")
            workers.append(a["result"] if a.get("ok") else {"queue": q, "error": a.get("error")})
        total = totals(workers)
        total["queue_drops"]["bypassed"] = self.bypassed() if self.bypassed is not None else None
        if self.bypassed is None and self.bypassed_note is not None:
            total["queue_drops"]["bypassed_note"] = self.bypassed_note
        return {
            **version_info(),
            "mode": self.mode,
            "pid": os.getpid(),
            "started": self.started_wall,
            "uptime": round(time.monotonic() - self.started, 3),
            "rss": rss_bytes(),
            "workers": workers,
            "totals": total,
        }

    def _connections(self, request: Request) -> Response:
        try:
            flt = ConnFilter.parse(request.get("filter"))
        except ValueError as exc:
            return error(str(exc))
        limit = request.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            return error("limit must be a non-negative integer")
        queues = [q for q in self.links.queues() if flt.queue is None or q in flt.queue]
        sub: Request = {"cmd": "connections", "filter": request.get("filter") or {}}
        if limit is not None:
            sub["limit"] = limit
        answers = self.links.call(queues, sub, self.timeout)
        rows: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        truncated = False
        for q in queues:
            a = answers.get(q) or error("no answer")
            if not a.get("ok"):
                errors.append({"queue": q, "error": a.get("error")})
                continue
            rows.extend(a["result"]["connections"])
            truncated = truncated or bool(a["result"].get("truncated"))
        rows.sort(key=lambda r: (r["queue"], r["flow"]))
        if limit is not None and len(rows) > limit:
            rows, truncated = rows[:limit], True
        return ok({"connections": rows, "truncated": truncated, "errors": errors})

    def _act(self, cmd: str, request: Request) -> Response:
        try:
            queue, flow = parse_conn_id(request.get("id"), self.links.queues())
        except ValueError as exc:
            return error(str(exc))
        answers = self.links.call([queue], {"cmd": cmd, "flow": flow}, self.timeout)
        return answers.get(queue) or error("no answer")

    def _reload(self) -> Response:
        # One reload at a time: two overlapping ones would interleave their RELOADING/READY messages.
        with self._reload_lock:
            if self.reload_check is not None:
                problem = self.reload_check()
                if problem is not None:
                    # The workers count it as a failed reload, as if they had tried (status, metrics).
                    self.links.call(self.links.queues(), {"cmd": "reload", "refused": problem}, self.timeout)
                    return error(f"reload refused, the running config and rules stay: {problem}")
            begin, end = self.reload_hooks or (None, None)
            if begin is not None:
                begin()
            try:
                queues = self.links.queues()
                answers = self.links.call(queues, {"cmd": "reload"}, self.timeout)
            finally:
                if end is not None:
                    end()
        results = [{"queue": q, **(answers.get(q) or error("no answer"))} for q in queues]
        failed = [r for r in results if not r.get("ok")]
        if failed:
            return {
                "ok": False,
                "error": "; ".join(f"queue {r['queue']}: {r['error']}" for r in failed),
                "result": results,
            }
        return ok(results)


# ================================================================================== the server


class ControlServer:
    """The listening Unix socket: access control, one thread per client, requests to `handler`.

    `start()` raises ControlError when the socket cannot be served (another daemon answers on the path,
    the path is not a socket, the group does not exist, bind fails).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        handler: Callable[[Request], Response],
        group: str | None = None,
        max_clients: int = 32,
        idle_timeout: float = 60.0,
    ) -> None:
        self.path = Path(path)
        self.handler = handler
        self.group = group
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self.policy = AccessPolicy()
        self.refused = 0
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._clients: set[socket.socket] = set()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        gid = resolve_group(self.group)
        self.policy = AccessPolicy(gid)
        self._prepare_directory(gid)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The socket file must never exist with looser permissions, not even between bind and chmod.
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot bind the control socket {self.path}: {exc}") from exc
        finally:
            os.umask(old)
        try:
            if gid is not None:
                os.chown(self.path, -1, gid)
                os.chmod(self.path, 0o660)
            else:
                os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            sock.listen(16)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                self.path.unlink()
            raise ControlError(f"cannot set up the control socket {self.path}: {exc}") from exc
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="control-accept", daemon=True)
        self._thread.start()
        log.info("control socket %s (%s)", self.path, f"root and group {self.group}" if gid else "root only")

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def close(self) -> None:
        """Stop accepting, cut the clients off, remove the socket file (if it is still ours)."""
        self._closed = True
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes accept() in the server thread
            sock.close()
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._inode is not None:
            with contextlib.suppress(OSError):
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    self.path.unlink()
            self._inode = None

    def filenos(self) -> list[int]:
        """The listening socket and the connected clients (a forked worker closes its copies)."""
        with self._lock:
            clients = [c.fileno() for c in self._clients]
        return [self.fileno(), *clients]

    # ------------------------------------------------------------------ helpers
    def _prepare_directory(self, gid: int | None) -> None:
        """Create the socket's directory if missing. Its mode and group are set only when it is ours:
        created here, or the runtime directory systemd made for this service; a shared directory such
        as /run or /tmp is never touched (the socket's own mode still protects it)."""
        directory = self.path.parent
        mode = 0o750 if gid is not None else 0o700
        ours = os.environ.get("RUNTIME_DIRECTORY", "").split(":")
        if not directory.exists():
            try:
                directory.mkdir(mode=mode, parents=True)
            except OSError as exc:
                raise ControlError(f"cannot create {directory}: {exc}") from exc
        elif str(directory) not in ours:
            return
        try:
            if gid is not None:
                os.chown(directory, -1, gid)
            os.chmod(directory, mode)
        except OSError as exc:
            raise ControlError(f"cannot set the mode of {directory}: {exc}") from exc

    def _remove_stale(self) -> None:
        """A socket file left by a daemon that was killed is removed; a live one is an error."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            log.warning("removed the control socket %s, left by a run that did not stop cleanly", self.path)
            return
        except OSError as exc:
            raise ControlError(f"cannot check the existing socket {self.path}: {exc}") from exc
        finally:
            probe.close()
        raise ControlError(f"another process answers on {self.path}: is tcpguard already running?")

    def _accept_loop(self) -> None:
        while not self._closed:
            sock = self._sock
            if sock is None:
                return
            try:
                conn, _ = sock.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.1)  # e.g. EMFILE: do not spin
                continue
            try:
                creds = peer_credentials(conn)
            except OSError:
                conn.close()
                continue
            if not self.policy.allows(*creds):
                self.refused += 1
                log.warning("control: refused a client (pid %d, uid %d, gid %d)", *creds)
                with contextlib.suppress(OSError):
                    conn.sendall(encode(error("permission denied")))
                conn.close()
                continue
            with self._lock:
                busy = len(self._clients) >= self.max_clients
                if not busy:
                    self._clients.add(conn)
            if busy:
                with contextlib.suppress(OSError):
                    conn.sendall(encode(error("too many control clients, try again")))
                conn.close()
                continue
            threading.Thread(
                target=self._session, args=(conn, creds), name="control-client", daemon=True
            ).start()

    def _session(self, conn: socket.socket, creds: tuple[int, int, int]) -> None:
        buf = bytearray()
        try:
            conn.settimeout(self.idle_timeout)
            while not self._closed:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while (nl := buf.find(b"\n")) >= 0:
                    line = bytes(buf[:nl])
                    del buf[: nl + 1]
                    if line.strip():
                        conn.sendall(encode(self._answer(line, creds)))
                if len(buf) > MAX_REQUEST:
                    conn.sendall(encode(error(f"request longer than {MAX_REQUEST} bytes")))
                    return
        except OSError:
            return
        finally:
            with self._lock:
                self._clients.discard(conn)
            conn.close()

    def _answer(self, line: bytes, creds: tuple[int, int, int]) -> Response:
        try:
            req = json.loads(line)
        except ValueError:
            return error("a request is one JSON object per line")
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return error('a request is a JSON object with a "cmd" string')
        if req["cmd"] in ("drop", "reset", "reload"):
            log.info("control: %s %s by uid %d (pid %d)", req["cmd"], req.get("id", ""), creds[1], creds[0])
        try:
            return self.handler(req)
        except Exception as exc:
            log.exception("control request %r failed", req.get("cmd"))
            return error(f"internal error: {type(exc).__name__}: {exc}")


# ================================================================================== the client side


class ControlClient:
    """Talks to a running daemon's control socket; errors are ControlError with an operator message."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def call(self, request: Request) -> Response:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(str(self.path))
            except FileNotFoundError:
                raise ControlError(
                    f"no control socket at {self.path}: is tcpguard running, with this control.socket?"
                ) from None
            except PermissionError:
                raise ControlError(
                    f"permission denied on {self.path}: root or the configured control.group only"
                ) from None
            except ConnectionRefusedError:
                raise ControlError(f"nobody answers on {self.path}: tcpguard is not running") from None
            # Refused at once (permission, too many clients): the send may fail, the reason is still there.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(encode(request))
            buf = bytearray()
            while b"\n" not in buf:
                data = sock.recv(1 << 20)
                if not data:
                    raise ControlError("the daemon closed the connection without an answer")
                buf += data
        except TimeoutError:
            raise ControlError(f"no answer from {self.path} within {self.timeout:g} s") from None
        except OSError as exc:
            raise ControlError(f"control socket {self.path}: {exc}") from None
        finally:
            sock.close()
        try:
            resp = json.loads(buf[: buf.find(b"\n")])
        except ValueError:
            raise ControlError("the daemon sent an answer that is not JSON") from None
        if not isinstance(resp, dict):
            raise ControlError("the daemon sent an answer that is not a JSON object")
        return resp


def _socket_path(args: argparse.Namespace) -> Path:
    """--socket, else the config's control.socket (--config, or the default config if it exists)."""
    from tcpguard.app.config import ConfigError, ControlConfig, load_config

    if args.socket:
        return Path(args.socket)
    config = args.config
    if config is None:
        from tcpguard.app.cli import DEFAULT_CONFIG

        config = DEFAULT_CONFIG if Path(DEFAULT_CONFIG).exists() else None
    if config is None:
        return ControlConfig().socket
    try:
        return load_config(config).control.socket
    except ConfigError as exc:
        raise ControlError(str(exc)) from None


def _human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _duration(s: float) -> str:
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:d}:{m:02d}:{s:02d}"


_STATUS_ROWS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("packets received", ("packets", "received"), "n"),
    ("  accepted", ("packets", "accepted"), "n"),
    ("  dropped", ("packets", "dropped"), "n"),
    ("  held now", ("packets", "held"), "n"),
    ("  looped back (mark)", ("adapter", "looped"), "n"),
    ("bytes received", ("bytes", "received"), "n"),
    ("  accepted", ("bytes", "accepted"), "n"),
    ("  dropped", ("bytes", "dropped"), "n"),
    ("resets sent", ("resets_sent",), "n"),
    ("  as a dropped packet", ("adapter", "sent_in_place"), "n"),
    ("  waiting for a retry", ("adapter", "send_pending"), "n"),
    ("  lost (not sent)", ("adapter", "send_errors"), "n"),
    ("rule errors", ("rule_errors",), "n"),
    ("alerts", ("alerts",), "n"),
    ("connections tracked", ("connections", "tracked"), "n"),
    ("connections opened", ("connections", "opened"), "n"),
    ("  met mid-stream", ("connections", "midstream"), "n"),
    ("queue full drops", ("queue_drops", "kernel_dropped"), "n"),
    ("queue user drops", ("queue_drops", "kernel_user_dropped"), "n"),
    ("queue bypassed", ("queue_drops", "bypassed"), "n"),
    ("netlink ENOBUFS", ("queue_drops", "enobufs"), "n"),
    ("memory RSS", ("memory", "rss"), "bytes"),
    ("stream buffers", ("memory", "buffered"), "bytes"),
    ("uptime", ("uptime",), "time"),
)


def _get(doc: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        doc = doc.get(key) if isinstance(doc, dict) else None
    return doc


def _cell(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        return _human_bytes(value)
    if kind == "time":
        return _duration(value)
    return str(value)


def format_status(st: dict[str, Any]) -> str:
    """A table: one column for the total, one per worker; connections by state after the counts."""
    workers = st.get("workers", [])
    live = [w for w in workers if "error" not in w]
    lines = [
        f"tcpguard {st.get('version')} ({st.get('core')} core): up {_duration(st.get('uptime', 0))}, "
        f"{st.get('mode')} mode, pid {st.get('pid')}, main RSS {_human_bytes(st.get('rss'))}"
    ]
    lines += [f"queue {w.get('queue')}: {w['error']}" for w in workers if "error" in w]
    cols: list[dict[str, Any]] = [st.get("totals", {}), *live]
    table = [["", "total", *(f"queue {w['queue']}" for w in live)]]
    rows = list(_STATUS_ROWS)
    states = sorted({s for c in cols for s in (_get(c, ("connections", "by_state")) or {})})
    at = next(i for i, r in enumerate(rows) if r[0] == "connections opened") + 1
    rows[at:at] = [(f"  {s}", ("connections", "by_state", s), "n") for s in states]
    # Why packets were dropped, under the count of them (the engine's reasons and the daemon's "held,
    # then dropped"; none when nothing was).
    reasons = sorted({r for c in cols for r in (_get(c, ("drops",)) or {})})
    at = next(i for i, r in enumerate(rows) if r[1] == ("packets", "dropped")) + 1
    rows[at:at] = [(f"    {r}", ("drops", r), "n") for r in reasons]
    for label, path, kind in rows:
        cells = [_cell(_get(c, path), kind) for c in cols]
        if kind == "time":
            cells[0] = ""  # a sum of uptimes means nothing
        if path[0] == "drops" or path[:2] == ("connections", "by_state"):
            cells = [c if c != "-" else "0" for c in cells]
        table.append([label, *cells])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        lines.append(
            "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)).rstrip()
        )
    note = _get(st.get("totals", {}), ("queue_drops", "bypassed_note"))
    if note:
        lines.append(f"queue bypassed: {note}")
    return "\n".join(lines)


def format_connections(result: dict[str, Any]) -> str:
    def ep(host: str, port: int) -> str:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    table = [["ID", "CLIENT", "SERVER", "STATE", "PKTS UP/DOWN", "BYTES UP/DOWN", "AGE", "IDLE"]]
    for r in result["connections"]:
        state = r["state"] + (f" ({r['ended']})" if r.get("ended") else "")
        table.append(
            [
                r["id"],
                ep(r["client"], r["cport"]),
                ep(r["server"], r["sport"]),
                state,
                f"{r['packets'][0]}/{r['packets'][1]}",
                f"{r['bytes'][0]}/{r['bytes'][1]}",
                f"{r['age']:.1f}s",
                f"{r['idle']:.1f}s",
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in table]
    if result.get("truncated"):
        lines.append("(more connections: raise --limit)")
    for e in result.get("errors", []):
        lines.append(f"queue {e['queue']}: {e['error']}")
    return "\n".join(lines)


def _parse_filters(items: list[str] | None) -> dict[str, str]:
    spec: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise ControlError(
                f"--filter {item!r}: expected KEY=VALUE, e.g. state=ESTABLISHED or port=80,443"
            )
        if key in spec:
            raise ControlError(f"--filter {key} given twice: separate alternatives with commas instead")
        spec[key] = value.strip()
    return spec


def cmd_control(args: argparse.Namespace) -> int:
    name = args.command
    try:
        path = _socket_path(args)
        if name == "connections":
            req: Request = {"cmd": "connections", "filter": _parse_filters(args.filter)}
            if args.limit is not None:
                req["limit"] = args.limit
        elif name in ("drop", "reset"):
            req = {"cmd": name, "id": args.id}
        elif name == "version":
            req = {"cmd": "version"}
        else:
            req = {"cmd": name}
        resp = ControlClient(path, timeout=args.timeout).call(req)
    except ControlError as exc:
        print(f"tcpguard {name}: {exc}", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        print(json.dumps(resp.get("result") if resp.get("ok") else resp, indent=2, default=str))
        return 0 if resp.get("ok") else 1
    if not resp.get("ok"):
        print(f"tcpguard {name}: {resp.get('error')}", file=sys.stderr)
        return 1
    result: Any = resp.get("result")
    if name == "status":
        print(format_status(result))
    elif name == "version":
        print(f"tcpguard {result['version']} ({result['core']} core), daemon pid {result['pid']}")
    elif name == "connections":
        print(format_connections(result))
    elif name in ("drop", "reset"):
        print(
            f"{result['id']}: {name} ({result['forged']} RST packets sent)"
            if name == "reset"
            else f"{result['id']}: dropped"
        )
    elif name == "reload":
        for r in result:
            print(f"queue {r['queue']}: reloaded, {r['result']['rules']} rules")
    return 0


def add_subparser(sub: Any) -> None:
    """Register version, status, connections, drop, reset and reload with the `tcpguard` command line."""
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_mutually_exclusive_group()
    where.add_argument("--socket", help="control socket path (default: control.socket of the config)")
    where.add_argument(
        "--config",
        help="config file to read control.socket from (default /etc/tcpguard/tcpguard.yaml when it exists)",
    )
    common.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer")

    v = sub.add_parser(
        "version",
        parents=[common],
        help="the running daemon's version and core (`tcpguard --version`: the installed one)",
    )
    v.add_argument("--json", action="store_true", help="print the answer as JSON")
    v.set_defaults(func=cmd_control)

    s = sub.add_parser("status", parents=[common], help="counters of the running daemon, per worker")
    s.add_argument("--json", action="store_true", help="print the status document as JSON")
    s.set_defaults(func=cmd_control)

    c = sub.add_parser("connections", parents=[common], help="list the tracked connections")
    c.add_argument(
        "--filter",
        action="append",
        metavar="KEY=VALUE",
        help="only connections matching: state, ip, client, server (address or CIDR), port, "
        "cport, sport, queue; comma-separated alternatives; repeat for more keys",
    )
    c.add_argument("--limit", type=int, help="at most this many connections")
    c.add_argument("--json", action="store_true", help="print the connections as JSON")
    c.set_defaults(func=cmd_control)

    for name, text in (
        ("drop", "drop a live connection silently from now on"),
        ("reset", "reset a live connection: RST to both ends, then drop"),
    ):
        a = sub.add_parser(name, parents=[common], help=text)
        a.add_argument("id", help="connection id QUEUE:FLOW as listed by `tcpguard connections`")
        a.add_argument("--json", action="store_true", help="print the answer as JSON")
        a.set_defaults(func=cmd_control)

    r = sub.add_parser(
        "reload",
        parents=[common],
        help="reload the config and rules (like SIGHUP), and report whether it worked",
    )
    r.add_argument("--json", action="store_true", help="print the answer as JSON")
    r.set_defaults(func=cmd_control)
