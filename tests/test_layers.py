"""Who may import whom (docs/ARCHITECTURE.md), checked on the source of every module.

* the core (`tcpguard.core`) imports the standard library, greenlet and itself: no adapter, no
  application, no socket, and no logging (it returns typed events, the application logs them);
* the adapters (`tcpguard.io`) import the standard library, NetfilterQueue, each other and, of the core,
  only the decision types they translate;
* nothing imports the command line (`tcpguard.app.cli`): it only parses and dispatches;
* rule modules (`rules/`) import the standard library and the public rule API (`tcpguard`, and the
  rules' libraries `tcpguard.http` and `tcpguard.tls`), nothing of the implementation.

Every import counts, also those inside functions and under `TYPE_CHECKING`: a lazy import is still a
dependency a reader has to follow.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in the file; relative imports resolved against its package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            yield node.lineno, mod
            for alias in node.names:  # `from tcpguard.core import forge` imports tcpguard.core.forge
                sub = ROOT.joinpath(*mod.split("."), alias.name)
                if sub.with_suffix(".py").exists() or (sub / "__init__.py").exists():
                    yield node.lineno, f"{mod}.{alias.name}"


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def top(name: str) -> str:
    return name.split(".", maxsplit=1)[0]


def offences(folder: str, allowed: tuple[str, ...], third_party: set[str]) -> list[str]:
    """Imports in `folder` of tcpguard modules outside `allowed` (prefixes) or of unknown packages."""
    out = []
    for path in modules(folder):
        for line, mod in imports(path):
            if (
                top(mod) in STDLIB
                or top(mod) in third_party
                or mod == "__future__"
                or mod.startswith("__future__.")
            ):
                continue
            if top(mod) == "tcpguard":
                if mod == "tcpguard" or any(mod == a or mod.startswith(a + ".") for a in allowed):
                    continue
                # `from tcpguard.core import forge` names the module tcpguard.core.forge (allowed) but
                # also yields the package tcpguard.core itself: a package of an allowed module is fine.
                if any(a.startswith(mod + ".") for a in allowed):
                    continue
            out.append(f"{path.relative_to(ROOT)}:{line}: {mod}")
    return out


def test_the_core_imports_only_itself_the_standard_library_and_greenlet() -> None:
    assert offences("tcpguard/core", ("tcpguard.core",), {"greenlet"}) == []


def test_the_core_opens_no_socket() -> None:
    found = [
        f"{p.relative_to(ROOT)}:{line}: {mod}"
        for p in modules("tcpguard/core")
        for line, mod in imports(p)
        if top(mod) in {"socket", "select", "selectors", "subprocess", "threading"}
    ]
    assert found == []


def test_the_core_does_not_log() -> None:
    # It returns typed events (tcpguard.core.events); the application logs them (tcpguard.app.eventlog).
    found = [
        f"{p.relative_to(ROOT)}:{line}: {mod}"
        for p in modules("tcpguard/core")
        for line, mod in imports(p)
        if top(mod) == "logging"
    ]
    assert found == []


def test_adapters_import_only_the_core_decision_types() -> None:
    assert offences("tcpguard/io", ("tcpguard.io", "tcpguard.core.decision"), {"netfilterqueue"}) == []


def test_the_lua_front_end_imports_only_the_core_lupa_and_greenlet() -> None:
    # A rule-language front end: it turns Lua rule files into the core's Rule objects, whose listeners
    # the dispatch calls; the rule loader of the application is its one user (and the rule guide's
    # generator, which documents it).
    assert offences("tcpguard/lua", ("tcpguard.lua", "tcpguard.core"), {"lupa", "greenlet"}) == []
    users_allowed = {ROOT / "tcpguard/app/daemon/ruleload.py", ROOT / "tools/gen_rule_docs.py"}
    users = [
        f"{p.relative_to(ROOT)}:{line}: {mod}"
        for folder in ("tcpguard", "tools", "rules")
        for p in modules(folder)
        if not p.is_relative_to(ROOT / "tcpguard/lua") and p not in users_allowed
        for line, mod in imports(p)
        if mod == "tcpguard.lua" or mod.startswith("tcpguard.lua.")
    ]
    assert users == []


def test_nothing_imports_the_command_line() -> None:
    found = [
        f"{p.relative_to(ROOT)}:{line}: {mod}"
        for folder in ("tcpguard", "tools", "rules")
        for p in modules(folder)
        if p != ROOT / "tcpguard/app/cli.py"
        for line, mod in imports(p)
        if mod == "tcpguard.app.cli" or mod.startswith("tcpguard.app.cli.")
    ]
    assert found == []


def test_rule_modules_import_only_the_public_rule_api() -> None:
    assert offences("rules", ("tcpguard.http", "tcpguard.tls"), set()) == []


def test_the_rules_libraries_import_only_the_standard_library() -> None:
    # They run wherever a rule module does, and are read by operators adapting a sample.
    found = [
        f"{p.relative_to(ROOT)}:{line}: {mod}"
        for p in (ROOT / "tcpguard/http.py", ROOT / "tcpguard/tls.py")
        for line, mod in imports(p)
        if top(mod) not in STDLIB and mod != "__future__"
    ]
    assert found == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from tcpguard.io import pcap\n", ["x.py:1: tcpguard.io", "x.py:1: tcpguard.io.pcap"]),
        ("def f():\n    import tcpguard.app.daemon\n", ["x.py:2: tcpguard.app.daemon"]),
        ("import greenlet, os\nfrom tcpguard.core import forge\n", []),
    ],
)
def test_the_check_sees_imports_anywhere(
    tmp_path: Path, source: str, expected: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The checker itself, on a fabricated core module: an adapter import at the top, an application
    # import inside a function, and what the core may import.
    folder = tmp_path / "tcpguard" / "core"
    folder.mkdir(parents=True)
    (folder / "x.py").write_text(source)
    (tmp_path / "tcpguard" / "io").mkdir()
    (tmp_path / "tcpguard" / "io" / "pcap.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    got = [
        o.replace("tcpguard/core/", "") for o in offences("tcpguard/core", ("tcpguard.core",), {"greenlet"})
    ]
    assert got == expected
