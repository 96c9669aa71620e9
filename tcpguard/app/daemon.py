"""`tcpguard run`: the inline daemon. Config and rules in, NFQUEUE workers running, iptables installed.

Process model. With one worker (the default) everything runs in one process. With N workers the main
process forks one child per queue (`queue.num + i`, the kernel's `--queue-balance` keeps each connection
on one queue, since its hash is symmetric in the addresses) and supervises them: it forwards SIGHUP and
SIGTERM, restarts a child that dies unexpectedly (with a back-off), and owns the iptables rules.

Start-up order: queues are bound first, iptables rules installed second, so no packet is ever sent to a
queue that nobody reads. Shutdown is the reverse: workers stop reading, answer every packet they hold, fire
`end_connection` for every open connection, unbind; then the rules are removed and the process exits 0.

Reload (SIGHUP): the config and the rules are loaded again in full; only if both load is anything
swapped, so a broken rule module or config keeps the running ones (and the log says why). Tracked
connections survive a reload. Settings that need new sockets or processes (queue numbers, worker count,
iptables) are not changed by a reload: the log says a restart is needed.

Signals only set flags; the work happens in the packet loop's timer tick, never inside a packet callback.

Observability (see docs/observability.md). Each `Worker` wraps the engine: it counts every packet's final
fate in packets and bytes (`Traffic`), writes the configured pcap dumps (`tcpguard.io.dumps`), and in its
timer tick executes the control requests waiting in its `Inbox` (status, connection list, operator drop
and reset through `engine.act`, reload), so the engine is only ever touched by the packet-loop thread.
The control socket and the Prometheus endpoint are served by the process that owns the public address:
the worker itself in single-process mode, the supervisor with several workers, which reaches each worker
over a socket pair made at fork (`tcpguard.app.control`). A worker restarted while those servers run is
forked from a threaded process: it closes every descriptor of theirs it inherited (gathered before the
fork, so the child takes none of their locks) and uses nothing else of the supervisor's.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tcpguard import core
from tcpguard.app.budget import RuleBudget
from tcpguard.app.config import (
    Config,
    ConfigError,
    DumpsConfig,
    config_warnings,
    load_config,
    parse_address,
)
from tcpguard.app.control import (
    ChannelLinks,
    ChannelServer,
    ConnFilter,
    ControlError,
    ControlServer,
    Dispatcher,
    Inbox,
    InboxLinks,
    Request,
    Response,
    WorkerLinks,
    connection_row,
    error,
    ok,
)
from tcpguard.app.logsetup import setup_logging
from tcpguard.app.metrics import (
    BypassMeter,
    MetricsServer,
    Traffic,
    kernel_queue_stats,
    rss_bytes,
    start_metrics_server,
)
from tcpguard.app.notify import Notifier
from tcpguard.app.ruleload import RuleTrial, load_rules, load_rules_bounded
from tcpguard.core.conntrack import Action
from tcpguard.core.decision import Decision, Output, Release, Verdict
from tcpguard.core.engine import Engine
from tcpguard.core.errors import RuleLoadError
from tcpguard.core.rules import RuleSet
from tcpguard.io.dumps import DUMP_KINDS, PacketDumps
from tcpguard.io.iptables import IptablesError, IptablesManager, IptablesSpec
from tcpguard.io.nfqueue import CAP_NET_ADMIN, CAP_NET_RAW, NfqueueAdapter, QueueStats, has_capabilities
from tcpguard.io.rawsend import RawSender

log = logging.getLogger("tcpguard.daemon")

RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)
# Seconds from SIGTERM to exit, whatever a rule is doing: then the iptables rules are removed and the
# process exits (single process), or the supervisor kills the workers that are still running. Below
# systemd's TimeoutStopSec (30 s), so the rules come out before systemd's SIGKILL could prevent it.
STOP_DEADLINE = 10.0


class StopDeadline:
    """Ends the process `STOP_DEADLINE` seconds after `arm()` unless `disarm()` came first.

    A clean stop answers the held packets and runs every open connection's `end_connection` listeners,
    each bounded by the rule budget; with many connections, no budget, or a rule that swallows the
    interruption, that could take for ever. A thread, because the packet loop is the thing that is late:
    it runs `cleanup` (remove the iptables rules) and exits with status 1. What it cannot beat: code that
    holds the interpreter lock in C for ever (no Python thread runs then); systemd's SIGKILL at
    TimeoutStopSec ends that, and the next start reuses the rules left behind.
    """

    def __init__(self, cleanup: Callable[[], None], seconds: float = STOP_DEADLINE) -> None:
        self.cleanup = cleanup
        self.seconds = seconds
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def arm(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="stop-deadline", daemon=True)
            self._thread.start()

    def disarm(self) -> None:
        self._done.set()

    def _run(self) -> None:
        if self._done.wait(self.seconds):
            return
        log.error("not stopped %g s after SIGTERM: removing the iptables rules and exiting", self.seconds)
        try:
            self.cleanup()
        finally:
            logging.shutdown()
            os._exit(1)
_ACCEPT = Verdict.ACCEPT
_DROP = Verdict.DROP


def iptables_spec(cfg: Config) -> IptablesSpec:
    ipt = cfg.iptables
    return IptablesSpec(
        chain=ipt.chain,
        hooks=tuple(ipt.hooks),
        queue_num=cfg.queue.num,
        queue_count=cfg.queue.workers,
        bypass=cfg.queue.bypass,
        mark=ipt.mark,
        in_interface=ipt.in_interface,
        out_interface=ipt.out_interface,
        ports=tuple(ipt.ports) if ipt.ports else None,
        ipv6=ipt.ipv6,
    )


#: The `drops` key of held packets dropped when released (status document, metrics).
HELD_THEN_DROPPED = "held, then dropped"


class AlertLog:
    """The alerts file: one JSON object per line, each flushed at once, as the engine built it (Suricata's
    EVE alert shape, see `Engine._alert` and docs/observability.md); the engine logs a line for each too.

    Each line goes out in one write() on a file opened for appending, so the lines of several workers
    sharing the file do not interleave. A write that fails (disk full, file system gone read-only) must
    not fail the packet being judged: it is counted and logged, once a minute at most, and the alert is
    still in the log line the engine wrote.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.write_errors = 0
        self._error_logged: float | None = None  # monotonic time of the last error line
        self._file: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def __call__(self, alert: dict[str, Any]) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(alert, default=str) + "\n")
        except OSError as exc:
            self.write_errors += 1
            now = time.monotonic()
            if self._error_logged is None or now - self._error_logged >= 60:
                self._error_logged = now
                log.error(
                    "alerts file %s: cannot write (%s); %d alerts lost", self.path, exc, self.write_errors
                )

    def close(self) -> None:
        if self._file is not None:
            # A line a failed write left in the buffer fails again here; it was counted already.
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def open_dumps(cfg: DumpsConfig, queue_num: int) -> PacketDumps | None:
    """The configured dumps of one queue, None when none is enabled. Raises OSError if it cannot write."""
    kinds = [k for k in DUMP_KINDS if getattr(cfg, k)]
    if not kinds:
        return None
    return PacketDumps(cfg.directory, queue_num, kinds, cfg.max_file_size, cfg.max_files)


