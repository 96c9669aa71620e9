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

The packet loop itself, one `Worker` per queue, is `tcpguard.app.daemon.worker`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tcpguard import core
from tcpguard.app.control.dispatch import Dispatcher
from tcpguard.app.control.protocol import (
    ControlError,
)
from tcpguard.app.control.server import (
    ChannelLinks,
    ChannelServer,
    ControlServer,
    InboxLinks,
    WorkerLinks,
)
from tcpguard.app.daemon.config import (
    Config,
    ConfigError,
    config_warnings,
    kernel_bypass_mark,
    load_config,
    parse_address,
)
from tcpguard.app.daemon.logsetup import setup_logging
from tcpguard.app.daemon.metrics import (
    BypassMeter,
    KernelBypassReader,
    MetricsServer,
    start_metrics_server,
)
from tcpguard.app.daemon.notify import Notifier
from tcpguard.app.daemon.ruleload import RuleTrial, load_rules_bounded
from tcpguard.app.daemon.worker import Worker
from tcpguard.core.errors import RuleLoadError
from tcpguard.core.rules import RuleSet
from tcpguard.io.iptables import IptablesError, IptablesManager, IptablesSpec
from tcpguard.io.nfqueue import CAP_NET_ADMIN, CAP_NET_RAW, NfqueueAdapter, has_capabilities
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
        bypass_mark=kernel_bypass_mark(cfg),
        repeat=cfg.queue.repeat,
    )


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
        bypass_mark=kernel_bypass_mark(cfg),
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
    kernel_bypass: KernelBypassReader | None = None,
) -> Services:
    """Serve the control socket and (if configured) the metrics endpoint for the workers behind `links`.
    Raises ControlError or OSError when either cannot be served, having closed what it opened."""
    disp = dispatcher or Dispatcher(
        links,
        mode,
        reload_check=reload_check,
        bypassed=bypass.read if bypass is not None else None,
        bypassed_note=_bypass_note(cfg),
        kernel_bypass=kernel_bypass.read if kernel_bypass is not None else None,
        kernel_bypass_note=_kernel_bypass_note(cfg),
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


def _kernel_bypass_note(cfg: Config) -> str | None:
    """Why the status cannot count what the kernel carried for bypassed connections, or None."""
    if not cfg.engine.inspection.bypass:
        return "no bypass rule: engine.inspection.bypass is off"
    if not cfg.iptables.bypass_mark:
        return "no bypass rule: iptables.bypass_mark is 0"
    if not cfg.iptables.manage:
        return "not counted with iptables.manage false: the bypass rules are yours (iptables -L -v -n)"
    return None


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
        # What the kernel carried for bypassed connections (issue 20): the connmark rule's counters.
        self.kernel_bypass = (
            KernelBypassReader(self.iptables.bypass_counters)
            if self.iptables is not None and kernel_bypass_mark(cfg)
            else None
        )
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
                kernel_bypass=self.kernel_bypass,
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
            kernel_bypass=self.kernel_bypass.read if self.kernel_bypass is not None else None,
            kernel_bypass_note=_kernel_bypass_note(self.cfg),
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
