"""Helpers for the sample-rule tests: load one module of rules/ on its own, make real TLS ClientHellos,
and play connections through an engine with the playbook of tests/core."""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path
from typing import Any

from tcpguard.app.daemon.ruleload import load_module
from tcpguard.core.decision import Verdict
from tcpguard.core.packet import RST, decode
from tcpguard.core.rules import RuleSet
from tcpguard.core.settings import EngineSettings
from tests.core.playbook import Playbook

__all__ = [
    "ACCEPT",
    "DROP",
    "HOLD",
    "RULES",
    "Playbook",
    "actions",
    "alerts",
    "client_hello",
    "flow",
    "forged",
    "load",
    "playbook",
    "send_pieces",
    "split",
]

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "rules"

ACCEPT, DROP, HOLD = Verdict.ACCEPT, Verdict.DROP, Verdict.HOLD


def load(name: str) -> tuple[RuleSet, dict[str, Any]]:
    """The rules of `rules/<name>.py`, freshly executed (so module-level state starts empty), and the
    module's namespace, to reach its helpers and settings."""
    rules = load_module(RULES / f"{name}.py")
    assert rules, f"rules/{name}.py registers no rule"
    return RuleSet(rules), rules[0].func.__globals__


def playbook(rules: RuleSet, settings: EngineSettings | None = None, **kw: Any) -> Playbook:
    return Playbook(rules=rules, settings=settings, **kw)


def alerts(pb: Playbook) -> list[str]:
    return [e["alert"]["signature"] for e in pb.names("alert")]


def actions(pb: Playbook) -> list[str]:
    return [e["action"] for e in pb.names("action")]


def forged(pb: Playbook) -> list[tuple[str, int]]:
    """Every RST the engine forged: (to 'client' or 'server', destination port)."""
    out = []
    for raw in pb.sent:
        p = decode(raw)
        assert p.flags & RST
        out.append(("server" if p.dport == pb.sport else "client", p.dport))
    return out


def flow(pb: Playbook) -> Any:
    """The playbook's connection as the rules saw it (still in the table, also after it ended)."""
    (conn,) = list(pb.engine.table)
    return conn


def client_hello(sni: str | None) -> bytes:
    """The bytes a real TLS client (Python's ssl, i.e. OpenSSL) sends first: its ClientHello records."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    data = outgoing.read()
    assert data[0] == 0x16, "not a TLS handshake record"
    return data


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def send_pieces(pb: Playbook, pieces: list[bytes]) -> list[Verdict]:
    """Send each piece as one client segment; the verdict of each (stops after the first drop)."""
    out = []
    for piece in pieces:
        v = pb.client("PA", piece).verdict
        out.append(v)
        if v == DROP:
            break
    return out
