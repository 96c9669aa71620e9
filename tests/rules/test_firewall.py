"""rules/firewall.py: the allow-list on new connections."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tcpguard.app.daemon.ruleload import load_module
from tcpguard.core.errors import RuleLoadError

from .samples import ACCEPT, DROP, RULES, actions, alerts, forged, load, playbook

RS, MOD = load("firewall")


def test_allowed_connection_passes_untouched() -> None:
    pb = playbook(RS, client="10.0.0.1", server="10.0.0.2", sport=443)
    pb.handshake()
    assert pb.client("PA", b"hello").verdict == ACCEPT
    assert alerts(pb) == [] and actions(pb) == []


def test_port_not_allowed_is_refused_with_a_reset_to_the_client() -> None:
    pb = playbook(RS, client="10.0.0.1", server="10.0.0.2", sport=23)
    assert pb.client("S").verdict == DROP
    assert actions(pb) == ["reset"]
    assert alerts(pb) == ["connection to port 23 not allowed"]
    # The server never answered, so only the client gets an RST (acknowledging its SYN).
    assert forged(pb) == [("client", 40000)]
    assert pb.decoded(pb.sent[0]).ack == pb.cisn + 1
    # Its retransmitted SYN is dropped too, without a second alert.
    assert pb.client("S", seq=pb.cisn).verdict == DROP
    assert len(alerts(pb)) == 1


def test_server_outside_the_allowed_networks_is_refused() -> None:
    pb = playbook(RS, client="10.0.0.1", server="8.8.8.8", sport=443)
    assert pb.client("S").verdict == DROP
    assert alerts(pb) == ["connection from 10.0.0.1 to 8.8.8.8 not allowed"]


@pytest.mark.parametrize(("server", "ok"), [("fd00:1::2", True), ("2001:db8::1", False)])
def test_ipv6(server: str, ok: bool) -> None:
    pb = playbook(RS, client="fd00:1::1", server=server, sport=80)
    assert pb.client("S").verdict == (ACCEPT if ok else DROP)


def test_entries_with_client_networks_and_port_ranges() -> None:
    mod = dict(MOD)
    networks, ports, allowed = mod["_networks"], mod["_ports"], mod["allowed"]
    entries = [
        (networks(["10.1.0.0/16"]), networks(["10.0.0.0/8"]), ports(["9000-9099", 8443])),
        (networks("any"), networks(["192.168.0.0/16"]), ports([80])),
    ]
    MOD["_ENTRIES"], saved = entries, MOD["_ENTRIES"]
    allowed.cache_clear()  # answers are cached per (client, server, port) for the entries in force
    try:
        ip = ipaddress.ip_address
        assert allowed(ip("10.1.2.3"), ip("10.9.9.9"), 9050) == (True, "")
        assert allowed(ip("10.1.2.3"), ip("10.9.9.9"), 8443) == (True, "")
        assert allowed(ip("10.1.2.3"), ip("10.9.9.9"), 9100) == (False, "connection to port 9100 not allowed")
        assert allowed(ip("10.2.0.1"), ip("10.9.9.9"), 9050)[0] is False  # client not in 10.1/16
        assert allowed(ip("fd00::1"), ip("fd00::2"), 80)[0] is False  # no entry for IPv6 servers
        assert allowed(ip("172.16.0.1"), ip("192.168.1.1"), 80) == (True, "")
    finally:
        MOD["_ENTRIES"] = saved
        allowed.cache_clear()


def test_a_client_reconnecting_to_a_service_is_decided_once() -> None:
    allowed = MOD["allowed"]
    allowed.cache_clear()
    for sport in (443, 443, 23, 23):
        pb = playbook(RS, client="10.0.0.1", server="10.0.0.2", sport=sport)
        assert pb.client("S").verdict == (ACCEPT if sport == 443 else DROP)
    info = allowed.cache_info()
    assert (info.misses, info.hits) == (2, 2)
    assert info.maxsize == 4096  # bounded: the least recently used answers are evicted


def test_a_typo_in_the_allow_list_is_a_load_error_with_its_line(tmp_path: Path) -> None:
    text = (RULES / "firewall.py").read_text().replace("[22, 25, 53, 80, 443, 8080]", '[22, "80-70"]')
    bad = tmp_path / "firewall.py"
    bad.write_text(text)
    with pytest.raises(RuleLoadError, match="bad port or range '80-70'") as e:
        load_module(bad)
    assert e.value.line is not None
