"""Each documented construct of the Lua front end, in a rule file of tests/lua/rules, through the engine.

The playbook (tests/core) plays real segments through a real Engine; the rules are loaded by the same
loader the daemon uses (`ruleload.load_module`), so what is checked here is what a gateway does."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest

from tcpguard.app.daemon.ruleload import load_module
from tcpguard.core.rules import RuleSet
from tests.rules.samples import ACCEPT, DROP, HOLD, actions, alerts, forged, playbook, send_pieces, split

RULES = Path(__file__).resolve().parent / "rules"


def lua(name: str) -> RuleSet:
    return RuleSet(load_module(RULES / f"{name}.lua"))


def errors(pb: object) -> list[str]:
    return [e["error"] for e in pb.names("rule_error")]  # type: ignore[attr-defined]


# ------------------------------------------------------------------ new_connection


def test_new_connection_reset_with_an_alert_naming_both_ends() -> None:
    pb = playbook(lua("connect"), sport=23)
    assert pb.client("S").verdict == DROP
    assert actions(pb) == ["reset"]
    assert alerts(pb) == ["telnet from 10.0.0.1:40000"]
    (alert,) = pb.names("alert")
    assert alert["alert"]["severity"] == 3  # low
    assert alert["tcpguard"]["rule"] == "connect.by_port"
    assert alert["tcpguard"]["fields"] == {
        "sources": [{"address": ["10.0.0.1"]}, {"service": ["tcp/40000"]}],
        "targets": [{"address": ["10.0.0.2"]}, {"service": ["tcp/23"]}],
    }
    assert forged(pb) == [("client", 40000)]  # at the SYN only the client has something to close


@pytest.mark.parametrize(("port", "action"), [(24, "drop"), (25, "halfreset"), (26, "drop")])
def test_new_connection_drop_halfreset_and_packet_drop(port: int, action: str) -> None:
    pb = playbook(lua("connect"), sport=port)
    assert pb.client("S").verdict == DROP
    assert actions(pb) == [action]
    assert alerts(pb) == []


def test_other_ports_pass_and_the_asserts_on_flow_and_packet_hold() -> None:
    pb = playbook(lua("connect"), sport=80)
    pb.handshake()
    assert pb.client("PA", b"hello").verdict == ACCEPT
    assert errors(pb) == []


def test_a_failing_rule_gets_the_rule_error_policy_and_its_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tcpguard.rules.lua")
    pb = playbook(lua("connect"), sport=27)
    assert pb.client("S").verdict == DROP
    (err,) = errors(pb)
    assert err == "LuaRuleError: connect.lua:28: a rule that fails"
    assert actions(pb) == ["reset"]  # the default rule_error policy
    logged = [r.getMessage() for r in caplog.records]
    assert "connect: seq 1000 window 65535" in logged and "port\t27" in logged


# ------------------------------------------------------------------ plain receive_data, end_connection


def test_plain_receive_data_reads_the_new_bytes_and_keeps_flow_fields() -> None:
    pb = playbook(lua("plain"))
    pb.handshake()
    assert pb.client("PA", b"GET /").verdict == ACCEPT
    assert pb.server("PA", b"public").verdict == ACCEPT
    assert pb.client("PA", b"\x00binary").verdict == ACCEPT
    assert pb.client("FA").verdict == ACCEPT
    pb.server("FA")
    pb.client("A")
    assert alerts(pb) == ["NUL first byte", "18 bytes in 3 calls"]
    assert errors(pb) == []


def test_plain_receive_data_actions_by_content() -> None:
    pb = playbook(lua("plain"))
    pb.handshake()
    assert pb.client("PA", b"LEN:" + struct.pack("!H", 999)).verdict == ACCEPT
    assert pb.client("PA", b"LEN:" + struct.pack("!H", 1001)).verdict == DROP
    assert actions(pb) == ["reset"]
    pb = playbook(lua("plain"))
    pb.handshake()
    assert pb.server("PA", b"the secret is").verdict == DROP
    assert actions(pb) == ["halfreset"]
    pb = playbook(lua("plain"))
    pb.handshake()
    assert pb.client("PA", b"QUIT").verdict == DROP
    assert actions(pb) == ["drop"]


def test_flow_fields_are_per_connection() -> None:
    rs = lua("plain")
    one, two = playbook(rs), playbook(rs, cport=40001)
    one.handshake()
    two.handshake()
    one.client("PA", b"abc")
    two.client("PA", b"abcdefgh")
    for pb in (one, two):
        pb.client("RA")
    assert alerts(one) == ["3 bytes in 1 calls"] and alerts(two) == ["8 bytes in 1 calls"]


# ------------------------------------------------------------------ streamed receive_data


def messages(*bodies: bytes) -> bytes:
    return b"".join(struct.pack("!H", len(b)) + b for b in bodies)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_streamed_iterator_reads_messages_however_split(size: int) -> None:
    data = messages(b"hello", b"", b"x" * 300, b"evil", b"never read")
    pb = playbook(lua("streamed"))
    pb.handshake()
    verdicts = send_pieces(pb, split(data, size))
    assert verdicts[-1] == DROP and set(verdicts[:-1]) <= {ACCEPT}
    # The segment completing "evil" is the one dropped: nothing after it was sent.
    end = len(messages(b"hello", b"", b"x" * 300, b"evil"))
    assert len(verdicts) == (end - 1) // size + 1
    assert alerts(pb) == ["evil message"] and actions(pb) == ["reset"]
    assert errors(pb) == []


def test_streamed_rule_sees_the_end_of_the_stream() -> None:
    pb = playbook(lua("streamed"))
    pb.handshake()
    assert send_pieces(pb, split(messages(b"one", b"two"), 2)) == [ACCEPT] * 5
    pb.client("FA")
    pb.server("FA")
    pb.client("A")
    assert alerts(pb) == ["2 messages"]
    pb = playbook(lua("streamed"))
    pb.handshake()
    pb.client("PA", struct.pack("!H", 10) + b"short")
    pb.client("FA")
    assert alerts(pb) == ["truncated message: 5 of 10 bytes"]


def test_streamed_rules_of_interleaved_connections_keep_their_own_state() -> None:
    # Two connections' coroutines suspended at once, resumed alternately, one segment at a time: the
    # greenlet of each waits with no Lua frame on the stack, so neither sees the other's bytes.
    rs = lua("streamed")
    a, b = playbook(rs), playbook(rs, cport=40001)
    a.handshake()
    b.handshake()
    da = split(messages(b"fine", b"also fine"), 1)
    db = split(messages(b"ok", b"evil"), 1)
    out_a, out_b = [], []
    for i in range(max(len(da), len(db))):
        if i < len(da):
            out_a.append(a.client("PA", da[i]).verdict)
        if i < len(db):
            out_b.append(b.client("PA", db[i]).verdict)
    assert out_a == [ACCEPT] * len(da)
    assert out_b[-1] == DROP and actions(b) == ["reset"] and actions(a) == []


def test_mark_holds_the_first_line_until_judged() -> None:
    pb = playbook(lua("hold"))
    pb.handshake()
    assert pb.client("PA", b"BAD req").verdict == HOLD
    dec = pb.client("PA", b"uest\n")
    assert dec.verdict == DROP
    assert [r.verdict for r in dec.releases] == [DROP]  # the held start never reaches the server
    pb = playbook(lua("hold"))
    pb.handshake()
    assert pb.client("PA", b"GOOD re").verdict == HOLD
    dec = pb.client("PA", b"quest\nmore")
    assert dec.verdict == ACCEPT
    assert [r.verdict for r in dec.releases] == [ACCEPT]
    assert pb.client("PA", b"later").verdict == ACCEPT
    assert errors(pb) == []


# ------------------------------------------------------------------ groups and policies


@pytest.mark.parametrize(
    ("client", "server", "port", "verdict"),
    [
        ("192.168.10.5", "192.168.20.9", 80, ACCEPT),
        ("192.168.10.5", "192.168.20.9", 22, ACCEPT),
        ("192.168.10.5", "192.168.20.9", 23, DROP),
        ("192.168.10.200", "192.168.20.9", 80, DROP),
        ("192.168.10.5", "192.168.21.9", 22, DROP),
    ],
)
def test_rule_group_allows_listed_traffic_and_drops_the_rest(
    client: str, server: str, port: int, verdict: int
) -> None:
    pb = playbook(lua("group"), client=client, server=server, sport=port)
    assert pb.client("S").verdict == verdict
    if verdict == DROP:
        assert alerts(pb) == ["Packet dropped: drop by default"] and actions(pb) == ["drop"]
    else:
        assert alerts(pb) == []


@pytest.mark.parametrize(
    ("client", "server", "port", "verdict", "action", "alert"),
    [
        ("10.0.0.1", "10.0.0.2", 80, ACCEPT, [], []),
        # Haka's policy.alert describes the alert by the policy's name when the entry gives none.
        ("10.0.0.1", "10.0.0.2", 22, DROP, ["reset"], ["new connection"]),
        ("10.1.2.3", "10.0.0.2", 8080, ACCEPT, [], []),
        ("10.2.2.3", "10.0.0.2", 8080, DROP, ["reset"], ["new connection"]),
        # Web for the lan would accept it, but the closed-server entry comes later and wins.
        ("10.0.0.1", "10.0.0.66", 80, DROP, ["drop"], ["closed server"]),
        ("10.9.0.1", "10.0.0.2", 8443, DROP, ["drop"], []),
        ("10.9.0.1", "10.0.0.2", 443, ACCEPT, [], []),  # outofrange(1, 1023) does not hold
    ],
)
def test_policies_last_eligible_wins(
    client: str, server: str, port: int, verdict: int, action: list[str], alert: list[str]
) -> None:
    pb = playbook(lua("policy"), client=client, server=server, sport=port)
    assert pb.client("S").verdict == verdict
    assert actions(pb) == action and alerts(pb) == alert
    if alert:
        fields = pb.names("alert")[0]["tcpguard"]["fields"]
        assert fields["sources"] == [{"address": [client]}, {"service": ["tcp/40000"]}]
