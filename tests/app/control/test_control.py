"""The control socket: the worker's side in its timer tick, the dispatcher, the server's access control,
the CLI, and the real daemon in the namespace lab (status counters, connection list, reset by id, reload,
several workers)."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tcpguard import rule, tcp_connection
from tcpguard.app.control.access import AccessPolicy
from tcpguard.app.control.client import ControlClient, _parse_filters, format_connections, format_status
from tcpguard.app.control.dispatch import Dispatcher, totals
from tcpguard.app.control.protocol import ConnFilter, ControlError, parse_conn_id
from tcpguard.app.control.server import ControlServer, Inbox
from tcpguard.app.daemon.config import parse_config
from tcpguard.app.daemon.worker import Worker
from tcpguard.core import forge
from tcpguard.core.decision import Output, Verdict
from tcpguard.core.packet import RST, decode
from tcpguard.core.rules import RuleSet
from tests.app.daemon.test_daemon import DROP_PORT, OPEN_PORT, TCPGUARD, Gateway, hexs, wait_for
from tests.core.playbook import Playbook
from tests.netns import CLIENT_V4, SERVER_V4, Lab

# ================================================================================== worker, in process


@rule(on=tcp_connection.events.new_connection)
def _gate(flow: Any, tcp: Any) -> None:
    if flow.dstport == 9001:
        flow.drop()


@rule(on=tcp_connection.events.receive_data)
def _pattern(flow: Any, stream: Any, current: Any, direction: str) -> None:
    if direction == "up" and current.find(b"EVIL"):
        flow.reset()


def make_worker(tmp_path: Path, extra: str = "") -> Worker:
    (tmp_path / "rules").mkdir(exist_ok=True)
    cfg = parse_config("rules_dir: rules\n" + extra, str(tmp_path / "tcpguard.yaml"))
    return Worker(cfg, tmp_path / "tcpguard.yaml", RuleSet.of(_gate, _pattern), queue_num=3)


class WorkerBook(Playbook):
    """A playbook whose packets go through `Worker.handle_packet` (counters, dumps), one token each."""

    def __init__(self, worker: Worker, **kw: Any) -> None:
        super().__init__(engine=worker.engine, **kw)
        self.worker = worker

    def feed(self, raw: bytes, token: object = None, dt: float = 0.001) -> Any:
        self.now += dt
        dec = self.worker.handle_packet(raw, self.now, token if token is not None else object())
        self.sent.extend(dec.send)
        return dec

    def handshake(self) -> None:
        self.client("S")
        self.server("SA")
        self.client("A")


def ask(worker: Worker, request: dict[str, Any], now: float = 1.0) -> tuple[dict[str, Any], Output]:
    """Submit from another thread as the control server does; answer in the timer tick."""
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.setdefault("r", worker.inbox.submit(request, 5)))
    t.start()
    deadline = time.monotonic() + 5
    out = Output()
    while t.is_alive() and time.monotonic() < deadline:
        tick = worker.handle_timer(now)
        out.releases += tick.releases
        out.send += tick.send
        time.sleep(0.01)
    t.join(5)
    return box["r"], out


def test_worker_counts_packets_and_bytes_by_final_verdict(tmp_path: Path) -> None:
    w = make_worker(tmp_path)
    pb = WorkerBook(w)
    pb.handshake()
    pb.client("PA", b"hello")
    blocked = WorkerBook(w, cport=40001, sport=9001)
    blocked.client("S")  # dropped by the rule
    resp, _ = ask(w, {"cmd": "status"})
    assert resp["ok"]
    st = resp["result"]
    syn = len(forge.build_tcp(4, b"\0" * 4, b"\0" * 4, 1, 2, 0, 0, 2, options=b"\0" * 12))
    assert st["queue"] == 3 and st["pid"] == os.getpid()
    assert st["packets"] == {"received": 5, "accepted": 4, "dropped": 1, "held": 0}
    assert st["bytes"]["dropped"] == syn
    assert st["bytes"]["received"] == st["bytes"]["accepted"] + st["bytes"]["dropped"]
    assert st["connections"]["opened"] == 2
    assert st["connections"]["by_state"] == {"CLOSED": 1, "ESTABLISHED": 1}
    assert st["resets_sent"] == 0 and st["rule_errors"] == 0
    assert st["memory"]["rss"] > 0
    assert st["engine"]["packets"] == 5


def test_worker_counts_held_packets_when_they_are_released(tmp_path: Path) -> None:
    w = make_worker(tmp_path)
    pb = WorkerBook(w)
    pb.handshake()
    first = pb.cnext
    pb.cnext += 4
    dec = pb.client("PA", b"late")  # out of order: held
    assert dec.verdict == Verdict.HOLD
    st = ask(w, {"cmd": "status"})[0]["result"]
    assert st["packets"]["held"] == 1 and st["packets"]["accepted"] == 3
    dec = pb.client("PA", b"gap!", seq=first)  # fills the gap: the held packet is released with it
    assert [r.verdict for r in dec.releases] == [Verdict.ACCEPT]
    st = ask(w, {"cmd": "status"})[0]["result"]
    assert st["packets"] == {"received": 5, "accepted": 5, "dropped": 0, "held": 0}


def test_reset_by_id_forges_rsts_in_the_timer_output(tmp_path: Path) -> None:
    w = make_worker(tmp_path)
    pb = WorkerBook(w)
    pb.handshake()
    pb.client("PA", b"abc")
    rows = ask(w, {"cmd": "connections"})[0]["result"]["connections"]
    assert len(rows) == 1
    row = rows[0]
    assert row["id"] == f"3:{row['flow']}" and row["state"] == "ESTABLISHED"
    assert (row["client"], row["cport"], row["server"], row["sport"]) == ("10.0.0.1", 40000, "10.0.0.2", 80)
    assert row["packets"] == [3, 1] and row["bytes"] == [3, 0] and row["ended"] is None
    resp, out = ask(w, {"cmd": "reset", "flow": row["flow"]})
    assert resp == {"ok": True, "result": {"id": row["id"], "action": "reset", "forged": 2}}
    assert len(out.send) == 2
    rsts = [decode(p) for p in out.send]
    assert all(p.flags & RST for p in rsts)
    # Each end gets the sequence number it expects next.
    to_server = next(p for p in rsts if p.dport == 80)
    to_client = next(p for p in rsts if p.dport == 40000)
    assert to_server.seq == pb.cnext and to_client.seq == pb.snext
    st = ask(w, {"cmd": "status"})[0]["result"]
    assert st["resets_sent"] == 2
    # Later packets of the connection are dropped; acting on it again is refused.
    assert pb.client("PA", b"more").verdict == Verdict.DROP
    again = ask(w, {"cmd": "reset", "flow": row["flow"]})[0]
    assert not again["ok"] and "already ended (reset)" in again["error"]
    assert ask(w, {"cmd": "drop", "flow": 999})[0] == {"ok": False, "error": "no connection 3:999"}
    assert not ask(w, {"cmd": "drop", "flow": "1"})[0]["ok"]


def test_drop_by_id_forges_nothing_and_drops_later_packets(tmp_path: Path) -> None:
    w = make_worker(tmp_path)
    pb = WorkerBook(w)
    pb.handshake()
    flow = ask(w, {"cmd": "connections"})[0]["result"]["connections"][0]["flow"]
    resp, out = ask(w, {"cmd": "drop", "flow": flow})
    assert resp["ok"] and resp["result"]["forged"] == 0 and out.send == []
    assert pb.client("PA", b"x").verdict == Verdict.DROP


def test_connection_filters(tmp_path: Path) -> None:
    w = make_worker(tmp_path)
    for cport, sport in ((40000, 80), (40001, 443), (40002, 80)):
        WorkerBook(w, cport=cport, sport=sport).handshake()
    WorkerBook(w, client="10.9.0.1", cport=50000, sport=22).client("S")

    def ids(flt: dict[str, str]) -> list[int]:
        resp = ask(w, {"cmd": "connections", "filter": flt})[0]
        assert resp["ok"], resp
        return sorted(r["cport"] for r in resp["result"]["connections"])

    assert ids({}) == [40000, 40001, 40002, 50000]
    assert ids({"port": "80"}) == [40000, 40002]
    assert ids({"sport": "443,22"}) == [40001, 50000]
    assert ids({"cport": "40001"}) == [40001]
    assert ids({"state": "syn_sent"}) == [50000]
    assert ids({"state": "ESTABLISHED", "port": "443"}) == [40001]
    assert ids({"client": "10.9.0.0/16"}) == [50000]
    assert ids({"ip": "10.0.0.1"}) == [40000, 40001, 40002]
    assert ids({"ip": "10.0.0.2"}) == [40000, 40001, 40002, 50000]
    assert ids({"server": "10.0.0.0/24", "port": "22"}) == [50000]
    assert ids({"queue": "3"}) == [40000, 40001, 40002, 50000]
    assert ids({"queue": "0"}) == []
    resp = ask(w, {"cmd": "connections", "limit": 2})[0]["result"]
    assert len(resp["connections"]) == 2 and resp["truncated"]
    for bad, msg in (
        ({"colour": "red"}, "unknown filter key"),
        ({"port": "http"}, "expected numbers"),
        ({"ip": "10.0.0.300"}, "filter ip"),
    ):
        resp = ask(w, {"cmd": "connections", "filter": bad})[0]
        assert not resp["ok"] and msg in resp["error"]


def test_reload_through_the_worker_reports_failure_and_keeps_rules(tmp_path: Path) -> None:
    w = make_worker(tmp_path)
    (tmp_path / "tcpguard.yaml").write_text("rules_dir: rules\n")
    (tmp_path / "rules" / "r.py").write_text(
        "from tcpguard import rule, tcp_connection\n"
        "@rule(on=tcp_connection.events.new_connection)\ndef x(flow, tcp):\n    pass\n"
    )
    resp = ask(w, {"cmd": "reload"})[0]
    assert resp == {"ok": True, "result": {"rules": 1}}
    (tmp_path / "rules" / "broken.py").write_text("this is not python\n")
    resp = ask(w, {"cmd": "reload"})[0]
    assert not resp["ok"] and "broken.py:1" in resp["error"]
    assert len(w.engine.rules) == 1 and w.reloads == 1 and w.reload_failures == 1


def test_dumps_see_dropped_packets_and_resets(tmp_path: Path) -> None:
    from tcpguard.io.pcap import iter_frames

    w = make_worker(tmp_path, "dumps:\n  directory: dumps\n  dropped: true\n  resets: true\n  input: true\n")
    pb = WorkerBook(w)
    pb.handshake()
    trigger = pb._seg(True, "PA", b"EVIL", None, None, 65535, b"", 0)
    dec = pb.feed(trigger)
    assert dec.verdict == Verdict.DROP and len(dec.send) == 2
    pb2 = WorkerBook(w, cport=40005)
    pb2.handshake()
    flow = ask(w, {"cmd": "connections", "filter": {"cport": "40005"}})[0]["result"]["connections"][0]["flow"]
    _, out = ask(w, {"cmd": "reset", "flow": flow})
    assert len(out.send) == 2
    w.shutdown(2.0)
    frames = {
        k: [f.data for f in iter_frames(tmp_path / "dumps" / f"{k}-q3-000001.pcap")]
        for k in ("dropped", "resets", "input")
    }
    assert frames["dropped"] == [trigger]
    assert frames["resets"] == [trigger, *dec.send, *out.send]
    assert len(frames["input"]) == 7 and frames["input"][3] == trigger


def test_inbox_withdraws_requests_that_time_out_and_answers_pending_ones_at_close() -> None:
    box = Inbox()
    resp = box.submit({"cmd": "status"}, timeout=0.05)
    assert not resp["ok"] and "did not answer" in resp["error"]
    assert box.serve(lambda r: {"ok": True, "result": 1}) == 0  # the withdrawn request never runs
    got: list[dict[str, Any]] = []
    t = threading.Thread(target=lambda: got.append(box.submit({"cmd": "status"}, timeout=5)))
    t.start()
    wait_for(lambda: bool(box._pending), "pending request")
    box.close("stopping")
    t.join(2)
    assert got == [{"ok": False, "error": "stopping"}]
    assert box.submit({"cmd": "x"}) == {"ok": False, "error": "stopping"}


def test_inbox_reports_a_failing_request_as_an_internal_error() -> None:
    box = Inbox()
    got: list[dict[str, Any]] = []
    t = threading.Thread(target=lambda: got.append(box.submit({"cmd": "status"}, timeout=5)))
    t.start()
    wait_for(lambda: bool(box._pending), "pending request")

    def boom(req: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("bug")

    box.serve(boom)
    t.join(2)
    assert got == [{"ok": False, "error": "internal error: RuntimeError: bug"}]


# ================================================================================== dispatcher, ids


def test_connection_ids() -> None:
    assert parse_conn_id("0:17", [0, 1]) == (0, 17)
    assert parse_conn_id(" 1:2 ", [0, 1]) == (1, 2)
    assert parse_conn_id("17", [4]) == (4, 17)
    for bad, msg in (
        ("17", "ambiguous"),
        ("2:1", "no worker serves queue 2"),
        ("a:1", "bad connection id"),
        ("0:", "bad connection id"),
        ("", "bad connection id"),
        (None, "bad connection id"),
    ):
        with pytest.raises(ValueError, match=msg):
            parse_conn_id(bad, [0, 1])


class FakeLinks:
    def __init__(self, answers: dict[int, Callable[[dict[str, Any]], dict[str, Any]]]) -> None:
        self.answers = answers
        self.calls: list[tuple[list[int], dict[str, Any]]] = []

    def queues(self) -> list[int]:
        return sorted(self.answers)

    def call(self, queues: list[int], request: dict[str, Any], timeout: float) -> dict[int, dict[str, Any]]:
        self.calls.append((queues, request))
        return {q: self.answers[q](request) for q in queues}


def _worker_doc(q: int, received: int) -> dict[str, Any]:
    return {
        "queue": q,
        "uptime": 1.0,
        "packets": {"received": received, "accepted": received, "dropped": 0, "held": 0},
        "bytes": {"received": 10 * received},
        "resets_sent": q,
        "rule_errors": 0,
        "connections": {"tracked": 1, "opened": 2, "by_state": {"ESTABLISHED": 1}},
    }


def test_drop_reasons_are_summed_over_workers_and_shown_under_the_drops() -> None:
    a, b, restarting = _worker_doc(0, 5), _worker_doc(1, 7), {"queue": 2, "error": "restarting"}
    a["drops"] = {"malformed": 1, "segment without ACK": 2}
    b["drops"] = {"segment without ACK": 3}
    total = totals([a, b, restarting])
    assert total["drops"] == {"malformed": 1, "segment without ACK": 5}
    text = format_status({"mode": "workers", "workers": [a, b, restarting], "totals": total})
    rows = {line.strip().split("  ")[0]: line.split() for line in text.splitlines()[1:]}
    assert rows["segment without ACK"][-3:] == ["5", "2", "3"]
    assert rows["malformed"][-3:] == ["1", "1", "0"]  # a worker without that reason shows 0
    lines = text.splitlines()
    dropped = next(i for i, line in enumerate(lines) if line.strip().startswith("dropped"))
    assert lines[dropped + 1].startswith("    malformed")  # right under the packet drops


def test_dispatcher_merges_workers_and_routes_actions_by_queue() -> None:
    def worker(q: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def answer(req: dict[str, Any]) -> dict[str, Any]:
            if req["cmd"] == "status":
                return {"ok": True, "result": _worker_doc(q, 5 + q)}
            if req["cmd"] == "connections":
                return {
                    "ok": True,
                    "result": {"connections": [{"queue": q, "flow": f, "id": f"{q}:{f}"} for f in (2, 1)]},
                }
            return {"ok": True, "result": {"id": f"{q}:{req['flow']}", "forged": 2}}

        return answer

    links = FakeLinks({0: worker(0), 1: worker(1), 2: lambda req: {"ok": False, "error": "restarting"}})
    d = Dispatcher(links, "workers")
    st = d.handle({"cmd": "status"})["result"]
    assert st["mode"] == "workers" and st["pid"] == os.getpid()
    assert st["workers"][2] == {"queue": 2, "error": "restarting"}
    assert st["totals"]["packets"]["received"] == 11
    assert st["totals"]["bytes"]["received"] == 110
    assert st["totals"]["resets_sent"] == 1
    assert st["totals"]["connections"] == {
        "tracked": 2,
        "opened": 4,
        "midstream": 0,
        "by_state": {"ESTABLISHED": 2},
    }
    conns = d.handle({"cmd": "connections", "limit": 3})["result"]
    assert [c["id"] for c in conns["connections"]] == ["0:1", "0:2", "1:1"] and conns["truncated"]
    assert conns["errors"] == [{"queue": 2, "error": "restarting"}]
    only = d.handle({"cmd": "connections", "filter": {"queue": "1"}})["result"]
    assert {c["queue"] for c in only["connections"]} == {1}
    assert links.calls[-1][0] == [1]
    assert d.handle({"cmd": "reset", "id": "1:7"})["result"]["id"] == "1:7"
    assert links.calls[-1] == ([1], {"cmd": "reset", "flow": 7})
    assert "ambiguous" in d.handle({"cmd": "drop", "id": "7"})["error"]
    assert "unknown command" in d.handle({"cmd": "frobnicate"})["error"]
    assert d.handle({"cmd": "ping"}) == {"ok": True, "result": "pong"}
    assert "limit" in d.handle({"cmd": "connections", "limit": -1})["error"]


def test_dispatcher_reload_checks_first_and_reports_each_worker() -> None:
    events: list[str] = []
    links = FakeLinks(
        {0: lambda r: {"ok": True, "result": {"rules": 2}}, 1: lambda r: {"ok": False, "error": "bad rules"}}
    )
    d = Dispatcher(
        links,
        "workers",
        reload_check=lambda: "x.py:1: syntax error",
        reload_hooks=(lambda: events.append("begin"), lambda: events.append("end")),
    )
    resp = d.handle({"cmd": "reload"})
    assert not resp["ok"] and "x.py:1" in resp["error"] and events == []
    # Refused: no worker loads anything; each is only told to count the failed reload.
    assert links.calls == [([0, 1], {"cmd": "reload", "refused": "x.py:1: syntax error"})]
    links.calls.clear()
    d.reload_check = lambda: None
    resp = d.handle({"cmd": "reload"})
    assert not resp["ok"] and resp["error"] == "queue 1: bad rules"
    assert events == ["begin", "end"]


# ================================================================================== the server


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (Unix socket paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="tgc-"))
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def echo_handler(req: dict[str, Any]) -> dict[str, Any]:
    if req["cmd"] == "boom":
        raise RuntimeError("handler bug")
    return {"ok": True, "result": req}


def raw_exchange(path: Path, payload: bytes) -> list[dict[str, Any]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return [json.loads(line) for line in data.splitlines()]


def test_server_creates_a_private_directory_and_socket_and_answers(short_dir: Path) -> None:
    path = short_dir / "run" / "control.sock"
    srv = ControlServer(path, echo_handler)
    srv.start()
    try:
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_ISSOCK(os.stat(path).st_mode)
        assert ControlClient(path).call({"cmd": "hello", "x": 1}) == {
            "ok": True,
            "result": {"cmd": "hello", "x": 1},
        }
        answers = raw_exchange(path, b'{"cmd": "a"}\n\n{"cmd": "boom"}\nnot json\n[1]\n{"cmd": 5}\n')
        assert answers[0] == {"ok": True, "result": {"cmd": "a"}}
        assert answers[1] == {"ok": False, "error": "internal error: RuntimeError: handler bug"}
        assert "one JSON object per line" in answers[2]["error"]
        assert '"cmd" string' in answers[3]["error"] and '"cmd" string' in answers[4]["error"]
        assert "longer than" in raw_exchange(path, b"x" * 70000)[0]["error"]
        # A second daemon on the same path is refused while the first answers.
        with pytest.raises(ControlError, match="already running"):
            ControlServer(path, echo_handler).start()
    finally:
        srv.close()
    assert not path.exists()


def test_server_removes_a_stale_socket_and_refuses_other_files(short_dir: Path) -> None:
    path = short_dir / "c.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a killed daemon leaves
    srv = ControlServer(path, echo_handler)
    srv.start()
    assert ControlClient(path).call({"cmd": "x"})["ok"]
    srv.close()
    path.write_text("not a socket")
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(path, echo_handler).start()
    with pytest.raises(ControlError, match="no group named"):
        ControlServer(short_dir / "d.sock", echo_handler, group="no-such-group-tcpguard").start()


def test_server_leaves_a_shared_directory_alone(short_dir: Path) -> None:
    os.chmod(short_dir, 0o755)
    srv = ControlServer(short_dir / "c.sock", echo_handler)
    srv.start()
    srv.close()
    assert stat.S_IMODE(os.stat(short_dir).st_mode) == 0o755


def test_server_sets_up_the_runtime_directory_systemd_made_for_it(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.chmod(short_dir, 0o755)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(short_dir))
    srv = ControlServer(short_dir / "c.sock", echo_handler)
    srv.start()
    srv.close()
    assert stat.S_IMODE(os.stat(short_dir).st_mode) == 0o700


def test_access_policy() -> None:
    p = AccessPolicy(gid=None, owner=1000)
    assert p.allows(1, 0, 0) and p.allows(1, 1000, 1000)
    assert not p.allows(1, 1001, 1001)
    g = AccessPolicy(gid=4242, owner=1000)
    assert g.allows(1, 1001, 4242)
    assert not g.allows(os.getpid(), 1001, 1001)  # our own supplementary groups do not hold 4242


def test_client_errors_name_the_problem(short_dir: Path) -> None:
    with pytest.raises(ControlError, match="no control socket"):
        ControlClient(short_dir / "none.sock").call({"cmd": "status"})
    path = short_dir / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    with pytest.raises(ControlError, match="not running"):
        ControlClient(path).call({"cmd": "status"})


def test_cli_filter_parsing_and_formatting() -> None:
    assert _parse_filters(["state=ESTABLISHED", "port=80,443"]) == {"state": "ESTABLISHED", "port": "80,443"}
    with pytest.raises(ControlError, match="KEY=VALUE"):
        _parse_filters(["port"])
    with pytest.raises(ControlError, match="twice"):
        _parse_filters(["port=1", "port=2"])
    assert ConnFilter.parse({}) == ConnFilter()
    st = {
        "mode": "workers",
        "pid": 1,
        "uptime": 3725,
        "rss": 1 << 20,
        "workers": [_worker_doc(0, 5), {"queue": 1, "error": "restarting"}],
        "totals": _worker_doc(0, 5),
    }
    text = format_status(st)
    assert "up 1:02:05" in text and "queue 1: restarting" in text and "ESTABLISHED" in text
    assert "packets received" in text
    rows = {
        "connections": [
            {
                "id": "0:1",
                "client": "fd00::1",
                "cport": 1,
                "server": "10.0.0.1",
                "sport": 80,
                "state": "CLOSED",
                "ended": "reset",
                "packets": [1, 2],
                "bytes": [3, 4],
                "age": 1.5,
                "idle": 0.25,
            }
        ],
        "truncated": True,
        "errors": [],
    }
    text = format_connections(rows)
    assert "[fd00::1]:1" in text and "CLOSED (reset)" in text and "raise --limit" in text


@pytest.mark.root
def test_peer_credentials_refuse_other_users_even_on_a_loosened_socket(short_dir: Path) -> None:
    group = grp.getgrnam("daemon")
    path = short_dir / "c.sock"
    srv = ControlServer(path, echo_handler, group="daemon")
    srv.start()
    try:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group.gr_gid
        os.chmod(short_dir, 0o755)
        os.chmod(path, 0o666)  # an operator loosened it by hand: SO_PEERCRED still decides

        def as_user(gid: int, groups: list[int]) -> dict[str, Any]:
            """Connect from a forked child that dropped to uid nobody (the venv's python may not be
            executable for nobody, so no exec)."""
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    os.setgroups(groups)
                    os.setgid(gid)
                    os.setuid(65534)
                    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    c.settimeout(5)
                    c.connect(str(path))
                    with contextlib.suppress(BrokenPipeError):  # a refused client may be cut off first
                        c.sendall(b'{"cmd":"ping"}\n')
                    os.write(w, c.recv(999))
                except BaseException as exc:
                    os.write(w, json.dumps({"child": repr(exc)}).encode())
                finally:
                    os._exit(0)
            os.close(w)
            with os.fdopen(r, "rb") as f:
                data = f.read()
            os.waitpid(pid, 0)
            result: dict[str, Any] = json.loads(data)
            return result

        assert as_user(65534, []) == {"ok": False, "error": "permission denied"}
        assert as_user(group.gr_gid, [])["ok"]  # primary group
        assert as_user(65534, [group.gr_gid])["ok"]  # supplementary group (from /proc)
        assert srv.refused == 1
    finally:
        srv.close()


# ================================================================================== the real daemon

RAW_SENDER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for h in sys.argv[2:]:
    s.sendto(bytes.fromhex(h), (sys.argv[1], 0))
"""

