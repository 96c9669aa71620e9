"""The Prometheus endpoint: the collector's translation of the status document, the HTTP server, the
config key, the kernel readers, and the real daemon's endpoint in the namespace lab."""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcpguard.app.daemon.config import ConfigError, parse_address, parse_config
from tcpguard.app.daemon.metrics import BypassMeter, kernel_queue_stats, rss_bytes, start_metrics_server
from tests.app.control.test_control import ObservedGateway, crafted_syns
from tests.app.daemon.test_daemon import DROP_PORT, OPEN_PORT, hexs, wait_for
from tests.netns import Lab

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def worker_doc(q: int) -> dict[str, Any]:
    return {
        "queue": q,
        "uptime": 12.5,
        "packets": {"received": 10 + q, "accepted": 7, "dropped": 3 + q, "held": 0},
        "bytes": {"received": 1000, "accepted": 700, "dropped": 300},
        "resets_sent": 2,
        "rule_errors": 1,
        "alerts": 4 + q,
        "connections": {"tracked": 3, "opened": 4, "by_state": {"ESTABLISHED": 2, "CLOSED": 1}},
        "queue_drops": {"kernel_dropped": 5, "kernel_user_dropped": 0, "kernel_waiting": 1, "enobufs": None},
        "memory": {"rss": 123456, "buffered": 77},
        "reloads": 1,
        "reload_failures": 0,
        "engine": {"packets": 10 + q, "bad_checksum": 1},
        "drops": {"segment without ACK": 2 + q},
        "adapter": {"sent": 2, "send_errors": 0, "handler_errors": 0, "unseen": 3, "refused": 0},
        "dumps": {"errors": 0, "files": {"dropped": {"packets": 3}}},
    }


STATUS = {
    "version": "9.8.7",
    "core": "pure (stale build)",
    "mode": "workers",
    "pid": 1,
    "uptime": 99.0,
    "rss": 5000,
    "workers": [worker_doc(0), worker_doc(1), {"queue": 2, "error": "restarting"}],
    "totals": {"queue_drops": {"bypassed": 42}},
}


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        body: bytes = resp.read()
        return body.decode()


def test_endpoint_serves_the_status_document_as_metrics() -> None:
    server = start_metrics_server("127.0.0.1", 0, lambda: STATUS)
    try:
        host, port = server.address
        m = samples(fetch(f"http://{host}:{port}/metrics"))
    finally:
        server.close()
    q0, q1 = (("queue", "0"),), (("queue", "1"),)
    assert m[("tcpguard_packets_received_total", q0)] == 10
    assert m[("tcpguard_packets_received_total", q1)] == 11
    assert m[("tcpguard_packets_dropped_total", q1)] == 4
    assert m[("tcpguard_bytes_accepted_total", q0)] == 700
    assert m[("tcpguard_resets_sent_total", q0)] == 2
    assert m[("tcpguard_rule_errors_total", q0)] == 1
    assert m[("tcpguard_connections_opened_total", q0)] == 4
    assert m[("tcpguard_queue_kernel_dropped_total", q0)] == 5
    assert m[("tcpguard_queue_unseen_total", q0)] == 3
    assert m[("tcpguard_verdicts_refused_total", q0)] == 0
    assert m[("tcpguard_packets_held", q0)] == 0
    assert m[("tcpguard_worker_rss_bytes", q0)] == 123456
    assert m[("tcpguard_connections", (("queue", "1"), ("state", "ESTABLISHED")))] == 2
    assert m[("tcpguard_engine_events_total", (("counter", "bad_checksum"), ("queue", "0")))] == 1
    assert m[("tcpguard_engine_drops_total", (("queue", "1"), ("reason", "segment without ACK")))] == 3
    assert m[("tcpguard_dump_packets_total", (("dump", "dropped"), ("queue", "0")))] == 3
    assert m[("tcpguard_workers", ())] == 2
    assert m[("tcpguard_uptime_seconds", ())] == 99
    assert m[("tcpguard_main_rss_bytes", ())] == 5000
    assert m[("tcpguard_queue_bypassed_total", ())] == 42
    assert m[("tcpguard_alerts_total", q0)] == 4 and m[("tcpguard_alerts_total", q1)] == 5
    assert m[("tcpguard_build_info", (("core", "pure (stale build)"), ("version", "9.8.7")))] == 1
    # A value the worker could not read is left out, and so is the worker that is restarting.
    assert ("tcpguard_queue_netlink_enobufs_total", q0) not in m
    assert not any(dict(labels).get("queue") == "2" for _, labels in m)


