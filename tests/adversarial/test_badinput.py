"""Bad input: fuzzed packets through decode and the engine (a short run of tools/fuzz_engine.py; the long
run is `python tools/fuzz_engine.py --count 1000000`), and malformed config and rule files, which must
each give a clear error (`file[:line]: message`, non-zero exit, no traceback) from `tcpguard check`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path
from types import ModuleType

import pytest

from tcpguard.app import cli
from tcpguard.core.rules import RuleSet, rule, tcp_connection
from tcpguard.core.settings import EngineSettings
from tests.core.playbook import Playbook

REPO = Path(__file__).resolve().parents[2]
TCPGUARD = str(Path(sys.executable).parent / "tcpguard")


def fuzz_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_engine", REPO / "tools" / "fuzz_engine.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_engine"] = mod
    spec.loader.exec_module(mod)
    return mod


# ====================================================================== fuzzing
@pytest.mark.parametrize("seed", [7, 8])
def test_fuzz_short_run(seed: int) -> None:
    report = fuzz_tool().run(20_000, seed=seed, check_every=200)
    print(report.summary())
    bad = [f for f in report.failures if f["kind"] != "bound"]  # bounds: see the test below
    assert bad == [], bad[:3]
    assert report.decode_errors > 0 and report.decoded > 0  # both sides of decode were exercised
    assert report.verdicts.get("HOLD", 0) > 0 and report.engine["rewritten"] > 0
    assert report.rss_end_mib - report.rss_after_warmup_mib < 64


def test_packets_held_by_a_rule_mark_respect_max_held_packets() -> None:
    @rule(on=tcp_connection.events.receive_data)
    def hold_all(flow, stream, current, direction):
        current.mark()

    st = EngineSettings()
    st.limits.max_held_packets = 8
    pb = Playbook(RuleSet.of(hold_all), st)
    pb.handshake()
    for i in range(20):
        pb.client("PA", b"x" * 10, token=i)
    assert pb.engine.held_packets <= 8


# ====================================================================== malformed files
def check(args: list[str], cwd: Path, in_process: bool = True) -> subprocess.CompletedProcess[str]:
    """`tcpguard check ARGS`: in this process (fast) or, for cases that may kill the interpreter, as a
    subprocess. Either way the result is (exit status, stdout, stderr)."""
    if not in_process:
        return subprocess.run(
            [TCPGUARD, "check", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
        )
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(["check", *args])
    except Exception:
        err.write(traceback.format_exc())
        rc = 99
    return subprocess.CompletedProcess(["tcpguard", "check", *args], rc, out.getvalue(), err.getvalue())


def clear_error(res: subprocess.CompletedProcess[str], where: str) -> str:
    err = res.stderr + res.stdout
    assert res.returncode == 1, (res.returncode, err)
    assert "Traceback" not in err, err
    assert where in err, err
    return err


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def laughs() -> str:
    lines = ["rules_dir: rules", "a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 15):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*{'a' if i == 1 else f'l{i - 1}'}"] * 10) + "]")
    lines.append("iptables:\n  hooks: *l14")
    return "\n".join(lines) + "\n"


CONFIGS: dict[str, tuple[bytes, str]] = {
    # name: (file content, what the message must contain besides the file name)
    "unclosed-flow": (b"queue:\n  num: [\n", ":3: invalid YAML"),
    "tab-indent": (b"queue:\n\tnum: 1\n", ":2: invalid YAML"),
    "not-utf8": (b"rules_dir: rules\nqueue:\n  num: \xff\xfe\n", "cannot read"),
    "binary": (b"\x00\x01\x02\x03binary", ":1: invalid YAML"),
    "top-level-list": (b"- a\n- b\n", ":1: expected a mapping"),
    "duplicate-key": (b"rules_dir: rules\nqueue:\n  num: 1\n  num: 2\n", ":4: queue.num: duplicate key"),
    "unknown-key": (
        b"rules_dir: rules\nqeueu:\n  num: 1\n",
        ":2: qeueu: unknown key (did you mean 'queue'?)",
    ),
    "wrong-type": (b"rules_dir: rules\nqueue:\n  num: zero\n", ":3: queue.num: expected"),
    "out-of-range": (b"rules_dir: rules\nqueue:\n  copy_range: 70000\n", ":3: queue.copy_range"),
    "bad-policy": (
        b"rules_dir: rules\nengine:\n  policies:\n    limit: maybe\n",
        ":4: engine.policies.limit",
    ),
    "negative-timeout": (
        b"rules_dir: rules\nengine:\n  timeouts:\n    closed: -1\n",
        ":4: engine.timeouts.closed",
    ),
    "billion-laughs": (laughs().encode(), ": iptables.hooks[0]: expected one of"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_malformed_config_gives_a_clear_error(tmp_path: Path, name: str) -> None:
    content, message = CONFIGS[name]
    (tmp_path / "rules").mkdir()
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    start = time.monotonic()
    err = clear_error(check(["--config", str(path)], tmp_path), str(path))
    assert message in err, err
    assert time.monotonic() - start < 20


def test_config_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "conf.yaml").mkdir()
    clear_error(check(["--config", str(tmp_path / "conf.yaml")], tmp_path), "cannot read")


def test_deeply_nested_config_value(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("rules_dir: rules\nqueue:\n  num: " + nested(5000) + "\n")
    (tmp_path / "rules").mkdir()
    clear_error(check(["--config", str(path)], tmp_path), str(path))


RULES: dict[str, tuple[bytes, str]] = {
    "syntax-error": (b"from tcpguard import rule\ndef f(:\n", "m.py:2: syntax error"),
    "null-byte": (b"x = 1\n\x00\n", "m.py: syntax error: source code string cannot contain null bytes"),
    "not-utf8": (b"# \xe9\nx = 1\n", "m.py: cannot read"),
    "bom": (b"\xef\xbb\xbfx = 1\n", "m.py:1: syntax error"),
    "missing-import": (b"import does_not_exist_xyz\n", "m.py:1: ModuleNotFoundError"),
    "raises-at-import": (b"x = 1\nraise RuntimeError('no')\n", "m.py:2: RuntimeError: no"),
    "unknown-event": (
        b"from tcpguard import rule\n@rule(on='nope')\ndef f(flow): pass\n",
        "m.py:2: ValueError",
    ),
    "streamed-new-connection": (
        b"from tcpguard import rule, tcp_connection\n"
        b"@rule(on=tcp_connection.events.new_connection, streamed=True)\ndef f(flow, tcp): pass\n",
        "m.py:2: ValueError: streamed=True is only meaningful for receive_data",
    ),
    "infinite-recursion": (b"def f():\n    return f()\nf()\n", "RecursionError"),
    "too-deep": (b"x = " + b"(" * 1000 + b")" * 1000 + b"\n", "m.py:1: syntax error"),
}


@pytest.mark.parametrize("name", list(RULES))
def test_malformed_rule_module_gives_a_clear_error(tmp_path: Path, name: str) -> None:
    content, message = RULES[name]
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "m.py").write_bytes(content)
    err = clear_error(check(["--rules", str(rules)], tmp_path), str(rules / "m.py"))
    assert message in err, err


def test_duplicate_rule_names_across_modules(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    body = (
        "from tcpguard import rule, tcp_connection\n"
        "@rule(on=tcp_connection.events.new_connection, name='x')\n"
        "def f(flow, tcp): pass\n"
    )
    (rules / "a.py").write_text(body)
    (rules / "b.py").write_text(body)
    err = clear_error(check(["--rules", str(rules)], tmp_path), str(rules / "b.py"))
    assert "already used in" in err


@pytest.mark.parametrize("exc", ["SystemExit('bye')", "KeyboardInterrupt()"])
def test_rule_module_that_exits_at_import(tmp_path: Path, exc: str) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "m.py").write_text(
        textwrap.dedent(f"""\
        x = 1
        raise {exc}
        """)
    )
    err = clear_error(check(["--rules", str(rules)], tmp_path, in_process=False), str(rules / "m.py"))
    assert "m.py:2:" in err
