"""Faults of the daemon itself, in the lab: killed under load, rules that raise or never return, SIGHUP
storms, a queue that overflows.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tcpguard.app.control.client import format_status
from tests.app.daemon.test_daemon import hexs, wait_for
from tests.app.tcpapps import CLIENT
from tests.netns import SERVER_V4

from .conftest import Rig
from .harness import PATTERN, Guard, check_invariant, iptables_lines, outcome
from .stack import MASK, Conn

pytestmark = pytest.mark.root


def start_client(
    guard: Guard, port: int, chunks: list[Any], gap: float, timeout: float = 30
) -> subprocess.Popen[str]:
    """A real client in the background (tests/app/tcpapps.py CLIENT); its JSON result comes on stdout."""
    spec = {"chunks": chunks, "gap": gap, "timeout": timeout}
    return guard.lab.popen(
        "client",
        [sys.executable, "-c", CLIENT, SERVER_V4, str(port), json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
    )


def result(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    res: dict[str, Any] = json.loads(out)
    return res


# ====================================================================== kill -9 under load
@pytest.mark.parametrize("bypass", [True, False], ids=["queue-bypass", "fail-closed"])
def test_kill9_under_load_then_restart(make_rig: Callable[..., Rig], bypass: bool) -> None:
    rig = make_rig({"queue": {"bypass": bypass}})
    guard = rig.guard
    port, wport = 8500, 8501
    guard.start_server(port, reply=200_000)
    guard.start_server(wport, reply=0)
    installed = iptables_lines(rig.lab)
    # Load: three transfers of 40 chunks of 20 kB over ~4 s each, running across the kill and restart.
    loads = [
        start_client(guard, port, [[seed, 20_000] for seed in range(k * 100, k * 100 + 40)], gap=0.1)
        for k in range(3)
    ]
    # A connection made before the kill that sends the pattern only after the restart.
    watcher = Conn(rig.net, SERVER_V4, wport)
    watcher.handshake()
    watcher.send("PA", 0, b"GET /before-the-kill ")
    assert watcher.wait_acked(21)
    time.sleep(1.0)
    guard.stop_daemon(signal.SIGKILL)
    # Down: the rules stay behind; traffic follows the bypass setting.
    down = guard.client([hexs(b"while the daemon is down")], port=port, timeout=3)
    if bypass:
        assert down["error"] is None and down["received_len"] == 200_000
    else:
        assert not down["connected"] or down["error"] is not None
    time.sleep(0.5)
    guard.start_daemon()
    assert iptables_lines(rig.lab) == installed  # same rules, nothing duplicated
    for proc in loads:
        r = result(proc)
        assert r["error"] is None and r["received_len"] == 200_000, r
    # The pre-kill connection is picked up mid-stream and inspected: the pattern resets it.
    watcher.send("PA", 21, b"?cmd=" + PATTERN)
    wait_for(lambda: any(r["hit"] for r in guard.records(watcher.sport)), "the rule sees the pattern")
    time.sleep(0.3)
    data, _ = guard.server_got(wport, timeout=0.5)
    assert data == b"GET /before-the-kill "
    # Byte-identical transfers: the server got exactly what each load client sent.
    sent = {
        b"".join(random.Random(s).randbytes(20_000) for s in range(k * 100, k * 100 + 40)) for k in range(3)
    }

    def got() -> set[bytes]:
        return {d for d, st in guard.server_conns(port) if st == "eof" and len(d) == 800_000}

    wait_for(lambda: sent <= got(), "the server application got every transfer whole")
    assert guard.stop_daemon() == 0


def test_reset_of_a_connection_picked_up_mid_stream(make_rig: Callable[..., Rig]) -> None:
    # Connections open when the daemon (re)starts are tracked from their first packet (midstream: track).
    rig = make_rig(start=False)
    guard = rig.guard
    guard.start_server(8550, reply=0)
    c = Conn(rig.net, SERVER_V4, 8550)
    c.handshake()
    c.send("PA", 0, b"GET /before-the-start ")
    assert c.wait_acked(22)
    guard.start_daemon()
    c.send("PA", 22, b"?cmd=" + PATTERN)
    rst = rig.net.wait(c.sport, lambda s: s.has("R"), 2.0)
    assert rst is not None, "no RST to the client"
    assert c.server_isn is not None and rst.seq == (c.server_isn + 1) & MASK, (
        f"RST seq {rst.seq} is not acceptable"
    )
    data, status = guard.server_got(8550)
    assert status == "reset" and data == b"GET /before-the-start ", (data, status)


# ====================================================================== rules that misbehave
RAISING = """