def test_endpoint_answers_404_off_its_path_without_gathering() -> None:
    gathered: list[int] = []

    def gather() -> dict[str, Any]:
        gathered.append(1)
        return STATUS

    server = start_metrics_server("127.0.0.1", 0, gather)
    try:
        host, port = server.address
        for path in ("/", "/metric", "/metrics/", "/favicon.ico", "/admin?x=1"):
            with pytest.raises(urllib.error.HTTPError) as err:
                fetch(f"http://{host}:{port}{path}")
            assert err.value.code == 404, path
            assert b"/metrics" in err.value.read()
        assert gathered == []
        assert ("tcpguard_up", ()) in samples(fetch(f"http://{host}:{port}/metrics"))
        assert gathered == [1]
    finally:
        server.close()


def test_a_failing_gather_gives_an_empty_scrape_not_an_error() -> None:
    def gather() -> dict[str, Any]:
        raise RuntimeError("worker gone")

    server = start_metrics_server("127.0.0.1", 0, gather)
    try:
        host, port = server.address
        assert samples(fetch(f"http://{host}:{port}/metrics")) == {}
    finally:
        server.close()


def test_metrics_address_in_the_config() -> None:
    assert parse_config("", "/etc/t.yaml").metrics.address is None
    assert parse_config("metrics:\n  address: 127.0.0.1:9464\n", "/etc/t.yaml").metrics.address == (
        "127.0.0.1:9464"
    )
    assert parse_address("[::1]:9464") == ("::1", 9464)
    assert parse_address("localhost:1") == ("localhost", 1)
    for bad in ("9464", "127.0.0.1:0", "127.0.0.1:70000", "::1:9464", "[127.0.0.1]:80", ":80", "a b:80"):
        with pytest.raises(ValueError):
            parse_address(bad)
    with pytest.raises(ConfigError) as info:
        parse_config("metrics:\n  address: '::1:9464'\n", "/etc/t.yaml")
    assert "/etc/t.yaml:2: metrics.address: write an IPv6 address in brackets" in str(info.value)


def test_kernel_queue_stats_reads_the_line_of_its_queue(tmp_path: Path) -> None:
    f = tmp_path / "nfnetlink_queue"
    f.write_text(
        "    0  12345     2 2 65531    17     3      999  1\n"
        "    1  12346     0 2 65531     0     0       5  1\n"
    )
    assert kernel_queue_stats(0, str(f)) == {
        "waiting": 2,
        "dropped": 17,
        "user_dropped": 3,
        "id_sequence": 999,
    }
    assert kernel_queue_stats(1, str(f)) == {"waiting": 0, "dropped": 0, "user_dropped": 0, "id_sequence": 5}
    assert kernel_queue_stats(2, str(f)) is None
    assert kernel_queue_stats(0, str(tmp_path / "missing")) is None
    rss = rss_bytes()
    assert rss is not None and rss > 1 << 20
    assert rss_bytes(2**22 + 12345) is None


def test_bypass_meter_counts_packets_the_rules_matched_that_never_entered_a_queue(tmp_path: Path) -> None:
    f = tmp_path / "nfnetlink_queue"
    matched = [0]

    def queues(q0: tuple[int, int] | None, q1: tuple[int, int] | None) -> None:
        """Set each queue's (id_sequence, queue_dropped); None: the queue is not bound."""
        lines = [f"    {q}  1 0 2 65531 {v[1]} 0 {v[0]} 1\n" for q, v in ((0, q0), (1, q1)) if v is not None]
        f.write_text("".join(lines))

    meter = BypassMeter(lambda: matched[0], [0, 1], str(f))
    queues((0, 0), (0, 0))
    assert meter.read() == 0
    matched[0] = 100
    queues((50, 0), (30, 5))  # 80 entered a queue, 5 dropped fail-closed: 15 passed uninspected
    assert meter.read() == 15
    # Read skew: packets that arrived after the rule counter was read are already in the queue counters.
    # The reading is low for a moment; the counter never goes down and catches up.
    matched[0] = 110
    queues((60, 0), (35, 5))
    assert meter.read() == 15
    matched[0] = 115
    queues((60, 0), (35, 5))
    assert meter.read() == 15
    matched[0] = 125
    queues((62, 0), (36, 5))  # 10 more matched, 3 queued: 7 more bypassed
    assert meter.read() == 22
    # Worker 1 restarts: its queue goes away (packets meanwhile bypass), then a new instance counts from 0.
    matched[0] = 135
    queues((64, 0), None)
    assert meter.read() == 30
    matched[0] = 140
    queues((65, 0), (4, 0))
    assert meter.read() == 30

    # iptables failing: no update, no crash.
    def broken() -> int:
        raise RuntimeError("iptables: no chain")

    meter._matched = broken
    assert meter.read() is None and meter.bypassed == 30 and meter.errors == 1


# ================================================================================== the real daemon

FETCH = r"""
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())
"""


FETCH_STATUS = r"""
import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=10).status)
except urllib.error.HTTPError as e:
    print(e.code)
"""


def scrape(g: ObservedGateway, port: int = 9464) -> Samples:
    return samples(g.lab.run("gw", [sys.executable, "-c", FETCH, f"http://127.0.0.1:{port}/metrics"]).stdout)


