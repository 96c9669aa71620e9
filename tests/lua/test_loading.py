"""Lua rule files go through every path Python modules do: the bounded trial load in a child
interpreter (`tcpguard check`, start, reload), all-or-nothing with the Python modules of the same
directory, and `tcpguard cost`, which reports their rules like Python ones."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tcpguard.app.daemon.ruleload import RuleTrial, load_rules, load_rules_bounded, rule_files
from tcpguard.app.offline.cost import measure, read_frames
from tcpguard.core.errors import RuleLoadError
from tests.lua.traffic import bench_capture

ROOT = Path(__file__).resolve().parents[2]
TCPGUARD = str(Path(sys.executable).parent / "tcpguard")


def mixed_dir(tmp: Path) -> Path:
    d = tmp / "rules"
    d.mkdir()
    shutil.copyfile(ROOT / "rules" / "badflags.py", d / "badflags.py")
    shutil.copyfile(ROOT / "rules" / "lua" / "firewall.lua", d / "firewall.lua")
    shutil.copyfile(ROOT / "rules" / "lua" / "shellcode.lua", d / "shellcode.lua")
    (d / "_helper.lua").write_text("return {}\n")
    return d


def test_rule_files_take_lua_files_but_not_helpers(tmp_path: Path) -> None:
    d = mixed_dir(tmp_path)
    assert [p.name for p in rule_files(d)] == ["badflags.py", "firewall.lua", "shellcode.lua"]
    names = load_rules(d).names()
    assert "firewall.allow_list" in names and "shellcode.no_shellcode" in names
    assert any(n.startswith("badflags.") for n in names)


def test_the_default_rules_directory_loads_no_lua_file() -> None:
    # The twins live in rules/lua, a folder the loader does not read: the default set is unchanged.
    assert all(p.suffix == ".py" for p in rule_files(ROOT / "rules"))


def test_the_trial_child_loads_lua_files(tmp_path: Path) -> None:
    result = RuleTrial(mixed_dir(tmp_path), 10.0).wait()
    assert result.error is None and result.rules == len(load_rules(tmp_path / "rules"))


def test_a_broken_lua_file_refuses_the_whole_set_in_the_trial(tmp_path: Path) -> None:
    d = mixed_dir(tmp_path)
    (d / "zz_broken.lua").write_text("haka.rule{\n  on = 42,\n  eval = function() end\n}\n")
    result = RuleTrial(d, 10.0).wait()
    assert result.error is not None
    assert (result.error.path, result.error.line) == (str(d / "zz_broken.lua"), 1)
    assert "'on' is not an event of tcp_connection" in result.error.message
    with pytest.raises(RuleLoadError):
        load_rules_bounded(d, 10.0)


def test_a_rule_name_used_by_a_python_module_and_a_lua_file_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "rules"
    d.mkdir()
    shutil.copyfile(ROOT / "rules" / "firewall.py", d / "firewall.py")
    shutil.copyfile(ROOT / "rules" / "lua" / "firewall.lua", d / "firewall.lua")
    with pytest.raises(RuleLoadError) as e:
        load_rules(d)
    assert "rule name 'firewall.allow_list' already used" in e.value.message


def check(d: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TCPGUARD, "check", "--rules", str(d)], capture_output=True, text=True, timeout=60, check=False
    )


def test_tcpguard_check_lists_lua_rules(tmp_path: Path) -> None:
    d = mixed_dir(tmp_path)
    res = check(d)
    assert res.returncode == 0, res.stderr
    assert "firewall.allow_list" in res.stdout and "shellcode.no_shellcode" in res.stdout
    (d / "zz_bad.lua").write_text("local x = \n")
    res = check(d)
    assert res.returncode == 1 and f"{d / 'zz_bad.lua'}:2:" in res.stderr


def test_cost_reports_lua_rules_like_python_ones(tmp_path: Path) -> None:
    d = mixed_dir(tmp_path)
    frames, _ = read_frames(bench_capture(tmp_path / "c.pcap", 60), 10_000)
    rows = measure(frames, lambda: load_rules(d), repeat=1)
    by_label = {r.label: r for r in rows}
    fw, sc = by_label["firewall.allow_list"], by_label["shellcode.no_shellcode"]
    assert fw.listens == "lua, new_connection" and fw.alerts > 0 and fw.dropped > 0
    assert sc.listens == "lua, receive_data, up, lookback 31" and sc.alerts == 3
    assert fw.rule_errors == sc.rule_errors == 0