class Worker:
    """The packet handler of one queue: the engine plus reload, between the adapter's timer ticks.

    It also sees every packet and every verdict on the way (`handle_packet` wraps the engine's), which is
    where the traffic counters and the pcap dumps are fed, and it answers control requests in its tick.
    """

    def __init__(
        self, cfg: Config, config_path: Path, rules: RuleSet, queue_num: int, notifier: Notifier | None = None
    ) -> None:
        self.cfg = cfg
        self.notifier = notifier
        self._next_status = 0.0
        self.config_path = config_path
        self.queue_num = queue_num
        self.alerts = AlertLog(cfg.alerts.file)
        self.engine = Engine(cfg.engine, rules)
        self.engine.alert_hook = self.alerts
        self.engine.wall_clock = time.time  # alert timestamps (the engine's own clock is monotonic)
        self.engine.queue = queue_num  # alert ids are QUEUE:FLOW, as the control commands take them
        self.engine.log_payload = cfg.logging.log_payload
        # Made here, in the thread that runs the packet loop: that is the thread it interrupts.
        self.budget = RuleBudget(self.engine, cfg.engine.limits.rule_time_budget)
        if self.budget.budget > 0:
            self.budget.start()
        self.reload_requested = False
        # A SIGHUP reload in progress: the new config and the trial load of its rules, which runs in a
        # child interpreter while this loop goes on forwarding (tcpguard.app.ruleload).
        self._pending_reload: tuple[Config, RuleTrial] | None = None
        self.reloads = 0
        self.reload_failures = 0
        self.last_reload_error: str | None = None
        # Released held packets by fate (only packets_/bytes_accepted and _dropped are used); see traffic.
        self._released = Traffic()
        self.inbox = Inbox()
        self.adapter_stats: QueueStats | None = None
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.dumps = open_dumps(cfg.dumps, queue_num)
        # Held packets by id(token): (token, size, raw bytes if the dropped dump may need them later).
        self._held: dict[int, tuple[object, int, bytes | None]] = {}
        self._tick_out: Output | None = None
        # Mid-stream pickups already reported in the log, and when (see _report_midstream).
        self._midstream_reported = 0
        self._midstream_next = 0.0

    # ------------------------------------------------------------------ the packet path
    def handle_packet(self, raw: bytes, now: float, token: object) -> Decision:
        # The engine counts every packet and the bytes of its direct verdicts (compiled, that costs next to
        # nothing); this wrapper only has work for held packets, releases and dumps.
        dumps = self.dumps
        if dumps is not None:
            dumps.input(raw)
        dec = self.engine.handle_packet(raw, now, token)
        if dec.verdict is not _ACCEPT or dec.releases or dumps is not None:
            self._account(raw, token, dec, dumps)
        return dec

    @property
    def traffic(self) -> Traffic:
        """Packets and bytes by their final fate: the engine's direct verdicts plus the releases."""
        est = self.engine.stats
        rel = self._released
        return Traffic(
            packets_received=est.packets,
            bytes_received=est.bytes,
            packets_accepted=est.accepted + rel.packets_accepted,
            bytes_accepted=est.bytes_accepted + rel.bytes_accepted,
            packets_dropped=est.dropped + rel.packets_dropped,
            bytes_dropped=est.bytes_dropped + rel.bytes_dropped,
        )

    def _account(self, raw: bytes, token: object, dec: Decision, dumps: PacketDumps | None) -> None:
        verdict = dec.verdict
        if verdict is _DROP:
            if dumps is not None:
                dumps.dropped(raw)
        elif verdict is not _ACCEPT:
            keep = raw if dumps is not None and dumps.wants_dropped else None
            self._held[id(token)] = (token, len(raw), keep)
        if dec.releases:
            self._account_releases(dec.releases)
        if dec.send and dumps is not None:
            dumps.reset(raw, dec.send)

    def _account_releases(self, releases: Sequence[Release]) -> None:
        """Count the final verdict of held packets (and dump the dropped ones)."""
        t = self._released
        dumps = self.dumps
        for rel in releases:
            entry = self._held.pop(id(rel.token), None)
            if entry is None or entry[0] is not rel.token:
                if entry is not None:
                    self._held[id(entry[0])] = entry
                continue
            _, size, raw = entry
            if rel.verdict == Verdict.ACCEPT:
                t.packets_accepted += 1
                t.bytes_accepted += size
            else:
                t.packets_dropped += 1
                t.bytes_dropped += size
                if dumps is not None and raw is not None:
                    dumps.dropped(raw)

    def _account_output(self, out: Output) -> None:
        if out.releases:
            self._account_releases(out.releases)
        if out.send and self.dumps is not None:
            self.dumps.reset(None, out.send)

    # ------------------------------------------------------------------ the timer tick
    def handle_timer(self, now: float) -> Output:
        n = self.notifier
        if self.reload_requested:
            self.reload_requested = False
            self._start_reload()
        if self._pending_reload is not None:
            self._poll_reload()
        out = self.engine.handle_timer(now)
        if self.engine.stats.midstream != self._midstream_reported and now >= self._midstream_next:
            self._report_midstream(now)
        # Control requests run here, in the packet-loop thread; operator resets add to this output.
        self._tick_out = out
        try:
            self.inbox.serve(lambda req: self.control(req, now))
        finally:
            self._tick_out = None
        self._account_output(out)
        if self.dumps is not None:
            self.dumps.flush()
        if n is not None:
            n.watchdog(now)
            if now >= self._next_status:
                self._next_status = now + 5.0
                n.status(self.status_line())
        return out

    def _report_midstream(self, now: float) -> None:
        """Connections that were open before this daemon started (a restart, a crash) or that the tracker
        forgot reach it mid-stream: say so, at most once a minute, so that an operator reading the log after
        a restart knows these were picked up (inspected from their next byte, or by the midstream policy)."""
        n = self.engine.stats.midstream
        first = self._midstream_reported == 0
        log.info(
            "%d connection%s met mid-stream%s (open before this start, or forgotten by the tracker); "
            "engine.policies.midstream=%s",
            n - self._midstream_reported,
            "" if n - self._midstream_reported == 1 else "s",
            " for the first time since start" if first else " in the last minute",
            self.engine.settings.policies.midstream,
        )
        self._midstream_reported = n
        self._midstream_next = now + 60.0

    def _reload_notified(self) -> bool:
        """Reload now, in this tick (a control request: its trial already ran in the control thread)."""
        n = self.notifier
        if n is not None:
            n.reloading()
        done = self.reload()
        if n is not None:
            n.ready(self.status_line())
        return done

    def _start_reload(self) -> None:
        """SIGHUP: read the config and start the trial load of its rules; `_poll_reload` finishes it.
        A SIGHUP while one is in progress is folded into it."""
        if self._pending_reload is not None:
            return
        try:
            cfg = load_config(self.config_path)
        except ConfigError as e:
            self._reload_failed(e)
            return
        if self.notifier is not None:
            self.notifier.reloading()
        log.info("reload: trying the rules of %s (within %g s)", cfg.rules_dir, cfg.rules_load_budget)
        self._pending_reload = (cfg, RuleTrial(cfg.rules_dir, cfg.rules_load_budget))

    def _poll_reload(self) -> None:
        assert self._pending_reload is not None
        cfg, trial = self._pending_reload
        result = trial.poll()
        if result is None:
            return
        self._pending_reload = None
        if result.error is not None:
            self._reload_failed(result.error)
        else:
            self.reload(cfg)
        if self.notifier is not None:
            self.notifier.ready(self.status_line())

    def cancel_reload(self) -> None:
        """Stop a trial load in progress (the worker is stopping)."""
        if self._pending_reload is not None:
            self._pending_reload[1].cancel()
            self._pending_reload = None

    def _reload_failed(self, e: Exception) -> None:
        self.reload_failures += 1
        self.last_reload_error = str(e)
        log.error("reload failed, keeping the running config and rules: %s", e)

    def status_line(self) -> str:
        st = self.engine.stats
        return (
            f"queue {self.queue_num}: {len(self.engine.table)} connections, {st.packets} packets "
            f"({st.accepted} accepted, {st.dropped} dropped), {st.resets_sent} resets, "
            f"{st.rule_errors} rule errors"
        )

    def shutdown(self, now: float) -> Output:
        self.cancel_reload()
        self.inbox.close()
        out = self.engine.shutdown(now)
        self.budget.stop()
        self._account_output(out)
        if self.dumps is not None:
            self.dumps.close()
        self.alerts.close()
        return out

    # ------------------------------------------------------------------ control requests (in the tick)
    def control(self, req: Request, now: float) -> Response:
        """Execute one control request. Runs in the packet-loop thread, between packets."""
        cmd = req.get("cmd")
        if cmd == "status":
            return ok(self.status(now))
        if cmd == "connections":
            try:
                flt = ConnFilter.parse(req.get("filter"))
            except ValueError as exc:
                return error(str(exc))
            limit = req.get("limit")
            rows: list[dict[str, Any]] = []
            truncated = False
            for conn in self.engine.table.by_key.values():
                if flt.matches(conn, self.queue_num):
                    if limit is not None and len(rows) >= limit:
                        truncated = True
                        break
                    rows.append(connection_row(conn, self.queue_num, now))
            return ok({"connections": rows, "truncated": truncated})
        if cmd in ("drop", "reset"):
            return self._act(str(cmd), req.get("flow"), now)
        if cmd == "reload":
            refused = req.get("refused")
            if refused:  # the dispatcher's trial load failed: nothing to load here, only to count
                self._reload_failed(RuntimeError(str(refused)))
                return error(f"reload refused, the running config and rules stay: {refused}")
            if not self._reload_notified():
                return error(f"reload failed, the running config and rules stay: {self.last_reload_error}")
            return ok({"rules": len(self.engine.rules)})
        return error(f"unknown command {cmd!r}")

    def _act(self, cmd: str, flow: Any, now: float) -> Response:
        cid = f"{self.queue_num}:{flow}"
        if not isinstance(flow, int) or isinstance(flow, bool):
            return error("flow must be an integer")
        conn = self.engine.connection(flow)
        if conn is None:
            return error(f"no connection {cid}")
        if conn.ended:
            return error(f"connection {cid} has already ended ({conn.end_reason})")
        out = self.engine.act(flow, Action.RESET if cmd == "reset" else Action.DROP, now)
        forged = 0
        if out is not None:
            forged = len(out.send)
            tick = self._tick_out
            if tick is not None:
                tick.releases.extend(out.releases)
                tick.send.extend(out.send)
        log.info("%s %s by the operator (%s)", cmd, cid, conn.describe())
        return ok({"id": cid, "action": cmd, "forged": forged})

    def _drops(self) -> dict[str, int]:
        """Dropped packets by reason: the engine's on arrival, and held packets dropped when released
        (a blocked connection's, for one), so that they add up to `packets.dropped`."""
        drops = dict(self.engine.drops)
        if self._released.packets_dropped:
            drops[HELD_THEN_DROPPED] = self._released.packets_dropped
        return dict(sorted(drops.items()))

    def status(self, now: float) -> dict[str, Any]:
        """This worker's status document (see docs/observability.md)."""
        eng = self.engine
        est = eng.stats
        t = self.traffic
        by_state = Counter(c.state.name for c in eng.table.by_key.values())
        kq = kernel_queue_stats(self.queue_num)
        ad = self.adapter_stats
        return {
            "queue": self.queue_num,
            "pid": os.getpid(),
            "started": self.started_wall,
            "uptime": round(now - self.started, 3),
            "packets": {
                "received": t.packets_received,
                "accepted": t.packets_accepted,
                "dropped": t.packets_dropped,
                "held": len(self._held),
            },
            "bytes": {"received": t.bytes_received, "accepted": t.bytes_accepted, "dropped": t.bytes_dropped},
            "resets_sent": est.resets_sent,
            "rule_errors": est.rule_errors,
            "alerts": est.alerts,
            "connections": {
                "tracked": len(eng.table),
                "opened": est.connections,
                "midstream": est.midstream,
                "by_state": dict(sorted(by_state.items())),
            },
            "queue_drops": {
                "kernel_dropped": kq["dropped"] if kq else None,
                "kernel_user_dropped": kq["user_dropped"] if kq else None,
                "kernel_waiting": kq["waiting"] if kq else None,
                "enobufs": ad.nl_enobufs if ad is not None else None,
            },
            "memory": {"rss": rss_bytes(), "buffered": eng.buffered},
            "reloads": self.reloads,
            "reload_failures": self.reload_failures,
            "engine": est.as_dict(),
            "drops": self._drops(),
            "adapter": ad.as_dict() if ad is not None else {},
            "dumps": {
                "errors": self.dumps.errors if self.dumps is not None else 0,
                "files": self.dumps.stats() if self.dumps is not None else {},
            },
        }

    # ------------------------------------------------------------------ reload
    def reload(self, cfg: Config | None = None) -> bool:
        """Load config (unless given) and rules again, here, under the load budget; swap them in only if
        both load. Callers run the trial load first (`_start_reload`, the dispatcher's reload check)."""
        try:
            if cfg is None:
                cfg = load_config(self.config_path)
            rules = load_rules(cfg.rules_dir, cfg.rules_load_budget)
        except (ConfigError, RuleLoadError) as e:
            self._reload_failed(e)
            return False
        restart = [
            k for k in ("queue", "iptables", "control", "metrics") if getattr(cfg, k) != getattr(self.cfg, k)
        ]
        if restart:
            log.warning("reload: changes to %s take effect only after a restart", ", ".join(restart))
        if cfg.dumps != self.cfg.dumps:
            self._reopen_dumps(cfg.dumps)
        self.engine.replace_rules(rules)
        self.engine.replace_settings(cfg.engine)
        self.engine.log_payload = cfg.logging.log_payload
        self.budget.budget = cfg.engine.limits.rule_time_budget
        if self.budget.budget > 0:
            self.budget.start()
        else:
            self.budget.stop()
        if cfg.alerts.file != self.cfg.alerts.file:
            self.alerts.close()
            self.alerts = AlertLog(cfg.alerts.file)
            self.engine.alert_hook = self.alerts
        self.cfg = cfg
        self.reloads += 1
        self.last_reload_error = None
        log.info("reloaded: %d rules from %s", len(rules), cfg.rules_dir)
        return True

    def _reopen_dumps(self, cfg: DumpsConfig) -> None:
        """New dump settings apply at once; dumps that cannot be opened are off (logged), not fatal."""
        if self.dumps is not None:
            self.dumps.close()
            self.dumps = None
        try:
            self.dumps = open_dumps(cfg, self.queue_num)
        except (OSError, ValueError) as e:
            log.error("reload: packet dumps are off, cannot open them: %s", e)


