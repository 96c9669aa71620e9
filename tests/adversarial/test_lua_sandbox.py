"""Lua rule files cannot leave their sandbox, loop, or eat the gateway's memory (issue 22).

Each case is a small Lua rule file loaded by the daemon's loader and played through a real Engine. An
escape attempt must fail inside the rule (a rule error with the file and line, the rule-error policy
applied to that connection) and never reach a file, a process, the network or a Python object; a loop
must be stopped by the instruction budget, however it hides (pcall, coroutines, metamethods, C
callbacks); memory must stop at the cap. After each, the next connection is handled normally."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tcpguard.app.daemon.ruleload import load_module, load_rules
from tcpguard.core.errors import RuleLoadError
from tcpguard.core.rules import RuleSet
from tests.rules.samples import ACCEPT, DROP, actions, alerts, playbook

ON_CONNECT = """haka.rule{{
  name = "probe",
  on = haka.dissectors.tcp_connection.events.new_connection,
  eval = function (flow, pkt)
    {body}
    haka.alert{{description = "escaped", severity = "high"}}
  end
}}
"""


def rules_of(tmp: Path, body: str, name: str = "probe") -> RuleSet:
    path = tmp / f"{name}.lua"
    path.write_text(ON_CONNECT.format(body=body))
    return RuleSet(load_module(path))


def errors(pb: object) -> list[str]:
    return [e["error"] for e in pb.names("rule_error")]  # type: ignore[attr-defined]


def probe(rs: RuleSet, port: int = 80) -> tuple[object, list[str]]:
    pb = playbook(rs, sport=port)
    verdict = pb.client("S").verdict
    assert alerts(pb) == [], "the rule went on past its escape attempt"
    assert verdict == DROP and actions(pb) == ["reset"], "the rule-error policy (reset) was not applied"
    return pb, errors(pb)


# ---------------------------------------------------------------------------- no way out


ESCAPES = {
    "io": ('io.open("/etc/passwd")', "global 'io'"),
    "os.execute": ('os.execute("id")', "field 'execute'"),
    "os.getenv": ('os.getenv("HOME")', "field 'getenv'"),
    "os.exit": ("os.exit(1)", "field 'exit'"),
    "os.remove": ('os.remove("/tmp/x")', "field 'remove'"),
    "load": ('load("return 1")()', "global 'load'"),
    "loadstring": ('loadstring("return 1")()', "global 'loadstring'"),
    "dofile": ('dofile("/etc/passwd")', "global 'dofile'"),
    "loadfile": ('loadfile("/etc/passwd")', "global 'loadfile'"),
    "string.dump": ("string.dump(print)", "field 'dump'"),
    "dump via a string's methods": ('("").dump(print)', "field 'dump'"),
    "the string metatable": ('getmetatable("").__index.rep = nil', "index a nil value"),
    "debug": ("debug.sethook()", "global 'debug'"),
    "package.loadlib": ('package.loadlib("libc.so.6", "system")', "global 'package'"),
    "collectgarbage": ('collectgarbage("stop")', "global 'collectgarbage'"),
    "lupa's python module": ('python.eval("1")', "global 'python'"),
    "_G": ('assert(rawget(_G, "io"), "no io in _G")', "no io in _G"),
    "_ENV": ('_ENV.io.open("/etc/passwd")', "global 'io'"),
    "require io": ('require("io")', 'require("io")'),
    "require debug": ('require("debug")', 'require("debug")'),
    "require python": ('require("python")', 'require("python")'),
    "require a path": ('require("../../etc/passwd")', 'require("../../etc/passwd")'),
    "require an absolute path": ('require("/etc/passwd")', 'require("/etc/passwd")'),
    "a __gc finalizer": ("setmetatable({}, {__gc = function() end})", "__gc finalizers are not allowed"),
    "a coroutine's os": ("coroutine.wrap(function() os.exit(1) end)()", "field 'exit'"),
    "haka internals": ("haka.dissector.new{}", "haka.dissector is not supported"),
}


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_escape_attempts_fail_inside_the_rule(case: str, tmp_path: Path) -> None:
    body, words = ESCAPES[case]
    _, errs = probe(rules_of(tmp_path, body))
    (err,) = errs
    assert err.startswith("LuaRuleError: probe.lua:5: ") and words in err, err


def test_a_flow_table_holds_no_python_object(tmp_path: Path) -> None:
    body = """
    for k, v in pairs(flow) do assert(type(v) ~= "userdata", "a Python object in the flow") end
    for k, v in pairs(pkt) do assert(type(v) ~= "userdata", "a Python object in the packet") end
    error("clean")"""
    _, errs = probe(rules_of(tmp_path, body))
    assert errs == ["LuaRuleError: probe.lua:8: clean"]


def test_the_cursor_behind_a_streamed_iterator_gives_nothing_of_python(tmp_path: Path) -> None:
    path = tmp_path / "cursor.lua"
    path.write_text(
        """haka.rule{
  on = haka.dissectors.tcp_connection.events.receive_data,
  options = {streamed = true},
  eval = function (flow, iter, direction)
    local cur
    for k, v in pairs(iter) do if type(v) == "userdata" then cur = v end end
    local tries = {
      function () return cur.__class__ end,
      function () return cur.stream.buf end,
      function () return cur.stream.__dict__ end,
      function () cur.pos = 0 end,
      function () return cur.mark.__self__ end,
      function () return cur.__init__.__globals__ end,
    }
    local refused = 0
    for _, f in ipairs(tries) do
      local ok, err = pcall(f)
      if not ok and tostring(err):find("not available to Lua rules", 1, true) then refused = refused + 1 end
    end
    haka.alert{description = refused .. " of " .. #tries .. " refused", severity = "info"}
  end
}
"""
    )
    pb = playbook(RuleSet(load_module(path)))
    pb.handshake()
    assert pb.client("PA", b"data").verdict == ACCEPT
    assert alerts(pb) == ["6 of 6 refused"]


def test_a_flow_kept_from_another_connection_cannot_act_on_it(tmp_path: Path) -> None:
    rs = rules_of(
        tmp_path,
        """if flow.dstport == 80 then KEPT = flow return end
    KEPT:drop()""",
    )
    first = playbook(rs, sport=80)
    assert first.client("S").verdict == ACCEPT and errors(first) == []
    second = playbook(rs, sport=81)
    assert second.client("S").verdict == DROP
    (err,) = errors(second)
    assert "not the connection of the rule call running now" in err
    assert actions(second) == ["reset"]  # the rule-error policy, not the kept flow's drop


# ---------------------------------------------------------------------------- no endless loop


LOOPS = {
    "a plain loop": "while true do end",
    "a loop that swallows the budget error": "while true do pcall(function() while true do end end) end",
    "a loop in a coroutine": "coroutine.wrap(function() while true do end end)()",
    "many short coroutines": "while true do coroutine.wrap(function() for i = 1, 900 do end end)() end",
    "a loop in a gsub callback": 'string.gsub(string.rep("a", 100), "a", function() while true do end end)',
    "a loop in __index": (
        "local t = setmetatable({}, {__index = function() while true do end end}) local x = t.x"
    ),
    "a loop in a table.sort comparator": (
        "local t = {3, 2, 1} table.sort(t, function(a, b) while true do end end)"
    ),
    "recursion": "local function f() return 1 + f() end f()",
}


@pytest.mark.parametrize("case", sorted(LOOPS))
def test_loops_are_stopped_by_the_instruction_budget(case: str, tmp_path: Path) -> None:
    rs = rules_of(tmp_path, LOOPS[case])
    started = time.monotonic()
    _, errs = probe(rs)
    (err,) = errs
    # Deep recursion meets the stack's limit or the memory cap before the budget.
    assert any(w in err for w in ("instruction budget exceeded", "stack overflow", "not enough memory")), err
    assert time.monotonic() - started < 30, "the budget did not stop the loop promptly"
    # The state is usable afterwards: the next connection's call runs (and fails the same way).
    _, again = probe(rs, port=81)
    assert len(again) == 1


def test_an_error_object_that_loops_in_tostring_is_not_run(tmp_path: Path) -> None:
    rs = rules_of(tmp_path, "error(setmetatable({}, {__tostring = function() while true do end end}))")
    _, errs = probe(rs)
    assert errs == ["LuaRuleError: error object of type table"]


def test_a_streamed_rule_that_loops_is_stopped(tmp_path: Path) -> None:
    path = tmp_path / "spin.lua"
    path.write_text(
        """haka.rule{
  on = haka.dissectors.tcp_connection.events.receive_data,
  options = {streamed = true},
  eval = function (flow, iter, direction)
    iter:wait()
    while true do end
  end
}
"""
    )
    pb = playbook(RuleSet(load_module(path)))
    pb.handshake()
    assert pb.client("PA", b"go").verdict == DROP
    (err,) = errors(pb)
    assert "spin.lua:6: instruction budget exceeded" in err
    assert actions(pb) == ["reset"]


def test_a_file_that_loops_at_load_is_refused_and_nothing_loads(tmp_path: Path) -> None:
    (tmp_path / "a_fine.lua").write_text(ON_CONNECT.format(body="return"))
    (tmp_path / "b_spin.lua").write_text("local n = 0\nwhile true do n = n + 1 end\n")
    with pytest.raises(RuleLoadError) as e:
        load_rules(tmp_path, budget=30)
    assert e.value.path == str(tmp_path / "b_spin.lua")
    assert e.value.line == 2 and "instruction budget exceeded" in e.value.message


# ---------------------------------------------------------------------------- bounded memory and C work


MEMORY = {
    "doubling a string": 'local s = "x" for i = 1, 40 do s = s .. s end',
    "string.rep": 'local s = string.rep("abcdefgh", 1 << 24)',
    "a table of strings": "local t = {} for i = 1, 100 do t[i] = string.rep(tostring(i), 1 << 20) end",
}


@pytest.mark.parametrize("case", sorted(MEMORY))
def test_memory_stops_at_the_cap(case: str, tmp_path: Path) -> None:
    _, errs = probe(rules_of(tmp_path, MEMORY[case]))
    (err,) = errs
    assert "not enough memory" in err or "LuaMemoryError" in err, err


def test_memory_kept_between_calls_hits_the_cap_and_the_gateway_goes_on(tmp_path: Path) -> None:
    hog = rules_of(tmp_path, 'HOARD = HOARD or {} HOARD[#HOARD + 1] = string.rep("x", 4 << 20)', "hog")
    failed = 0
    for port in range(1, 40):
        pb = playbook(hog, sport=port)
        pb.client("S")
        failed += len(errors(pb))
    assert failed > 0  # past the cap every call fails: the flows get the rule-error policy
    # A second file has its own state and cap: it still runs.
    other = rules_of(tmp_path, "error('ran')", "other")
    _, errs = probe(other)
    assert errs == ["LuaRuleError: other.lua:5: ran"]


C_WORK = {
    "an empty string repeated 10^15 times": ('string.rep("", 10^15 // 1)', "repetitions is more than"),
    "a backtracking pattern": (
        'string.find(string.rep("a", 5000), ".-.-.-.-.-b")',
        "quantifiers: too costly",
    ),
    "a backtracking pattern as a method": (
        'local s = string.rep("a", 5000) s:match("(.-)(.-)(.-)b")',
        "quantifiers: too costly",
    ),
    "gsub with a backtracking pattern": (
        'string.gsub(string.rep("a", 3000), "a*a*a*a*b", "")',
        "quantifiers: too costly",
    ),
}


@pytest.mark.parametrize("case", sorted(C_WORK))
def test_work_in_c_that_no_hook_sees_is_refused_up_front(case: str, tmp_path: Path) -> None:
    body, words = C_WORK[case]
    started = time.monotonic()
    _, errs = probe(rules_of(tmp_path, body))
    (err,) = errs
    assert words in err, err
    assert time.monotonic() - started < 30


def test_a_plain_find_and_a_simple_pattern_on_a_large_subject_are_allowed(tmp_path: Path) -> None:
    body = """local s = string.rep("a", 1 << 20) .. "b"
    assert(string.find(s, "ab", 1, true) == (1 << 20))
    assert(s:find("a*b") == 1)
    error("fine")"""
    _, errs = probe(rules_of(tmp_path, body))
    assert errs == ["LuaRuleError: probe.lua:8: fine"]


# ---------------------------------------------------------------------------- helper files


def test_require_reads_only_helper_files_of_the_rules_directory(tmp_path: Path) -> None:
    (tmp_path / "_names.lua").write_text("return {blocked = 81}\n")
    rs = rules_of(
        tmp_path, 'local n = require("_names") if flow.dstport == n.blocked then flow:drop() end return'
    )
    pb = playbook(rs, sport=81)
    assert pb.client("S").verdict == DROP and errors(pb) == [] and actions(pb) == ["drop"]
    # The helper is not a rule file of its own.
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["_names.lua", "probe.lua"]
    assert len(load_rules(tmp_path)) == 1


def test_a_helper_file_is_checked_like_a_rule_file(tmp_path: Path) -> None:
    helper = tmp_path / "_h.lua"
    helper.write_text("return {}\n")
    os.chmod(helper, 0o666)
    rs = rules_of(tmp_path, 'require("_h") return')
    pb = playbook(rs)
    pb.client("S")
    (err,) = errors(pb)
    assert "writable by other users" in err
