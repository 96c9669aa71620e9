"""`tcpguard replay` on what an operator really feeds it: damaged captures, failing and looping rules,
and the summary's words checked against what happened to each packet."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from tcpguard.app.daemon.ruleload import load_rules
from tcpguard.app.offline.replay import EXIT_DAMAGED, error_text, replay
from tcpguard.core.rules import RuleSet
from tcpguard.io.pcap import LINKTYPE_ETHERNET, LINKTYPE_RAW, PcapReader, PcapWriter

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "samples" / "demo.pcap"
TCPGUARD = [sys.executable, "-m", "tcpguard.app.cli"]
T0 = 1_700_000_000.0


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TCPGUARD, *args], check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def _records(path: Path) -> list[tuple[float, bytes]]:
    with PcapReader(path, stop_at_damage=True) as reader:
        assert reader.linktype == LINKTYPE_ETHERNET
        return [(f.ts, f.data) for f in reader]


def _write(path: Path, frames: list[tuple[float, bytes]], linktype: int = LINKTYPE_RAW) -> None:
    with PcapWriter(path, linktype) as w:
        for ts, data in frames:
            w.write(data, ts)


def _tshark_frames(path: Path) -> list[str]:
    r = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-e", "frame.time_epoch", "-e", "frame.len"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return r.stdout.splitlines()


# ------------------------------------------------------------------------------ damaged captures


@pytest.mark.parametrize("tail", ["cut", "junk"])
def test_a_damaged_capture_is_replayed_up_to_the_damage_with_outputs_summary_and_status(
    tmp_path: Path, tail: str
) -> None:
    """As tcpdump writes a file when killed (cut mid-record), or with junk after the last record: every
    whole record is replayed, --out and --events are written, the summary printed, the offset named, and
    the status is EXIT_DAMAGED. The outputs equal those of a clean capture of the same whole records."""
    raw = DEMO.read_bytes()
    damaged = tmp_path / "damaged.pcap"
    damaged.write_bytes(raw[:150_000] if tail == "cut" else raw + b"\xde\xad" * 11)
    whole = _records(damaged)
    clean = tmp_path / "clean.pcap"  # the same whole records, nothing after them
    _write(clean, whole, LINKTYPE_ETHERNET)

    outs = {}
    for name, cap in (("damaged", damaged), ("clean", clean)):
        out, events = tmp_path / f"{name}.out.pcap", tmp_path / f"{name}.events"
        r = run("replay", str(cap), "--rules", "rules", "--out", str(out), "--events", str(events))
        outs[name] = (r, out, events)
    r, out, events = outs["damaged"]
    rc, cout, cevents = outs["clean"]
    assert rc.returncode == 0, rc.stderr
    assert r.returncode == EXIT_DAMAGED, r.stderr
    offset = len(raw) if tail == "junk" else 149416  # where the last whole record of the cut file ends
    assert f"{damaged}: offset {offset}: " in r.stderr and "warning" in r.stderr
    # The summary is printed, and says the same as the clean run's, plus the damage.
    assert r.stdout.splitlines()[:-1] == rc.stdout.splitlines()
    assert r.stdout.splitlines()[-1].startswith(f"capture damaged at byte {offset}: ")
    assert f"replayed the {len(whole)} whole records before it" in r.stdout
    assert out.read_bytes() == cout.read_bytes() and len(_tshark_frames(out)) > 0
    assert events.read_text() == cevents.read_text()
    assert not list(tmp_path.glob(".*.part"))


def test_a_failed_replay_leaves_no_output_and_keeps_the_previous_one(tmp_path: Path) -> None:
    """Not a capture at all: status 1, and neither a 24-byte --out nor an empty --events is left; a file
    an earlier run wrote there stays as it was."""
    bogus = tmp_path / "notes.pcap"
    bogus.write_text("this is not a capture\n")
    out, events = tmp_path / "out.pcap", tmp_path / "events.jsonl"
    r = run("replay", str(bogus), "--rules", "rules", "--out", str(out), "--events", str(events))
    assert r.returncode == 1 and "not a pcap or pcapng file" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.pcap"]

    out.write_bytes(b"an earlier run's output")
    events.write_text("an earlier run's events\n")
    r = run("replay", str(bogus), "--rules", "rules", "--out", str(out), "--events", str(events))
    assert r.returncode == 1
    assert out.read_bytes() == b"an earlier run's output"
    assert events.read_text() == "an earlier run's events\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl", "notes.pcap", "out.pcap"]


# ------------------------------------------------------------------------------ the summary's words


def _segment(
    t: float, up: bool, flags: str, seq: int, ack: int, data: bytes = b"", cport: int = 40000
) -> tuple[float, bytes]:
    c, s = "10.7.0.1", "10.7.0.2"
    ip = IP(src=c, dst=s) if up else IP(src=s, dst=c)
    tcp = TCP(sport=cport, dport=80, flags=flags, seq=seq, ack=ack, window=65535)
    if not up:
        tcp.sport, tcp.dport = 80, cport
    return (t, bytes(ip / tcp / Raw(data)) if data else bytes(ip / tcp))


def _held_and_idle_capture(path: Path) -> None:
    """One connection whose second data segment arrives before the first (held, then released when the
    gap fills), and one that only sends a SYN and is then idle past the SYN_SENT timeout (30 s)."""
    frames = [
        _segment(T0, True, "S", 100, 0),
        _segment(T0 + 0.01, False, "SA", 500, 101),
        _segment(T0 + 0.02, True, "A", 101, 501),
        _segment(T0 + 0.03, True, "PA", 107, 501, b"world"),  # out of order: held
        _segment(T0 + 0.04, True, "PA", 101, 501, b"hello "),  # fills the gap: both pass
        _segment(T0 + 0.05, False, "A", 501, 112),
        _segment(T0 + 1, True, "S", 900, 0, cport=40001),  # never answered
        _segment(T0 + 100, False, "A", 501, 112),  # time passes: the SYN_SENT connection times out
    ]
    _write(path, frames)


def test_the_summary_counts_each_packet_once_by_its_fate_and_calls_a_timeout_a_timeout(
    tmp_path: Path,
) -> None:
    cap = tmp_path / "held.pcap"
    _held_and_idle_capture(cap)
    out = tmp_path / "out.pcap"
    summary = replay(cap, RuleSet(), out=out)
    assert summary.stats["held"] == 1 and summary.released_accepted == 1
    assert summary.stats["timeouts"] == 1
    lines = summary.lines()
    text = "\n".join(lines)
    # The held packet was released and forwarded: it is counted as forwarded, and nowhere as "held".
    assert (
        lines[1] == "packets forwarded 8 (after being held: 1), dropped 0 (after being held: 0), rewritten 0"
    )
    assert "held 1" not in text and len(_tshark_frames(out)) == 8
    # A connection that timed out was not refused.
    assert "refused" not in text
    assert "connections ended idle (timeout) 1" in text


# ------------------------------------------------------------------------------ rules that fail or loop


LOOPING = """
from tcpguard import rule, tcp_connection


