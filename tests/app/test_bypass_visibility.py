"""What the operator sees of connection bypass (issue 20), in process: the worker's status and connection
list, `reset` of a bypassed connection, the BypassLeak log line, the metrics, and replay's summary and
events. The live daemon's side is in tests/adversarial/test_bypass.py."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from tcpguard import rule, tcp_connection
from tcpguard.app.control.client import format_connections, format_status
from tcpguard.app.control.dispatch import totals
from tcpguard.app.control.protocol import ConnFilter
from tcpguard.app.daemon.config import parse_config
from tcpguard.app.daemon.metrics import KernelBypassReader, start_metrics_server
from tcpguard.app.daemon.worker import Worker
from tcpguard.app.eventlog import EventLog
from tcpguard.app.offline.replay import replay
from tcpguard.core.engine import BYPASS_GRACE
from tcpguard.core.events import BypassLeak
from tcpguard.core.rules import RuleSet
from tcpguard.core.settings import EngineSettings
from tcpguard.io.pcap import PcapWriter
from tests.app.control.test_control import WorkerBook, ask
from tests.app.daemon.test_metrics import fetch, samples
from tests.core.playbook import Playbook


@rule(on=tcp_connection.events.receive_data, direction="up")
def _first_request_only(flow: Any, stream: Any, current: Any, direction: str) -> None:
    current.read()
    flow.done()


RULES = RuleSet.of(_first_request_only)


def bypass_worker(tmp_path: Path, extra: str = "") -> Worker:
    (tmp_path / "rules").mkdir(parents=True, exist_ok=True)
    cfg = parse_config(
        "rules_dir: rules\nengine: {inspection: {bypass: true}}\n" + extra, str(tmp_path / "tcpguard.yaml")
    )
    return Worker(cfg, tmp_path / "tcpguard.yaml", RULES, queue_num=2)


def bypassed_book(w: Worker, **kw: Any) -> WorkerBook:
    """A connection whose only listener is done after the first request: the request is its last
    inspected packet, the server's answer then reaches the worker only as a late packet."""
    pb = WorkerBook(w, **kw)
    pb.handshake()
    dec = pb.client("PA", b"GET / HTTP/1.1\r\n\r\n")
    assert dec.bypass
    pb.server("PA", b"HTTP/1.1 200 OK\r\n\r\n")  # queued behind the verdict: a late packet
    return pb


def test_status_counts_bypassed_connections_and_their_late_packets(tmp_path: Path) -> None:
    w = bypass_worker(tmp_path)
    bypassed_book(w)
    resp, _ = ask(w, {"cmd": "status"})
    st = resp["result"]
    assert st["bypass"] == {
        "connections": 1,
        "remembered": 1,
        "late_packets": 1,
        "late_bytes": 40 + len(b"HTTP/1.1 200 OK\r\n\r\n"),
        "depth_reached": 0,
    }
    assert st["connections"]["tracked"] == 0  # forgotten by the engine
    total = totals([st, st])
    assert total["bypass"]["connections"] == 2 and total["bypass"]["late_packets"] == 2
    assert total["adapter"]["bypass_marked"] == 0  # no adapter in process
    total["bypass"].update(kernel_packets=1234, kernel_bytes=5 << 20)
    text = format_status({"workers": [st], "totals": total, "uptime": 1})
    assert "connections bypassed" in text and "packets via the kernel" in text
    assert any(line.startswith("  packets via the kernel") and "1234" in line for line in text.splitlines())


def test_connections_lists_a_bypassed_connection_as_bypassed_since_when(tmp_path: Path) -> None:
    w = bypass_worker(tmp_path)
    bypassed_book(w)
    live = WorkerBook(w, cport=40001)
    live.handshake()  # tracked, not bypassed yet (no data)
    resp, _ = ask(w, {"cmd": "connections"})
    rows = resp["result"]["connections"]
    assert [r["state"] for r in rows] == ["ESTABLISHED", "BYPASSED"]
    gone = rows[1]
    assert gone["id"].startswith("2:") and gone["late"] == {"packets": 1, "bytes": 59}
    assert (gone["client"], gone["cport"], gone["server"], gone["sport"]) == (
        "10.0.0.1",
        40000,
        "10.0.0.2",
        80,
    )
    assert gone["since"] > 1e9  # wall clock
    only, _ = ask(w, {"cmd": "connections", "filter": {"state": "bypassed"}})
    assert [r["state"] for r in only["result"]["connections"]] == ["BYPASSED"]
    by_port, _ = ask(w, {"cmd": "connections", "filter": {"cport": "40000", "client": "10.0.0.0/24"}})
    assert [r["state"] for r in by_port["result"]["connections"]] == ["BYPASSED"]
    none, _ = ask(w, {"cmd": "connections", "filter": {"state": "ESTABLISHED"}})
    assert [r["state"] for r in none["result"]["connections"]] == ["ESTABLISHED"]
    table = format_connections(resp["result"])
    assert "BYPASSED at " in table and "1 late" in table
    with pytest.raises(ValueError, match="BYPASSED"):
        ConnFilter.parse({"state": "GONE"})  # the error lists it among the states


