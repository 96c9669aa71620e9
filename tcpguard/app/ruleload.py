"""Loading rule modules from a directory, all or nothing.

Every `*.py` file in the directory (not starting with `_`) is compiled and executed as its own module, in
file-name order, while `tcpguard.core.rules.collecting()` gathers the rules it registers. Any failure
raises `RuleLoadError` naming the file and line, and nothing is returned, so a caller that already runs a
rule set keeps it: a reload swaps in a complete new set or none.

The files run with the daemon's privileges, so a file or directory that other users can write is
refused: whoever can edit a rule can run code as root.
"""

from __future__ import annotations

import os
import stat
import sys
import traceback
import types
from pathlib import Path

from tcpguard.core.errors import RuleLoadError
from tcpguard.core.rules import Rule, RuleSet, collecting

MODULE_PREFIX = "tcpguard_rules"


def rule_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.py") if not p.name.startswith("_") and p.is_file())


def _check_permissions(path: Path) -> None:
    st = path.stat()
    if st.st_mode & stat.S_IWOTH:
        raise RuleLoadError(str(path), None, "writable by other users: refusing to load it (chmod o-w)")
    if os.geteuid() == 0 and st.st_uid != 0:
        # Its owner may chmod it writable at any time, so read-only is no protection: whoever owns a rule
        # file can run code as root.
        raise RuleLoadError(
            str(path),
            None,
            f"owned by uid {st.st_uid} while tcpguard runs as root: refusing to load it (chown root)",
        )


def _error_line(exc: BaseException, path: Path) -> int | None:
    """The line in `path` where `exc` happened (innermost frame in that file)."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == str(path):
            line = frame.lineno
    return line


def load_module(path: Path) -> list[Rule]:
    """Execute one rule module and return the rules it registered."""
    _check_permissions(path)
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RuleLoadError(str(path), None, f"cannot read: {e}") from e
    try:
        code = compile(source, str(path), "exec")
    except SyntaxError as e:
        raise RuleLoadError(str(path), e.lineno, f"syntax error: {e.msg}") from e
    name = f"{MODULE_PREFIX}.{path.stem}"
    module = types.ModuleType(name)
    module.__file__ = str(path)
    with collecting() as found:
        # Registered in sys.modules while it runs so that dataclasses, pickling and tracebacks that look
        # the module up work; removed afterwards so a reload really reloads.
        sys.modules[name] = module
        try:
            exec(code, module.__dict__)
        except (Exception, SystemExit, KeyboardInterrupt) as e:
            # SystemExit/KeyboardInterrupt raised by a module (sys.exit() at import) must not stop a
            # running daemon on reload: they are load errors like any other.
            raise RuleLoadError(str(path), _error_line(e, path), f"{type(e).__name__}: {e}") from e
        finally:
            sys.modules.pop(name, None)
    return list(found)


def load_rules(directory: str | Path) -> RuleSet:
    """All rules of all modules in `directory`, or `RuleLoadError` and nothing."""
    d = Path(directory)
    if not d.is_dir():
        raise RuleLoadError(str(d), None, "rules directory does not exist")
    _check_permissions(d)
    rules: list[Rule] = []
    seen: dict[str, Path] = {}
    for path in rule_files(d):
        for r in load_module(path):
            if r.name in seen:
                raise RuleLoadError(str(path), None, f"rule name {r.name!r} already used in {seen[r.name]}")
            seen[r.name] = path
            rules.append(r)
    return RuleSet(rules)
