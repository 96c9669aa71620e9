"""The per-rule time budget interrupts stuck rules without stopping the engine."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from tcpguard.app.daemon.budget import RuleBudget
from tcpguard.core.decision import Verdict
from tcpguard.core.rules import RuleSet, rule, tcp_connection
from tests.core.playbook import Playbook


@rule(on=tcp_connection.events.receive_data)
def spins(flow: Any, stream: Any, current: Any, direction: str) -> None:
    if current.find(b"spin"):
        while True:
            # A rule that swallows every Exception is still interrupted.
            with contextlib.suppress(Exception):
                pass


@rule(on=tcp_connection.events.receive_data, streamed=True)
def sleeps(flow: Any, stream: Any, current: Any, direction: str) -> None:
    if current.find(b"sleep"):
        time.sleep(60)


def _run(rules: RuleSet, trigger: bytes) -> Playbook:
    pb = Playbook(rules)
    budget = RuleBudget(pb.engine, 0.2)
    budget.start()
    try:
        pb.handshake()
        t0 = time.monotonic()
        d = pb.client("PA", trigger)
        took = time.monotonic() - t0
    finally:
        budget.stop()
    assert d.verdict == Verdict.DROP  # default rule_error policy: reset
    assert len(d.send) == 2
    assert took < 5
    assert budget.timeouts == 1
    errs = pb.names("rule_error")
    assert len(errs) == 1 and "time budget" in errs[0]["error"]
    return pb


def test_a_spinning_plain_rule_is_interrupted() -> None:
    pb = _run(RuleSet.of(spins), b"spin")
    assert pb.names("rule_error")[0]["rule"].endswith("spins")


def test_a_sleeping_streamed_rule_is_interrupted_and_the_engine_goes_on() -> None:
    pb = _run(RuleSet.of(sleeps), b"sleep")
    other = Playbook(engine=pb.engine, cport=40001)
    other.handshake()
    assert other.client("PA", b"fine").verdict == Verdict.ACCEPT


def test_fast_rules_are_never_interrupted() -> None:
    pb = Playbook(RuleSet.of(spins))
    budget = RuleBudget(pb.engine, 0.05)
    budget.start()
    try:
        pb.handshake()
        for _ in range(200):
            assert pb.client("PA", b"quick").verdict == Verdict.ACCEPT
    finally:
        budget.stop()
    assert budget.timeouts == 0
