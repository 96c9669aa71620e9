"""`tcpguard cost`: the rule sets it measures, what it measures them on, and its command line.

No timing is asserted. The measurement takes its clock as a parameter, so the tests give it one that counts
the work the test rules do (each call adds its rule's weight): the figures are then exact, and they show
which rule sets ran, on how many packets, and with rule state that starts afresh for every run.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import ARP, Ether
from scapy.utils import wrpcap

from tcpguard.app.daemon.ruleload import load_rules
from tcpguard.app.offline import cost as rulecost
from tcpguard.core.conntrack import Connection
from tcpguard.core.cursor import Cursor
from tcpguard.core.engine import Engine
from tcpguard.core.rules import RuleSet, rule, tcp_connection
from tcpguard.core.stream import HalfStream
from tcpguard.io.pcap import iter_frames

from .test_replay import LOOPING, RAISING  # the same failing rules as replay's tests

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "samples" / "demo.pcap"
EV = tcp_connection.events


class Work:
    """A clock that advances only when a test rule works: by its weight, per call."""

    def __init__(self) -> None:
        self.units = 0.0

    def __call__(self) -> float:
        return self.units


def _rules(work: Work) -> RuleSet:
    @rule(on=EV.new_connection)
    def cheap(flow: Connection, tcp: object) -> None:
        work.units += 1

    @rule(on=EV.receive_data, direction="up")
    def dear(flow: Connection, stream: HalfStream, current: Cursor, direction: str) -> None:
        work.units += 100

    @rule(on=EV.end_connection)
    def ending(flow: Connection) -> None:
        work.units += 10

    return RuleSet.of(cheap, dear, ending)


def _counts(frames: rulecost.Frames) -> tuple[int, int, int]:
    """(connections, client data events, ended connections) on `frames`, counted by rules that record
    their calls, on an engine driven here (not by the code under test)."""
    seen = {"new": 0, "data": 0, "end": 0}

    @rule(on=EV.new_connection)
    def new(flow: Connection, tcp: object) -> None:
        seen["new"] += 1

    @rule(on=EV.receive_data, direction="up")
    def data(flow: Connection, stream: HalfStream, current: Cursor, direction: str) -> None:
        seen["data"] += 1

    @rule(on=EV.end_connection)
    def end(flow: Connection) -> None:
        seen["end"] += 1

    engine = Engine(rules=RuleSet.of(new, data, end))
    for raw, ts in frames:
        engine.handle_packet(raw, ts)
    engine.shutdown(frames[-1][1])
    return seen["new"], seen["data"], seen["end"]


def test_each_rule_alone_then_all_doing_nothing_then_all() -> None:
    frames = rulecost.load_frames(DEMO, 10_000)
    conns, data, ends = _counts(frames)
    assert conns > 0 and data > 0 and ends == conns
    work = Work()
    rows = rulecost.measure(frames, lambda: _rules(work), repeat=2, clock=work)
    names = _rules(work).names()
    per = 1e6 / len(frames)  # one work unit over the whole run, per packet, in the table's micro-units
    labels = [r.label for r in rows]
    assert labels == ["(no rules)", *names, "(all 3 rules, listeners emptied)", "(all 3 rules)"]
    got = {r.label: r.us_per_packet for r in rows}
    assert got["(no rules)"] == 0
    assert got[names[0]] == pytest.approx(1 * conns * per)
    assert got[names[1]] == pytest.approx(100 * data * per)
    assert got[names[2]] == pytest.approx(10 * ends * per)
    assert got["(all 3 rules, listeners emptied)"] == 0  # the bodies never ran
    # All together: no test rule acts on a connection, so each is called as often as when alone.
    assert got["(all 3 rules)"] == pytest.approx((conns + 100 * data + 10 * ends) * per)
    assert all(r.added == r.us_per_packet for r in rows)  # the base is 0 work units
    assert [r.listens for r in rows[1:4]] == [
        "new_connection",
        "receive_data, up, lookback 256",
        "end_connection",
    ]
    assert all(r.dropped == r.alerts == r.rule_errors == r.bad_checksum == 0 for r in rows)


STATEFUL = """
import _tcpguard_test_work as work
from tcpguard import rule, tcp_connection

