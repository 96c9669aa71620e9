"""Floods from the client namespace against the real daemon, bounded in count and time, while a legitimate
client keeps working.

For each flood: the daemon's memory (VmHWM from /proc) stays within a bound derived from the configured
caps, legitimate connections made during the flood are served and still inspected (a request with the
pattern is reset), and the daemon's counters (its status document, read over the control socket) say
what was refused or evicted.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.app.daemon.test_daemon import hexs
from tests.netns import CLIENT_V4, SERVER_V4

from .conftest import Rig
from .harness import PATTERN, Guard
from .stack import Conn, fast_ipv4_tcp

pytestmark = pytest.mark.root

FLOOD_SECONDS = 3.0
MIB = 1024


class Sampler:
    """Samples the daemon's RSS every 0.1 s while the flood runs."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.guard.rss_kib()[0])
            except (OSError, AttributeError):
                return
            time.sleep(0.1)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def legit_traffic(guard: Guard, port: int, rounds: int) -> dict[str, list[dict[str, Any]]]:
    """`rounds` ordinary requests and one with the pattern, through the kernel's own TCP stack."""
    out: dict[str, list[dict[str, Any]]] = {"plain": [], "pattern": []}
    for i in range(rounds):
        out["plain"].append(guard.client([hexs(f"legit request {i}".encode())], port=port, timeout=10))
        time.sleep(0.1)
    out["pattern"].append(guard.client([hexs(b"GET /?x=" + PATTERN)], port=port, timeout=10))
    return out


def during(flood: Callable[[], int], legit: Callable[[], Any]) -> tuple[int, Any]:
    """Run `flood` in a thread while `legit` runs here; returns (packets the flood sent, legit's result)."""
    sent: list[int] = []
    t = threading.Thread(target=lambda: sent.append(flood()), daemon=True)
    t.start()
    time.sleep(0.3)  # the flood is on before the first legitimate connection
    result = legit()
    t.join(FLOOD_SECONDS + 10)
    return (sent[0] if sent else 0), result


def assert_legit_ok(res: dict[str, list[dict[str, Any]]], reply: int) -> None:
    for r in res["plain"]:
        assert r["error"] is None and r["received_len"] == reply, f"a legitimate request failed: {r}"
    for r in res["pattern"]:
        assert r["error"] == "ConnectionResetError", f"the pattern was not caught during the flood: {r}"


def syn_flood(rig: Rig, port: int, count: int) -> Callable[[], int]:
    ports = [p for p in range(1024, 65536) if not 32768 <= p < 61000]  # leave the legit client's range
    pkts = [
        fast_ipv4_tcp(
            CLIENT_V4,
            SERVER_V4,
            random.choice(ports),
            port,
            random.getrandbits(32),
            0,
            0x02,
            options=b"\x02\x04\x05\xb4",
        )
        for _ in range(count)
    ]

    def flood() -> int:
        deadline = time.monotonic() + FLOOD_SECONDS
        sent = 0
        for i in range(0, len(pkts), 500):
            if time.monotonic() > deadline:
                break
            sent += rig.net.blast(pkts[i : i + 500])
        return sent

    return flood


@pytest.fixture
def syn_rig(make_rig: Callable[..., Rig]) -> Iterator[Rig]:
    yield make_rig(
        {
            "queue": {"bypass": False},
            "engine": {"limits": {"max_connections": 2000}, "timeouts": {"syn_sent": 5.0}},
        }
    )


def test_syn_flood(syn_rig: Rig) -> None:
    rig, guard = syn_rig, syn_rig.guard
    port = 8200
    guard.start_server(port, reply=1000)
    base = guard.rss_kib()[0]
    with Sampler(guard) as mem:
        sent, res = during(syn_flood(rig, port, 60_000), lambda: legit_traffic(guard, port, 4))
    assert sent > 10_000
    assert_legit_ok(res, 1000)
    st = guard.worker_status()
    eng = st["engine"]
    assert st["connections"]["tracked"] <= 2000
    assert eng["evicted"] + eng["refused"] > 0, eng  # the table filled up: the counters say so
    # 2000 connections cost a few MiB; 48 MiB over the idle daemon is a generous bound.
    assert mem.peak - base < 48 * MIB, (base, mem.peak)
    print(
        f"SYN flood: {sent} SYNs sent, RSS {base} -> peak {mem.peak} KiB, engine {eng}, "
        f"queue {st['queue_drops']}"
    )