@rule(on=tcp_connection.events.receive_data)
def explode(flow, stream, current, direction):
    if direction == "up" and flow.dstport == {port}:
        raise RuntimeError("boom")
"""


@pytest.mark.parametrize("policy", ["reset", "accept"])
def test_rule_that_raises_on_every_packet(make_rig: Callable[..., Rig], policy: str) -> None:
    port, other = 8600, 8601
    rig = make_rig({"engine": {"policies": {"rule_error": policy}}}, extra_rules=RAISING.format(port=port))
    guard = rig.guard
    guard.start_server(port, reply=100)
    guard.start_server(other, reply=100)
    results = [guard.client([hexs(b"request %d" % i)], port=port, timeout=5) for i in range(5)]
    if policy == "reset":
        assert all(r["error"] == "ConnectionResetError" for r in results), results
        wait_for(lambda: all(st for _, st in guard.server_conns(port)), "the server saw every end")
        assert all(st == "reset" and d == b"" for d, st in guard.server_conns(port))
    else:
        assert all(r["error"] is None and r["received_len"] == 100 for r in results), results
    # The daemon is alive, other traffic is served and inspected, the error is counted and named.
    assert guard.daemon is not None and guard.daemon.poll() is None
    assert guard.client([hexs(b"fine")], port=other)["received_len"] == 100
    assert guard.client([hexs(b"x " + PATTERN)], port=other)["error"] == "ConnectionResetError"
    st = guard.worker_status()
    assert st["engine"]["rule_errors"] >= 5
    log = guard.log_text()
    # Named with the flow, the rule's file:line and the exception type (its message only with log_payload).
    assert "rule test_rules.explode raised on" in log and "test_rules.py:" in log and "RuntimeError" in log


EXITING = """

@rule(on=tcp_connection.events.receive_data)
def bail_out(flow, stream, current, direction):
    if b"EXIT" in current.peek(4):
        raise SystemExit(3)
"""


def test_rule_that_raises_system_exit(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(extra_rules=EXITING)
    guard = rig.guard
    guard.start_server(8650, reply=100)
    guard.client([hexs(b"EXIT now")], port=8650, timeout=3)
    time.sleep(1.0)
    assert guard.daemon is not None and guard.daemon.poll() is None, guard.log_text()[-2000:]
    assert guard.client([hexs(b"x " + PATTERN)], port=8650)["error"] == "ConnectionResetError"


def test_reload_of_a_module_that_exits_at_import(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    guard = rig.guard
    guard.start_server(8660, reply=10)
    (guard.rules_dir / "zz_exit.py").write_text("raise SystemExit(0)\n")
    assert guard.daemon is not None
    guard.daemon.send_signal(signal.SIGHUP)
    time.sleep(1.5)
    assert guard.daemon.poll() is None, guard.log_text()[-1500:]
    assert guard.client([hexs(b"x " + PATTERN)], port=8660)["error"] == "ConnectionResetError"


LOOPING = """

@rule(on=tcp_connection.events.receive_data)
def spin(flow, stream, current, direction):
    if b"LOOP" in current.peek(4):
        while True:
            pass
