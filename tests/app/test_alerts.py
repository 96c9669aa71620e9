"""The alert record (Suricata's EVE alert shape, docs/observability.md): every field of the alerts the
sample rules raise on the demo capture through `tcpguard replay`, and the engine's choices behind them
(the action after the rule call, the direction's addresses, bad severities)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tcpguard import rule, tcp_connection
from tcpguard.core.conntrack import Connection
from tcpguard.core.dispatch import SEVERITIES
from tcpguard.core.rules import RuleSet
from tests.core.playbook import Playbook

ROOT = Path(__file__).resolve().parents[2]
TCPGUARD = [sys.executable, "-m", "tcpguard.app.cli"]
EV = tcp_connection.events

#: The keys of an alert record, of its `alert` object and of its `tcpguard` object (`fields` only when
#: the rule passed keyword arguments): an added or lost key fails here and must be documented.
RECORD_KEYS = [
    "timestamp",
    "flow_id",
    "event_type",
    "src_ip",
    "src_port",
    "dest_ip",
    "dest_port",
    "proto",
    "direction",
    "alert",
    "tcpguard",
]
ALERT_KEYS = ["action", "signature", "severity"]
TCPGUARD_KEYS = ["id", "rule", "severity", "action"]


def replay_events(tmp_path: Path) -> list[dict[str, Any]]:
    events = tmp_path / "events.jsonl"
    subprocess.run(
        [
            *TCPGUARD,
            "replay",
            str(ROOT / "samples" / "demo.pcap"),
            "--rules",
            str(ROOT / "rules"),
            "--events",
            str(events),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
        timeout=120,
    )
    return [json.loads(line) for line in events.read_text().splitlines()]


def test_replay_alerts_have_every_eve_field(tmp_path: Path) -> None:
    events = replay_events(tmp_path)
    conns = {e["flow"]: e for e in events if e["event"] == "new_connection"}
    alerts = {e["tcpguard"]["rule"]: e for e in events if e["event"] == "alert"}
    assert sorted(alerts) == ["firewall.allow_list", "http_host.blocked_host", "shellcode.no_shellcode"]
    expected = {
        # rule: (signature, severity, flow action, direction given by the rule)
        "firewall.allow_list": ("connection to port 9999 not allowed", "low", "reset", None),
        "http_host.blocked_host": (
            "HTTP request to blocked host blocked.example",
            "medium",
            "halfreset",
            "up",
        ),
        "shellcode.no_shellcode": ("shell-code pattern b'/bin/sh' from the client", "high", "reset", "up"),
    }
    for name, ev in alerts.items():
        signature, severity, action, _ = expected[name]
        record = {k: v for k, v in ev.items() if k not in ("event", "flow", "time")}  # the stream's envelope
        assert list(record) == RECORD_KEYS, name
        assert list(record["alert"]) == ALERT_KEYS and list(record["tcpguard"]) == TCPGUARD_KEYS, name
        # ISO-8601 with its time zone, at the packet's time in the capture (Suricata's pcap mode does so).
        stamp = datetime.fromisoformat(record["timestamp"])
        assert stamp.tzinfo is not None and stamp.utcoffset() is not None
        assert stamp == datetime.fromtimestamp(ev["time"], UTC)
        assert record["event_type"] == "alert" and record["proto"] == "TCP"
        conn = conns[ev["flow"]]
        assert record["flow_id"] == ev["flow"] and record["tcpguard"]["id"] == str(ev["flow"])
        # All three are about the client's side: the addresses read client to server.
        assert record["direction"] == "to_server"
        assert (record["src_ip"], record["src_port"]) == (conn["client"], conn["cport"])
        assert (record["dest_ip"], record["dest_port"]) == (conn["server"], conn["sport"])
        # The rules alert, then act: the record says what they did.
        assert record["alert"] == {
            "action": "blocked",
            "signature": signature,
            "severity": SEVERITIES[severity],
        }
        assert record["tcpguard"] == {
            "id": str(ev["flow"]),
            "rule": name,
            "severity": severity,
            "action": action,
        }


def test_an_alert_records_the_action_the_rule_took_after_it() -> None:
    got: list[dict[str, Any]] = []

    @rule(on=EV.receive_data)
    def watch(flow: Connection, stream: Any, current: Any, direction: str) -> None:
        if current.find(b"bad"):
            flow.alert("bad seen", severity="info", direction=direction)
            flow.drop()
        elif current.find(b"odd"):
            flow.alert("odd seen", severity="low", direction=direction, where=direction)

    pb = Playbook(RuleSet.of(watch))
    pb.engine.alert_hook = got.append
    pb.handshake()
    pb.server("PA", b"odd reply")
    assert got[0]["alert"] == {"action": "allowed", "signature": "odd seen", "severity": 3}
    assert got[0]["tcpguard"]["action"] == "none" and got[0]["tcpguard"]["fields"] == {"where": "down"}
    # About the server's bytes: the server is the source, as in Suricata's to_client alerts.
    assert got[0]["direction"] == "to_client"
    assert (got[0]["src_ip"], got[0]["dest_ip"]) == ("10.0.0.2", "10.0.0.1")
    assert (got[0]["src_port"], got[0]["dest_port"]) == (80, 40000)
    pb.client("PA", b"bad request")
    assert got[1]["alert"]["action"] == "blocked" and got[1]["tcpguard"]["action"] == "drop"
    assert got[1]["alert"]["severity"] == 4 and got[1]["direction"] == "to_server"
    assert pb.engine.stats.alerts == 2


def test_a_streamed_rule_alert_records_the_action_too() -> None:
    got: list[dict[str, Any]] = []

    @rule(on=EV.receive_data, streamed=True)
    def line_reader(flow: Connection, stream: Any, current: Any, direction: str) -> None:
        if current.find(b"\n"):
            flow.alert("a line", severity="medium", direction=direction)
            flow.reset()

    pb = Playbook(RuleSet.of(line_reader))
    pb.engine.alert_hook = got.append
    pb.handshake()
    pb.client("PA", b"abc")
    assert got == []
    pb.client("PA", b"d\n")
    assert got[0]["alert"]["action"] == "blocked" and got[0]["tcpguard"]["action"] == "reset"
    assert got[0]["tcpguard"]["rule"].endswith(".line_reader")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"severity": "critical"}, "alert severity 'critical'"), ({"direction": "in"}, "alert direction 'in'")],
)
def test_a_bad_severity_or_direction_is_the_rules_error(kwargs: dict[str, str], message: str) -> None:
    got: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []

    @rule(on=EV.new_connection)
    def sloppy(flow: Connection, tcp: Any) -> None:
        flow.alert("x", **kwargs)

    pb = Playbook(RuleSet.of(sloppy))
    pb.engine.alert_hook = got.append
    pb.engine.sink = lambda ev: errors.append(ev) if ev["event"] == "rule_error" else None
    pb.client("S")
    assert got == [] and pb.engine.stats.rule_errors == 1
    assert errors[0]["error"].startswith("ValueError: " + message)


def test_an_alerts_file_that_cannot_be_written_loses_the_line_not_the_packet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tcpguard.app.daemon.worker import AlertLog

    alerts = AlertLog(Path("/dev/full"))  # every write fails with ENOSPC, as on a full disk
    with caplog.at_level("ERROR", logger="tcpguard.daemon"):
        alerts({"event_type": "alert"})
        alerts({"event_type": "alert"})
    assert alerts.write_errors == 2
    errors = [r.getMessage() for r in caplog.records if r.name == "tcpguard.daemon"]
    assert len(errors) == 1 and "alerts file /dev/full: cannot write" in errors[0]  # once a minute at most
    alerts.close()
