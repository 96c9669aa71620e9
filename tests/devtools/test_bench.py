"""`tcpguard bench --short` runs end to end on the namespace network and prints every row.

No timing is asserted (timing lives in the benchmark, not in tests): only that every path, traffic kind,
memory measurement and offline command produced a figure, and that nothing is left behind.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tcpguard.devtools.bench.network import paths_for
from tcpguard.devtools.bench.report import Report

pytestmark = pytest.mark.root


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_short_bench_runs_and_prints_every_row(tmp_path: Path) -> None:
    before = _namespaces()
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nHand-written text that must survive.\n")
    r = subprocess.run(
        [sys.executable, "-m", "tcpguard.app.cli", "bench", "--short", "--quiet", "--doc", str(doc)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    rows = {tuple(c.strip() for c in line.strip("|").split("|")) for line in out.splitlines() if "|" in line}
    names = {row[0] for row in rows}
    for name, _label in paths_for(os.cpu_count() or 2):
        for kind in ("rr", "bulk"):
            row = next((x for x in rows if x[:2] == (name, kind)), None)
            assert row is not None, f"no {name}/{kind} row in:\n{out}"
            assert re.fullmatch(r"[\d,]+", row[2]) and row[2] != "0", row  # packets/s is a figure
            assert re.fullmatch(r"\d+", row[12]), row  # SYN retransmissions, counted in the client namespace
        assert name in names
    memory = (
        "fabricated, handshake only",
        "fabricated, after 1 request/response",
        "real connections held open through the daemon",
    )
    offline = (
        "tcpguard replay (sample rules)",
        "tcpguard trace (output on tmpfs)",
        "tcpguard trace (output on disk)",
    )
    for label in (*memory, *offline):
        assert any(row[0] == label for row in rows), f"no {label!r} row in:\n{out}"
    mem = [row for row in rows if row[0] in memory]
    assert all(re.fullmatch(r"[\d,]+", row[2]) and row[2] != "0" for row in mem), mem
    for label in offline:  # packets/s, wall and CPU: figures, not "failed"
        row = next(row for row in rows if row[0] == label)
        assert re.fullmatch(r"[\d,]+", row[3]) and re.fullmatch(r"[\d,]+", row[5]) and row[3] != "0", row
    assert "### Targets" in out
    # The doc got the results section and kept its own text.
    text = doc.read_text()
    assert "Hand-written text that must survive." in text
    assert "<!-- bench:begin -->" in text and "Produced by `tcpguard bench --short" in text
    # Every namespace the benchmark made is gone.
    assert not {ns for ns in _namespaces() - before if ns.startswith("tgb-")}


def test_report_marks_missing_figures_as_not_measured() -> None:
    rep = Report([], [], [], "no capture", {"cpu": "x"}, "tcpguard bench")
    lines = rep.tables()
    assert any("not measured" in line for line in lines)
