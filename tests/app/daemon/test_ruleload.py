"""Loading rule modules: all or nothing, errors that name the file and line, unsafe files refused."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tcpguard.app.daemon import ruleload
from tcpguard.app.daemon.ruleload import TRIAL_GRACE, RuleTrial, load_rules, load_rules_bounded
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
        "from tcpguard import rule\n\n@rule(on='end_connection', name='a.first')\ndef dup(flow): pass\n",
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
    rs = load_rules(Path(__file__).resolve().parents[3] / "rules")
    assert len(rs) >= 3


# ------------------------------------------------------------------ bounded in time (issue 18, section 1)

LOOPS = "from tcpguard import rule\n\nx = 1\nwhile True:\n    pass\n"


def test_a_module_that_never_finishes_loading_fails_with_its_file_and_line(tmp_path: Path) -> None:
    write(tmp_path, "a.py", GOOD)
    bad = write(tmp_path, "b.py", LOOPS)
    t0 = time.monotonic()
    with pytest.raises(RuleLoadError) as e:
        load_rules_bounded(tmp_path, 0.5)
    assert time.monotonic() - t0 < 0.5 + TRIAL_GRACE
    assert str(e.value) == f"{bad}:4: did not finish loading within 0.5 s"


def test_a_blocking_call_at_import_is_bounded_too(tmp_path: Path) -> None:
    bad = write(tmp_path, "a.py", "import time\n\ntime.sleep(3600)\n")
    with pytest.raises(RuleLoadError) as e:
        load_rules_bounded(tmp_path, 0.5)
    assert str(e.value) == f"{bad}:3: did not finish loading within 0.5 s"


def test_a_module_that_swallows_the_interruption_is_interrupted_again(tmp_path: Path) -> None:
    bad = write(
        tmp_path,
        "a.py",
        "while True:\n    try:\n        while True:\n            pass\n"
        "    except BaseException:\n        pass\n",
    )
    with pytest.raises(RuleLoadError) as e:
        load_rules_bounded(tmp_path, 0.5)
    assert e.value.path == str(bad) and "did not finish loading within 0.5 s" in e.value.message


def test_a_module_deaf_to_signals_is_killed_by_the_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SIGALRM blocked, then a sleep: the child's own timer never fires, only the parent's kill ends it.
    monkeypatch.setattr(ruleload, "TRIAL_GRACE", 0.5)
    bad = write(
        tmp_path,
        "a.py",
        "import signal, time\nsignal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\ntime.sleep(3600)\n",
    )
    t0 = time.monotonic()
    trial = RuleTrial(tmp_path, 0.5)
    result = trial.wait()
    assert time.monotonic() - t0 < 5
    assert result.error is not None and result.error.path == str(bad)
    assert "did not finish loading within 0.5 s (stopped by the parent)" in result.error.message
    with pytest.raises(ChildProcessError):
        os.waitpid(trial.pid, os.WNOHANG)  # reaped, not left a zombie


def test_a_module_that_only_hangs_in_the_second_load_is_stopped_there(tmp_path: Path) -> None:
    # The trial imports it once (it leaves a marker), the real load a second time (it loops): the
    # in-process timer is what stops it.
    marker = tmp_path / "marker"
    rules = tmp_path / "rules"
    rules.mkdir()
    bad = write(
        rules,
        "a.py",
        f"import os\nif os.path.exists({str(marker)!r}):\n    while True:\n        pass\n"
        f"open({str(marker)!r}, 'w').close()\n",
    )
    with pytest.raises(RuleLoadError) as e:
        load_rules_bounded(rules, 0.5)
    assert marker.exists()
    assert str(e.value) == f"{bad}:3: did not finish loading within 0.5 s"


def test_the_trial_reports_errors_as_the_load_does(tmp_path: Path) -> None:
    bad = write(tmp_path, "b.py", "from tcpguard import rule\n\ndef broken(:\n    pass\n")
    result = RuleTrial(tmp_path, 5).wait()
    assert result.error is not None and str(result.error) == f"{bad}:3: syntax error: invalid syntax"
    write(tmp_path, "b.py", GOOD)
    result = RuleTrial(tmp_path, 5).wait()
    assert result.error is None and result.rules == 2


def test_polling_a_trial_does_not_wait_for_it(tmp_path: Path) -> None:
    write(tmp_path, "a.py", "import time\ntime.sleep(2)\n")
    trial = RuleTrial(tmp_path, 5)
    t0 = time.monotonic()
    assert trial.poll() is None
    assert time.monotonic() - t0 < 0.1
    trial.cancel()
    assert trial.result is not None and trial.result.error is not None
    with pytest.raises(ChildProcessError):
        os.waitpid(trial.pid, os.WNOHANG)


@pytest.mark.parametrize(
    ("event", "params", "expected"),
    [
        ("new_connection", "flow", "cannot be called as new_connection(flow, tcp)"),
        ("receive_data", "flow, stream", "as receive_data(flow, stream, current, direction)"),
        ("end_connection", "flow, reason", "cannot be called as end_connection(flow)"),
        ("end_connection", "flow, *, how", "cannot be called as end_connection(flow)"),
    ],
)
def test_a_listener_that_cannot_take_its_events_arguments_is_refused(
    tmp_path: Path, event: str, params: str, expected: str
) -> None:
    bad = write(
        tmp_path,
        "a.py",
        f"from tcpguard import rule, tcp_connection\n\n@rule(on='{event}')\ndef wrong({params}):\n    pass\n",
    )
    with pytest.raises(RuleLoadError) as e:
        load_rules(tmp_path)
    assert e.value.path == str(bad) and e.value.line == 3  # where the listener is declared: its @rule
    assert f"listener a.wrong({params})" in e.value.message and expected in e.value.message


def test_listeners_with_defaults_or_star_args_are_accepted(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.py",
        "from tcpguard import rule, tcp_connection\n\n"
        "@rule(on='new_connection')\ndef a(flow, tcp, extra=1):\n    pass\n\n"
        "@rule(on='receive_data')\ndef b(*args):\n    pass\n\n"
        "@rule(on='end_connection')\ndef c(flow, **kw):\n    pass\n",
    )
    assert load_rules(tmp_path).names() == ["a.a", "a.b", "a.c"]