def test_syn_flood_does_not_flood_the_log(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig({"queue": {"bypass": False}, "engine": {"limits": {"max_connections": 200}}})
    guard = rig.guard
    guard.start_server(8210, reply=10)
    before = len(guard.log_text().splitlines())
    rig.net.blast(
        [
            fast_ipv4_tcp(CLIENT_V4, SERVER_V4, 1024 + i, 8210, random.getrandbits(32), 0, 0x02)
            for i in range(5000)
        ]
    )
    time.sleep(1.5)
    evicted = guard.worker_status()["engine"]["evicted"]
    lines = len(guard.log_text().splitlines()) - before
    assert evicted > 1000
    assert lines < 100, f"{lines} log lines for {evicted} evictions"


def ooo_flood(rig: Rig, port: int, conns: int, segs: int) -> Callable[[], int]:
    """`conns` real connections, each sent `segs` segments beyond a gap that never fills."""
    made = []
    for _ in range(conns):
        c = Conn(rig.net, SERVER_V4, port)
        c.handshake()
        made.append(c)
    pkts = [
        fast_ipv4_tcp(
            CLIENT_V4,
            SERVER_V4,
            c.sport,
            port,
            c.seq_at(1000 + 300 * i),
            c.ack_value,
            0x18,
            payload=b"o" * 200,
        )
        for c in made
        for i in range(segs)
    ]
    random.shuffle(pkts)

    def flood() -> int:
        return rig.net.blast(pkts)

    return flood


SANE_LIMITS = {"max_held_packets": 1024, "max_ooo_segments": 32, "max_ooo_bytes": 16384}


@pytest.fixture
def ooo_rig(make_rig: Callable[..., Rig]) -> Iterator[Rig]:
    yield make_rig({"queue": {"bypass": False, "maxlen": 4096}, "engine": {"limits": SANE_LIMITS}})


def test_out_of_order_flood_within_configured_caps(ooo_rig: Rig) -> None:
    rig, guard = ooo_rig, ooo_rig.guard
    port, web = 8300, 8301
    guard.start_server(port, reply=0)
    guard.start_server(web, reply=1000)
    base = guard.rss_kib()[0]
    with Sampler(guard) as mem:
        sent, res = during(ooo_flood(rig, port, 64, 48), lambda: legit_traffic(guard, web, 4))
    assert sent == 64 * 48
    assert_legit_ok(res, 1000)
    st = guard.worker_status()
    eng = st["engine"]
    assert st["packets"]["held"] <= SANE_LIMITS["max_held_packets"]
    assert eng["ooo_dropped"] + eng["limit_hits"] > 0, eng  # what was refused is counted
    assert mem.peak - base < 48 * MIB, (base, mem.peak)
    print(
        f"OOO flood: {sent} segments, held {st['packets']['held']}, RSS {base} -> peak {mem.peak} KiB, "
        f"engine {eng}, queue {st['queue_drops']}"
    )


def test_out_of_order_flood_with_default_limits(make_rig: Callable[..., Rig]) -> None:
    # The configuration an operator gets (bypass: true, queue.maxlen 4096). Held packets stay in the
    # kernel queue: if they could fill it, everything behind them would pass uninspected (fail-open).
    # 4608 segments that can never be delivered must not switch inspection off.
    rig = make_rig()
    guard = rig.guard
    port, web = 8300, 8301
    guard.start_server(port, reply=0)
    guard.start_server(web, reply=1000)
    sent, res = during(ooo_flood(rig, port, 72, 64), lambda: legit_traffic(guard, web, 2))
    assert sent == 72 * 64
    assert_legit_ok(res, 1000)
    st = guard.worker_status()
    assert st["packets"]["held"] <= st["queue_drops"]["kernel_waiting"] <= 4096 // 2, st


def test_flood_of_segments_for_unknown_connections(make_rig: Callable[..., Rig]) -> None:
    # Mid-stream data for 20,000 connections nobody opened (`midstream: track` picks each one up): the
    # table stays at its cap and evicts; legitimate traffic goes on.
    rig = make_rig({"queue": {"bypass": False}, "engine": {"limits": {"max_connections": 1000}}})
    guard = rig.guard
    port, web = 8400, 8401
    guard.start_server(port, reply=0)
    guard.start_server(web, reply=1000)
    pkts = [
        fast_ipv4_tcp(
            CLIENT_V4,
            SERVER_V4,
            1024 + i,
            port,
            random.getrandbits(32),
            random.getrandbits(32),
            0x18,
            payload=b"m" * 100,
        )
        for i in range(20_000)
    ]
    base = guard.rss_kib()[0]

    def flood() -> int:
        return rig.net.blast(pkts)

    with Sampler(guard) as mem:
        sent, res = during(flood, lambda: legit_traffic(guard, web, 3))
    assert_legit_ok(res, 1000)
    st = guard.worker_status()
    assert st["connections"]["tracked"] <= 1000
    assert st["engine"]["midstream"] > 0 and st["engine"]["evicted"] > 0, st["engine"]
    assert mem.peak - base < 48 * MIB
    print(f"mid-stream flood: {sent} segments, engine {st['engine']}, RSS peak {mem.peak} KiB")
