"""The names rule modules import: the flag constants the rule API exports, and what the sample rules and
the rules' HTTP library (tcpguard.http) are allowed to import."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import tcpguard
from tcpguard.core import packet

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in `path`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, "." * node.level + (node.module or "")))
    return out


@pytest.mark.parametrize("name", FLAGS)
def test_the_rule_api_exports_each_tcp_flag_with_the_decoders_value(name: str) -> None:
    assert name in tcpguard.__all__
    assert getattr(tcpguard, name) == getattr(packet, name)
    assert getattr(tcpguard, name) == 1 << FLAGS.index(name)  # RFC 9293's bit order: FIN is bit 0


def test_no_sample_rule_defines_its_own_flag_constants() -> None:
    for path in sorted((ROOT / "rules").glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            names = {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
            assert not names & set(FLAGS), f"{path.name}:{node.lineno} defines {sorted(names & set(FLAGS))}"


def test_the_rules_libraries_import_only_the_standard_library() -> None:
    for lib in ("http.py", "tls.py"):
        for line, module in imports(ROOT / "tcpguard" / lib):
            top = module.split(".")[0]
            ok = module == "__future__" or top in sys.stdlib_module_names
            assert ok, f"tcpguard/{lib}:{line}: {module}"


def test_sample_rules_import_only_the_public_rule_api_and_the_standard_library() -> None:
    public = {"tcpguard", "tcpguard.http", "tcpguard.tls"}
    for path in sorted((ROOT / "rules").glob("*.py")):
        for line, module in imports(path):
            ok = module in public or module.split(".")[0] in sys.stdlib_module_names
            assert ok, f"rules/{path.name}:{line} imports {module}"
