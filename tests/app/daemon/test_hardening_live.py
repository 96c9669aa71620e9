"""Live hardening on a real gateway (issue 18): nothing an operator writes wedges the gateway. A rule
module that never finishes loading, a rule that loops with no budget at SIGTERM, a second daemon on the
same queue, and an operator's NFQUEUE rule that sends tcpguard's own accepted packets back to it."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tcpguard.app.daemon.run import STOP_DEADLINE
from tests.netns import Lab

from .test_daemon import OPEN_PORT, TCPGUARD, Gateway, hexs, wait_for

pytestmark = pytest.mark.root


def status(g: Gateway) -> dict[str, Any]:
    argv = [TCPGUARD, "status", "--config", str(g.config), "--json", "--timeout", "5"]
    r = g.lab.run("gw", argv, cwd=g.tmp)
    result: dict[str, Any] = json.loads(r.stdout)
    return result


def test_a_module_that_never_finishes_loading_leaves_the_gateway_forwarding(lab: Lab, tmp_path: Path) -> None:
    g = Gateway(lab, tmp_path)
    g.config.write_text(g.config.read_text() + "rules_load_budget: 4\n")
    g.start_server(OPEN_PORT, reply=1000)
    g.start_daemon()
    wedge = g.rules_dir / "wedge.py"
    wedge.write_text("from tcpguard import rule\n\nwhile True: pass\n")
    assert g.daemon is not None
    g.daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload: trying the rules" in g.daemon_log.read_text(), "the trial load to start")
    t0 = time.monotonic()
    # While the trial runs (4 s): connections are forwarded and inspected by the running rules, and the
    # control socket answers.
    assert g.client([hexs(b"hello")])["received_len"] == 1000
    assert g.client([hexs(b"/bin/sh")])["error"] == "ConnectionResetError"
    assert status(g)["workers"][0]["reloads"] == 0
    assert time.monotonic() - t0 < 4, "these ran during the trial"
    wait_for(lambda: "did not finish loading" in g.daemon_log.read_text(), "the trial to fail", timeout=15)
    assert f"{wedge}:3: did not finish loading within 4 s" in g.daemon_log.read_text()
    doc = status(g)["workers"][0]
    assert doc["reload_failures"] == 1 and doc["reloads"] == 0
    # The control reload says why, within the budget, and the rules stay.
    r = g.lab.run("gw", [TCPGUARD, "reload", "--config", str(g.config)], check=False, cwd=g.tmp, timeout=30)
    assert r.returncode != 0 and f"{wedge}:3: did not finish loading within 4 s" in r.stderr + r.stdout
    assert g.client([hexs(b"/bin/sh")])["error"] == "ConnectionResetError"
    assert g.stop_daemon(timeout=15) == 0
    assert not g.chain_installed()


def test_sigterm_ends_the_daemon_whatever_a_rule_is_doing(lab: Lab, tmp_path: Path) -> None:
    g = Gateway(lab, tmp_path)
    # No rule budget: nothing interrupts the rule; the stop deadline must end the process anyway.
    g.config.write_text(g.config.read_text() + "engine:\n  limits:\n    rule_time_budget: 0\n")
    (g.rules_dir / "spin.py").write_text(
        "from tcpguard import rule, tcp_connection\n\n"
        "@rule(on=tcp_connection.events.receive_data)\n"
        "def spin(flow, stream, current, direction):\n"
        "    if current.find(b'SPIN'):\n"
        "        while True:\n"
        "            pass\n"
    )
    g.start_server(OPEN_PORT)
    g.start_daemon()
    client = g.lab.popen(
        "client",
        [*_client_argv(), json.dumps({"chunks": [hexs(b"SPIN")], "gap": 0, "timeout": 5})],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # the rule is spinning in the packet loop now
    t0 = time.monotonic()
    assert g.daemon is not None
    g.daemon.send_signal(signal.SIGTERM)
    code = g.daemon.wait(STOP_DEADLINE + 10)
    assert time.monotonic() - t0 < STOP_DEADLINE + 5
    assert code == 1  # not a clean stop, and it says so
    assert "not stopped 10 s after SIGTERM: removing the iptables rules" in g.daemon_log.read_text()
    assert not g.chain_installed()
    client.wait(30)


def _client_argv() -> list[str]:
    import sys

    from tests.app.tcpapps import CLIENT
    from tests.netns import SERVER_V4

    return [sys.executable, "-c", CLIENT, SERVER_V4, str(OPEN_PORT)]


def test_a_second_daemon_on_the_same_queue_names_the_first(lab: Lab, tmp_path: Path) -> None:
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = Gateway(lab, tmp_path / "first")
    first.start_daemon()
    second = Gateway(lab, tmp_path / "second")
    second.config.write_text(second.config.read_text().replace("manage: true", "manage: false"))
    assert first.daemon is not None
    r = lab.run("gw", [TCPGUARD, "run", "--config", str(second.config)], check=False, cwd=second.tmp)
    assert r.returncode == 1
    assert f"cannot bind NFQUEUE 0: process {first.daemon.pid} (" in r.stderr
    assert "is bound to it (another tcpguard?)" in r.stderr
    assert first.stop_daemon() == 0


def test_packets_sent_back_by_an_operator_rule_without_the_mark_exemption_do_not_loop(
    lab: Lab, tmp_path: Path
) -> None:
    g = Gateway(lab, tmp_path, manage=False)
    # queue.repeat is on by default; the operator's own rule queues all forwarded TCP, tcpguard's marked
    # packets included (the foot-gun).
    lab.run("gw", ["iptables", "-w", "-A", "FORWARD", "-p", "tcp", "-j", "NFQUEUE", "--queue-num", "0"])
    try:
        g.start_server(OPEN_PORT, reply=50_000)
        g.start_daemon()
        res = g.client([hexs(b"through")], timeout=5)
        assert res["error"] is None and res["received_len"] == 50_000
        # The rules still judged the first pass of every packet.
        assert g.client([hexs(b"/bin/sh")])["error"] == "ConnectionResetError"
        adapter = status(g)["workers"][0]["adapter"]
        assert adapter["looped"] > 0
        assert adapter["looped"] <= adapter["packets"] - adapter["looped"]  # once per packet at most
        assert g.daemon_log.read_text().count("came back to queue 0 carrying tcpguard's mark") == 1
        assert g.stop_daemon() == 0
    finally:
        lab.run("gw", ["iptables", "-w", "-F", "FORWARD"], check=False)


def test_a_restart_after_kill9_says_what_it_found(lab: Lab, tmp_path: Path) -> None:
    g = Gateway(lab, tmp_path)
    g.start_server(OPEN_PORT, reply=10)
    g.start_daemon()
    # A connection that lives across the restart: a chunk before the kill, one after.
    spec = {"chunks": [hexs(b"before "), hexs(b"after")], "gap": 3, "timeout": 15}
    client = g.lab.popen(
        "client",
        [*_client_argv(), json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    g.stop_daemon(signal.SIGKILL)
    start = len(g.daemon_log.read_text())
    g.start_daemon()
    out, _ = client.communicate(timeout=40)
    assert json.loads(out)["error"] is None
    wait_for(lambda: "mid-stream" in g.daemon_log.read_text()[start:], "the mid-stream report", timeout=10)
    log = g.daemon_log.read_text()[start:]
    assert "restart after an unclean stop: iptables: chain TCPGUARD was already there (" in log
    assert "chain TCPGUARD reused" in log
    assert "removed the control socket" in log and "left by a run that did not stop cleanly" in log
    assert "1 connection met mid-stream for the first time since start" in log
    assert status(g)["totals"]["connections"]["midstream"] == 1
    assert g.stop_daemon() == 0
    # A clean start after a clean stop finds nothing.
    start = len(g.daemon_log.read_text())
    g.start_daemon()
    assert g.stop_daemon() == 0
    log = g.daemon_log.read_text()[start:]
    assert "unclean stop" not in log and "removed the control socket" not in log and "installed" in log


def test_the_status_says_why_bypassed_packets_are_not_counted(lab: Lab, tmp_path: Path) -> None:
    g = Gateway(lab, tmp_path, manage=False)
    g.config.write_text(g.config.read_text().replace("bypass: true", "bypass: true\n  repeat: false"))
    g.start_daemon()
    argv = [TCPGUARD, "status", "--config", str(g.config)]
    text = g.lab.run("gw", argv, cwd=g.tmp).stdout
    assert "queue bypassed: not counted with iptables.manage false" in text
    assert "no daemon bound" in text
    assert status(g)["totals"]["queue_drops"]["bypassed"] is None
    assert g.stop_daemon() == 0
