"""A time budget per rule call: a rule stuck in a loop is interrupted, logged by name, and its flow gets
the rule-error verdict, while the gateway keeps forwarding.

The engine stays sans-IO: it only publishes which rule is running (`engine.in_rule`) and a call counter
(`engine.rule_calls`). This watchdog thread samples them; when the same call has been running for longer
than the budget it sends a signal to the packet-loop thread, whose handler raises `RuleTimeout` inside the
rule (a signal, not an asynchronous exception, because a signal also interrupts a rule blocked in a
sleeping system call). `RuleTimeout` is a BaseException, so a rule's `except Exception` does not swallow
it, and the engine catches it around every rule call.

What it cannot stop: a rule blocked inside C code that ignores signals. For that last case the systemd
watchdog (WATCHDOG=1 from the packet loop) restarts the service.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from tcpguard.core.engine import Engine
from tcpguard.core.errors import RuleTimeout

log = logging.getLogger("tcpguard.budget")

SIGNAL = signal.SIGUSR2


class RuleBudget:
    """Interrupts rule calls that run longer than `budget` seconds. Start in the packet-loop thread."""

    def __init__(self, engine: Engine, budget: float, interval: float | None = None) -> None:
        self.engine = engine
        self.budget = budget
        self.interval = interval if interval is not None else max(budget / 4, 0.005)
        self.timeouts = 0
        self._target = threading.get_ident()
        self._stop = threading.Event()
        self._flagged: int | None = None
        self._thread: threading.Thread | None = None
        self._previous: Any = None

    def start(self) -> None:
        """Start watching (idempotent: a reload that keeps the budget on calls it again)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = threading.Event()
        self._previous = signal.signal(SIGNAL, self._on_signal)
        self._thread = threading.Thread(target=self._watch, name="rule-budget", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        if self._previous is not None:
            signal.signal(SIGNAL, self._previous)
            self._previous = None

    def _watch(self) -> None:
        seen_call = -1
        since = 0.0
        while not self._stop.wait(self.interval):
            eng = self.engine
            call = eng.rule_calls
            if eng.in_rule is None:
                seen_call = -1
                continue
            now = time.monotonic()
            if call != seen_call:
                seen_call, since = call, now
                continue
            if now - since >= self.budget:
                self._flagged = call
                signal.pthread_kill(self._target, SIGNAL)
                since = now  # ask again after another budget if the rule ignores it

    def _on_signal(self, signum: int, frame: Any) -> None:
        eng = self.engine
        rule = eng.in_rule
        if rule is not None and self._flagged == eng.rule_calls:
            self.timeouts += 1
            self._flagged = None
            log.error("rule %s ran past its budget of %.3f s: interrupted", rule.name, self.budget)
            raise RuleTimeout(f"rule {rule.name} exceeded its time budget of {self.budget:g} s")
