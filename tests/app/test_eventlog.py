"""The engine's events become the log lines the daemon always wrote (tcpguard.app.eventlog): the same
messages on the `tcpguard.engine` logger, the flow in journald fields, no payload unless allowed."""

from __future__ import annotations

import logging

import pytest

from tcpguard import Cursor, Flow, Stream, rule, tcp_connection
from tcpguard.app.eventlog import EventLog
from tcpguard.core.events import EngineEvent
from tcpguard.core.rules import RuleSet
from tcpguard.core.settings import EngineSettings
from tests.core.playbook import Playbook


@rule(on=tcp_connection.events.receive_data)
def chokes(flow: Flow, stream: Stream, current: Cursor, direction: str) -> None:
    if current.find(b"SECRET"):
        int(b"SECRET-42")


@rule(on=tcp_connection.events.receive_data)
def alerts(flow: Flow, stream: Stream, current: Cursor, direction: str) -> None:
    if current.find(b"BAD"):
        flow.alert("bad bytes", severity="high", direction="up")
        flow.reset()


def run(
    rules: RuleSet, data: bytes, log_payload: bool, settings: EngineSettings | None = None
) -> list[EngineEvent]:
    pb = Playbook(rules, settings)
    seen: list[EngineEvent] = []
    log = EventLog(log_payload)

    def listen(ev: EngineEvent) -> None:
        seen.append(ev)
        log(ev)

    pb.engine.on_event = listen
    pb.handshake()
    pb.client("PA", data)
    return seen


@pytest.mark.parametrize("log_payload", [False, True])
def test_a_rule_error_is_logged_with_its_flow_and_rule_and_payload_only_if_allowed(
    caplog: pytest.LogCaptureFixture, log_payload: bool
) -> None:
    with caplog.at_level(logging.ERROR, logger="tcpguard.engine"):
        events = run(RuleSet.of(chokes), b"SECRET", log_payload)
    assert [type(e).__name__ for e in events] == ["RuleError", "Blocked"]
    (rec,) = [r for r in caplog.records if r.name == "tcpguard.engine"]
    msg = rec.getMessage()
    assert msg.startswith("rule test_eventlog.chokes raised on 10.0.0.1:40000 > 10.0.0.2:80 at ")
    assert "test_eventlog.py:" in msg and "ValueError" in msg
    assert ("SECRET-42" in msg) is log_payload
    assert rec.__dict__["TCPGUARD_RULE"] == "test_eventlog.chokes"
    assert rec.__dict__["TCPGUARD_FLOW"] == "10.0.0.1:40000 > 10.0.0.2:80"
    assert rec.__dict__["TCPGUARD_VERDICT"] == "reset"


def test_an_alert_and_the_block_after_it(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tcpguard.engine"):
        events = run(RuleSet.of(alerts), b"BAD", False)
    assert [type(e).__name__ for e in events] == ["AlertRaised", "Blocked"]
    lines = [r.getMessage() for r in caplog.records if r.name == "tcpguard.engine"]
    assert lines == [
        "alert [high] 10.0.0.1:40000 > 10.0.0.2:80: bad bytes (rule test_eventlog.alerts, action reset)",
        "10.0.0.1:40000 > 10.0.0.2:80: reset by rule",
    ]


def test_a_limit_hit_names_the_policy(caplog: pytest.LogCaptureFixture) -> None:
    st = EngineSettings()
    st.limits.max_stream_buffer = 100
    with caplog.at_level(logging.WARNING, logger="tcpguard.engine"):
        events = run(RuleSet(), b"x" * 200, False, st)
    assert [type(e).__name__ for e in events] == ["LimitHit", "Blocked"]
    (rec,) = [r for r in caplog.records if r.name == "tcpguard.engine"]
    assert (
        rec.getMessage()
        == "buffer limit hit on 10.0.0.1:40000 > 10.0.0.2:80 (0 bytes buffered): policy reset"
    )


def test_without_a_listener_the_engine_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    pb = Playbook(RuleSet.of(chokes))
    with caplog.at_level(logging.DEBUG):
        pb.handshake()
        pb.client("PA", b"SECRET")
    assert pb.engine.stats.rule_errors == 1
    assert [r for r in caplog.records if r.name.startswith("tcpguard")] == []
