"""The rule guide's Lua part (generated from tcpguard.lua.api) says what the code does: its example runs
as described, each refused construct is refused at load, and each supported method is defined."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from tcpguard.app.daemon.ruleload import load_module
from tcpguard.core.errors import RuleLoadError
from tcpguard.core.rules import RuleSet
from tcpguard.lua import api
from tcpguard.lua.prelude import PRELUDE
from tests.rules.samples import ACCEPT, DROP, actions, alerts, playbook, send_pieces, split

ROOT = Path(__file__).resolve().parents[2]


def guide_example() -> str:
    text = (ROOT / "docs" / "rules.md").read_text()
    part = text[text.index("## Lua rules (Haka-compatible)") :]
    blocks: list[str] = re.findall(r"```lua\n(.*?)```", part, re.S)
    return blocks[0]


def test_the_guides_example_does_what_it_says(tmp_path: Path) -> None:
    path = tmp_path / "example.lua"
    path.write_text(guide_example())
    rs = RuleSet(load_module(path))
    # The policy: only the lan's web connections (10.0.0.0/8 to 80/443) are accepted, by the one entry;
    # with no entry eligible nothing is done.
    assert playbook(rs, client="10.1.1.1", sport=443).client("S").verdict == ACCEPT
    # The streamed rule: a message longer than 4096 is refused however the length is split.
    pb = playbook(rs)
    pb.handshake()
    data = struct.pack("!H", 3) + b"abc" + struct.pack("!H", 5000)
    assert send_pieces(pb, split(data, 1))[-1] == DROP
    assert alerts(pb) == ["oversized message"] and actions(pb) == ["reset"]


REFUSED = [
    ("local http = require('protocol/http')", 'require("protocol/http")'),
    ("local dns = require('protocol/dns')", 'require("protocol/dns")'),
    ("local x = haka.dissectors.http", 'the dissector "http"'),
    ("haka.rule{on = tcp_connection.events.receive_packet, eval = function() end}", '"receive_packet"'),
    (
        "local ipv4 = require('protocol/ipv4')\nhaka.rule{on = ipv4.events.receive_packet, eval = print}",
        "ipv4",
    ),
    ("haka.rule{on = haka.dissectors.tcp.events.receive_packet, eval = print}", 'tcp event "receive_packet"'),
    ("local g = haka.grammar.new('x')", "haka.grammar"),
    ("local sm = haka.state_machine.new('x')", "haka.state_machine"),
    ("local d = haka.dissector.new{name = 'x'}", "haka.dissector"),
    ("local re = require('regexp/pcre')", 'require("regexp/pcre")'),
    ("local f = function(s) s:setstring('x') end", "stream modification (:setstring)"),
    ("local f = function(i) i:erase(4) end", "stream modification (:erase)"),
    (
        "haka.policy{on = tcp_connection.policies.no_connection_found, action = haka.policy.drop}",
        'tcp_connection policy "no_connection_found"',
    ),
]


@pytest.mark.parametrize(("source", "words"), REFUSED, ids=[w for _, w in REFUSED])
def test_each_unsupported_construct_is_refused_at_load(source: str, words: str, tmp_path: Path) -> None:
    path = tmp_path / "x.lua"
    path.write_text(source + "\n")
    with pytest.raises(RuleLoadError) as e:
        load_module(path)
    assert e.value.path == str(path) and e.value.line is not None
    assert words in e.value.message and "not supported by tcpguard" in e.value.message, e.value.message


def test_every_method_the_table_names_is_defined_in_the_prelude() -> None:
    classes = {"flow": "Flow", "sub": "Sub", "iter": "Iter", "tcp": "Packet"}
    names = " ".join(name for name, _, _ in api.SUPPORTED)
    methods = set(re.findall(r"\b(flow|sub|iter|tcp):(\w+)\(", names))
    assert len(methods) > 20
    for obj, method in sorted(methods):
        assert f"function {classes[obj]}:{method}(" in PRELUDE, f"{obj}:{method}"
    for fn in ("rule", "rule_group", "abort"):
        assert f"function haka.{fn}(" in PRELUDE or f"haka.{fn} = " in PRELUDE
    for fn in ("accept", "drop", "reset", "alert", "log", "set", "range", "outofrange", "ipv4_in_network"):
        assert f"function policy.{fn}(" in PRELUDE or f"policy.{fn} = " in PRELUDE, fn
