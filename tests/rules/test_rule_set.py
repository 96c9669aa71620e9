"""The sample rules as one set: documented, each covered, loaded together in order, and replayed from a
capture the way `tcpguard replay` runs them."""

from __future__ import annotations

import ast
import io
import json
from pathlib import Path
from typing import Any

import pytest

from tcpguard.app.daemon.ruleload import load_rules, rule_files
from tcpguard.app.offline.replay import replay
from tcpguard.core.decision import Decision
from tcpguard.core.engine import Engine
from tcpguard.io.pcap import PcapWriter

from .samples import ACCEPT, DROP, RULES, Playbook, client_hello

SAMPLES = [p.stem for p in rule_files(RULES)]


def test_the_samples_are_the_six_of_the_guide() -> None:
    assert SAMPLES == ["badflags", "firewall", "http_host", "ratelimit", "shellcode", "tls_sni"]


@pytest.mark.parametrize("name", SAMPLES)
def test_each_sample_is_documented_at_its_top_and_has_its_own_tests(name: str) -> None:
    doc = ast.get_docstring(ast.parse((RULES / f"{name}.py").read_text()))
    assert doc is not None and len(doc) > 300, f"rules/{name}.py needs a module docstring"
    summary, _, rest = doc.partition("\n\n")
    assert "\n" not in summary and summary.endswith("."), "first line: a one-sentence summary"
    assert "Event:" in rest, "the docstring says which event the rule listens to"
    assert (Path(__file__).parent / f"test_{name}.py").exists()


class Recorder(Playbook):
    """A playbook that also keeps every packet it fed, with its time, to write a capture from."""

    frames: list[tuple[float, bytes]]

    def feed(self, raw: bytes, token: object = None, dt: float = 0.001) -> Decision:
        self.frames.append((self.now + dt, raw))
        return super().feed(raw, token, dt)


def conversation(
    engine: Engine, frames: list[tuple[float, bytes]], cport: int, sport: int, server: str = "10.0.0.2"
) -> Recorder:
    pb = Recorder(engine=engine, client="10.0.0.1", server=server, cport=cport, sport=sport)
    pb.frames = frames
    pb.now = frames[-1][0] if frames else 0.0
    return pb


def play_mix(engine: Engine, frames: list[tuple[float, bytes]]) -> dict[str, Any]:
    """One connection per sample rule (and two allowed ones) through `engine`; the verdicts that matter."""
    out: dict[str, Any] = {}
    web = conversation(engine, frames, 41000, 80)
    web.handshake()
    out["web"] = web.client("PA", b"GET / HTTP/1.1\r\nHost: www.example.org\r\n\r\n").verdict
    web.server("PA", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    tls = conversation(engine, frames, 41001, 443)
    tls.handshake()
    out["tls"] = tls.client("PA", client_hello("www.example.org")).verdict
    host = conversation(engine, frames, 41002, 80)
    host.handshake()
    out["http_host"] = host.client("PA", b"GET / HTTP/1.1\r\nHost: blocked.example\r\n\r\n").verdict
    sni = conversation(engine, frames, 41003, 443)
    sni.handshake()
    out["tls_sni"] = sni.client("PA", client_hello("tracker.example")).verdict
    sh = conversation(engine, frames, 41004, 8080)
    sh.handshake()
    out["shellcode"] = [sh.client("PA", p).verdict for p in (b"echo; /bi", b"n/s", b"h")]
    out["firewall"] = conversation(engine, frames, 41005, 23).client("S").verdict
    out["badflags"] = conversation(engine, frames, 41006, 8080).client("FPU").verdict
    far = conversation(engine, frames, 41007, 443, server="192.0.2.1")
    out["firewall_net"] = far.client("S").verdict
    return out


EXPECTED = {
    "web": ACCEPT,
    "tls": ACCEPT,
    "http_host": DROP,
    "tls_sni": DROP,
    "shellcode": [ACCEPT, ACCEPT, DROP],
    "firewall": DROP,
    "badflags": DROP,
    "firewall_net": DROP,
}
EXPECTED_ALERTS = [
    "HTTP request to blocked host blocked.example",
    "TLS connection to blocked server name tracker.example",
    "shell-code pattern b'/bin/sh' from the client",
    "connection to port 23 not allowed",
    "Xmas scan from 10.0.0.1 (flags FPU) to port 8080",
    "connection from 10.0.0.1 to 192.0.2.1 not allowed",
]
EXPECTED_ACTIONS = ["halfreset", "reset", "reset", "reset", "drop", "reset"]


def test_the_whole_set_through_the_engine() -> None:
    events: list[dict[str, Any]] = []
    engine = Engine(rules=load_rules(RULES), sink=events.append)
    assert play_mix(engine, []) == EXPECTED
    assert [e["alert"]["signature"] for e in events if e["event"] == "alert"] == EXPECTED_ALERTS
    assert [e["action"] for e in events if e["event"] == "action"] == EXPECTED_ACTIONS
    assert engine.stats.rule_errors == 0


def test_the_whole_set_replayed_from_a_capture(tmp_path: Path) -> None:
    frames: list[tuple[float, bytes]] = []
    play_mix(Engine(), frames)  # no rules: only to record what the endpoints send
    capture = tmp_path / "mix.pcap"
    writer = PcapWriter(capture)
    for ts, raw in frames:
        writer.write(raw, 1_700_000_000 + ts)
    writer.close()
    events = io.StringIO()
    summary = replay(capture, load_rules(RULES), events=events)
    assert summary.frames == len(frames)
    assert summary.alerts == len(EXPECTED_ALERTS)
    lines = [json.loads(line) for line in events.getvalue().splitlines()]
    assert [e["alert"]["signature"] for e in lines if e["event"] == "alert"] == EXPECTED_ALERTS
    assert summary.stats.get("rule_errors", 0) == 0
    # Every forged RST is in the replay's count: one per reset end, one for each half-reset.
    assert summary.forged == 1 + 2 + 2 + 1 + 1
