"""The command line as an operator uses it: `tcpguard check` and `tcpguard replay`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tcpguard.app import cli

ROOT = Path(__file__).resolve().parents[2]
TCPGUARD = [sys.executable, "-m", "tcpguard.app.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TCPGUARD, *args], check=False, capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_check_accepts_the_shipped_config_and_rules() -> None:
    r = run("check", "--config", "etc/tcpguard.yaml")
    assert r.returncode == 0, r.stderr
    assert "config etc/tcpguard.yaml: ok" in r.stdout and "shellcode.no_shellcode" in r.stdout


def test_check_fails_on_a_broken_rule_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("from tcpguard import rule\n\n\nimport does_not_exist\n")
    r = run("check", "--rules", str(tmp_path))
    assert r.returncode == 1
    assert f"{tmp_path / 'bad.py'}:4: ModuleNotFoundError" in r.stderr


def test_check_fails_on_a_broken_config_with_file_key_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("engine:\n  limits:\n    max_connections: lots\n")
    r = run("check", "--config", str(cfg))
    assert r.returncode == 1
    assert f"{cfg}:3: engine.limits.max_connections" in r.stderr


def test_replay_writes_forwarded_packets_events_and_a_summary(tmp_path: Path) -> None:
    out, events = tmp_path / "out.pcap", tmp_path / "events.jsonl"
    r = run("replay", "samples/demo.pcap", "--rules", "rules", "--out", str(out), "--events", str(events))
    assert r.returncode == 0, r.stderr
    assert "connections 6" in r.stdout and "resets sent 4" in r.stdout
    evs = [json.loads(line) for line in events.read_text().splitlines()]
    kinds = {e["event"] for e in evs}
    assert {"new_connection", "receive_data", "end_connection", "verdict", "alert", "action"} <= kinds
    assert sum(1 for e in evs if e["event"] == "verdict") == 412  # one per frame of the capture
    # The summary's drops by reason are the drop verdicts' reasons (up to a colon), counted from the events.
    reasons = Counter(
        e["reason"].split(":")[0] for e in evs if e["event"] == "verdict" and e["verdict"] == "drop"
    )
    assert sum(reasons.values()) == 30
    assert "dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) in r.stdout.splitlines()
    check = subprocess.run(
        ["tshark", "-r", str(out)], check=False, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0 and check.stderr.count("rror") == 0
    # 382 accepted frames plus 4 forged RSTs.
    assert len(check.stdout.splitlines()) == 386


def test_replay_of_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    r = run("replay", str(tmp_path / "none.pcap"), "--rules", "rules")
    assert r.returncode == 1 and "none.pcap" in r.stderr


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(action.choices)


def test_each_plugged_module_registers_the_commands_listed_for_it() -> None:
    """A command line naming a plugged command imports only its module: the list must be exact."""
    core = set(cli.CORE_COMMANDS)
    everything = _subcommands(cli.build_parser())
    listed = {c for cmds in cli.PLUGGED_COMMANDS.values() for c in cmds}
    assert everything == core | listed
    for cmds in cli.PLUGGED_COMMANDS.values():
        for cmd in cmds:
            assert _subcommands(cli.build_parser(cmd)) == core | set(cmds)
    for cmd in core:
        assert _subcommands(cli.build_parser(cmd)) == core  # no plugged module imported for it
    assert _subcommands(cli.build_parser("trcae")) == everything  # a typo: the error lists every command


def test_the_command_is_the_first_argument_that_is_not_an_option() -> None:
    assert cli._command(["-v", "-v", "trace", "x.pcap", "-o", "out"]) == "trace"
    assert cli._command(["--help"]) is None
