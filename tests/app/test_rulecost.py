"""`tcpguard cost`: the rule sets it measures, what it measures them on, and its command line.

No timing is asserted. The measurement takes its clock as a parameter, so the tests give it one that counts
the work the test rules do (each call adds its rule's weight): the figures are then exact, and they show
which rule sets ran on how many packets.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tcpguard.app import rulecost
from tcpguard.core.conntrack import Connection
from tcpguard.core.cursor import Cursor
from tcpguard.core.rules import RuleSet, rule, tcp_connection
from tcpguard.core.stream import HalfStream

ROOT = Path(__file__).resolve().parents[2]
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
    """(connections, client data events, ended connections) the engine reports on `frames`, counted
    with rules that record calls (not with the code under test)."""
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

    rulecost.run_once(frames, RuleSet.of(new, data, end), None)
    return seen["new"], seen["data"], seen["end"]


def test_each_rule_alone_then_all_doing_nothing_then_all() -> None:
    frames = rulecost.load_frames(DEMO, 10_000)
    conns, data, ends = _counts(frames)
    assert conns > 0 and data > 0 and ends > 0
    work = Work()
    rules = _rules(work)
    rows = rulecost.measure(frames, rules, repeat=2, clock=work)
    per = 1e6 / len(frames)  # one work unit over the whole run, per packet, in the table's micro-units
    labels = [r.label for r in rows]
    assert labels == ["(no rules)", *rules.names(), "(all 3 rules, listeners doing nothing)", "(all 3 rules)"]
    got = {r.label: r.us_per_packet for r in rows}
    assert got["(no rules)"] == 0
    assert got[rules.names()[0]] == pytest.approx(1 * conns * per)
    assert got[rules.names()[1]] == pytest.approx(100 * data * per)
    assert got[rules.names()[2]] == pytest.approx(10 * ends * per)
    assert got["(all 3 rules, listeners doing nothing)"] == 0  # the bodies never ran
    # All together: no test rule acts on a connection, so each is called as often as when alone.
    assert got["(all 3 rules)"] == pytest.approx((conns + 100 * data + 10 * ends) * per)
    assert all(r.added == r.us_per_packet for r in rows)  # the base is 0 work units
    assert [r.listens for r in rows[1:4]] == [
        "new_connection",
        "receive_data, up, lookback 256",
        "end_connection",
    ]


def test_frames_are_bounded_and_only_ip() -> None:
    every = rulecost.load_frames(DEMO, 10_000)
    assert len(every) == 412  # the demo capture's frames are all IPv4
    first = rulecost.load_frames(DEMO, 50)
    assert first == every[:50]
    with pytest.raises(ValueError, match="no IP frames"):
        rulecost.measure([], RuleSet())


def test_no_rules_measures_only_the_engine() -> None:
    rows = rulecost.measure(rulecost.load_frames(DEMO, 100), RuleSet(), repeat=1)
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


def test_command_prints_a_row_per_sample_rule() -> None:
    r = run(str(DEMO), "--rules", "rules", "--repeat", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("412 IP frames of") and "6 rules" in lines[0]
    names = [line.split()[0] for line in lines[2:]]
    for name in ("(no", "http_host.blocked_host", "shellcode.no_shellcode", "tls_sni.blocked_sni"):
        assert name in names
    row = next(line for line in lines if line.startswith("tls_sni.blocked_sni"))
    assert "receive_data streamed, up, ports 443 8443" in row


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["none.pcap", "--rules", "rules"], 1, "none.pcap"),
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