seen = 0  # module state, like a rate limiter's buckets: it must not carry over from one run to the next


@rule(on=tcp_connection.events.new_connection)
def limit(flow, tcp):
    global seen
    seen += 1
    if seen > 2:
        flow.alert("over the limit")
        flow.drop()


@rule(on=tcp_connection.events.receive_data, direction="up")
def count(flow, stream, current, direction):
    work.units += 1
"""


def test_rule_modules_start_afresh_for_every_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule that refuses connections after the first two would, with its state carried over, refuse
    every connection of the later runs: fewer data calls, and the best of the runs would be that one."""
    (tmp_path / "stateful.py").write_text(STATEFUL)
    work = types.ModuleType("_tcpguard_test_work")
    work.units = 0.0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "_tcpguard_test_work", work)
    frames = rulecost.load_frames(DEMO, 10_000)
    # One fresh run, driven here: the data calls the counting rule gets with the limit in place.
    engine = Engine(rules=load_rules(tmp_path))
    for raw, ts in frames:
        engine.handle_packet(raw, ts)
    once = work.units
    conns, _, _ = _counts(frames)
    assert conns > 2 and once > 0
    rows = rulecost.measure(frames, lambda: load_rules(tmp_path), repeat=3, clock=lambda: work.units)
    got = {r.label: r for r in rows}
    per = 1e6 / len(frames)
    assert got["(all 2 rules)"].us_per_packet == pytest.approx(once * per)
    assert got["(all 2 rules)"].alerts == conns - 2 and got["(all 2 rules)"].dropped > 0
    assert got["stateful.limit"].alerts == conns - 2  # each row's counters come from a fresh run too


def test_frames_are_bounded_in_number_and_bytes_and_only_ip(tmp_path: Path) -> None:
    every = rulecost.load_frames(DEMO, 10_000)
    assert len(every) == len([f for f in iter_frames(DEMO) if f.ip is not None]) == 412
    assert rulecost.load_frames(DEMO, 50) == every[:50]
    budget = sum(len(ip) for ip, _ in every[:10])
    assert rulecost.load_frames(DEMO, 10_000, max_bytes=budget) == every[:10]
    assert rulecost.load_frames(DEMO, 10_000, max_bytes=budget - 1) == every[:9]
    mixed = tmp_path / "mixed.pcap"
    wrpcap(str(mixed), [Ether() / ARP(), Ether() / IP(dst="10.0.0.2") / TCP(), Ether() / ARP()])
    (only,) = rulecost.load_frames(mixed, 10)
    assert only[0][9] == 6  # the IPv4 packet (protocol TCP), not an ARP frame
    with pytest.raises(ValueError, match="no IP frames"):
        rulecost.measure([], RuleSet)


def test_no_rules_measures_only_the_engine() -> None:
    rows = rulecost.measure(rulecost.load_frames(DEMO, 100), RuleSet, repeat=1)
    assert [r.label for r in rows] == ["(no rules)"]
    assert rows[0].us_per_packet > 0


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tcpguard.app.cli", "cost", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_command_prints_a_row_per_sample_rule_and_logs_nothing_while_timing() -> None:
    r = run(str(DEMO), "--rules", "rules", "--repeat", "1")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # the demo's alerts are counted in the table, not logged per run
    lines = r.stdout.splitlines()
    assert lines[0].startswith("412 IP frames of") and "7 rules from rules" in lines[0]
    names = [line.split()[0] for line in lines[2:]]
    for name in ("(no", "http_host.blocked_host", "shellcode.no_shellcode", "tls_sni.blocked_sni"):
        assert name in names
    row = next(line for line in lines if line.startswith("tls_sni.blocked_sni"))
    assert "receive_data streamed, up, ports 443 8443" in row
    everything = next(line for line in lines if line.startswith("(all 7 rules)"))
    assert everything.split()[-2] != "0"  # the demo capture raises alerts with the sample rules


