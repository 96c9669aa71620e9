"""Loading rule modules: all or nothing, errors that name the file and line, unsafe files refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tcpguard.app.ruleload import load_rules
from tcpguard.core.errors import RuleLoadError
from tcpguard.core.rules import EventName

GOOD = """
from tcpguard import rule, tcp_connection

@rule(on=tcp_connection.events.new_connection)
def first(flow, tcp):
    pass

@rule(on=tcp_connection.events.receive_data, streamed=True)
def second(flow, stream, current, direction):
    pass
"""


def write(d: Path, name: str, text: str) -> Path:
    p = d / name
    p.write_text(text)
    p.chmod(0o644)
    return p


def test_loads_every_module_in_name_order(tmp_path: Path) -> None:
    write(tmp_path, "b_second.py", GOOD.replace("first", "third").replace("second", "fourth"))
    write(tmp_path, "a_first.py", GOOD)
    write(tmp_path, "_helper.py", "raise RuntimeError('never loaded: starts with _')")
    write(tmp_path, "notes.txt", "not a module")
    rs = load_rules(tmp_path)
    assert rs.names() == ["a_first.first", "a_first.second", "b_second.third", "b_second.fourth"]
    assert [r.event for r in rs.new_connection] == [EventName.NEW_CONNECTION] * 2
    assert len(rs.streamed) == 2 and rs.receive_data == ()


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path, "a.py", GOOD)
    bad = write(tmp_path, "b.py", "from tcpguard import rule\n\ndef broken(:\n    pass\n")
    with pytest.raises(RuleLoadError) as e:
        load_rules(tmp_path)
    assert e.value.path == str(bad) and e.value.line == 3
    assert str(e.value).startswith(f"{bad}:3: syntax error")


def test_error_while_importing_names_the_line(tmp_path: Path) -> None:
    bad = write(tmp_path, "a.py", GOOD + "\n\nx = {}['missing']\n")
    with pytest.raises(RuleLoadError) as e:
        load_rules(tmp_path)
    assert e.value.line == GOOD.count("\n") + 3
    assert "KeyError" in e.value.message and e.value.path == str(bad)


def test_unknown_event_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, "a.py", "from tcpguard import rule\n@rule(on='receive_packet')\ndef f(flow): pass\n")
    with pytest.raises(RuleLoadError, match=r"a.py:2: ValueError: unknown event 'receive_packet'"):
        load_rules(tmp_path)


def test_duplicate_rule_names_are_an_error(tmp_path: Path) -> None:
    write(tmp_path, "a.py", GOOD)
    write(
        tmp_path,
        "b.py",
        GOOD.replace("def second", "@rule(on=tcp_connection.events.end_connection)\ndef first2").replace(
            "first2", "x"
        )
        + "\n@rule(on='end_connection', name='a.first')\ndef dup(flow): pass\n",
    )
    with pytest.raises(RuleLoadError, match="already used"):
        load_rules(tmp_path)


def test_world_writable_rule_file_is_refused(tmp_path: Path) -> None:
    p = write(tmp_path, "a.py", GOOD)
    p.chmod(0o666)
    with pytest.raises(RuleLoadError, match="writable by other users"):
        load_rules(tmp_path)


def test_world_writable_directory_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "rules"
    d.mkdir()
    write(d, "a.py", GOOD)
    d.chmod(0o777)
    with pytest.raises(RuleLoadError, match="writable by other users"):
        load_rules(d)


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership check applies when tcpguard runs as root")
def test_rule_file_owned_and_writable_by_another_user_is_refused_as_root(tmp_path: Path) -> None:
    p = write(tmp_path, "a.py", GOOD)
    os.chown(p, 1234, 1234)
    with pytest.raises(RuleLoadError, match="owned by uid 1234"):
        load_rules(tmp_path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(RuleLoadError, match="does not exist"):
        load_rules(tmp_path / "nope")


def test_shipped_sample_rules_load() -> None:
    rs = load_rules(Path(__file__).resolve().parents[2] / "rules")
    assert len(rs) >= 3
