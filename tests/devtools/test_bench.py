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

from tcpguard.devtools.bench.network import KINDS, bypass_supported, paths_for
from tcpguard.devtools.bench.report import Report

pytestmark = pytest.mark.root


def _sections(out: str) -> dict[str, list[tuple[str, ...]]]:
    """The printed tables by their `### ` heading: each a list of rows (cells stripped), headers left out."""
    tables: dict[str, list[tuple[str, ...]]] = {}
    current: list[tuple[str, ...]] = []
    for line in out.splitlines():
        if line.startswith("### "):
            current = tables.setdefault(line[4:].strip(), [])
        elif line.startswith("|") and not line.startswith("|---"):
            current.append(tuple(c.strip() for c in line.strip().strip("|").split("|")))
    return {k: v[1:] for k, v in tables.items()}  # v[0] is the header row


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
        timeout=480,
        check=False,
    )
    out = r.stdout
    print(out)  # shown by pytest when an assertion below fails
    assert r.returncode == 0, out + r.stderr
    rows = {tuple(c.strip() for c in line.strip("|").split("|")) for line in out.splitlines() if "|" in line}
    names = {row[0] for row in rows}
    sections = _sections(out)
    gateway = sections["Through the gateway"]
    for name, _label in paths_for(os.cpu_count() or 2):
        for kind in ("rr", "bulk"):
            row = next((x for x in gateway if x[:2] == (name, kind)), None)
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
    # Issues 20 and 21: every path has every traffic kind in the kinds table, with figures.
    kinds = next(v for k, v in sections.items() if k.startswith("Every traffic kind"))
    for name, _label in paths_for(os.cpu_count() or 2):
        for kind in KINDS:
            row = next((x for x in kinds if x[:2] == (name, kind)), None)
            assert row is not None, f"no {name}/{kind} row in the kinds table:\n{out}"
            mb, mean, uq_pps, uq_mean, per_conn, conns, bypassed = (
                row[2],
                row[5],
                row[6],
                row[7],
                row[8],
                row[9],
                row[10],
            )
            assert re.fullmatch(r"[\d,]+\.\d", mb) and float(mb.replace(",", "")) > 0, row
            assert re.fullmatch(r"[\d,]+", mean) and 40 <= int(mean.replace(",", "")) <= 65_536 + 100, row
            if name.startswith(("nfq", "tcpguard")):
                # Packets went to user space, of a plausible size; a TLS connection took some of them.
                assert re.fullmatch(r"[\d,]+", uq_pps) and uq_pps != "0", row
                assert (
                    re.fullmatch(r"[\d,]+", uq_mean) and 40 <= int(uq_mean.replace(",", "")) <= 65_536 + 100
                ), row
                if kind == "tls" and name != "nfq-scapy":
                    assert re.fullmatch(r"[\d,]+\.\d", per_conn), row
            else:
                assert uq_pps == "-" and uq_mean == "-", row  # nothing queued on these paths
            # Connections completed in the window; scapy's few MB/s finish none of 2 MB in a short window.
            if kind == "tls" and name != "nfq-scapy":
                assert re.fullmatch(r"[\d,]+\.\d", conns) and conns != "0.0", row
                assert "TLS" in row[14], row  # the negotiated cipher suite
            if name.startswith("tcpguard"):
                # The daemon's own count of bypassed connections, once the daemon has the key: the bypass
                # path must not pass for bypass-on while the key is silently left out.
                if bypass_supported():
                    assert re.fullmatch(r"[\d,]+", bypassed), row
                else:
                    assert bypassed == "n/a: not in this daemon", row
            else:
                assert bypassed == "-", row
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


def test_kinds_table_and_bypass_targets_from_figures() -> None:
    """The kinds table and the issue 20/21 targets, from known figures: MB/s and ratios, user-space packets
    per TLS connection, the daemon's bypass count (or that the daemon has none), a failed kind."""
    from tcpguard.devtools.bench.measurement import PathResult, PhaseResult

    def ph(mb: float, uq: int = 0, conns: int = 0, bypassed: int | None = None) -> PhaseResult:
        return PhaseResult(
            seconds=2.0,
            packets=int(mb * 2e6 / 1000),
            bytes=int(mb * 2e6),
            busy_share=0.5,
            uq_packets=uq,
            uq_bytes=uq * 1000,
            connections=conns,
            daemon_bypassed=bypassed,
        )

    paths = [
        PathResult("none", "n", phases={"tls": ph(300.0, conns=40), "bulk-gso": ph(2000.0)}),
        PathResult("nfq-bare", "b", phases={"tls": ph(60.0, uq=1000, conns=8), "bulk-gso": ph(100.0, uq=9)}),
        PathResult("tcpguard-1", "t", phases={"tls": ph(40.0, uq=800, conns=4, bypassed=0)}),
        PathResult("tcpguard-1+bypass", "t", phases={"tls": ph(270.0, uq=360, conns=36, bypassed=36)}),
        PathResult("tcpguard-2", "t", phases={"tls": ph(50.0, uq=900, conns=5)}),
    ]
    paths[2].failed["bulk-gso"] = "load generator bulk failed"
    out = "\n".join(Report(paths, [], [], "none", {"cpu": "x"}, "tcpguard bench").tables())
    kinds = next(v for k, v in _sections(out).items() if k.startswith("Every traffic kind"))
    row = {r[:2]: r for r in kinds}
    by = row[("tcpguard-1+bypass", "tls")]
    assert by[2:5] == ("270.0", "0.90x", "4.50x"), by  # MB/s, x none, x bare
    assert by[6] == "180" and by[7] == "1,000" and by[8] == "10.0" and by[10] == "36", by
    assert row[("tcpguard-2", "tls")][10] == "n/a: not in this daemon"
    assert row[("none", "tls")][6] == "-" and row[("none", "tls")][10] == "-"
    assert row[("tcpguard-1", "bulk-gso")][2] == "failed: load generator bulk failed"
    targets = {r[0]: r[1:] for r in _sections(out)["Targets (issues 7, 20, 21)"]}
    assert targets["tls: none / nfq-bare MB/s >= 3 (the load outruns the bare loop)"] == ("5.00", "yes")
    assert targets["tls: tcpguard-1+bypass / none MB/s >= 0.8"] == ("0.90", "yes")
    assert targets["tls: tcpguard-1+bypass / nfq-bare MB/s > 1"] == ("4.50", "yes")
    assert targets["tls: tcpguard-1+bypass user-space packets per connection <= 25"] == ("10.0", "yes")
    assert targets["bulk-gso: tcpguard-1 / nfq-bare MB/s >= 3"] == ("not measured", "-")
