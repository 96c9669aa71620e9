"""What of Haka's Lua API tcpguard provides, and what it refuses: one table for the rule guide and the tests.

`tools/gen_rule_docs.py` renders `SUPPORTED` and `UNSUPPORTED` into docs/rules.md's "Lua rules
(Haka-compatible)" part, and tests/lua/test_api_table.py checks each row against the prelude (every
supported name is defined there, every refused one is refused when a rule file uses it), so the guide
cannot promise what the code does not do.
"""

from __future__ import annotations

#: (Haka name, what tcpguard does, how it differs from Haka: empty when it does not).
SUPPORTED: tuple[tuple[str, str, str], ...] = (
    ("require('protocol/ipv4'), require('protocol/tcp'), require('protocol/tcp_connection')",
     "the module tables (`ipv4`, `tcp`, `tcp_connection`); `ipv4` and `tcp_connection` are also globals", ""),
    ("require('_name')", "a helper file `_name.lua` of the rules directory, run once, its return value kept",
     "Haka's require reads Lua's path; here only `_name.lua` files beside the rule file"),
    ("haka.rule{on = ..., eval = ..., options = {streamed = true}, name = ...}",
     "a listener of the event; `hook =` and a top-level `streamed = true` (Haka's older spelling) too",
     "tcpguard's own options: `direction = 'up'|'down'`, `lookback = N`, `ports = {...}` (as `@rule`'s)"),
    ("haka.dissectors.tcp_connection.events.new_connection", "`eval(flow, tcp)` on the client's SYN", ""),
    ("haka.dissectors.tcp_connection.events.receive_data",
     "`eval(flow, current, direction)`: `current` is a vbuffer_sub of the new bytes, or with "
     "`streamed = true` a blocking vbuffer_iterator", ""),
    ("haka.dissectors.tcp_connection.events.end_connection", "`eval(flow)`, once per connection", ""),
    ("flow.srcip, flow.dstip, flow.srcport, flow.dstport",
     "the client's and server's addresses (`ipv4.addr`) and ports", "IPv6 connections too (their addresses "
     "print as IPv6 and match IPv6 networks)"),
    ("flow.<field> = value", "any field a rule sets on the flow, kept until the connection ends", ""),
    ("flow:drop(), flow:reset(), flow:halfreset(), flow:send([direction])",
     "as the Python `flow.drop()` ...", "`reset()` also works before the handshake completes "
     "(Haka asserts it is established)"),
    ("tcp.srcport, tcp.dstport, tcp.seq, tcp.ack_seq, tcp.window_size, tcp.urgent_pointer, tcp.hdr_len, "
     "tcp.flags.<syn|ack|fin|rst|psh|urg|ece|cwr>, tcp.ip.src, tcp.ip.dst, tcp.payload, tcp:drop()",
     "the SYN's fields", ""),
    ("#sub, sub:size(), sub:asstring(), sub:sub(offset[, size]), sub:asnumber([endian]), sub:byte(i), "
     "sub:check_size(n), sub:isflat(), sub:flatten()", "vbuffer_sub reads", ""),
    ("sub:lookback()", "tcpguard: with `options.lookback = N`, the retained bytes before the new ones and "
     "the new ones as one sub, and how many came before", "not in Haka"),
    ("iter:available(), iter:wait(), iter:check_available(n[, nonblocking]), iter:advance(n|'available'|"
     "'all'), iter:sub(n|'available'|'all'), iter:foreach_available(), iter:mark(), iter:unmark(), "
     "iter.meter, iter.iseof",
     "the blocking iterator of a streamed listener: reads that need bytes not yet received suspend the "
     "listener until they arrive or the stream ends",
     "`wait()` returns true while bytes are available, as Haka's own dissectors use it "
     "(`while iter:wait() do`)"),
    ("haka.rule_group{name, on, init, continue, final}, group:rule{eval = ...}",
     "init, then each rule while `continue(ret, ...)` is true, then final when no rule stopped it; a "
     "blocked connection stops the group", ""),
    ("haka.policy{on = haka.dissectors.tcp_connection.policies.new_connection, name, <criteria>, action}",
     "criteria on `srcip`, `dstip`, `srcport`, `dstport`: a value, an `ipv4.network`, "
     "`haka.policy.ipv4_in_network`, `set`, `range`, `outofrange`, `new_criterion`; the last eligible "
     "entry registered decides", ""),
    ("haka.policy.accept, .drop, .reset, .alert{...}, .log(...), lists of them", "policy actions",
     "`reset` is tcpguard's (Haka's tcp_connection has none)"),
    ("haka.alert{description, severity, sources, targets, ...}, haka.alert.address(...), "
     "haka.alert.service(...)", "an alert of tcpguard's (the EVE record), the other keys as its `fields`",
     "only inside a rule call: an alert is about a connection"),
    ("haka.log(...), haka.log.debug/info/warning/error(section, fmt, ...), print(...)",
     "lines of the `tcpguard.rules.lua` logger (at most 2,000 characters each)", ""),
    ("ipv4.addr(...), ipv4.network(...), net:contains(addr)", "addresses and networks",
     "`ipv4.network` also takes IPv6 networks (\"fc00::/7\")"),
    ("haka.abort()", "ends the rule call quietly", ""),
)  # fmt: skip

#: (what a Haka file may use, why tcpguard has none). Used where Haka files use them (a require, an `on =`,
#: a policy at the top level) they fail when the file loads, with its line; stream modification is found
#: in the source at load wherever it is; anything else reached only inside an `eval` fails at that call,
#: as a rule error.
UNSUPPORTED: tuple[tuple[str, str], ...] = (
    ("other dissectors: `require('protocol/http')`, `dns`, `udp`, `haka.dissectors.http` ...",
     "tcpguard hands rules TCP connections only"),
    ("`tcp_connection.events.receive_packet`, `ipv4.events.*`, `tcp.events.*`", "no per-packet events"),
    ("`haka.grammar`, `haka.state_machine`, `haka.dissector`, `flow:select_next_dissector()`",
     "no grammars or dissectors of one's own"),
    ("`require('regexp/pcre')` and other Haka C modules", "no regular expression module: Lua patterns, "
     "bounded (see the sandbox)"),
    ("stream modification: `:insert`, `:erase`, `:replace`, `:setstring`, `:setfixedstring`, "
     "`:setnumber`, `:setbits`, `:restore`",
     "rules inspect and block; the bytes the receiver reads are the bytes rules saw"),
    ("policies other than `tcp_connection.policies.new_connection`", "the engine's tracker decides the rest"),
)  # fmt: skip