@rule(on=tcp_connection.events.receive_data)
def spin(flow, stream, current, direction):
    while True:
        pass
"""

RAISING = """
from tcpguard import rule, tcp_connection


@rule(on=tcp_connection.events.receive_data)
def parse(flow, stream, current, direction):
    raise ValueError("cannot parse %r" % current.peek(current.available()))
"""


def test_a_looping_rule_is_stopped_by_the_time_budget_and_reported(tmp_path: Path) -> None:
    """Before: replay hung silently for ever. Now each call is interrupted after the configured budget,
    the flow gets the rule-error verdict, and the summary names the rule and the timeout."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "spin.py").write_text(LOOPING)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("engine:\n  limits:\n    rule_time_budget: 0.1\n")
    cap = tmp_path / "held.pcap"
    _held_and_idle_capture(cap)
    t = time.monotonic()
    r = run("replay", str(cap), "--rules", str(rules), "--config", str(cfg), timeout=60)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t < 30
    assert "rule errors 1" in r.stdout
    assert (
        "spin.spin at " in r.stdout
        and "RuleTimeout: rule spin.spin exceeded its time budget of 0.1 s" in r.stdout
    )


def test_rule_errors_are_reported_once_each_with_their_text_and_without_payload(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "parser.py").write_text(RAISING)
    cap = tmp_path / "held.pcap"
    _held_and_idle_capture(cap)
    events = tmp_path / "ev.jsonl"
    r = run("replay", str(cap), "--rules", str(rules), "--events", str(events))
    assert r.returncode == 0, r.stderr
    (line,) = [x for x in r.stdout.splitlines() if "parser.parse at" in x]
    assert line.endswith(": ValueError: cannot parse b'...' (1 times)"), line
    assert f"{rules / 'parser.py'}:7" in line
    assert "hello" not in r.stdout + r.stderr  # the payload the rule choked on is not shown
    # The events file keeps the whole text, as before.
    errs = [json.loads(x) for x in events.read_text().splitlines() if '"rule_error"' in x]
    assert [e["error"] for e in errs] == ["ValueError: cannot parse b'hello world'"]


def test_error_text_elides_bytes_and_bounds_the_length() -> None:
    assert error_text(KeyError(b"GET /x")) == "KeyError: b'...'"
    assert error_text(ValueError('x b"a\\"b" y')) == "ValueError: x b'...' y"
    assert error_text(TypeError("f() takes 2 positional arguments but 4 were given")).endswith("4 were given")
    assert len(error_text(RuntimeError("z" * 1000))) == len("RuntimeError: ") + 200
    assert error_text(StopIteration()) == "StopIteration"


def test_replay_from_the_library_is_unchanged_for_a_clean_capture() -> None:
    summary = replay(DEMO, load_rules(ROOT / "rules"))
    assert summary.damage is None and summary.frames == 412


# ------------------------------------------------------------------------------ progress on a terminal


def _stderr_through_a_terminal(*args: str) -> tuple[int, str]:
    """Run `tcpguard` with its stderr on a pseudo-terminal (stdout a pipe); what the terminal got."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    # A new pseudo-terminal is 0 columns wide, and tqdm fits its bar to that: make it a usual 120.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        proc = subprocess.Popen([*TCPGUARD, *args], stdout=subprocess.PIPE, stderr=slave, cwd=ROOT)
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            seen += chunk
        proc.communicate(timeout=120)
        return proc.returncode, seen.decode(errors="replace")
    finally:
        os.close(master)


def test_replay_shows_a_progress_bar_on_a_terminal_only(tmp_path: Path) -> None:
    """Like `trace`: tqdm's bar over the capture's bytes on a terminal, nothing when stderr is a pipe."""
    big = tmp_path / "big.pcap"
    with PcapReader(DEMO) as reader:
        frames = [(f.ts, f.data) for f in reader]
    # 20 copies of the demo, later copies shifted in time so the connections do not overlap: 8,240 frames.
    _write(big, [(ts + 3600 * k, data) for k in range(20) for ts, data in frames], LINKTYPE_ETHERNET)
    rc, seen = _stderr_through_a_terminal("replay", str(big), "--rules", "rules")
    assert rc == 0
    assert "replay:" in seen and "%|" in seen and "/6.13M" in seen  # the bar, over the file's bytes
    r = run("replay", str(big), "--rules", "rules")
    assert r.returncode == 0 and "%|" not in r.stderr
