"""Golden replays: real captures through the sample rules, compared with checked-in expectations.

The expectations (tests/golden/*.json) are rewritten by tools/golden.py only for intended changes. They
are not trusted blindly: `test_demo_expectation_agrees_with_tshark` re-derives the key facts of the demo
expectation from tshark's own dissection of the capture.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tcpguard.app.offline.golden import record

from .cases import CASES

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_replay(name: str) -> None:
    capture, rules, settings = CASES[name]
    expected = json.loads((ROOT / "tests" / "golden" / f"{name}.json").read_text())
    got = json.loads(json.dumps(record(ROOT / capture, ROOT / rules, settings())))
    assert got["flows"] == expected["flows"]
    assert got["forged"] == expected["forged"]
    assert got["verdicts"] == expected["verdicts"]
    assert got["stats"] == expected["stats"]


def _tshark(capture: Path, *fields: str) -> list[list[str]]:
    args = ["tshark", "-r", str(capture), "-T", "fields", "-E", "separator=|"]
    for f in fields:
        args += ["-e", f]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return [line.split("|") for line in out.splitlines()]


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is installed by scripts/install.sh")
def test_demo_expectation_agrees_with_tshark() -> None:
    capture = ROOT / "samples" / "demo.pcap"
    expected: dict[str, Any] = json.loads((ROOT / "tests" / "golden" / "demo.json").read_text())
    rows = _tshark(
        capture,
        "frame.number",
        "tcp.stream",
        "tcp.dstport",
        "tcp.seq_raw",
        "tcp.ack_raw",
        "tcp.payload",
        "http.host",
        "http.request.uri",
    )
    streams: dict[int, list[list[str]]] = {}
    for r in rows:
        streams.setdefault(int(r[1]), []).append(r)
    assert len(streams) == len(expected["flows"])  # one flow per TCP connection

    dropped_expected: set[int] = set()
    forged_expected: list[dict[str, Any]] = []
    for frames in streams.values():
        first = frames[0]
        if first[2] == "9999":
            # Not on the allow-list: every frame is dropped; an RST+ACK acking the SYN goes to the client.
            dropped_expected |= {int(f[0]) for f in frames}
            forged_expected.append(
                {
                    "frame": int(first[0]),
                    "dst_port": int(first[2]) and None,
                    "seq": 0,
                    "ack": (int(first[3]) + 1) % 2**32,
                    "to": "client",
                }
            )
            continue
        trigger = next((f for f in frames if f[6] == "blocked.example" or "/bin/sh" in f[7]), None)
        if trigger is None:
            continue
        n = int(trigger[0])
        dropped_expected |= {int(f[0]) for f in frames if int(f[0]) >= n}
        # The server never saw the request: the RST to it carries the request's own seq and ack.
        forged_expected.append({"frame": n, "seq": int(trigger[3]), "ack": int(trigger[4]), "to": "server"})
        if "/bin/sh" in trigger[7]:
            forged_expected.append(
                {"frame": n, "seq": int(trigger[4]), "ack": int(trigger[3]), "to": "client"}
            )

    verdicts = expected["verdicts"]
    assert len(verdicts) == len(rows)
    assert {i + 1 for i, v in enumerate(verdicts) if v == "D"} == dropped_expected
    assert set(verdicts) <= {"A", "D"}
    # The engine's byte counters: IP packet lengths as tshark reads them (IPv4 total length, IPv6 payload
    # length + its 40-byte header), of every frame and of the dropped ones (nothing is held here, so every
    # other byte was accepted).
    ip_len = {
        int(n): int(v4) if v4 else 40 + int(v6)
        for n, v4, v6 in _tshark(capture, "frame.number", "ip.len", "ipv6.plen")
    }
    dropped_bytes = sum(ip_len[n] for n in dropped_expected)
    stats = expected["stats"]
    assert stats["bytes"] == sum(ip_len.values())
    assert stats["bytes_dropped"] == dropped_bytes
    assert stats["bytes_accepted"] == sum(ip_len.values()) - dropped_bytes
    got = [
        {
            "frame": f["frame"],
            "seq": f["seq"],
            "ack": f["ack"],
            "to": "client" if f["dst"].startswith("10.99.0.1:") else "server",
        }
        for f in expected["forged"]
    ]
    want = [{k: v for k, v in f.items() if k != "dst_port"} for f in forged_expected]
    assert sorted(got, key=str) == sorted(want, key=str)


def _follow_client_streams(capture: Path) -> dict[int, bytes]:
    """Client-to-server bytes of each TCP connection in `capture`, as tshark reassembles them."""
    streams = {int(r[0]) for r in _tshark(capture, "tcp.stream") if r[0]}
    out: dict[int, bytes] = {}
    for n in sorted(streams):
        text = subprocess.run(
            ["tshark", "-r", str(capture), "-q", "-z", f"follow,tcp,raw,{n}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        lines = text.splitlines()
        body = lines[next(i for i, line in enumerate(lines) if line.startswith("Node 1:")) + 1 :]
        # In raw follow output the server's bytes are indented by a tab; the client's are not.
        out[n] = b"".join(bytes.fromhex(line) for line in body if line and not line.startswith(("\t", "=")))
    return out


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is installed by scripts/install.sh")
def test_evasion_capture_never_forwards_the_pattern(tmp_path: Path) -> None:
    """Whatever the segment trick, the stream the server would reassemble from the forwarded packets
    never holds the pattern; where the rule let a connection through, it got the first copies only."""
    from tcpguard.app.daemon.ruleload import load_rules
    from tcpguard.app.offline.replay import replay

    out = tmp_path / "forwarded.pcap"
    replay(ROOT / "samples" / "evasion.pcap", load_rules(ROOT / "rules"), out=out)
    streams = _follow_client_streams(out)
    assert len(streams) == 8
    assert all(b"/bin/sh" not in data for data in streams.values()), streams
    by_content = sorted(streams.values())
    assert b"cmd /bin/XX;" in by_content  # conflicting retransmission rewritten to the first copy
    assert b"cmd /bin/ls;" in by_content  # the bad-checksum copy never passed
    assert b"GET / HTTP/1.0\r\n\r\n" in by_content  # the SYN's data was stripped
