"""The Lua twins in rules/lua give the same verdicts, alerts, actions and forged packets as the Python
samples they copy (rules/firewall.py, rules/shellcode.py), on the same captures.

Each capture is written with scapy and replayed by `tcpguard.app.offline.golden.record`, the record the
golden tests compare: one verdict per frame (so the same packets are forwarded), each flow's actions
and alerts, and every forged RST. Generated traffic mixes addresses inside and outside the firewall's
networks (IPv4 and IPv6), allowed and refused ports, and client bytes that hide shell-code patterns
split at random points. Clients never open with byte 0x16: the Python shell-code sample hands a
connection that opens like TLS to its TLS evidence, which the twin does not copy."""

from __future__ import annotations

import shutil
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcpguard.app.offline.golden import record
from tests.lua.traffic import Conn, bench_capture, write

ROOT = Path(__file__).resolve().parents[2]
PATTERNS = [b"/bin/sh", b"/bin/bash", b"cmd.exe", b"\x31\xc0\x50\x68//sh", b"\x90" * 32]


def rule_dirs(tmp: Path) -> tuple[Path, Path]:
    py, lua = tmp / "py", tmp / "lua"
    for d, files in ((py, ["firewall.py", "shellcode.py"]), (lua, ["lua/firewall.lua", "lua/shellcode.lua"])):
        d.mkdir(exist_ok=True)
        for f in files:
            shutil.copyfile(ROOT / "rules" / f, d / Path(f).name)
    return py, lua


def same(capture: Path, py: Path, lua: Path) -> dict[str, object]:
    a, b = record(capture, py), record(capture, lua)
    assert b["verdicts"] == a["verdicts"]
    assert b["flows"] == a["flows"]
    assert b["forged"] == a["forged"]
    return a


def test_twins_agree_on_a_mixed_capture(tmp_path: Path) -> None:
    py, lua = rule_dirs(tmp_path)
    rec = same(bench_capture(tmp_path / "mix.pcap", 240), py, lua)
    flows = rec["flows"]
    assert isinstance(flows, list)
    # The capture exercises both rules both ways: refused connections, reset shell-code, clean ones.
    kinds = {(tuple(f["actions"]), bool(f["alerts"])) for f in flows}
    assert kinds == {((), False), (("reset",), True)}
    signatures = {a[1] for f in flows for a in f["alerts"]}
    assert "shell-code pattern b'/bin/sh' from the client" in signatures
    assert "connection from 10.1.0.1 to 8.8.8.8 not allowed" in signatures
    assert any(s.startswith("connection to port") for s in signatures)


ADDRESSES = st.sampled_from(
    [("10.1.2.3", "10.0.0.2"), ("10.1.2.3", "8.8.8.8"), ("fd00::1", "fd00::2"), ("fd00::1", "2001:db8::2"),
     ("192.168.1.5", "172.16.0.9"), ("203.0.113.7", "192.168.1.1")]
)  # fmt: skip
PORTS = st.sampled_from([22, 25, 53, 80, 443, 8080, 23, 3389, 65535])
FILLER = st.binary(max_size=40).filter(lambda b: not b.startswith(b"\x16"))


@st.composite
def client_bytes(draw: st.DrawFn) -> list[bytes]:
    parts = draw(st.lists(st.one_of(FILLER, st.sampled_from(PATTERNS)), min_size=1, max_size=4))
    data = b"x" + b"".join(parts)
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=6)))
    return [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True) if data[i:j]]


@st.composite
def connections(draw: st.DrawFn) -> list[Conn]:
    n = draw(st.integers(1, 4))
    out = []
    for i in range(n):
        client, server = draw(ADDRESSES)
        out.append(
            Conn(
                client=client, server=server, cport=30000 + i, sport=draw(PORTS), pieces=draw(client_bytes())
            )
        )
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conns=connections())
def test_twins_agree_on_generated_traffic(conns: list[Conn], tmp_path_factory: object) -> None:
    tmp = tmp_path_factory.mktemp("twins")  # type: ignore[attr-defined]
    py, lua = rule_dirs(tmp)
    same(write(tmp / "gen.pcap", conns), py, lua)
