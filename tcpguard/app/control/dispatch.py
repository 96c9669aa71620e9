"""The control commands, in one table, and the dispatcher that executes a request by it.

Each command is served in up to two places: the dispatcher (in the process that owns the public socket)
and the workers (in their packet loops, where the engine may be touched). The table says, for each name,
how the request fans out (answered by the dispatcher alone, sent to every worker, or sent to the worker
of the connection id's queue), what the dispatcher does with it and the answers, and what a worker does.
Both `Dispatcher.handle` and the daemon's `Worker.control` look the name up here, so a command is added,
or changed, in one place.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tcpguard.app.control.protocol import (
    WORKER_TIMEOUT,
    ConnFilter,
    Request,
    Response,
    error,
    ok,
    parse_conn_id,
    version_info,
)
from tcpguard.app.control.server import WorkerLinks
from tcpguard.app.daemon.metrics import rss_bytes

# ================================================================================== the dispatcher


_TOTAL_PATHS = (
    ("packets", ("received", "accepted", "dropped", "held")),
    ("bytes", ("received", "accepted", "dropped")),
    ("connections", ("tracked", "opened", "midstream")),
    ("queue_drops", ("kernel_dropped", "kernel_user_dropped", "kernel_waiting", "enobufs")),
    ("memory", ("rss", "buffered")),
    (
        "adapter",
        (
            "sent_in_place",
            "send_pending",
            "send_errors",
            "looped",
            "bypass_marked",
            "bypass_looped",
            "gso_packets",
            "csum_partial",
            "csum_trusted",
        ),
    ),
    ("bypass", ("connections", "remembered", "late_packets", "late_bytes", "depth_reached")),
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
    # The largest packet of any worker (not a sum).
    out["adapter"]["largest"] = max(
        (int((w.get("adapter") or {}).get("largest") or 0) for w in workers if "error" not in w), default=0
    )
    out["connections"]["by_state"] = dict(sorted(by_state.items()))
    out["drops"] = dict(sorted(drops.items()))
    return out


class Fanout(enum.Enum):
    """Where a command is answered."""

    #: The dispatcher answers alone (it runs the same code as the workers: they are its forks).
    DISPATCHER = "the dispatcher"
    #: Sent to every worker (or those a filter names); the dispatcher merges the answers.
    EVERY_WORKER = "every worker"
    #: Sent to the one worker whose queue the connection id names.
    ID_WORKER = "the worker of the id's queue"


class WorkerSide(Protocol):
    """What a worker offers the commands that reach it. Called in its packet loop, between packets
    (`tcpguard.app.daemon.worker.Worker` is the one implementation; the protocol keeps this package from
    importing the daemon)."""

    def status(self, now: float) -> dict[str, Any]: ...

    def connection_rows(
        self, flt: ConnFilter, limit: int | None, now: float
    ) -> tuple[list[dict[str, Any]], bool]: ...

    def act(self, cmd: str, flow: Any, now: float) -> Response: ...

    def reload_request(self, refused: str | None) -> Response: ...


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
        kernel_bypass: Callable[[], tuple[int, int] | None] | None = None,
        kernel_bypass_note: str | None = None,
    ) -> None:
        self.links = links
        self.mode = mode
        # Packets that passed uninspected (fail-open), counted for all queues together since one NFQUEUE
        # rule feeds them all (tcpguard.app.daemon.metrics.BypassMeter); None when not measured.
        self.bypassed = bypassed
        # Why `bypassed` is not measured, shown where the missing number is (status, docs).
        self.bypassed_note = bypassed_note
        # Connection bypass (issue 20): packets and bytes of bypassed connections that the kernel carried
        # past the queues (the connmark rule's counters, `IptablesManager.bypass_counters`), for all queues
        # together; None when not measured, and why.
        self.kernel_bypass = kernel_bypass
        self.kernel_bypass_note = kernel_bypass_note
        self.reload_check = reload_check
        self.reload_hooks = reload_hooks
        self.timeout = timeout
        self.started = time.monotonic()
        self.started_wall = time.time()
        self._reload_lock = threading.Lock()

    def handle(self, request: Request) -> Response:
        """Answer one request by the table; any thread (the worker parts run in the workers' loops)."""
        cmd = request.get("cmd")
        command = COMMANDS.get(cmd) if isinstance(cmd, str) else None
        if command is None:
            return error(f"unknown command {cmd!r} (commands: {', '.join(COMMANDS)})")
        return command.dispatch(self, request)

    def _ping(self, request: Request) -> Response:
        return ok("pong")

    def _version(self, request: Request) -> Response:
        return ok({**version_info(), "pid": os.getpid()})

    def _status(self, request: Request) -> Response:
        return ok(self.status())

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
        kernel = self.kernel_bypass() if self.kernel_bypass is not None else None
        total["bypass"]["kernel_packets"] = kernel[0] if kernel is not None else None
        total["bypass"]["kernel_bytes"] = kernel[1] if kernel is not None else None
        if kernel is None and self.kernel_bypass_note is not None:
            total["bypass"]["kernel_note"] = self.kernel_bypass_note
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

    def _act(self, request: Request) -> Response:
        cmd = str(request.get("cmd"))
        try:
            queue, flow = parse_conn_id(request.get("id"), self.links.queues())
        except ValueError as exc:
            return error(str(exc))
        answers = self.links.call([queue], {"cmd": cmd, "flow": flow}, self.timeout)
        return answers.get(queue) or error("no answer")

    def _reload(self, request: Request) -> Response:
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


# ================================================================================== the worker's part


def _worker_status(worker: WorkerSide, request: Request, now: float) -> Response:
    return ok(worker.status(now))


def _worker_connections(worker: WorkerSide, request: Request, now: float) -> Response:
    try:
        flt = ConnFilter.parse(request.get("filter"))
    except ValueError as exc:
        return error(str(exc))
    rows, truncated = worker.connection_rows(flt, request.get("limit"), now)
    return ok({"connections": rows, "truncated": truncated})


def _worker_act(worker: WorkerSide, request: Request, now: float) -> Response:
    return worker.act(str(request.get("cmd")), request.get("flow"), now)


def _worker_reload(worker: WorkerSide, request: Request, now: float) -> Response:
    # `refused`: the dispatcher's trial load failed; the worker loads nothing and only counts it.
    refused = request.get("refused")
    return worker.reload_request(str(refused) if refused else None)


def execute_in_worker(worker: WorkerSide, request: Request, now: float) -> Response:
    """A worker's answer to a request the dispatcher sent it (the daemon's `Worker.control`)."""
    cmd = request.get("cmd")
    command = COMMANDS.get(cmd) if isinstance(cmd, str) else None
    if command is None or command.execute is None:
        return error(f"unknown command {cmd!r}")
    return command.execute(worker, request, now)


# ================================================================================== the table


@dataclass(frozen=True, slots=True)
class Command:
    """One control command: how it fans out, the dispatcher's part, and the worker's part (None when the
    dispatcher answers alone)."""

    name: str
    fanout: Fanout
    dispatch: Callable[[Dispatcher, Request], Response]
    execute: Callable[[WorkerSide, Request, float], Response] | None = None

    def __post_init__(self) -> None:
        # A command that reaches workers needs their part, and one that does not must not have one that
        # nothing would call: either mistake would only show as "unknown command" at run time.
        if (self.fanout is Fanout.DISPATCHER) != (self.execute is None):
            raise ValueError(f"control command {self.name}: its fanout and its worker part disagree")


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("ping", Fanout.DISPATCHER, Dispatcher._ping),
        Command("version", Fanout.DISPATCHER, Dispatcher._version),
        Command("status", Fanout.EVERY_WORKER, Dispatcher._status, _worker_status),
        Command("connections", Fanout.EVERY_WORKER, Dispatcher._connections, _worker_connections),
        Command("drop", Fanout.ID_WORKER, Dispatcher._act, _worker_act),
        Command("reset", Fanout.ID_WORKER, Dispatcher._act, _worker_act),
        Command("reload", Fanout.EVERY_WORKER, Dispatcher._reload, _worker_reload),
    )
}
