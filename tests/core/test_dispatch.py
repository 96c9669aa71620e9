"""Listener dispatch (tcpguard.core.dispatch): what the rules' events and alerts carry."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tcpguard import Cursor, Flow, Stream, rule, tcp_connection
from tcpguard.core.rules import RuleSet

from .playbook import Playbook


@rule(on=tcp_connection.events.receive_data)
def noisy(flow: Flow, stream: Stream, current: Cursor, direction: str) -> None:
    if direction == "up" and current.find(b"ALERT"):
        flow.alert("seen", severity="low", direction="up")


def test_events_and_alerts_carry_the_time_of_the_packet_that_caused_them() -> None:
    # The engine's clock is the packets' time (a replayed capture's timestamps); the dispatch's events
    # and alerts must say when, not the time the engine was made (they used to say 0.0).
    pb = Playbook(RuleSet.of(noisy))
    alerts: list[dict[str, Any]] = []
    pb.engine.alert_hook = alerts.append
    pb.now = 1_700_000_000.0
    pb.handshake()
    pb.client("PA", b"ALERT")
    when = pb.now
    (data,) = [e for e in pb.names("receive_data") if e["direction"] == "up"]
    assert data["time"] == when
    (alert,) = alerts
    assert datetime.fromisoformat(alert["timestamp"]) == datetime.fromtimestamp(when, UTC)
