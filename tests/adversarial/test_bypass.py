"""Connection bypass (issue 20) in the real daemon, and the attacks on bypass itself.

Each test runs the daemon in a lab (`make_rig`) with `engine.inspection.bypass: true` and its own rule
module (below): `header` reads the first HEADER bytes of the client's stream and is then done with the
connection (a rule that judges a request line and needs nothing more); `thorough`, only on the WATCHED
server ports, reads the whole client stream and resets the connection on PATTERN. So a connection to an
ordinary port is bypassed once its header is judged, and one to a watched port never is.

What must hold, against the real kernel and real TCP endpoints:

* a bypassed connection's later packets never reach the daemon (its counters and the kernel's queue
  counters), yet every byte arrives, through the kernel (the connmark rule's counters);
* the same with several workers (queue-balance);
* a connection one rule is done with while another still wants it is not bypassed: the second rule still
  sees the pattern and resets the connection;
* a SYN flood while connections are being bypassed: the bypassed-connection table stays within its bound
  (`engine.limits.max_connections`), legitimate traffic is served, and once the flood ends the table
  empties and the daemon goes quiet by itself;
* kill -9 and restart with a bypassed connection live: it keeps flowing through the kernel and the new
  daemon never sees it (not picked up mid-stream);
* packets already queued when the verdict is given are answered consistently: accepted as the bypassed
  connection's (counted as late), never dropped, never picked up as a new mid-stream connection, and no
  rule sees their bytes.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tcpguard.app.control.client import ControlClient
from tests.app.daemon.test_daemon import hexs, wait_for
from tests.netns import CLIENT_V4, SERVER_V4

from .conftest import Rig
from .harness import PATTERN, Guard
from .stack import Conn, fast_ipv4_tcp

pytestmark = pytest.mark.root

HEADER = b"GET /index HTTP1"  # 16 bytes: what `header` judges
WATCHED = (8150, 8151)

RULES = """
import json, os, time
from tcpguard import rule, tcp_connection

RECORD = {record!r}
PATTERN = {pattern!r}
HEADER = {header}
SLOW = {slow!r}


def _log(flow, name, off, data):
    with open(os.path.join(RECORD, f"{{flow.srcport}}.jsonl"), "a") as f:
        f.write(json.dumps({{"rule": name, "id": flow.id, "off": off, "data": data.hex()}}) + "\\n")


@rule(on=tcp_connection.events.receive_data, direction="up")
def header(flow, stream, current, direction):
    off = current.pos
    data = current.read()
    _log(flow, "header", off, data)
    if PATTERN in data:
        flow.reset()
    elif off + len(data) >= HEADER:
        if SLOW:
            time.sleep(SLOW)  # the verdict waits: packets pile up in the queue behind it
        flow.done()


@rule(on=tcp_connection.events.receive_data, direction="up", ports={watched!r})
def thorough(flow, stream, current, direction):
    off = current.pos
    data = current.read()
    _log(flow, "thorough", off, data)
    seen = flow.store.get("tail", b"") + data
    flow.store["tail"] = seen[-len(PATTERN):]
    if PATTERN in seen:
        flow.reset()


@rule(on=tcp_connection.events.end_connection)
def ended(flow):
    with open(os.path.join(RECORD, f"{{flow.srcport}}.end"), "a") as f:
        f.write(flow.end_reason + "\\n")
"""

BYPASS_ON: dict[str, Any] = {"engine": {"inspection": {"bypass": True}}}


def bypass_rig(make_rig: Callable[..., Rig], config: dict[str, Any] | None = None, slow: float = 0.0) -> Rig:
    """A lab and daemon with bypass on and this module's rules (written before the daemon starts)."""
    over: dict[str, Any] = {**BYPASS_ON}
    for k, v in (config or {}).items():
        over[k] = {**over.get(k, {}), **v} if isinstance(v, dict) else v
    rig = make_rig(over, start=False)
    g = rig.guard
    (g.rules_dir / "test_rules.py").write_text(
        RULES.format(
            record=str(g.record_dir), pattern=PATTERN, header=len(HEADER), slow=slow, watched=list(WATCHED)
        )
    )
    g.start_daemon()
    return rig