@dataclass
class _Flags:
    stop: bool = False
    reload: bool = False


def _serve_queue(
    cfg: Config, config_path: Path, rules: RuleSet, queue_num: int, notifier: Notifier | None = None
) -> tuple[NfqueueAdapter, Worker]:
    """Bind one queue; the caller runs the adapter."""
    worker = Worker(cfg, config_path, rules, queue_num, notifier)
    adapter = NfqueueAdapter(
        worker,
        queue_num=queue_num,
        max_len=cfg.queue.maxlen,
        copy_range=cfg.queue.copy_range,
        fail_open=cfg.queue.bypass,
        sender=RawSender(mark=cfg.iptables.mark),
        repeat_mark=cfg.iptables.mark if cfg.queue.repeat else None,
    )
    worker.adapter_stats = adapter.stats
    adapter.open()
    return adapter, worker


def _run_worker_process(
    cfg: Config, config_path: Path, rules: RuleSet, queue_num: int, ready_fd: int, channel: socket.socket
) -> int:
    """Body of a forked worker: bind, report readiness on `ready_fd`, serve the supervisor's control
    requests arriving on `channel`, loop until SIGTERM."""
    try:
        adapter, worker = _serve_queue(cfg, config_path, rules, queue_num)
    except OSError as e:
        os.write(ready_fd, f"E{e}".encode())
        return 1
    chan = ChannelServer(channel, worker.inbox)
    chan.start()
    os.write(ready_fd, b"R")
    os.close(ready_fd)
    signal.signal(signal.SIGTERM, lambda *_: adapter.stop())
    signal.signal(signal.SIGINT, lambda *_: adapter.stop())
    signal.signal(signal.SIGHUP, lambda *_: setattr(worker, "reload_requested", True))
    try:
        adapter.run()
    finally:
        chan.close()
    return 0


