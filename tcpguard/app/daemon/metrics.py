"""What a running gateway counts, and the Prometheus endpoint that exports it.

One source of truth: `tcpguard status` and `/metrics` are both built from the same status document (see
`tcpguard.app.control`), a JSON-able dict per worker that the worker assembles in its timer tick, where
reading the engine is safe. The Prometheus collector only translates that document into metric families
at scrape time, so the two views can never disagree about what a counter means.

Why a custom collector instead of `Counter` objects incremented on the packet path: the engine and the
adapter already count everything in plain integer attributes (the cheapest possible increment), and with
several worker processes the counters live in other processes anyway. Collecting on scrape costs nothing
between scrapes and needs no shared-memory multiprocess mode.

Also here: the small readers of kernel state that the status document includes (the NFQUEUE counters in
`/proc/net/netfilter/nfnetlink_queue`, the process's resident memory), and `BypassMeter`, which counts the
packets that passed uninspected through the queue's fail-open paths, which no kernel counter records.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = [
    "KERNEL_QUEUE_FILE",
    "BypassMeter",
    "KernelBypassReader",
    "MetricsServer",
    "StatusCollector",
    "Traffic",
    "kernel_queue_stats",
    "rss_bytes",
    "start_metrics_server",
]

log = logging.getLogger("tcpguard.metrics")

KERNEL_QUEUE_FILE = "/proc/net/netfilter/nfnetlink_queue"


@dataclass(slots=True)
class Traffic:
    """Packets and bytes through one worker, by what finally happened to them.

    The engine's own `Stats` count verdicts given when a packet arrives; a held packet gets its verdict
    later, in a `Release`. These count the final fate of every packet (direct verdict or release), in
    packets and in bytes as received from the queue, so `received = accepted + dropped + held now`
    (plus packets the adapter verdicted itself after a handler error, which it counts separately).
    """

    packets_received: int = 0
    bytes_received: int = 0
    packets_accepted: int = 0
    bytes_accepted: int = 0
    packets_dropped: int = 0
    bytes_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def kernel_queue_stats(queue_num: int, path: str = KERNEL_QUEUE_FILE) -> dict[str, int] | None:
    """The kernel's counters for one NFQUEUE, or None when the file or the queue's line is missing.

    The kernel prints one line per bound queue (net/netfilter/nfnetlink_queue.c, `seq_show`): queue
    number, peer port id, packets waiting, copy mode, copy range, packets dropped because the queue was
    full (`queue_dropped`), packets dropped because sending them to us failed (`user_dropped`, the
    netlink buffer overran), the last packet id, and a constant 1. The file is per network namespace,
    which is the daemon's own.
    """
    try:
        with open(path, encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 8 and fields[0].isdigit() and int(fields[0]) == queue_num:
            try:
                return {
                    "waiting": int(fields[2]),
                    "dropped": int(fields[5]),
                    "user_dropped": int(fields[6]),
                    "id_sequence": int(fields[7]),
                }
            except ValueError:
                return None
    return None


class BypassMeter:
    """Counts packets that passed uninspected through the fail-open paths of the queue (`queue.bypass`).

    Why a meter of its own: a packet that finds its queue full while the fail-open flag is set, or no
    process bound with `--queue-bypass`, is accepted by the kernel before it gets a queue packet id, and no
    kernel counter records it (`queue_dropped` counts only fail-closed drops, `id_sequence` only packets
    that entered the queue). The NFQUEUE iptables rules count it, though: so bypassed = packets the rules
    matched - packets that entered a queue (its last packet id) - packets dropped because it was full.

    `matched` returns the rules' packet count (`IptablesManager.queued_packets`); it runs iptables, so the
    meter is read only when a status is asked for, in the control or metrics thread, never in the packet
    loop. The rule counter is read before the queues, so packets arriving in between make one reading low,
    never high. The meter adds up the changes between readings (a queue whose counters went back was
    re-created by a worker restart; its new counters start from zero) and reports the largest sum seen: a
    counter that never decreases and catches up at the next reading. Known inexactness: the packets an old
    queue instance took after the previous reading and before its worker restarted count as bypassed.
    Assumes the rule and queue counters started at zero together, which the daemon's start guarantees
    (queues bound first, then the chain rebuilt with zeroed counters).
    """

    def __init__(
        self, matched: Callable[[], int], queues: Sequence[int], path: str = KERNEL_QUEUE_FILE
    ) -> None:
        self._matched = matched
        self.queues = tuple(queues)
        self.path = path
        self._lock = threading.Lock()
        self._prev_matched = 0
        self._prev_queued = dict.fromkeys(self.queues, 0)
        self._sum = 0
        self.bypassed = 0
        self.errors = 0

    def read(self) -> int | None:
        """Update from the rule and queue counters; the bypass count, or None if iptables cannot be read."""
        with self._lock:
            try:
                matched = self._matched()
            except Exception as e:  # iptables missing, timing out or failing: no reading, never a crash
                self.errors += 1
                log.warning("cannot read the NFQUEUE rule counters, bypassed packets not updated: %s", e)
                return None
            delta = matched - self._prev_matched if matched >= self._prev_matched else matched
            self._prev_matched = matched
            for q in self.queues:
                kq = kernel_queue_stats(q, self.path)
                queued = kq["id_sequence"] + kq["dropped"] if kq is not None else 0
                prev = self._prev_queued[q]
                delta -= queued - prev if queued >= prev else queued
                self._prev_queued[q] = queued
            self._sum += delta
            self.bypassed = max(self.bypassed, self._sum)
            return self.bypassed


class KernelBypassReader:
    """Reads the connmark rule's counters (`IptablesManager.bypass_counters`): the packets and bytes of
    bypassed connections that the kernel carried past the queues. Like BypassMeter, it runs iptables, so
    it is read only when a status is asked for (control or metrics thread), never in the packet loop; a
    failing read is None and one log line, never a crash. The counters start at zero when the daemon
    (re)builds its chain, so they count since this daemon started."""

    def __init__(self, read: Callable[[], tuple[int, int]]) -> None:
        self._read = read
        self.errors = 0

    def read(self) -> tuple[int, int] | None:
        try:
            return self._read()
        except Exception as e:  # iptables missing, timing out or failing
            self.errors += 1
            if self.errors == 1:
                log.warning("cannot read the bypass rule's counters: %s", e)
            return None


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident memory of a process (from /proc/PID/statm, the cheapest source), None if unreadable."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


# --------------------------------------------------------------------------------------------- Prometheus

# (metric name, help, path in a worker's status document). Counters get `_total` from prometheus_client.
_COUNTERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("tcpguard_packets_received", "Packets read from the queue.", ("packets", "received")),
    ("tcpguard_packets_accepted", "Packets accepted (directly or when released).", ("packets", "accepted")),
    ("tcpguard_packets_dropped", "Packets dropped by tcpguard's verdict.", ("packets", "dropped")),
    ("tcpguard_bytes_received", "Bytes of the packets read from the queue.", ("bytes", "received")),
    ("tcpguard_bytes_accepted", "Bytes of the packets accepted.", ("bytes", "accepted")),
    ("tcpguard_bytes_dropped", "Bytes of the packets dropped.", ("bytes", "dropped")),
    ("tcpguard_resets_sent", "RST packets forged (rules, limits and operator resets).", ("resets_sent",)),
    ("tcpguard_rule_errors", "Rule calls that raised.", ("rule_errors",)),
    ("tcpguard_alerts", "Alerts the rules raised (`flow.alert`).", ("alerts",)),
    (
        "tcpguard_connections_opened",
        "Connections tracked since the worker started.",
        ("connections", "opened"),
    ),
    (
        "tcpguard_queue_kernel_dropped",
        "Packets the kernel dropped because the queue was full.",
        ("queue_drops", "kernel_dropped"),
    ),
    (
        "tcpguard_queue_kernel_user_dropped",
        "Packets the kernel dropped because it could not send them to tcpguard.",
        ("queue_drops", "kernel_user_dropped"),
    ),
    (
        "tcpguard_queue_netlink_enobufs",
        "Times the kernel reported lost queue messages (ENOBUFS).",
        ("queue_drops", "enobufs"),
    ),
    ("tcpguard_forged_sent", "Forged packets transmitted.", ("adapter", "sent")),
    (
        "tcpguard_forged_sent_in_place",
        "Forged RSTs transmitted as the verdict of the dropped packet they replace.",
        ("adapter", "sent_in_place"),
    ),
    (
        "tcpguard_forged_send_retried",
        "Forged packets transmitted on a retry (the raw socket refused them at first).",
        ("adapter", "send_retried"),
    ),
    (
        "tcpguard_forged_send_errors",
        "Forged packets lost: not transmitted, retries given up.",
        ("adapter", "send_errors"),
    ),
    (
        "tcpguard_handler_errors",
        "Packets whose processing raised (verdicted by the adapter).",
        ("adapter", "handler_errors"),
    ),
    (
        "tcpguard_queue_unseen",
        "Queued packets whose message never reached tcpguard (dropped explicitly).",
        ("adapter", "unseen"),
    ),
    (
        "tcpguard_verdicts_refused",
        "Verdict messages of tcpguard's own that the kernel refused.",
        ("adapter", "refused"),
    ),
    (
        "tcpguard_bypassed_connections",
        "Connections handed to the kernel (connection bypass): no rule wanted more of them.",
        ("bypass", "connections"),
    ),
    (
        "tcpguard_bypass_late_packets",
        "Packets of bypassed connections that still reached the daemon (in flight at the verdict, or all "
        "of them when the kernel rule is missing).",
        ("bypass", "late_packets"),
    ),
    (
        "tcpguard_bypass_late_bytes",
        "Bytes of the packets of bypassed connections that still reached the daemon.",
        ("bypass", "late_bytes"),
    ),
    (
        "tcpguard_bypass_looped",
        "Packets that came back to the queue carrying the bypass bit (the chain does not exempt it).",
        ("adapter", "bypass_looped"),
    ),
    ("tcpguard_reloads", "Successful reloads.", ("reloads",)),
    ("tcpguard_reload_failures", "Reloads refused (bad config or rules).", ("reload_failures",)),
)

_GAUGES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("tcpguard_packets_held", "Packets held back right now.", ("packets", "held")),
    ("tcpguard_forged_send_pending", "Forged packets waiting for a retry.", ("adapter", "send_pending")),
    ("tcpguard_connections_tracked", "Connections in the table right now.", ("connections", "tracked")),
    ("tcpguard_queue_waiting", "Packets waiting in the kernel queue.", ("queue_drops", "kernel_waiting")),
    ("tcpguard_worker_rss_bytes", "Resident memory of the worker process.", ("memory", "rss")),
    ("tcpguard_stream_buffer_bytes", "Bytes held in stream buffers.", ("memory", "buffered")),
    (
        "tcpguard_bypassed_remembered",
        "Bypassed connections the engine still remembers (to answer their late packets).",
        ("bypass", "remembered"),
    ),
    ("tcpguard_worker_uptime_seconds", "Seconds since the worker started.", ("uptime",)),
)


def _dig(doc: Any, path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return float(doc) if isinstance(doc, int | float) and not isinstance(doc, bool) else None


def _keyed(family: Any, workers: list[dict[str, Any]], path: tuple[str, ...]) -> Any:
    """`family` with one sample per worker and key of the {key: number} dict at `path` in its document,
    labelled (queue, key)."""
    for w in workers:
        doc: Any = w
        for key in path:
            doc = doc.get(key) if isinstance(doc, dict) else None
        for key, n in sorted((doc or {}).items()):
            if isinstance(n, int | float) and not isinstance(n, bool):
                family.add_metric([str(w["queue"]), key], float(n))
    return family


class StatusCollector:
    """A prometheus_client collector over the status document returned by `gather()`.

    `gather` is called once per scrape (in the HTTP server's thread); it must be thread-safe and return
    the same document as the control socket's `status` (workers whose entry has an `error` are skipped,
    so a restarting worker's series disappear for a scrape rather than dropping to zero).
    """

    def __init__(self, gather: Callable[[], dict[str, Any]]) -> None:
        self.gather = gather

    def describe(self) -> list[Metric]:
        # No metrics at registration: describing would call gather() (and wait for a tick) at start.
        return []

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        try:
            status = self.gather()
        except Exception:
            log.exception("metrics: gathering the status failed")
            return
        workers = [w for w in status.get("workers", []) if isinstance(w, dict) and "error" not in w]
        up = GaugeMetricFamily("tcpguard_up", "1: the daemon answered this scrape.", labels=[])
        up.add_metric([], 1.0)
        yield up
        # Prometheus's convention for what runs: a constant 1 whose labels say it. The core label tells
        # a gateway silently running the pure-Python core (about half the speed) from a compiled one.
        info = GaugeMetricFamily(
            "tcpguard_build_info",
            "Always 1: the daemon's version and core (compiled, or pure with the reason).",
            labels=["version", "core"],
        )
        info.add_metric([str(status.get("version")), str(status.get("core"))], 1.0)
        yield info
        answering = GaugeMetricFamily(
            "tcpguard_workers", "Worker processes answering (configured workers minus restarting ones)."
        )
        answering.add_metric([], float(len(workers)))
        yield answering
        uptime = GaugeMetricFamily("tcpguard_uptime_seconds", "Seconds since the daemon started.")
        uptime.add_metric([], float(status.get("uptime", 0.0)))
        yield uptime
        bypassed = _dig(status, ("totals", "queue_drops", "bypassed"))
        if bypassed is not None:
            c = CounterMetricFamily(
                "tcpguard_queue_bypassed",
                "Packets that passed uninspected through the queue's fail-open paths (all queues).",
            )
            c.add_metric([], bypassed)
            yield c
        for name, text, key in (
            (
                "tcpguard_bypass_kernel_packets",
                "Packets of bypassed connections the kernel carried past the queues (all queues; the "
                "connmark rule's counter since the chain was installed).",
                "kernel_packets",
            ),
            (
                "tcpguard_bypass_kernel_bytes",
                "Bytes of bypassed connections the kernel carried past the queues (all queues).",
                "kernel_bytes",
            ),
        ):
            v = _dig(status, ("totals", "bypass", key))
            if v is not None:
                c = CounterMetricFamily(name, text)
                c.add_metric([], v)
                yield c
        rss = status.get("rss")
        if isinstance(rss, int):
            main_rss = GaugeMetricFamily("tcpguard_main_rss_bytes", "Resident memory of the main process.")
            main_rss.add_metric([], float(rss))
            yield main_rss
        for name, text, path in _COUNTERS:
            c = CounterMetricFamily(name, text, labels=["queue"])
            for w in workers:
                v = _dig(w, path)
                if v is not None:
                    c.add_metric([str(w["queue"])], v)
            yield c
        for name, text, path in _GAUGES:
            g = GaugeMetricFamily(name, text, labels=["queue"])
            for w in workers:
                v = _dig(w, path)
                if v is not None:
                    g.add_metric([str(w["queue"])], v)
            yield g
        yield _keyed(
            GaugeMetricFamily(
                "tcpguard_connections", "Connections in the table by TCP state.", labels=["queue", "state"]
            ),
            workers,
            ("connections", "by_state"),
        )
        yield _keyed(
            CounterMetricFamily(
                "tcpguard_engine_events",
                "Every engine counter (tcpguard.core.engine.Stats), by name.",
                labels=["queue", "counter"],
            ),
            workers,
            ("engine",),
        )
        yield _keyed(
            CounterMetricFamily(
                "tcpguard_engine_drops",
                "Dropped packets by reason: the engine's on arrival, and 'held, then dropped' when released.",
                labels=["queue", "reason"],
            ),
            workers,
            ("drops",),
        )
        dumped = CounterMetricFamily(
            "tcpguard_dump_packets", "Packets written to each pcap dump.", labels=["queue", "dump"]
        )
        for w in workers:
            for kind, d in sorted(w.get("dumps", {}).get("files", {}).items()):
                dumped.add_metric([str(w["queue"]), kind], float(d.get("packets", 0)))
        yield dumped


class MetricsServer:
    """The HTTP endpoint (prometheus_client's threaded WSGI server) and how to stop it."""

    def __init__(self, httpd: Any, thread: Any, address: tuple[str, int]) -> None:
        self._httpd = httpd
        self._thread = thread
        self.address = address

    def fileno(self) -> int:
        fd: int = self._httpd.socket.fileno()
        return fd

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


#: The one path the endpoint serves; any other answers 404.
METRICS_PATH = "/metrics"


def _only_metrics_path(app: Callable[..., Any]) -> Callable[..., Any]:
    """The exposition app on METRICS_PATH alone. prometheus_client's server answers the metrics on every
    path, so a mistyped scrape URL or a scanner's probe got a 200 that hid the mistake (and cost a gather
    from every worker each time); an endpoint that answers only its own path makes both visible."""

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") != METRICS_PATH:
            body = f"not found: tcpguard serves its metrics at {METRICS_PATH}\n".encode()
            headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
            start_response("404 Not Found", headers)
            return [body]
        return app(environ, start_response)

    return serve


def start_metrics_server(host: str, port: int, gather: Callable[[], dict[str, Any]]) -> MetricsServer:
    """Serve METRICS_PATH on host:port from a private registry (no process or platform collectors: they
    would describe only the process that serves, not the workers), one thread per request, request lines
    not logged. Raises OSError if it cannot bind."""
    import socket
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import CollectorRegistry, make_wsgi_app

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(gather))
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        address_family = family
        daemon_threads = True  # a slow scraper never holds up the daemon's exit

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = make_server(host, port, _only_metrics_path(make_wsgi_app(registry)), Server, QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True)
    thread.start()
    bound = httpd.socket.getsockname()
    log.info("metrics endpoint on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", bound[1])
    return MetricsServer(httpd, thread, (host, int(bound[1])))