def data(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def control(guard: Guard, request: dict[str, Any]) -> dict[str, Any]:
    resp: dict[str, Any] = ControlClient(guard.tmp / "control.sock", 10).call(request)
    return resp


def status(guard: Guard) -> dict[str, Any]:
    st = guard.status()
    assert st is not None, guard.log_text()
    return st


def only_client_port(guard: Guard) -> int:
    ports = {int(p.stem) for p in guard.record_dir.glob("*.jsonl")}
    assert len(ports) == 1, ports
    return ports.pop()


def rule_bytes(guard: Guard, cport: int, name: str) -> int:
    return sum(len(bytes.fromhex(r["data"])) for r in guard.records(cport) if r["rule"] == name)


def test_a_connection_whose_rules_are_done_leaves_the_queue(make_rig: Callable[..., Rig]) -> None:
    rig = bypass_rig(make_rig)
    g = rig.guard
    port = 8100
    g.start_server(port)
    size = 2 << 20
    res = g.client([hexs(HEADER), [7, size], hexs(b" then " + PATTERN)], port=port, timeout=30)
    assert res["error"] is None, res
    got, how = g.server_got(port)
    # Every byte arrived, the pattern after the header too: past the bypass, tcpguard no longer looks
    # (the trade-off the operator chose with engine.inspection.bypass).
    assert how == "eof" and got == HEADER + data(7, size) + b" then " + PATTERN
    cport = only_client_port(g)
    assert g.end_reasons(cport) == ["bypassed"]
    assert rule_bytes(g, cport, "header") < 64 << 10  # the rule saw the start, not the 2 MB
    st = status(g)
    w, tot = st["workers"][0], st["totals"]
    assert w["bypass"]["connections"] == 1
    # The daemon saw the handshake and the first packets; the kernel carried the rest (the connmark
    # rule's counters: GRO-merged packets, so bytes are the measure).
    assert w["packets"]["received"] < 200, w["packets"]
    assert tot["bypass"]["kernel_bytes"] > size, tot["bypass"]
    assert w["engine"]["midstream"] == 0 and w["packets"]["dropped"] == 0
    print(f"bypass: daemon saw {w['packets']['received']} packets, kernel carried {tot['bypass']}")
    # The operator's view: the remembered connection, and a reset that says what it cannot do.
    rows = control(g, {"cmd": "connections", "filter": {"state": "BYPASSED"}})["result"]["connections"]
    assert [(r["state"], r["cport"], r["sport"]) for r in rows] == [("BYPASSED", cport, port)]
    answer = control(g, {"cmd": "reset", "id": rows[0]["id"]})
    assert not answer["ok"] and f"cannot reset {rows[0]['id']}" in answer["error"]
    assert "conntrack -D -p tcp" in answer["error"]


def test_one_rule_done_while_another_still_wants_is_not_bypassed(make_rig: Callable[..., Rig]) -> None:
    """The attack: make the quick rule lose interest early (a harmless header), then send the pattern
    later, hoping the connection left inspection with the first rule. The second rule still wants it."""
    rig = bypass_rig(make_rig)
    g = rig.guard
    port = WATCHED[0]
    g.start_server(port)
    chunks = [hexs(HEADER), [3, 200_000], hexs(b"x" + PATTERN + b"y"), [4, 1000]]
    res = g.client(chunks, port=port, gap=0.05, timeout=15)
    assert res["error"] == "ConnectionResetError", res
    got, _ = g.server_got(port)
    assert PATTERN not in got
    cport = only_client_port(g)
    assert g.end_reasons(cport) != ["bypassed"]
    assert rule_bytes(g, cport, "thorough") >= len(HEADER) + 200_000  # it saw everything up to the pattern
    assert rule_bytes(g, cport, "header") < 64 << 10  # the quick rule did stop
    assert status(g)["workers"][0]["bypass"]["connections"] == 0


def test_several_workers_each_bypass_their_connections(make_rig: Callable[..., Rig]) -> None:
    rig = bypass_rig(make_rig, {"queue": {"workers": 2}})
    g = rig.guard
    size = 1 << 20
    ports = [8100 + i for i in range(4)]
    for p in ports:
        g.start_server(p)
    results: dict[int, dict[str, Any]] = {}

    def one(p: int) -> None:
        results[p] = g.client([hexs(HEADER), [p, size]], port=p, timeout=30)

    threads = [threading.Thread(target=one, args=(p,)) for p in ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for p in ports:
        assert results[p]["error"] is None, results[p]
        got, how = g.server_got(p)
        assert how == "eof" and got == HEADER + data(p, size), p
    st = status(g)
    workers, tot = st["workers"], st["totals"]
    assert len(workers) == 2 and all("error" not in w for w in workers)
    assert tot["bypass"]["connections"] == 4
    assert tot["packets"]["received"] < 4 * 200, [w["packets"] for w in workers]
    assert tot["bypass"]["kernel_bytes"] > 4 * size
    assert tot["adapter"]["bypass_looped"] == 0


def test_bypass_under_a_syn_flood_is_bounded_and_stops_by_itself(make_rig: Callable[..., Rig]) -> None:
    cap = 100
    rig = bypass_rig(
        make_rig,
        {
            "queue": {"bypass": False},
            "engine": {"limits": {"max_connections": cap}, "timeouts": {"closed": 2.0}},
        },
    )
    g = rig.guard
    port = 8100
    g.start_server(port)
    spoofed = [
        fast_ipv4_tcp(
            CLIENT_V4, SERVER_V4, random.randint(1024, 19000), port, random.getrandbits(32), 0, 0x02
        )
        for _ in range(20_000)
    ]
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            st = g.status(timeout=5)
            if st is not None:
                peak = max(peak, st["workers"][0]["bypass"]["remembered"])
            time.sleep(0.2)

    flood = threading.Thread(target=lambda: rig.net.blast(spoofed, rate=5000), daemon=True)
    sampler = threading.Thread(target=sample, daemon=True)
    flood.start()
    sampler.start()
    made = 0
    for _ in range(2 * cap + 50):  # more bypassed connections than the table holds
        c = Conn(rig.net, SERVER_V4, port)
        try:
            c.handshake(timeout=1.0)
        except AssertionError:  # the SYN lost to the flood (a raw client does not retransmit)
            continue
        c.send("PA", 0, HEADER)
        made += 1
    legit = g.client([hexs(HEADER), [9, 100_000]], port=port, timeout=20)
    flood.join(30)
    stop.set()
    sampler.join(10)
    assert made > cap, made
    assert legit["error"] is None, legit
    st = status(g)
    w = st["workers"][0]
    assert w["bypass"]["connections"] > cap
    assert peak <= cap and w["bypass"]["remembered"] <= cap, (peak, w["bypass"])
    assert w["connections"]["tracked"] <= cap
    # It stops by itself: the remembered connections expire (timeouts.closed after their verdict, swept
    # every 10 s), and with no traffic left nothing reaches the daemon any more.
    wait_for(lambda: status(g)["workers"][0]["bypass"]["remembered"] == 0, "bypass table empty", timeout=30)
    before = status(g)["workers"][0]["packets"]["received"]
    time.sleep(1.0)
    assert status(g)["workers"][0]["packets"]["received"] == before
    assert g.daemon is not None and g.daemon.poll() is None
    print(
        f"SYN flood with bypass: {made} raw connections bypassed, table peak {peak} (cap {cap}), "
        f"{w['bypass']}"
    )


def test_kill_9_and_restart_leave_bypassed_connections_flowing(make_rig: Callable[..., Rig]) -> None:
    rig = bypass_rig(make_rig)
    g = rig.guard
    port = 8100
    g.start_server(port)
    chunk, n = 64 << 10, 60
    box: dict[str, Any] = {}
    sender = threading.Thread(
        target=lambda: box.setdefault(
            "r",
            g.client([hexs(HEADER), *[[100 + i, chunk] for i in range(n)]], port=port, gap=0.1, timeout=30),
        )
    )
    sender.start()
    wait_for(lambda: status(g)["workers"][0]["bypass"]["connections"] == 1, "bypassed", timeout=10)
    assert g.daemon is not None
    g.daemon.send_signal(signal.SIGKILL)
    g.daemon.wait(10)
    time.sleep(0.5)  # the connection goes on without any daemon: the chain stays, its connmark rule works
    g.start_daemon()  # reinstalls the chain over the leftover one
    sender.join(60)
    assert box["r"]["error"] is None, box["r"]
    got, how = g.server_got(port)
    assert how == "eof" and got == HEADER + b"".join(data(100 + i, chunk) for i in range(n))
    st = status(g)
    w = st["workers"][0]
    # The new daemon never saw the connection: not a packet, not picked up mid-stream.
    assert w["packets"]["received"] == 0, w["packets"]
    assert w["connections"]["opened"] == 0 and w["engine"]["midstream"] == 0
    assert st["totals"]["bypass"]["kernel_bytes"] > 0  # the rest went through the new chain's rule
    assert "chain TCPGUARD was already there" in g.log_text()


def test_packets_queued_behind_the_bypass_verdict_are_answered_consistently(
    make_rig: Callable[..., Rig],
) -> None:
    """The header rule takes 0.3 s over its verdict while the client keeps sending: those packets are in
    the queue when the connection is bypassed. They must leave as the bypassed connection's packets."""
    rig = bypass_rig(make_rig, slow=0.3)
    g = rig.guard
    port = 8100
    g.start_server(port)
    size = 1 << 20
    res = g.client([hexs(HEADER), [5, size]], port=port, timeout=30)
    assert res["error"] is None, res
    got, how = g.server_got(port)
    assert how == "eof" and got == HEADER + data(5, size)
    w = status(g)["workers"][0]
    assert w["bypass"]["connections"] == 1
    assert w["bypass"]["late_packets"] >= 1, w["bypass"]  # they did arrive after the verdict
    assert w["connections"]["opened"] == 1 and w["engine"]["midstream"] == 0  # never a new connection
    assert w["packets"]["dropped"] == 0, w["drops"]
    cport = only_client_port(g)
    # No rule saw their bytes: the header rule's last batch is the one it was done with.
    assert rule_bytes(g, cport, "header") < 64 << 10
    assert g.end_reasons(cport) == ["bypassed"]
