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
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tcpguard.app.config import Config, ConfigError, load_config
from tcpguard.app.logsetup import setup_logging
from tcpguard.app.notify import Notifier
from tcpguard.app.ruleload import load_rules
from tcpguard.core.decision import Decision, Output
from tcpguard.core.engine import Engine
from tcpguard.core.errors import RuleLoadError
from tcpguard.core.rules import RuleSet
from tcpguard.io.iptables import IptablesError, IptablesManager, IptablesSpec
from tcpguard.io.nfqueue import NfqueueAdapter
from tcpguard.io.rawsend import RawSender

log = logging.getLogger("tcpguard.daemon")

RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)


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


class AlertLog:
    """Alerts as JSON lines (one object per alert, flushed at once) plus a log line each."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def __call__(self, alert: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"wall_time": time.time(), **alert}, default=str) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Worker:
    """The packet handler of one queue: the engine plus reload, between the adapter's timer ticks."""

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
        self.reload_requested = False
        self.reloads = 0
        self.reload_failures = 0

    def handle_packet(self, raw: bytes, now: float, token: object) -> Decision:
        return self.engine.handle_packet(raw, now, token)

    def handle_timer(self, now: float) -> Output:
        n = self.notifier
        if self.reload_requested:
            self.reload_requested = False
            if n is not None:
                n.reloading()
            self.reload()
            if n is not None:
                n.ready(self.status_line())
        out = self.engine.handle_timer(now)
        if n is not None:
            n.watchdog(now)
            if now >= self._next_status:
                self._next_status = now + 5.0
                n.status(self.status_line())
        return out

    def status_line(self) -> str:
        st = self.engine.stats
        return (
            f"queue {self.queue_num}: {len(self.engine.table)} connections, {st.packets} packets "
            f"({st.accepted} accepted, {st.dropped} dropped), {st.resets_sent} resets, "
            f"{st.rule_errors} rule errors"
        )

    def shutdown(self, now: float) -> Output:
        out = self.engine.shutdown(now)
        self.alerts.close()
        return out

    def reload(self) -> bool:
        """Load config and rules again; swap them in only if both load."""
        try:
            cfg = load_config(self.config_path)
            rules = load_rules(cfg.rules_dir)
        except (ConfigError, RuleLoadError) as e:
            self.reload_failures += 1
            log.error("reload failed, keeping the running config and rules: %s", e)
            return False
        restart = [k for k in ("queue", "iptables") if getattr(cfg, k) != getattr(self.cfg, k)]
        if restart:
            log.warning("reload: changes to %s take effect only after a restart", ", ".join(restart))
        self.engine.replace_rules(rules)
        self.engine.replace_settings(cfg.engine)
        if cfg.alerts.file != self.cfg.alerts.file:
            self.alerts.close()
            self.alerts = AlertLog(cfg.alerts.file)
            self.engine.alert_hook = self.alerts
        self.cfg = cfg
        self.reloads += 1
        log.info("reloaded: %d rules from %s", len(rules), cfg.rules_dir)
        return True


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
    )
    adapter.open()
    return adapter, worker


def _run_worker_process(cfg: Config, config_path: Path, rules: RuleSet, queue_num: int, ready_fd: int) -> int:
    """Body of a forked worker: bind, report readiness on `ready_fd`, loop until SIGTERM."""
    try:
        adapter, worker = _serve_queue(cfg, config_path, rules, queue_num)
    except OSError as e:
        os.write(ready_fd, f"E{e}".encode())
        return 1
    os.write(ready_fd, b"R")
    os.close(ready_fd)
    signal.signal(signal.SIGTERM, lambda *_: adapter.stop())
    signal.signal(signal.SIGINT, lambda *_: adapter.stop())
    signal.signal(signal.SIGHUP, lambda *_: setattr(worker, "reload_requested", True))
    adapter.run()
    return 0


