"""rules/badflags.py: scan probes and bad flag combinations are dropped silently."""

from __future__ import annotations

import pytest

from tcpguard.app.daemon.ruleload import load_rules
from tcpguard.core.settings import EngineSettings

from .samples import ACCEPT, DROP, RULES, actions, alerts, forged, load, playbook

RS, MOD = load("badflags")


@pytest.mark.parametrize(
    ("flags", "name"),
    [("FPU", "Xmas scan"), ("", "NULL scan"), ("F", "FIN scan"), ("PU", "segment without ACK")],
)
def test_scan_probes_are_dropped_with_an_alert_and_no_reset(flags: str, name: str) -> None:
    pb = playbook(RS, sport=8080)
    assert pb.client(flags).verdict == DROP
    assert actions(pb) == ["drop"]
    (alert,) = alerts(pb)
    assert alert.startswith(f"{name} from 10.0.0.1 (flags ") and alert.endswith(" to port 8080")
    assert forged(pb) == []  # the scanner learns nothing
    assert pb.client(flags).verdict == DROP  # and its next probe on the same ports neither


def test_a_probe_from_a_low_source_port_names_the_real_sender() -> None:
    # The engine guesses the lower port is the service, so the flow's "client" is the target here;
    # the alert names the packet's sender all the same.
    pb = playbook(RS, client="10.0.0.1", server="10.0.0.2", cport=80, sport=40000)
    assert pb.client("FPU").verdict == DROP
    assert alerts(pb)[0].startswith("Xmas scan from 10.0.0.1 ")


@pytest.mark.parametrize(
    ("flags", "what"), [("SU", "SYN with URG"), ("SP", "SYN with PSH"), ("SPU", "SYN with URG+PSH")]
)
def test_syn_with_urg_or_psh_is_dropped(flags: str, what: str) -> None:
    pb = playbook(RS)
    assert pb.client(flags).verdict == DROP
    assert alerts(pb)[0].startswith(what + " from 10.0.0.1")


def test_legitimate_first_packets_pass() -> None:
    ecn = playbook(RS)
    assert ecn.client("SEC").verdict == ACCEPT  # ECN negotiation
    assert ecn.server("SAE").verdict == ACCEPT
    plain = playbook(RS)
    plain.handshake()
    assert plain.client("PA", b"x").verdict == ACCEPT
    # A real connection picked up mid-stream starts with an ACK: not a probe.
    mid = playbook(RS)
    assert mid.client("PA", b"data of a connection older than tcpguard").verdict == ACCEPT
    assert alerts(ecn) == alerts(plain) == alerts(mid) == []


def test_engine_drops_syn_fin_itself_and_the_rule_never_sees_it() -> None:
    pb = playbook(RS)
    assert pb.client("SF").verdict == DROP
    assert pb.names("new_connection") == [] and alerts(pb) == []


def test_with_midstream_drop_the_engine_drops_probes_before_any_rule() -> None:
    settings = EngineSettings()
    settings.policies.midstream = "drop"
    pb = playbook(RS, settings=settings)
    assert pb.client("FPU").verdict == DROP
    assert alerts(pb) == []


def test_in_the_whole_set_a_probe_to_a_refused_port_is_dropped_not_reset() -> None:
    # badflags.py sorts before firewall.py: the probe is dropped silently instead of being answered.
    pb = playbook(load_rules(RULES), sport=23)
    assert pb.client("FPU").verdict == DROP
    assert actions(pb) == ["drop"] and forged(pb) == []
    assert alerts(pb)[0].startswith("Xmas scan")


def test_probe_name_table() -> None:
    name = MOD["probe_name"]
    assert name(0x02) is None and name(0x12) is None and name(0x10) is None and name(0x04) is None
    assert name(0x29) == "Xmas scan" and name(0x00) == "NULL scan" and name(0x01) == "FIN scan"
    assert name(0x02 | 0x20) == "SYN with URG"
