"""`tcpguard check` catches what would break a gateway before it is deployed: rule modules that never
finish loading or whose listeners cannot take their event's arguments, an empty rules directory, and
configurations that are valid but cannot work (issue 18, sections 1 and 3)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TCPGUARD = [sys.executable, "-m", "tcpguard.app.cli"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TCPGUARD, *args], check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def config(tmp_path: Path, text: str) -> Path:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "a.py").write_text(
        "from tcpguard import rule\n\n@rule(on='end_connection')\ndef e(flow):\n    pass\n"
    )
    path = tmp_path / "c.yaml"
    path.write_text(f"rules_dir: rules\n{text}")
    return path


def test_a_module_that_loops_at_import_fails_check_within_the_budget(tmp_path: Path) -> None:
    cfg = config(tmp_path, "rules_load_budget: 0.5\n")
    bad = tmp_path / "rules" / "wedge.py"
    bad.write_text("from tcpguard import rule\n\nwhile True:\n    pass\n")
    t0 = time.monotonic()
    r = run("check", "--config", str(cfg), timeout=30)
    assert time.monotonic() - t0 < 15
    assert r.returncode == 1
    assert f"{bad}:3: did not finish loading within 0.5 s" in r.stderr


def test_a_listener_with_the_wrong_parameters_fails_check(tmp_path: Path) -> None:
    (tmp_path / "r.py").write_text(
        "from tcpguard import rule, tcp_connection\n\n"
        "@rule(on=tcp_connection.events.receive_data)\ndef scan(flow, data):\n    pass\n"
    )
    r = run("check", "--rules", str(tmp_path))
    assert r.returncode == 1
    assert f"{tmp_path / 'r.py'}:3: listener r.scan(flow, data) cannot be called as receive_data(" in r.stderr


def test_an_empty_rules_directory_passes_with_a_warning(tmp_path: Path) -> None:
    r = run("check", "--rules", str(tmp_path))
    assert r.returncode == 0
    assert "0 rules ok" in r.stdout
    assert f"{tmp_path}: warning: no rule files (*.py or *.lua" in r.stderr


def test_repeat_without_managed_iptables_says_what_the_operators_rule_needs(tmp_path: Path) -> None:
    cfg = config(tmp_path, "queue: {repeat: true}\niptables: {manage: false, mark: 0x10}\n")
    r = run("check", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert f"{cfg}: warning: queue.repeat: true with iptables.manage: false" in r.stderr
    assert "-m mark ! --mark 0x10" in r.stderr and "-m mark --mark 0x10 -j RETURN" in r.stderr
    # Either change removes the warning: tcpguard's own chain exempts the mark, and without repeat no
    # packet is re-queued.
    for text in ("queue: {repeat: false}\niptables: {manage: false}\n", "iptables: {manage: true}\n"):
        cfg = config(tmp_path, text)
        r = run("check", "--config", str(cfg))
        assert r.returncode == 0 and f"{cfg}: warning" not in r.stderr, r.stderr


def test_hooking_one_direction_of_local_traffic_is_warned_about(tmp_path: Path) -> None:
    one_way = (("[INPUT]", "INPUT without OUTPUT"), ("[OUTPUT, FORWARD]", "OUTPUT without INPUT"))
    for hooks, missing in one_way:
        cfg = config(tmp_path, f"iptables: {{hooks: {hooks}}}\n")
        r = run("check", "--config", str(cfg))
        assert r.returncode == 0, r.stderr
        assert f"warning: iptables.hooks: {missing}" in r.stderr
    for hooks in ("[INPUT, OUTPUT]", "[FORWARD]", "[FORWARD, INPUT, OUTPUT]"):
        cfg = config(tmp_path, f"iptables: {{hooks: {hooks}}}\n")
        r = run("check", "--config", str(cfg))
        assert r.returncode == 0 and f"{cfg}: warning" not in r.stderr, (hooks, r.stderr)


def test_run_without_the_capabilities_says_so_before_anything_else(tmp_path: Path) -> None:
    # Root without CAP_NET_ADMIN and CAP_NET_RAW (dropped from the bounding set): as for any user without
    # them, the error names the real problem first, not the first file or socket that cannot be opened.
    cfg = config(tmp_path, "")
    r = subprocess.run(
        ["setpriv", "--bounding-set", "-net_admin,-net_raw", *TCPGUARD, "run", "--config", str(cfg)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 1
    assert "tcpguard run: needs CAP_NET_ADMIN" in r.stderr and "run it as root" in r.stderr