"""


def test_rule_that_loops_forever(make_rig: Callable[..., Rig]) -> None:
    # engine.limits.rule_time_budget (default 0.5 s): the call is interrupted, the flow gets the rule_error
    # verdict (reset), the log names the rule, and the gateway goes on serving and inspecting.
    rig = make_rig(extra_rules=LOOPING)
    guard = rig.guard
    guard.start_server(8700, reply=100)
    looped = guard.client([hexs(b"LOOP")], port=8700, timeout=3)
    ok = guard.client([hexs(b"fine")], port=8700, timeout=3)
    caught = guard.client([hexs(b"x " + PATTERN)], port=8700, timeout=3)
    assert looped["error"] == "ConnectionResetError", looped
    assert ok["error"] is None and ok["received_len"] == 100, ok
    assert caught["error"] == "ConnectionResetError", caught
    log = guard.log_text()
    assert "rule test_rules.spin ran past its budget" in log, log[-2000:]
    assert guard.worker_status()["engine"]["rule_errors"] >= 1


STUCK_IN_C = """

import hashlib as _hashlib

@rule(on=tcp_connection.events.receive_data)
def grind(flow, stream, current, direction):
    if b"GRIND" in current.peek(5):
        _hashlib.pbkdf2_hmac("sha256", b"x", b"y", 40_000_000)  # ~15 s inside C, deaf to signals
"""


def test_rule_stuck_in_c_code_stops_the_watchdog_pings(make_rig: Callable[..., Rig], tmp_path: Any) -> None:
    # What the budget cannot interrupt (a signal handler runs only when the C call returns) the systemd
    # watchdog catches: the stuck packet loop stops pinging it, so WatchdogSec (systemd/tcpguard.service)
    # kills and restarts the daemon.
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    os.environ["NOTIFY_SOCKET"] = path
    os.environ["WATCHDOG_USEC"] = "1000000"
    try:
        rig = make_rig(extra_rules=STUCK_IN_C)
    finally:
        del os.environ["NOTIFY_SOCKET"], os.environ["WATCHDOG_USEC"]
    guard = rig.guard
    guard.start_server(8750, reply=100)

    def pings(seconds: float) -> int:
        n = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                n += sock.recv(4096).startswith(b"WATCHDOG=1")
        return n

    assert pings(1.5) >= 1
    guard.client([hexs(b"GRIND")], port=8750, timeout=1)
    time.sleep(0.5)
    assert pings(2.0) == 0
    sock.close()


# ====================================================================== SIGHUP storms
@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_storm(make_rig: Callable[..., Rig], workers: int) -> None:
    rig = make_rig({"queue": {"workers": workers}})
    guard = rig.guard
    port = 8800
    guard.start_server(port, reply=100_000)
    long = start_client(guard, port, [[s, 10_000] for s in range(30)], gap=0.1)
    assert guard.daemon is not None
    stop = threading.Event()
    sent = [0]

    def storm() -> None:
        while not stop.is_set():
            guard.daemon.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            sent[0] += 1
            time.sleep(0.002)

    t = threading.Thread(target=storm, daemon=True)
    t.start()
    shorts = [guard.client([hexs(b"during the storm %d" % i)], port=port, timeout=10) for i in range(5)]
    # A broken rule module in the middle of the storm: every reload fails and keeps the running rules.
    (guard.rules_dir / "zz_broken.py").write_text("this is not python\n")
    blocked = guard.client([hexs(b"x " + PATTERN)], port=port, timeout=10)
    (guard.rules_dir / "zz_broken.py").unlink()
    time.sleep(1.0)
    stop.set()
    t.join(5)
    assert sent[0] > 300
    assert all(r["error"] is None and r["received_len"] == 100_000 for r in shorts), shorts
    assert blocked["error"] == "ConnectionResetError"
    r = result(long)
    assert r["error"] is None and r["received_len"] == 100_000, r
    assert guard.daemon.poll() is None
    assert guard.client([hexs(b"x " + PATTERN)], port=port)["error"] == "ConnectionResetError"
    log = guard.log_text()
    assert "Traceback" not in log, log[-3000:]
    reloads = log.count("reloaded:")
    assert 1 <= reloads < sent[0] // 5  # coalesced: at most one reload per timer tick and worker
    assert guard.stop_daemon() == 0
    assert not guard.chain_installed()


# ====================================================================== queue overflow
SLOW = """