@dataclass
class Services:
    """The control socket and the metrics endpoint of the process that owns the public addresses."""

    control: ControlServer | None = None
    metrics: MetricsServer | None = None

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.control is not None:
            self.control.close()
            self.control = None

    def filenos(self) -> list[int]:
        """Descriptors a forked worker must close: listening sockets and connected control clients."""
        fds = []
        if self.control is not None:
            fds += self.control.filenos()
        if self.metrics is not None:
            fds.append(self.metrics.fileno())
        return [fd for fd in fds if fd >= 0]


def start_services(
    cfg: Config,
    links: WorkerLinks,
    mode: str,
    dispatcher: Dispatcher | None = None,
    bypass: BypassMeter | None = None,
    reload_check: Callable[[], str | None] | None = None,
) -> Services:
    """Serve the control socket and (if configured) the metrics endpoint for the workers behind `links`.
    Raises ControlError or OSError when either cannot be served, having closed what it opened."""
    disp = dispatcher or Dispatcher(
        links,
        mode,
        reload_check=reload_check,
        bypassed=bypass.read if bypass is not None else None,
        bypassed_note=_bypass_note(cfg),
    )
    services = Services()
    try:
        services.control = ControlServer(cfg.control.socket, disp.handle, group=cfg.control.group)
        services.control.start()
        if cfg.metrics.address is not None:
            host, port = parse_address(cfg.metrics.address)
            services.metrics = start_metrics_server(host, port, disp.status)
    except BaseException:
        services.close()
        raise
    return services


