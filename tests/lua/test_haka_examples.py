"""Haka's documented examples behave as Haka documents them, and what tcpguard lacks fails at load.

tests/lua/rules/haka holds the examples, written in the shape and spelling of Haka's own (the sample
ruleset tcp/rules.lua's rule group, with `hook =` and the global `tcp_connection`; a streamed rule with
`streamed = true` at the top level), and files using what tcpguard does not have: Haka's PCRE module,
the ipv4 dissector's events, the http dissector, stream modification. Those must be refused when the
file loads, with the file, the line and what is missing, never when the first connection arrives."""

from __future__ import annotations

from pathlib import Path

import pytest

from tcpguard.app.daemon.ruleload import load_module, load_rules
from tcpguard.core.errors import RuleLoadError
from tcpguard.core.rules import RuleSet
from tests.rules.samples import ACCEPT, DROP, actions, alerts, playbook, send_pieces, split

HAKA = Path(__file__).resolve().parent / "rules" / "haka"


@pytest.mark.parametrize(
    ("client", "server", "port", "verdict"),
    [
        ("192.168.10.1", "192.168.20.1", 80, ACCEPT),  # "authorizing http traffic"
        ("192.168.10.1", "192.168.20.1", 22, ACCEPT),  # "authorizing ssh traffic"
        ("192.168.10.1", "192.168.20.1", 443, DROP),  # "drop by default"
        ("192.168.10.130", "192.168.20.1", 80, DROP),  # outside 192.168.10.0/25
        ("192.168.10.1", "192.168.20.200", 22, DROP),  # outside 192.168.20.0/25
    ],
)
def test_the_sample_tcp_ruleset_drops_by_default(client: str, server: str, port: int, verdict: int) -> None:
    rs = RuleSet(load_module(HAKA / "tcp_rules.lua"))
    pb = playbook(rs, client=client, server=server, sport=port)
    assert pb.client("S").verdict == verdict
    if verdict == DROP:
        assert alerts(pb) == ["Packet dropped : drop by default"]
        (alert,) = pb.names("alert")
        assert alert["tcpguard"]["fields"] == {
            "sources": {"address": [client, "40000"]},
            "targets": {"address": [server, str(port)]},
        }
        assert actions(pb) == ["drop"]
    else:
        assert alerts(pb) == [] and actions(pb) == []


@pytest.mark.parametrize("size", [1, 3, 100])
def test_a_streamed_rule_in_the_older_spelling_finds_a_split_pattern(size: int) -> None:
    rs = RuleSet(load_module(HAKA / "streamed_hook.lua"))
    (rule,) = rs.rules
    assert rule.streamed
    pb = playbook(rs)
    pb.handshake()
    verdicts = send_pieces(pb, split(b"GET /?x=/bin/sh HTTP/1.0\r\n", size))
    assert verdicts[-1] == DROP
    assert alerts(pb) == ["/bin/sh shellcode detected"] and actions(pb) == ["drop"]


@pytest.mark.parametrize(
    ("name", "line", "words"),
    [
        ("pcre.lua", 2, 'require("regexp/pcre")'),
        ("ipfilter.lua", 6, 'the ipv4 dissector\'s event "receive_packet"'),
        ("http.lua", 2, 'require("protocol/http")'),
        ("modify.lua", 7, "stream modification (:insert)"),
    ],
)
def test_what_tcpguard_lacks_fails_at_load_with_file_and_line(
    name: str, line: int, words: str, tmp_path: Path
) -> None:
    with pytest.raises(RuleLoadError) as e:
        load_module(HAKA / name)
    assert e.value.path == str(HAKA / name)
    assert e.value.line == line
    assert words in e.value.message and "not supported by tcpguard" in e.value.message
    # And through the directory loader, as `tcpguard check` and a reload see it: nothing loads.
    d = tmp_path / "rules"
    d.mkdir()
    (d / "ok.lua").write_text((HAKA / "streamed_hook.lua").read_text())
    (d / name).write_text((HAKA / name).read_text())
    with pytest.raises(RuleLoadError) as e2:
        load_rules(d)
    assert (e2.value.path, e2.value.line) == (str(d / name), line)
