"""One worker: the engine of one NFQUEUE, wrapped with what the daemon adds around it.

Observability (see docs/observability.md). Each `Worker` wraps the engine: it counts every packet's final
fate in packets and bytes (`Traffic`), writes the configured pcap dumps (`tcpguard.io.dumps`), and in its
timer tick executes the control requests waiting in its `Inbox` (status, connection list, operator drop
and reset through `engine.act`, reload; what each one does is the command table in
`tcpguard.app.control.dispatch`), so the engine is only ever touched by the packet-loop thread.
The control socket and the Prometheus endpoint are served by the process that owns the public address:
the worker itself in single-process mode, the supervisor with several workers (`tcpguard.app.daemon.run`),
which reaches each worker over a socket pair made at fork (`tcpguard.app.control.server`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from tcpguard.app.control.dispatch import execute_in_worker
from tcpguard.app.control.protocol import (
    ConnFilter,
    Request,
    Response,
    bypassed_row,
    connection_row,
    error,
    ok,
)
from tcpguard.app.control.server import (
    Inbox,
)
from tcpguard.app.daemon.budget import RuleBudget
from tcpguard.app.daemon.config import (
    Config,
    ConfigError,
    DumpsConfig,
    bypass_leak_hint,
    load_config,
)
from tcpguard.app.daemon.metrics import (
    Traffic,
    kernel_queue_stats,
    rss_bytes,
)
from tcpguard.app.daemon.notify import Notifier
from tcpguard.app.daemon.ruleload import RuleTrial, load_rules
from tcpguard.app.eventlog import EventLog
from tcpguard.core.conntrack import Action
from tcpguard.core.decision import Decision, Output, Release, Verdict
from tcpguard.core.engine import Engine
from tcpguard.core.errors import RuleLoadError
from tcpguard.core.rules import RuleSet
from tcpguard.io.dumps import DUMP_KINDS, PacketDumps
from tcpguard.io.nfqueue import QueueStats

log = logging.getLogger("tcpguard.daemon")

_ACCEPT = Verdict.ACCEPT
_DROP = Verdict.DROP


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


def bypassed_answer(cmd: str, cid: str, flow: Any, now: float) -> str:
    """What `drop`/`reset` of a bypassed connection answers: it cannot be done from here, and how the
    operator can still cut it in the kernel. tcpguard no longer sees the connection's packets and no
    longer knows its sequence numbers, so it could not forge an RST the ends would take."""
    c, s = ipaddress.ip_address(flow.client), ipaddress.ip_address(flow.server)
    ip = "ip6tables" if c.version == 6 else "iptables"
    conntrack = (
        "conntrack (conntrack-tools)"
        if shutil.which("conntrack")
        else "conntrack (from conntrack-tools, not installed here)"
    )
    return (
        f"cannot {cmd} {cid} ({flow.describe()}): it was bypassed {max(0.0, now - flow.since):.0f} s ago, "
        "handed to the kernel, which now forwards it without tcpguard (no rule, no normalisation, no RST "
        f"checks), and tcpguard no longer knows where its sequence numbers are. Cut it in the kernel: "
        f"delete its conntrack entry with {conntrack}, `conntrack -D -p tcp --orig-src {c} --orig-port-src "
        f"{flow.cport} --orig-dst {s} --orig-port-dst {flow.sport}` (its next packet is then queued again "
        f"and handled as mid-stream, engine.policies.midstream), or add a rule before tcpguard's jump, "
        f"`{ip} -I FORWARD -p tcp -s {c} --sport {flow.cport} -d {s} --dport {flow.sport} -j REJECT "
        "--reject-with tcp-reset` (and the same with source and destination swapped)"
    )


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
        # The engine's events (errors, limits, blocks, alerts) become log lines with journald fields here.
        self.events = EventLog(cfg.logging.log_payload, bypass_leak_hint(cfg))
        self.engine.on_event = self.events
        # Made here, in the thread that runs the packet loop: that is the thread it interrupts.
        self.budget = RuleBudget(self.engine, cfg.engine.limits.rule_time_budget)
        if self.budget.budget > 0:
            self.budget.start()
        self.reload_requested = False
        # A SIGHUP reload in progress: the new config and the trial load of its rules, which runs in a
        # child interpreter while this loop goes on forwarding (tcpguard.app.daemon.ruleload).
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
    def handle_packet(
        self, raw: bytes, now: float, token: object, checksum_trusted: bool = False
    ) -> Decision:
        # The engine counts every packet and the bytes of its direct verdicts (compiled, that costs next to
        # nothing); this wrapper only has work for held packets, releases and dumps. `checksum_trusted`: the
        # kernel vouched for the checksum (tcpguard.io.nfqueue, GSO packets).
        dumps = self.dumps
        if dumps is not None:
            dumps.input(raw)
        dec = self.engine.handle_packet(raw, now, token, checksum_trusted=checksum_trusted)
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
        """Execute one control request by the command table. Runs in the packet-loop thread, between
        packets."""
        return execute_in_worker(self, req, now)

    def connection_rows(
        self, flt: ConnFilter, limit: int | None, now: float
    ) -> tuple[list[dict[str, Any]], bool]:
        """The rows of the connections `flt` matches, at most `limit`, and whether more matched."""
        rows: list[dict[str, Any]] = []
        truncated = False
        for conn in self.engine.table.by_key.values():
            if flt.matches(conn, self.queue_num):
                if limit is not None and len(rows) >= limit:
                    truncated = True
                    break
                rows.append(connection_row(conn, self.queue_num, now))
        if not truncated:
            # Then the connections handed to the kernel that the engine still remembers (issue 20).
            wall = time.time()
            for flow in self.engine.bypassed:
                if flt.matches_bypassed(flow, self.queue_num):
                    if limit is not None and len(rows) >= limit:
                        truncated = True
                        break
                    rows.append(bypassed_row(flow, self.queue_num, now, wall))
        return rows, truncated

    def reload_request(self, refused: str | None) -> Response:
        """`reload` from the control socket; `refused`: the dispatcher's trial load failed, so nothing is
        loaded here and the failure is only counted."""
        if refused:
            self._reload_failed(RuntimeError(refused))
            return error(f"reload refused, the running config and rules stay: {refused}")
        if not self._reload_notified():
            return error(f"reload failed, the running config and rules stay: {self.last_reload_error}")
        return ok({"rules": len(self.engine.rules)})

    def act(self, cmd: str, flow: Any, now: float) -> Response:
        """`drop` or `reset` of one of this worker's connections, from the control socket."""
        cid = f"{self.queue_num}:{flow}"
        if not isinstance(flow, int) or isinstance(flow, bool):
            return error("flow must be an integer")
        conn = self.engine.connection(flow)
        if conn is None:
            gone = self.engine.bypassed_flow(flow)
            if gone is not None:
                return error(bypassed_answer(cmd, cid, gone, now))
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

    def _bypass_status(self) -> dict[str, int]:
        """Connection bypass (issue 20) as this worker saw it: connections handed to the kernel, those the
        engine still remembers, and their packets and bytes that still reached the daemon (`late`)."""
        est = self.engine.stats
        return {
            "connections": est.bypassed,
            "remembered": len(self.engine.bypassed),
            "late_packets": est.bypass_packets,
            "late_bytes": est.bypass_bytes,
            "depth_reached": est.depth_reached,
        }

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
            "bypass": self._bypass_status(),
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
        if cfg.engine.inspection.bypass != self.cfg.engine.inspection.bypass:
            # The engine takes the new value now; the chain's bypass rules are installed at start only.
            restart.append("engine.inspection.bypass (its iptables rules)")
        if restart:
            log.warning("reload: changes to %s take effect only after a restart", ", ".join(restart))
        if cfg.dumps != self.cfg.dumps:
            self._reopen_dumps(cfg.dumps)
        self.engine.replace_rules(rules)
        self.engine.replace_settings(cfg.engine)
        self.events.log_payload = cfg.logging.log_payload
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