def quiet(g: ObservedGateway) -> None:
    """Wait until no packet arrived for a while (the last ACKs and FINs of closed connections)."""
    last = -1
    for _ in range(40):
        n = g.status()["totals"]["packets"]["received"]
        if n == last:
            return
        last = n
        time.sleep(0.7)
    raise AssertionError("traffic did not settle")


def assert_matches_status(m: Samples, worker: dict[str, Any]) -> None:
    q = (("queue", str(worker["queue"])),)
    for name, value in (
        ("tcpguard_packets_received_total", worker["packets"]["received"]),
        ("tcpguard_packets_accepted_total", worker["packets"]["accepted"]),
        ("tcpguard_packets_dropped_total", worker["packets"]["dropped"]),
        ("tcpguard_bytes_received_total", worker["bytes"]["received"]),
        ("tcpguard_bytes_dropped_total", worker["bytes"]["dropped"]),
        ("tcpguard_resets_sent_total", worker["resets_sent"]),
        ("tcpguard_rule_errors_total", worker["rule_errors"]),
        ("tcpguard_connections_opened_total", worker["connections"]["opened"]),
        ("tcpguard_queue_kernel_dropped_total", worker["queue_drops"]["kernel_dropped"]),
        ("tcpguard_connections_tracked", worker["connections"]["tracked"]),
    ):
        assert m[(name, q)] == value, name
    for state, n in worker["connections"]["by_state"].items():
        assert m[("tcpguard_connections", (*q, ("state", state)))] == n


@pytest.mark.root
def test_the_daemon_serves_its_counters(lab: Lab, tmp_path: Path) -> None:
    g = ObservedGateway(lab, tmp_path, extra="metrics:\n  address: 127.0.0.1:9464\n")
    try:
        g.start_server(OPEN_PORT, reply=100)
        g.start_server(DROP_PORT)
        g.start_daemon()
        m = scrape(g)
        assert m[("tcpguard_up", ())] == 1 and m[("tcpguard_workers", ())] == 1
        st = g.status()
        assert m[("tcpguard_build_info", (("core", st["core"]), ("version", st["version"])))] == 1
        assert m[("tcpguard_alerts_total", (("queue", "0"),))] == 0
        probe = g.lab.run("gw", [sys.executable, "-c", FETCH_STATUS, "http://127.0.0.1:9464/"])
        assert probe.stdout.strip() == "404"
        assert m[("tcpguard_packets_received_total", (("queue", "0"),))] == 0
        syns = crafted_syns(4)
        g.send_raw(syns)
        g.wait_received(4)
        m = scrape(g)
        q0 = (("queue", "0"),)
        assert m[("tcpguard_packets_received_total", q0)] == 4
        assert m[("tcpguard_packets_dropped_total", q0)] == 4
        assert m[("tcpguard_bytes_dropped_total", q0)] == sum(len(p) for p in syns)
        assert m[("tcpguard_connections_opened_total", q0)] == 4
        assert m[("tcpguard_connections", (*q0, ("state", "CLOSED")))] == 4
        assert g.client([hexs(b"hello")])["error"] is None
        assert g.client([hexs(b"/bin/sh")], shutdown=False)["error"] == "ConnectionResetError"
        wait_for(lambda: g.status()["workers"][0]["resets_sent"] == 2, "resets counted")
        quiet(g)
        # Quiet now: the endpoint and the control socket report the same numbers.
        m = scrape(g)
        st = g.status()
        assert_matches_status(m, st["workers"][0])
        assert m[("tcpguard_resets_sent_total", q0)] == 2
        assert m[("tcpguard_connections_opened_total", q0)] == 6
        # Nothing overflowed: every packet the NFQUEUE rules matched entered the queue.
        assert st["totals"]["queue_drops"]["bypassed"] == 0
        assert m[("tcpguard_queue_bypassed_total", ())] == 0
    finally:
        g.cleanup()


@pytest.mark.root
def test_with_two_workers_the_supervisor_serves_both(lab: Lab, tmp_path: Path) -> None:
    g = ObservedGateway(lab, tmp_path, workers=2, extra="metrics:\n  address: 127.0.0.1:9465\n")
    try:
        g.start_server(OPEN_PORT, reply=100)
        g.start_server(DROP_PORT)
        g.start_daemon()
        g.send_raw(crafted_syns(8))
        g.wait_received(8)
        for i in range(4):
            assert g.client([hexs(f"c{i}".encode())])["error"] is None
        quiet(g)
        m = scrape(g, 9465)
        st = g.status()
        assert m[("tcpguard_workers", ())] == 2
        for w in st["workers"]:
            assert_matches_status(m, w)
        assert sum(m[("tcpguard_connections_opened_total", (("queue", q),))] for q in ("0", "1")) == 12
        # One --queue-balance rule feeds both queues: its counter equals what entered them together.
        assert st["totals"]["queue_drops"]["bypassed"] == 0
    finally:
        g.cleanup()