def _bypass_note(cfg: Config) -> str | None:
    """Why the status cannot count the packets that passed uninspected, or None when it can."""
    if not cfg.queue.bypass:
        return "not counted with queue.bypass false: a packet that misses the queue is dropped, not passed"
    if not cfg.iptables.manage:
        return (
            "not counted with iptables.manage false: the NFQUEUE rules are yours, so tcpguard cannot tell "
            "the packets that passed them uninspected (queue full, or no daemon bound, as during a restart) "
            "from the packets it read"
        )
    return None


class Daemon:
    def __init__(self, config_path: Path, cfg: Config, rules: RuleSet) -> None:
        self.config_path = config_path
        self.cfg = cfg
        self.rules = rules
        self.iptables = IptablesManager(iptables_spec(cfg)) if cfg.iptables.manage else None
        # Fail-open leaves no trace in the kernel's queue counters: compare our rules' counters with them.
        # Only with rules we installed (their counters start with our queues) and with bypass on (without
        # it a packet that misses the queue is dropped, not passed).
        self.bypass = (
            BypassMeter(self.iptables.queued_packets, range(cfg.queue.num, cfg.queue.num + cfg.queue.workers))
            if self.iptables is not None and cfg.queue.bypass
            else None
        )
        self.bypass_note = _bypass_note(cfg)
        self.flags = _Flags()
        self.children: dict[int, int] = {}  # pid -> queue number
        self.notifier = Notifier()
        self.links = ChannelLinks(range(cfg.queue.num, cfg.queue.num + cfg.queue.workers))
        self.services: Services | None = None

    # -------------------------------------------------------------------- single process
    def run_inline(self) -> int:
        adapter, worker = _serve_queue(
            self.cfg, self.config_path, self.rules, self.cfg.queue.num, self.notifier
        )

        deadline = StopDeadline(self._remove_iptables)

        def stop(*_: object) -> None:
            self.notifier.stopping()
            deadline.arm()
            adapter.stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, lambda *_: setattr(worker, "reload_requested", True))
        try:
            self.services = start_services(
                self.cfg,
                InboxLinks(self.cfg.queue.num, worker.inbox),
                "single",
                bypass=self.bypass,
                # The trial load runs in the control thread, so the packet loop only does the real one.
                reload_check=self._reload_check,
            )
            self._install_iptables()
        except (IptablesError, ControlError, OSError):
            adapter.drain()
            adapter.close()
            if self.services is not None:
                self.services.close()
            raise
        log.info("running: queue %d, %d rules, core %s", self.cfg.queue.num, len(self.rules), core.MODE)
        self.notifier.ready(worker.status_line())
        try:
            adapter.run()
        finally:
            worker.inbox.close()
            self.services.close()
            self._remove_iptables()
            deadline.disarm()
        log.info("stopped: %s", adapter.stats.as_dict())
        return 0

    # -------------------------------------------------------------------- several processes
    def _spawn(self, queue_num: int) -> int:
        r, w = os.pipe()
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Gathered before the fork: a restart happens while the supervisor's server threads run, and the
        # child must not take a lock one of them might hold at that instant (it would never be released).
        inherited = self.links.filenos() + (self.services.filenos() if self.services is not None else [])
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            parent_end.close()
            code = 1
            try:
                # The supervisor's listening sockets, its control clients and the other workers' channels:
                # a worker holding them would keep them open after the supervisor closed them.
                for fd in inherited:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                code = _run_worker_process(self.cfg, self.config_path, self.rules, queue_num, w, child_end)
            except BaseException:
                log.exception("worker for queue %d crashed", queue_num)
            finally:
                os._exit(code)
        os.close(w)
        child_end.close()
        with os.fdopen(r, "rb") as f:
            status = f.read()
        if not status.startswith(b"R"):
            parent_end.close()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            raise OSError(f"worker for queue {queue_num} could not start: {status[1:].decode()}")
        self.children[pid] = queue_num
        self.links.set(queue_num, parent_end)
        log.info("worker %d serves queue %d", pid, queue_num)
        return pid

    def _signal_children(self, sig: int) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def run_workers(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self.flags, "stop", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self.flags, "stop", True))
        signal.signal(signal.SIGHUP, lambda *_: setattr(self.flags, "reload", True))
        dispatcher = Dispatcher(
            self.links,
            "workers",
            reload_check=self._reload_check,
            reload_hooks=(
                self.notifier.reloading,
                lambda: self.notifier.ready(f"{len(self.children)} workers"),
            ),
            bypassed=self.bypass.read if self.bypass is not None else None,
            bypassed_note=self.bypass_note,
        )
        try:
            for i in range(self.cfg.queue.workers):
                self._spawn(self.cfg.queue.num + i)
            self.services = start_services(self.cfg, self.links, "workers", dispatcher)
            self._install_iptables()
        except (OSError, IptablesError, ControlError):
            if self.services is not None:
                self.services.close()
            self._signal_children(signal.SIGTERM)
            self._reap_all()
            raise
        restarts: dict[int, int] = {}
        log.info("running: %d workers, %d rules, core %s", len(self.children), len(self.rules), core.MODE)
        self.notifier.ready(f"{len(self.children)} workers")
        try:
            while not self.flags.stop:
                time.sleep(0.2)
                self.notifier.watchdog(time.monotonic())
                if self.flags.reload:
                    self.flags.reload = False
                    self.notifier.reloading()
                    self._reload_check(lambda: self.flags.stop)
                    self._signal_children(signal.SIGHUP)
                    self.notifier.ready(f"{len(self.children)} workers")
                with contextlib.suppress(ChildProcessError):
                    pid, status = os.waitpid(-1, os.WNOHANG)
                    if pid and pid in self.children:
                        q = self.children.pop(pid)
                        self.links.remove(q)
                        n = restarts.get(q, 0)
                        restarts[q] = n + 1
                        log.error("worker %d (queue %d) exited with status %d; restarting", pid, q, status)
                        time.sleep(RESTART_BACKOFF[min(n, len(RESTART_BACKOFF) - 1)])
                        if not self.flags.stop:
                            self._spawn(q)
        finally:
            self.notifier.stopping()
            if self.services is not None:
                self.services.close()
            self._signal_children(signal.SIGTERM)
            self._reap_all()
            for q in self.links.queues():
                self.links.remove(q)
            self._remove_iptables()
        return 0

    def _reap_all(self) -> None:
        deadline = time.monotonic() + STOP_DEADLINE
        while self.children and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                self.children.pop(pid, None)
            else:
                time.sleep(0.05)
        for pid in list(self.children):
            log.error("worker %d did not stop in time; killing it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self.children.pop(pid, None)

    def _reload_check(self, give_up: Callable[[], bool] | None = None) -> str | None:
        """Validate once in the supervisor (or the control thread) so a broken reload is reported once,
        not per worker, and a rule set that does not load in time never reaches a packet loop. Returns
        the problem, None if the config and rules load. `give_up` (a stop was asked) ends the trial."""
        try:
            cfg = load_config(self.config_path)
        except ConfigError as e:
            log.error("reload will fail, workers keep the running config and rules: %s", e)
            return str(e)
        result = RuleTrial(cfg.rules_dir, cfg.rules_load_budget).wait(give_up)
        if result.error is not None:
            log.error("reload will fail, workers keep the running config and rules: %s", result.error)
            return str(result.error)
        return None

    # -------------------------------------------------------------------- iptables
    def _install_iptables(self) -> None:
        if self.iptables is not None:
            found = self.iptables.install()
            for line in found:
                # A daemon killed with SIGKILL (or a crash) leaves its chain; with queue.bypass false the
                # traffic it queued was dropped meanwhile, with true it passed uninspected.
                log.warning("restart after an unclean stop: %s", line)
            log.info("iptables chain %s %s", self.cfg.iptables.chain, "reused" if found else "installed")

    def _remove_iptables(self) -> None:
        if self.iptables is not None:
            try:
                self.iptables.remove()
                log.info("iptables chain %s removed", self.cfg.iptables.chain)
            except IptablesError as e:
                log.error("could not remove the iptables rules: %s", e)

    def run(self) -> int:
        if self.cfg.queue.workers == 1:
            return self.run_inline()
        return self.run_workers()


def main_run(config_path: str, verbose: int = 0) -> int:
    path = Path(config_path)
    # First, before any file is opened: without these every later step fails, each in its own words.
    if not has_capabilities(CAP_NET_ADMIN, CAP_NET_RAW):
        print(
            "tcpguard run: needs CAP_NET_ADMIN (NFQUEUE, iptables) and CAP_NET_RAW (resets): run it as root "
            "or as the systemd service",
            file=sys.stderr,
        )
        return 1
    try:
        cfg = load_config(path)
    except ConfigError as e:
        print(f"tcpguard run: {e}", file=sys.stderr)
        return 1
    setup_logging(cfg, verbose)
    for warning in config_warnings(cfg):
        log.warning("%s: %s", path, warning)
    try:
        rules = load_rules_bounded(cfg.rules_dir, cfg.rules_load_budget)
    except RuleLoadError as e:
        log.error("cannot load rules: %s", e)
        print(f"tcpguard run: {e}", file=sys.stderr)
        return 1
    # Everything loaded so far (modules, rules, config) lives as long as the process: moved out of the
    # collector's generations, it no longer makes every full collection longer.
    gc.collect()
    gc.freeze()
    try:
        return Daemon(path, cfg, rules).run()
    except (OSError, IptablesError, ControlError) as e:
        log.error("cannot start: %s", e)
        print(f"tcpguard run: {e}", file=sys.stderr)
        return 1