import time as _time

@rule(on=tcp_connection.events.receive_data)
def slow(flow, stream, current, direction):
    if flow.dstport == {port}:
        _time.sleep(0.01)
"""


def overflow(rig: Rig, port: int) -> tuple[Conn, bytes]:
    """A burst of 300 in-order 100-byte segments at a rule that takes 10 ms each, through a 64-packet
    queue; the pattern is in the middle of the burst."""
    c = Conn(rig.net, SERVER_V4, port)
    c.handshake()
    data = bytearray(b"." * 30_000)
    data[15_005 : 15_005 + len(PATTERN)] = PATTERN
    rig.net.blast([c.raw("PA", off, bytes(data[off : off + 100])) for off in range(0, len(data), 100)])
    return c, bytes(data)


@pytest.fixture
def slow_rig(make_rig: Callable[..., Rig], request: pytest.FixtureRequest) -> Rig:
    bypass = request.param
    return make_rig(
        {"queue": {"bypass": bypass, "maxlen": 64}, "engine": {"limits": {"max_held_packets": 32}}},
        extra_rules=SLOW.format(port=8900),
    )


@pytest.mark.parametrize("slow_rig", [False], indirect=True, ids=["fail-closed"])
def test_queue_overflow_fail_closed(slow_rig: Rig) -> None:
    rig, guard = slow_rig, slow_rig.guard
    guard.start_server(8900, reply=0)
    c, _ = overflow(rig, 8900)
    time.sleep(2.5)  # the daemon works through what it got
    o = outcome(guard, 8900, c.sport, c.reset_seen())
    check_invariant(o)  # overflowed packets were dropped, not passed: the server read only inspected bytes
    st = guard.worker_status()
    assert st["queue_drops"]["kernel_dropped"] > 0, st["queue_drops"]  # counted
    c.abort(len(o.server))


@pytest.mark.parametrize("slow_rig", [True], indirect=True, ids=["fail-open"])
def test_queue_overflow_fail_open_is_counted(slow_rig: Rig) -> None:
    # Fixed: the kernel counts only fail-closed drops, so the daemon compares its NFQUEUE rule's packet
    # counter with the packets that entered the queue (tcpguard.app.daemon.metrics.BypassMeter).
    rig, guard = slow_rig, slow_rig.guard
    guard.start_server(8900, reply=0)
    c, _ = overflow(rig, 8900)
    time.sleep(2.5)
    o = outcome(guard, 8900, c.sport, c.reset_seen())
    c.abort(len(o.server))
    # The policy is applied: overflowing packets passed uninspected. The server read bytes the rule never
    # saw (the client's view of the server's ACKs is no evidence: the gateway drops ACKs of bytes it never
    # forwarded, policies.verify_acks).
    assert len(o.server) > len(o.rule) and PATTERN in o.server and PATTERN not in o.rule, o
    st = guard.status()
    assert st is not None
    drops = st["totals"]["queue_drops"]
    # Counted: those bytes came in 100-byte segments that bypassed the daemon, each of them counted.
    least = -(-(len(o.server) - len(o.rule)) // 100)
    assert drops["bypassed"] is not None and drops["bypassed"] >= least, (drops, least)
    assert drops["kernel_dropped"] == 0, drops  # fail-open: the kernel itself counts nothing
    # And shown by `tcpguard status` (the total column).
    row = next(line for line in format_status(st).splitlines() if line.startswith("queue bypassed"))
    assert row.split()[2] == str(drops["bypassed"]), row