HOLD_OPEN = r"""
import json, socket, sys
source = (sys.argv[4], 0) if len(sys.argv) > 4 else None
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5, source_address=source)
s.settimeout(30)
s.sendall(sys.argv[3].encode())
print(s.getsockname()[1], flush=True)
res = {"error": None, "received": 0}
try:
    while True:
        b = s.recv(65536)
        if not b: break
        res["received"] += len(b)
except Exception as e:
    res["error"] = type(e).__name__
print(json.dumps(res), flush=True)
"""


def crafted_syns(n: int, dport: int = DROP_PORT, first_port: int = 50001) -> list[bytes]:
    """SYNs from the client to the server with distinct source ports and a nonzero IP id (the kernel
    keeps a given id), so the packets the gateway sees are these bytes with TTL - 1."""
    out = []
    for i in range(n):
        p = bytearray(
            forge.build_tcp(
                4,
                socket.inet_aton(CLIENT_V4),
                socket.inet_aton(SERVER_V4),
                first_port + i,
                dport,
                1000 + i,
                0,
                0x02,
                64240,
            )
        )
        p[4:6] = (0x1000 + i).to_bytes(2, "big")
        out.append(bytes(p))
    return out


def normalised(packet: bytes) -> bytes:
    """An IPv4 packet with TTL and header checksum zeroed (what forwarding changes)."""
    p = bytearray(packet)
    p[8] = 0
    p[10:12] = b"\0\0"
    return bytes(p)