def test_bad_checksums_are_reported(tmp_path: Path) -> None:
    cap = tmp_path / "offloaded.pcap"
    wrpcap(str(cap), [IP(src="10.0.0.1", dst="10.0.0.2") / TCP(flags="S", chksum=0x1234)])
    r = run(str(cap), "--rules", "rules", "--repeat", "1")
    assert r.returncode == 0, r.stderr
    assert "1 packets had bad checksums" in r.stdout and "--ignore-checksums" in r.stdout
    r = run(str(cap), "--rules", "rules", "--repeat", "1", "--ignore-checksums")
    assert r.returncode == 0 and "bad checksums" not in r.stdout


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["none.pcap", "--rules", "rules"], 1, "none.pcap"),
        (["README.md", "--rules", "rules"], 1, "README.md"),
        ([str(DEMO)], 2, "give --rules DIR"),
        ([str(DEMO), "--rules", "rules", "--frames", "0"], 2, "at least 1"),
    ],
)
def test_bad_input_is_a_clear_error(args: list[str], status: int, message: str) -> None:
    r = run(*args)
    assert r.returncode == status and message in r.stderr, r.stderr


def test_a_broken_rule_names_its_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("from tcpguard import rule\n\nx = 1 / 0\n")
    r = run(str(DEMO), "--rules", str(tmp_path))
    assert r.returncode == 1 and f"{tmp_path / 'bad.py'}:3: ZeroDivisionError" in r.stderr


# ------------------------------------------------------------------------------ damage, loops, errors

def test_a_damaged_capture_is_measured_up_to_the_damage(tmp_path: Path) -> None:
    """Before: `cost` stopped with the reader's error and measured nothing."""
    raw = DEMO.read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(raw[:150_000])
    r = run(str(cut), "--rules", "rules", "--repeat", "1")
    assert r.returncode == 3, r.stderr
    assert r.stdout.startswith("181 IP frames of") and "(all 7 rules)" in r.stdout
    assert "capture damaged at byte 149416: " in r.stdout
    assert f"tcpguard cost: warning: {cut}: offset 149416: " in r.stderr
    # Damage past the frames asked for is never reached: a clean run.
    r = run(str(cut), "--rules", "rules", "--repeat", "1", "--frames", "100")
    assert r.returncode == 0 and r.stdout.startswith("100 IP frames of") and "capture damaged" not in r.stdout


def test_a_looping_rule_times_out_instead_of_hanging(tmp_path: Path) -> None:
    """Before: the first call never returned. Now the daemon's budget interrupts it, the row's run stops at
    the first timeout, and the row says so."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "spin.py").write_text(LOOPING)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("engine:\n  limits:\n    rule_time_budget: 0.1\n")
    r = run(str(DEMO), "--rules", str(rules), "--config", str(cfg), "--repeat", "3")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith(("spin.spin", "(all 1 rules)"))]
    assert len(rows) == 2 and all("timed out" in row for row in rows)
    assert "RuleTimeout: rule spin.spin exceeded its time budget of 0.1 s" in r.stdout
    assert "timed out: a rule call ran past the rule time budget (0.1 s" in r.stdout


def test_rule_errors_are_listed_with_their_text_without_payload(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "parser.py").write_text(RAISING)
    r = run(str(DEMO), "--rules", str(rules), "--repeat", "1")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # nothing logged per call while the clock runs
    lines = r.stdout.splitlines()
    start = lines.index("rule errors (one untimed run of each row that had them):")
    listed = [line for line in lines[start:] if "parser.parse at" in line]
    assert len(listed) == 2  # the rule alone, and the whole set
    assert all(f"{rules / 'parser.py'}:7: ValueError: cannot parse b'...' (" in line for line in listed)
    assert "GET" not in r.stdout  # the demo's HTTP requests are what the rule choked on