def test_reset_of_a_bypassed_connection_says_why_not_and_how_to_cut_it(tmp_path: Path) -> None:
    w = bypass_worker(tmp_path)
    bypassed_book(w)
    flow = w.engine.stats.bypassed and next(iter(w.engine.bypassed)).id
    for cmd in ("reset", "drop"):
        resp, out = ask(w, {"cmd": cmd, "flow": flow})
        assert not resp["ok"]
        msg = resp["error"]
        assert f"cannot {cmd} 2:{flow} (10.0.0.1:40000 > 10.0.0.2:80): it was bypassed" in msg
        assert "conntrack -D -p tcp --orig-src 10.0.0.1 --orig-port-src 40000 --orig-dst 10.0.0.2" in msg
        assert "iptables -I FORWARD -p tcp -s 10.0.0.1 --sport 40000 -d 10.0.0.2 --dport 80 -j REJECT" in msg
        assert out.send == []  # nothing forged: the sequence numbers are unknown
    resp, _ = ask(w, {"cmd": "reset", "flow": 999})
    assert resp["error"] == "no connection 2:999"


def test_a_bypass_leak_is_a_warning_naming_the_missing_rule(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    w = bypass_worker(tmp_path)
    pb = bypassed_book(w)
    caplog.set_level(logging.WARNING, "tcpguard.engine")
    pb.client("A", dt=BYPASS_GRACE + 1)  # long after the verdict: the kernel rule is missing
    (rec,) = [r for r in caplog.records if "still reaches the daemon" in r.getMessage()]
    assert rec.levelno == logging.WARNING
    msg = rec.getMessage()
    assert "bypassed connection 10.0.0.1:40000 > 10.0.0.2:80" in msg
    chain = "-A TCPGUARD -m connmark --mark 0x40000000/0x40000000 -j RETURN"
    assert "tcpguard's chain TCPGUARD" in msg and chain in msg
    assert rec.__dict__["TCPGUARD_VERDICT"] == "bypass"
    # Operator rules: the hint says where the rules go instead.
    w2 = bypass_worker(tmp_path / "b", "iptables: {manage: false}\nqueue: {repeat: false}\n")
    assert "before its NFQUEUE rule" in (w2.events.bypass_rules or "")
    assert "-m connmark --mark 0x40000000/0x40000000 -j ACCEPT" in (w2.events.bypass_rules or "")


def test_offline_tools_do_not_call_a_bypass_leak_a_missing_rule(caplog: pytest.LogCaptureFixture) -> None:
    pb = Playbook(RULES, _bypass_settings())
    pb.handshake()
    pb.client("PA", b"GET /")
    flow = next(iter(pb.engine.bypassed))
    caplog.set_level(logging.DEBUG, "tcpguard.engine")
    EventLog()(BypassLeak(flow, 5.0))
    assert caplog.records == []


def _bypass_settings() -> EngineSettings:
    st = EngineSettings()
    st.inspection.bypass = True
    return st


def test_metrics_carry_the_bypass_counters_and_the_kernels() -> None:
    worker = {
        "queue": 0,
        "bypass": {
            "connections": 3,
            "remembered": 2,
            "late_packets": 4,
            "late_bytes": 400,
            "depth_reached": 0,
        },
        "adapter": {"bypass_looped": 1},
    }
    status = {"workers": [worker], "totals": {"bypass": {"kernel_packets": 900, "kernel_bytes": 1 << 20}}}
    server = start_metrics_server("127.0.0.1", 0, lambda: status)
    try:
        host, port = server.address
        m = samples(fetch(f"http://{host}:{port}/metrics"))
    finally:
        server.close()
    q0 = (("queue", "0"),)
    assert m[("tcpguard_bypassed_connections_total", q0)] == 3
    assert m[("tcpguard_bypassed_remembered", q0)] == 2
    assert m[("tcpguard_bypass_late_packets_total", q0)] == 4
    assert m[("tcpguard_bypass_late_bytes_total", q0)] == 400
    assert m[("tcpguard_bypass_looped_total", q0)] == 1
    assert m[("tcpguard_bypass_kernel_packets_total", ())] == 900
    assert m[("tcpguard_bypass_kernel_bytes_total", ())] == 1 << 20


def test_the_kernel_counter_reader_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> tuple[int, int]:
        raise RuntimeError("iptables: no chain")

    reader = KernelBypassReader(broken)
    assert reader.read() is None and reader.read() is None
    assert reader.errors == 2
    assert len([r for r in caplog.records if "bypass rule's counters" in r.getMessage()]) == 1
    assert KernelBypassReader(lambda: (5, 500)).read() == (5, 500)


def test_replay_counts_the_packets_that_would_not_have_reached_the_daemon(tmp_path: Path) -> None:
    frames: list[bytes] = []

    class Recorder(Playbook):
        def feed(self, raw: bytes, token: object = None, dt: float = 0.001) -> Any:
            frames.append(raw)
            return super().feed(raw, token, dt)

    pb = Recorder(RULES, _bypass_settings())
    pb.handshake()
    pb.client("PA", b"GET / HTTP/1.1\r\n\r\n")
    for _ in range(5):
        pb.server("PA", b"x" * 100)
        pb.client("A")
    cap = tmp_path / "c.pcap"
    with PcapWriter(cap) as wr:
        for i, raw in enumerate(frames):
            wr.write(raw, 1.0 + i / 100)
    events = io.StringIO()
    summary = replay(cap, RULES, _bypass_settings(), events=events)
    (line,) = [x for x in summary.lines() if x.startswith("connections bypassed")]
    assert line == (
        "connections bypassed 1 (no rule wanted more of them): 10 later packets "
        f"({5 * 140 + 5 * 40} bytes) would not have reached the daemon"
    )
    evs = [json.loads(x) for x in events.getvalue().splitlines()]
    names = [e["event"] for e in evs]
    assert "bypass" in names
    assert [e["reason"] for e in evs if e["event"] == "end_connection"] == ["bypassed"]
    (after,) = [e for e in evs if e["event"] == "bypassed"]
    assert (after["packets_after"], after["bytes_after"]) == (10, 5 * 140 + 5 * 40)
