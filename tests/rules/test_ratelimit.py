"""rules/ratelimit.py: a token bucket per source on new connections, with the engine's clock."""

from __future__ import annotations

from typing import Any

from tcpguard.core.engine import Engine

from .samples import ACCEPT, DROP, Playbook, load

BURST_SETTINGS = ("BURST", "RATE")


class Sources:
    """SYNs from many clients and ports through one engine, at chosen times."""

    def __init__(self) -> None:
        self.rules, self.mod = load("ratelimit")
        self.events: list[dict[str, Any]] = []
        self.engine = Engine(rules=self.rules, sink=self.events.append)
        self.port = 30000

    def syn(self, client: str, at: float, server: str | None = None) -> int:
        self.port += 1
        if server is None:
            server = "fd00::2" if ":" in client else "10.0.0.2"
        pb = Playbook(engine=self.engine, client=client, server=server, cport=self.port)
        pb.now = at
        return int(pb.client("S", dt=0.0).verdict)

    def alerts(self) -> list[str]:
        return [e["alert"]["signature"] for e in self.events if e["event"] == "alert"]


def test_burst_then_rate() -> None:
    s = Sources()
    burst, rate = s.mod["BURST"], s.mod["RATE"]
    assert [s.syn("10.0.0.1", 1.0) for _ in range(burst)] == [ACCEPT] * burst
    assert s.syn("10.0.0.1", 1.0) == DROP
    assert s.syn("10.0.0.1", 1.0) == DROP
    limit = f"more than {burst} new connections from 10.0.0.1 at once (limit {rate:g} per second)"
    assert s.alerts() == [limit]
    # One token comes back after 1/RATE seconds; the next refusal alerts again.
    assert s.syn("10.0.0.1", 1.0 + 1 / rate) == ACCEPT
    assert s.syn("10.0.0.1", 1.0 + 1 / rate) == DROP
    assert len(s.alerts()) == 2
    # Another source has its own bucket.
    assert s.syn("10.0.0.3", 1.0) == ACCEPT
    # After a long pause the bucket is full again, but never more than BURST.
    later = [s.syn("10.0.0.1", 1000.0) for _ in range(burst + 1)]
    assert later == [ACCEPT] * burst + [DROP]


def test_ipv6_sources_share_a_bucket_per_64() -> None:
    s = Sources()
    burst = s.mod["BURST"]
    for i in range(burst):
        assert s.syn(f"fd00:1:2:3::{i + 1:x}", 5.0) == ACCEPT
    assert s.syn("fd00:1:2:3:ffff::1", 5.0) == DROP
    assert s.alerts()[0].startswith(f"more than {burst} new connections from fd00:1:2:3::/64")
    assert s.syn("fd00:1:2:4::1", 5.0) == ACCEPT


def test_exempt_sources_and_midstream_pickups_are_not_counted() -> None:
    s = Sources()
    burst = s.mod["BURST"]
    assert all(s.syn("127.0.0.1", 0.0, server="127.0.0.2") == ACCEPT for _ in range(burst + 5))
    for i in range(burst + 5):
        pb = Playbook(engine=s.engine, client="10.0.0.9", server="10.0.0.2", cport=50000 + i)
        pb.now = 0.0
        assert pb.client("PA", b"old connection", dt=0.0).verdict == ACCEPT
    assert s.syn("10.0.0.9", 0.0) == ACCEPT
    assert s.alerts() == []


def test_reset_action() -> None:
    s = Sources()
    s.mod["ACTION"] = "reset"
    for _ in range(s.mod["BURST"]):
        s.syn("10.0.0.1", 0.0)
    pb = Playbook(engine=s.engine, client="10.0.0.1", server="10.0.0.2", cport=60000)
    dec = pb.client("S", dt=0.0)
    assert dec.verdict == DROP and len(dec.send) == 1  # an RST+ACK to the client: connection refused


def test_memory_is_bounded_by_forgetting_the_least_recent_source() -> None:
    s = Sources()
    s.mod["MAX_SOURCES"] = 3
    for i in range(10):
        s.syn(f"10.0.1.{i}", float(i))
    buckets = s.mod["_buckets"]
    assert len(buckets) == 3
    assert [str(k) for k in buckets] == ["10.0.1.7", "10.0.1.8", "10.0.1.9"]


def test_state_is_per_load() -> None:
    # A reload executes the module again: the buckets start empty.
    assert Sources().mod["_buckets"] is not Sources().mod["_buckets"]
