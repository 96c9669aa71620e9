"""The application's layout holds: nothing imports the CLI, and the control commands live in one table
that the dispatcher and the workers both follow (issue 19)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tcpguard.app.control.dispatch import COMMANDS, Dispatcher, Fanout
from tcpguard.app.control.protocol import Request, Response
from tests.app.control.test_control import make_worker

ROOT = Path(__file__).resolve().parents[2]
CLI = "tcpguard.app.cli"


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside a function, relative imports resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_nothing_in_the_package_or_the_tools_imports_the_cli() -> None:
    """The CLI only parses and dispatches: a module importing it (the control client did for the default
    config path, rule cost for the offline loader) made the cycle cli -> daemon -> control -> cli."""
    sources = [p for d in ("tcpguard", "tools") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(sources) > 30
    importers = [
        str(p.relative_to(ROOT))
        for p in sources
        if p != ROOT / "tcpguard/app/cli.py" and CLI in _imported_modules(p)
    ]
    assert importers == []


def test_the_import_scan_sees_imports_inside_functions(tmp_path: Path) -> None:
    """The scan above must find the kind of import that caused the cycle: one inside a function."""
    probe = ROOT / "tcpguard" / "app" / "_probe_for_layout_test.py"
    assert not probe.exists()
    try:
        probe.write_text("def f():\n    from tcpguard.app.cli import main\n\n    from . import cli\n")
        assert CLI in _imported_modules(probe)
        probe.write_text("def f():\n    from . import cli\n")
        assert CLI in _imported_modules(probe)
    finally:
        probe.unlink(missing_ok=True)


def test_every_command_of_the_table_reaches_the_workers_it_names(tmp_path: Path) -> None:
    """One table: a command that fans out to workers is executed by a real Worker through the table, one
    the dispatcher answers alone is unknown to the workers, and the dispatcher knows exactly the table."""
    worker = make_worker(tmp_path)
    sent: list[str] = []

    class Links:
        """Queue 3, served in this thread by the worker (as the timer tick would)."""

        def queues(self) -> list[int]:
            return [3]

        def call(self, queues: list[int], request: Request, timeout: float) -> dict[int, Response]:
            sent.append(str(request["cmd"]))
            return {q: worker.control(dict(request), 1.0) for q in queues}

    d = Dispatcher(Links(), mode="test")
    assert set(COMMANDS) == {"ping", "version", "status", "connections", "drop", "reset", "reload"}
    for name, command in COMMANDS.items():
        sent.clear()
        request: Request = {"cmd": name}
        if command.fanout is Fanout.ID_WORKER:
            request["id"] = "3:1"
        answer = d.handle(request)
        worker_answer = worker.control({"cmd": name, "flow": 1}, 1.0)
        if command.fanout is Fanout.DISPATCHER:
            assert answer["ok"] and sent == []
            assert worker_answer == {"ok": False, "error": f"unknown command {name!r}"}
        else:
            assert sent == [name]
            assert "unknown command" not in str(worker_answer.get("error"))
    unknown = d.handle({"cmd": "frobnicate"})
    assert unknown["error"] == f"unknown command 'frobnicate' (commands: {', '.join(COMMANDS)})"
    assert d.handle({"cmd": ["not", "hashable"]})["ok"] is False


def test_a_command_whose_fanout_and_worker_part_disagree_is_refused() -> None:
    from tcpguard.app.control.dispatch import Command

    with pytest.raises(ValueError, match="control command x"):
        Command("x", Fanout.DISPATCHER, Dispatcher._status, lambda w, r, now: {"ok": True})
    with pytest.raises(ValueError, match="control command y"):
        Command("y", Fanout.EVERY_WORKER, Dispatcher._status)