class Daemon:
    def __init__(self, config_path: Path, cfg: Config, rules: RuleSet) -> None:
        self.config_path = config_path
        self.cfg = cfg
        self.rules = rules
        self.iptables = IptablesManager(iptables_spec(cfg)) if cfg.iptables.manage else None
        self.flags = _Flags()
        self.children: dict[int, int] = {}  # pid -> queue number
        self.notifier = Notifier()

    # -------------------------------------------------------------------- single process
    def run_inline(self) -> int:
        adapter, worker = _serve_queue(
            self.cfg, self.config_path, self.rules, self.cfg.queue.num, self.notifier
        )

        def stop(*_: object) -> None:
            self.notifier.stopping()
            adapter.stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, lambda *_: setattr(worker, "reload_requested", True))
        try:
            self._install_iptables()
        except IptablesError:
            adapter.drain()
            adapter.close()
            raise
        log.info("running: queue %d, %d rules", self.cfg.queue.num, len(self.rules))
        self.notifier.ready(worker.status_line())
        try:
            adapter.run()
        finally:
            self._remove_iptables()
        log.info("stopped: %s", adapter.stats.as_dict())
        return 0

    # -------------------------------------------------------------------- several processes
    def _spawn(self, queue_num: int) -> int:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            code = 1
            try:
                code = _run_worker_process(self.cfg, self.config_path, self.rules, queue_num, w)
            except BaseException:
                log.exception("worker for queue %d crashed", queue_num)
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            status = f.read()
        if not status.startswith(b"R"):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            raise OSError(f"worker for queue {queue_num} could not start: {status[1:].decode()}")
        self.children[pid] = queue_num
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
        try:
            for i in range(self.cfg.queue.workers):
                self._spawn(self.cfg.queue.num + i)
            self._install_iptables()
        except (OSError, IptablesError):
            self._signal_children(signal.SIGTERM)
            self._reap_all()
            raise
        restarts: dict[int, int] = {}
        log.info("running: %d workers, %d rules", len(self.children), len(self.rules))
        self.notifier.ready(f"{len(self.children)} workers")
        try:
            while not self.flags.stop:
                time.sleep(0.2)
                self.notifier.watchdog(time.monotonic())
                if self.flags.reload:
                    self.flags.reload = False
                    self.notifier.reloading()
                    self._reload_check()
                    self._signal_children(signal.SIGHUP)
                    self.notifier.ready(f"{len(self.children)} workers")
                with contextlib.suppress(ChildProcessError):
                    pid, status = os.waitpid(-1, os.WNOHANG)
                    if pid and pid in self.children:
                        q = self.children.pop(pid)
                        n = restarts.get(q, 0)
                        restarts[q] = n + 1
                        log.error("worker %d (queue %d) exited with status %d; restarting", pid, q, status)
                        time.sleep(RESTART_BACKOFF[min(n, len(RESTART_BACKOFF) - 1)])
                        if not self.flags.stop:
                            self._spawn(q)
        finally:
            self.notifier.stopping()
            self._signal_children(signal.SIGTERM)
            self._reap_all()
            self._remove_iptables()
        return 0

    def _reap_all(self) -> None:
        deadline = time.monotonic() + 30
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

    def _reload_check(self) -> None:
        """Validate once in the supervisor so a broken reload is reported once, not per worker."""
        try:
            cfg = load_config(self.config_path)
            load_rules(cfg.rules_dir)
        except (ConfigError, RuleLoadError) as e:
            log.error("reload will fail, workers keep the running config and rules: %s", e)

    # -------------------------------------------------------------------- iptables
    def _install_iptables(self) -> None:
        if self.iptables is not None:
            self.iptables.install()
            log.info("iptables chain %s installed", self.cfg.iptables.chain)

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
    try:
        cfg = load_config(path)
    except ConfigError as e:
        print(f"tcpguard run: {e}", file=sys.stderr)
        return 1
    setup_logging(cfg, verbose)
    try:
        rules = load_rules(cfg.rules_dir)
    except RuleLoadError as e:
        log.error("cannot load rules: %s", e)
        print(f"tcpguard run: {e}", file=sys.stderr)
        return 1
    try:
        return Daemon(path, cfg, rules).run()
    except (OSError, IptablesError) as e:
        log.error("cannot start: %s", e)
        print(f"tcpguard run: {e}", file=sys.stderr)
        return 1
