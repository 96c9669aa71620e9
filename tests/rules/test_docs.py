"""docs/rules.md and the configuration table of docs/operator-guide.md are generated from the code by
tools/gen_rule_docs.py; these tests fail when the checked-in files and the code disagree."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

import tcpguard.http
from tcpguard.app.daemon.config import schema_keys

ROOT = Path(__file__).resolve().parents[2]
FIX = "run `python tools/gen_rule_docs.py` and commit the result"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_rule_docs", ROOT / "tools" / "gen_rule_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def outputs() -> dict[Path, str]:
    gen = generator()
    try:
        result: dict[Path, str] = gen.outputs()
    except gen.DocError as e:
        pytest.fail(f"the rule API and its documentation tables disagree: {e}")
    return result


def test_rules_md_is_generated_from_the_code(outputs: dict[Path, str]) -> None:
    path = ROOT / "docs" / "rules.md"
    assert path.read_text(encoding="utf-8") == outputs[path], f"docs/rules.md is out of date: {FIX}"


def test_operator_guide_config_table_is_generated_from_the_config(outputs: dict[Path, str]) -> None:
    path = ROOT / "docs" / "operator-guide.md"
    assert path.read_text(encoding="utf-8") == outputs[path], f"docs/operator-guide.md is out of date: {FIX}"
    text = outputs[path]
    for key in schema_keys():
        assert f"`{key}`" in text, key


def test_reference_covers_the_whole_public_rule_api(outputs: dict[Path, str]) -> None:
    text = outputs[ROOT / "docs" / "rules.md"]
    for name in ("drop", "reset", "halfreset", "send", "alert", "store", "end_reason", "midstream"):
        assert f"`flow.{name}" in text, name
    for name in ("read", "peek", "readline", "find", "skip", "wait", "mark", "unmark", "available"):
        assert f"`current.{name}(" in text, name
    for event in ("new_connection", "receive_data", "end_connection"):
        assert f"`tcp_connection.events.{event}`" in text
    # The flag constants the rule API exports, and the HTTP request reader rules import.
    for flag in ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"):
        assert f"| `{flag}` |" in text, flag
    assert "## Reading HTTP requests: `tcpguard.http`" in text
    for name in tcpguard.http.__all__:
        assert f"`http.{name}" in text, name
    # Every sample module has its section.
    for path in sorted((ROOT / "rules").glob("*.py")):
        assert f"### `rules/{path.name}`" in text


def test_the_guides_link_each_other_and_exist() -> None:
    guide = (ROOT / "docs" / "operator-guide.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([\w.-]+\.md)\)", guide):
        assert (ROOT / "docs" / target).exists(), target
    anchors = set(re.findall(r"\]\(#([\w-]+)\)", guide))
    headings = {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.*)$", guide, flags=re.M)
    }
    assert anchors <= headings, anchors - headings