class ObservedGateway(Gateway):
    """The daemon test gateway with a private control socket and optional extra config."""

    def __init__(self, lab: Lab, tmp: Path, workers: int = 1, extra: str = "") -> None:
        super().__init__(lab, tmp)
        # A short path: Unix socket paths are limited to 107 bytes and pytest's tmp paths are long.
        self.sockdir = Path(tempfile.mkdtemp(prefix="tgc-"))
        self.socket = self.sockdir / "run" / "control.sock"
        cfg = yaml.safe_load(self.config.read_text())
        cfg["queue"]["workers"] = workers
        cfg["control"] = {"socket": str(self.socket)}
        cfg.update(yaml.safe_load(extra) or {})
        self.config.write_text(yaml.safe_dump(cfg))

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        return ControlClient(self.socket, timeout=20).call(request)

    def status(self) -> dict[str, Any]:
        resp = self.call({"cmd": "status"})
        assert resp["ok"], resp
        result: dict[str, Any] = resp["result"]
        return result

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [TCPGUARD, *args, "--socket", str(self.socket)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check:
            assert r.returncode == 0, r.stderr
        return r

    def send_raw(self, packets: list[bytes]) -> None:
        self.lab.run("client", [sys.executable, "-c", RAW_SENDER, SERVER_V4, *(p.hex() for p in packets)])

    def wait_received(self, n: int, timeout: float = 10) -> dict[str, Any]:
        box: list[dict[str, Any]] = []

        def done() -> bool:
            box.append(self.status())
            return int(box[-1]["totals"]["packets"]["received"]) >= n

        wait_for(done, f"{n} packets received", timeout)
        return box[-1]

    def hold_open(
        self, text: str = "hello", port: int = OPEN_PORT, source: str | None = None
    ) -> tuple[subprocess.Popen[str], int]:
        """A client connection that sends `text` and then waits; returns the process and its port."""
        proc = self.lab.popen(
            "client",
            [sys.executable, "-c", HOLD_OPEN, SERVER_V4, str(port), text, *([source] if source else [])],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        return proc, int(proc.stdout.readline())

    def cleanup(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.stop_daemon()
        subprocess.run(["rm", "-rf", str(self.sockdir)], check=False)


@pytest.fixture
def ogw(lab: Lab, tmp_path: Path) -> Iterator[ObservedGateway]:
    g = ObservedGateway(lab, tmp_path)
    (g.rules_dir / "boom.py").write_text(
        "from tcpguard import rule, tcp_connection\n"
        "@rule(on=tcp_connection.events.new_connection)\n"
        "def boom(flow, tcp):\n"
        "    if flow.dstport == 8002:\n"
        "        raise RuntimeError('boom')\n"
    )
    g.start_server(OPEN_PORT, reply=1000)
    g.start_server(DROP_PORT)
    g.start_server(8002)
    g.start_daemon()
    yield g
    g.cleanup()


@pytest.mark.root
def test_status_counters_match_the_traffic_sent(ogw: ObservedGateway) -> None:
    st = ogw.status()
    assert st["mode"] == "single" and [w["queue"] for w in st["workers"]] == [0]
    assert st["totals"]["packets"]["received"] == 0
    # Exact: five crafted SYNs to the port the rules drop.
    syns = crafted_syns(5)
    ogw.send_raw(syns)
    w = ogw.wait_received(5)["workers"][0]
    assert w["packets"] == {"received": 5, "accepted": 0, "dropped": 5, "held": 0}
    assert sum(w["drops"].values()) == 5 and all("by rule" in reason for reason in w["drops"])
    size = sum(len(p) for p in syns)
    assert w["bytes"] == {"received": size, "accepted": 0, "dropped": size}
    assert w["connections"]["opened"] == 5 and w["connections"]["by_state"] == {"CLOSED": 5}
    assert ogw.server_conns(DROP_PORT) == []
    # Real connections: three clean ones, one reset by a rule, one whose rule raises (policy: reset).
    for i in range(3):
        assert ogw.client([hexs(f"request {i}".encode())])["error"] is None
    assert ogw.client([hexs(b"cmd=/bin/sh")], shutdown=False)["error"] == "ConnectionResetError"
    # A rule error at the SYN: the client in SYN-SENT gets one RST+ACK (connection refused).
    assert ogw.client([hexs(b"x")], port=8002, timeout=3)["error"] == "ConnectionRefusedError"
    time.sleep(0.6)
    st = ogw.status()
    w = st["workers"][0]
    assert w["connections"]["opened"] == 10
    assert w["resets_sent"] == 3 and w["rule_errors"] == 1
    assert w["engine"]["resets_sent"] == 3 and w["adapter"]["sent"] == 3
    p = w["packets"]
    assert p["held"] == 0 and p["received"] == p["accepted"] + p["dropped"]
    assert w["bytes"]["received"] == w["bytes"]["accepted"] + w["bytes"]["dropped"]
    assert p["received"] == w["engine"]["packets"] == w["adapter"]["packets"]
    # The reset connections' trigger packets were dropped (at least one each), the SYNs too.
    assert p["dropped"] >= 5 + 2
    assert sum(w["drops"].values()) == p["dropped"]  # the reasons account for every drop
    assert sum(w["connections"]["by_state"].values()) == w["connections"]["tracked"] == 10
    assert isinstance(w["queue_drops"]["kernel_dropped"], int)  # read from /proc/net/netfilter
    assert w["queue_drops"]["kernel_dropped"] == 0 and w["queue_drops"]["enobufs"] == 0
    assert w["memory"]["rss"] > 1 << 20 and st["rss"] > 1 << 20
    assert st["totals"]["packets"] == p
    text = ogw.cli("status").stdout
    assert "packets received" in text and f"{p['received']}" in text and "resets sent" in text
    as_json = json.loads(ogw.cli("status", "--json").stdout)
    assert as_json["workers"][0]["connections"]["opened"] == 10


@pytest.mark.root
def test_connections_lists_a_live_connection_and_reset_kills_it_on_both_ends(ogw: ObservedGateway) -> None:
    proc, cport = ogw.hold_open("hello")
    ogw.hold_open("other")  # a second live connection the filter must leave out

    def listed() -> list[dict[str, Any]]:
        out = ogw.cli("connections", "--json", "--filter", f"cport={cport}", "--filter", "state=established")
        rows: list[dict[str, Any]] = json.loads(out.stdout)["connections"]
        return rows

    wait_for(lambda: len(listed()) == 1 and listed()[0]["bytes"][0] == 5, "the connection listed")
    (row,) = listed()
    assert (row["client"], row["cport"], row["server"], row["sport"]) == (
        CLIENT_V4,
        cport,
        SERVER_V4,
        OPEN_PORT,
    )
    assert row["bytes"] == [5, 0] and row["packets"][0] >= 3 and row["age"] >= 0
    table = ogw.cli("connections").stdout
    assert row["id"] in table and f"{CLIENT_V4}:{cport}" in table and "ESTABLISHED" in table
    out = ogw.cli("reset", row["id"]).stdout
    assert f"{row['id']}: reset (2 RST packets sent)" in out
    # Both applications see the reset.
    result = json.loads(proc.communicate(timeout=20)[0])
    assert result == {"error": "ConnectionResetError", "received": 0}
    wait_for(lambda: any(st == "reset" for _, st in ogw.server_conns()), "server sees the reset")
    data, st = next(c for c in ogw.server_conns() if c[1] is not None)
    assert (data, st) == (b"hello", "reset")
    # The entry stays a while as ended; acting again is refused, as is an unknown id.
    ended = ogw.cli("connections", "--json", "--filter", f"cport={cport}").stdout
    assert json.loads(ended)["connections"][0]["ended"] == "reset"
    again = ogw.cli("reset", row["id"], check=False)
    assert again.returncode == 1 and "already ended" in again.stderr
    missing = ogw.cli("drop", "0:99999", check=False)
    assert missing.returncode == 1 and "no connection 0:99999" in missing.stderr
    assert ogw.status()["workers"][0]["resets_sent"] == 2
    # The other connection is untouched.
    assert (
        len(ogw.call({"cmd": "connections", "filter": {"state": "ESTABLISHED"}})["result"]["connections"])
        == 1
    )


@pytest.mark.root
def test_drop_by_id_silences_the_connection(ogw: ObservedGateway) -> None:
    proc, cport = ogw.hold_open("hello")
    wait_for(
        lambda: bool(
            ogw.call({"cmd": "connections", "filter": {"cport": str(cport)}})["result"]["connections"]
        ),
        "listed",
    )
    row = ogw.call({"cmd": "connections", "filter": {"cport": str(cport)}})["result"]["connections"][0]
    assert ogw.call({"cmd": "drop", "id": row["id"]}) == {
        "ok": True,
        "result": {"id": row["id"], "action": "drop", "forged": 0},
    }
    proc.terminate()  # its FIN is dropped now: the server never hears of the end
    time.sleep(1.0)
    assert ogw.server_conns()[0] == (b"hello", None)


@pytest.mark.root
def test_reload_through_the_socket(ogw: ObservedGateway) -> None:
    assert ogw.client([hexs(b"FORBIDDEN")])["error"] is None
    ogw.write_rules("FORBIDDEN")
    assert "queue 0: reloaded, 5 rules" in ogw.cli("reload").stdout
    assert ogw.client([hexs(b"FORBIDDEN")], shutdown=False)["error"] == "ConnectionResetError"
    (ogw.rules_dir / "broken.py").write_text("this is not python\n")
    r = ogw.cli("reload", check=False)
    assert r.returncode == 1 and "broken.py:1" in r.stderr
    w = ogw.status()["workers"][0]
    assert (w["reloads"], w["reload_failures"]) == (1, 1)


@pytest.mark.root
def test_two_workers_one_socket_ids_by_queue(lab: Lab, tmp_path: Path) -> None:
    g = ObservedGateway(lab, tmp_path, workers=2)
    try:
        g.start_server(OPEN_PORT, reply=10)
        g.start_daemon()
        st = g.status()
        assert st["mode"] == "workers" and [w["queue"] for w in st["workers"]] == [0, 1]
        assert len({w["pid"] for w in st["workers"]} | {st["pid"]}) == 3
        # The kernel spreads connections over the queues by a hash of the addresses only (not the
        # ports), seeded at boot: open connections from further client addresses until both workers
        # hold one. Each worker numbers its flows from 1, so "0:1" and "1:1" both exist.
        procs: dict[str, tuple[subprocess.Popen[str], int]] = {}

        def rows() -> list[dict[str, Any]]:
            resp = g.call({"cmd": "connections", "filter": {"state": "ESTABLISHED"}})
            assert resp["ok"], resp
            r: list[dict[str, Any]] = resp["result"]["connections"]
            return r

        for i in range(20):
            src = f"10.77.1.{100 + i}"
            g.lab.run("client", ["ip", "addr", "add", f"{src}/24", "dev", "eth0"])
            procs[src] = g.hold_open(f"conn{i}", source=src)
            wait_for(lambda: len(rows()) == len(procs), "connection listed")
            if len({r["queue"] for r in rows()}) == 2:
                break
        listed = rows()
        assert {r["queue"] for r in listed} == {0, 1}
        assert {r["client"] for r in listed} == set(procs)
        assert all(r["id"] == f"{r['queue']}:{r['flow']}" for r in listed)
        assert {"0:1", "1:1"} <= {r["id"] for r in listed}
        st = g.status()
        assert st["totals"]["connections"]["by_state"]["ESTABLISHED"] == len(procs)
        assert [w["connections"]["tracked"] for w in st["workers"]] == [
            sum(r["queue"] == q for r in listed) for q in (0, 1)
        ]
        # Reset "1:1" by its queue-qualified id: exactly that client sees it, "0:1" lives on.
        victim = next(r for r in listed if r["id"] == "1:1")
        out = g.cli("reset", "1:1").stdout
        assert "1:1: reset (2 RST packets sent)" in out
        proc = procs[victim["client"]][0]
        assert json.loads(proc.communicate(timeout=20)[0])["error"] == "ConnectionResetError"
        assert {r["id"] for r in rows()} == {r["id"] for r in listed} - {"1:1"}
        bare = g.cli("reset", str(victim["flow"]), check=False)
        assert bare.returncode == 1 and "ambiguous" in bare.stderr
        assert "queue 0: reloaded" in g.cli("reload").stdout
        # A worker that dies is restarted and answers again with fresh counters.
        pid = st["workers"][1]["pid"]
        os.kill(pid, 9)
        wait_for(
            lambda: g.status()["workers"][1].get("pid") not in (None, pid), "worker restarted", timeout=15
        )
        assert g.stop_daemon() == 0
        assert not g.socket.exists()
    finally:
        g.cleanup()


# ================================================================================== versions and filters


def test_a_misspelt_state_filter_is_an_error_listing_the_states(tmp_path: Path) -> None:
    w = make_worker(tmp_path)
    WorkerBook(w).handshake()
    resp = ask(w, {"cmd": "connections", "filter": {"state": "established,SYN_SNET"}})[0]
    assert not resp["ok"]
    assert "unknown state SYN_SNET" in resp["error"] and "SYN_SENT, SYN_RECV, ESTABLISHED" in resp["error"]
    # The dispatcher refuses it before asking any worker.
    links = FakeLinks({0: lambda req: {"ok": True, "result": {"connections": []}}})
    resp = Dispatcher(links, "single").handle({"cmd": "connections", "filter": {"state": "open"}})
    assert not resp["ok"] and "unknown state OPEN (states: SYN_SENT" in resp["error"] and links.calls == []
    # Any case of a real state still works.
    assert ConnFilter.parse({"state": "established,time_wait"}).states == frozenset(
        {"ESTABLISHED", "TIME_WAIT"}
    )


def test_version_is_answered_by_the_dispatcher_even_without_workers() -> None:
    import tcpguard
    import tcpguard.core

    links = FakeLinks({0: lambda req: {"ok": False, "error": "restarting"}})
    d = Dispatcher(links, "single")
    resp = d.handle({"cmd": "version"})
    assert resp == {
        "ok": True,
        "result": {"version": tcpguard.__version__, "core": tcpguard.core.MODE, "pid": os.getpid()},
    }
    assert links.calls == []
    st = d.handle({"cmd": "status"})["result"]
    assert (st["version"], st["core"]) == (tcpguard.__version__, tcpguard.core.MODE)
    assert format_status(st).startswith(f"tcpguard {tcpguard.__version__} ({tcpguard.core.MODE} core): up ")


def test_alerts_are_summed_over_workers_and_shown_in_the_status() -> None:
    workers = [{**_worker_doc(0, 5), "alerts": 2}, {**_worker_doc(1, 6), "alerts": 3}]
    total = totals(workers)
    assert total["alerts"] == 5
    text = format_status({"uptime": 1, "mode": "workers", "pid": 1, "workers": workers, "totals": total})
    row = next(line.split() for line in text.splitlines() if line.startswith("alerts"))
    assert row == ["alerts", "5", "2", "3"]


def test_tcpguard_version_flag_names_the_version_and_the_core() -> None:
    import tcpguard
    import tcpguard.core

    r = subprocess.run([TCPGUARD, "--version"], capture_output=True, text=True, timeout=60, check=True)
    assert r.stdout == f"tcpguard {tcpguard.__version__} ({tcpguard.core.MODE} core)\n"


ALERTING_RULE = """
from tcpguard import rule, tcp_connection

@rule(on=tcp_connection.events.receive_data)
def canary(flow, stream, current, direction):
    if direction == "up" and current.find(b"CANARY"):
        flow.alert("canary from the client", severity="high", direction=direction, seen=current.available())
        flow.reset()
"""


@pytest.mark.root
def test_the_daemon_answers_its_version_and_writes_eve_alerts(lab: Lab, tmp_path: Path) -> None:
    import tcpguard
    import tcpguard.core

    g = ObservedGateway(lab, tmp_path)
    try:
        (g.rules_dir / "alerting.py").write_text(ALERTING_RULE)
        g.start_server(OPEN_PORT)
        g.start_daemon()
        r = g.cli("version")
        assert r.stdout.startswith(
            f"tcpguard {tcpguard.__version__} ({tcpguard.core.MODE} core), daemon pid "
        )
        assert json.loads(g.cli("version", "--json").stdout)["pid"] == g.status()["pid"]
        before = time.time()
        proc, port = g.hold_open("xx CANARY xx")
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["error"] == "ConnectionResetError"
        proc.wait(timeout=10)
        after = time.time()
        alerts_file = tmp_path / "alerts.jsonl"
        wait_for(lambda: alerts_file.exists() and alerts_file.read_text().strip() != "", "the alert written")
        (line,) = alerts_file.read_text().splitlines()
        a = json.loads(line)
        flow = a["flow_id"]
        assert a == {
            "timestamp": a["timestamp"],
            "flow_id": flow,
            "event_type": "alert",
            "src_ip": CLIENT_V4,
            "src_port": port,
            "dest_ip": SERVER_V4,
            "dest_port": OPEN_PORT,
            "proto": "TCP",
            "direction": "to_server",
            "alert": {"action": "blocked", "signature": "canary from the client", "severity": 1},
            "tcpguard": {
                "id": f"0:{flow}",
                "rule": "alerting.canary",
                "severity": "high",
                "action": "reset",
                "fields": {"seen": 12},
            },
        }
        # Wall time (the engine's own clock is monotonic), with its time zone.
        stamp = datetime.fromisoformat(a["timestamp"])
        assert stamp.utcoffset() is not None and before - 1 <= stamp.timestamp() <= after + 1
        assert "CANARY" not in line.replace("canary from the client", "")  # no payload
        st = g.status()
        assert st["totals"]["alerts"] == 1 and st["workers"][0]["alerts"] == 1
        assert st["workers"][0]["engine"]["alerts"] == 1
        # The journal/log line carries the rule and the action too.
        assert "(rule alerting.canary, action reset)" in g.daemon_log.read_text()
    finally:
        g.cleanup()
