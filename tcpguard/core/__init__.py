"""The sans-IO core: bytes and a clock in, decisions out. Nothing here touches a socket or the wall clock.

The hot modules may be compiled by mypyc (setup.py), which puts a `.so` next to each `.py`. Python
imports the `.so` first, so one built from older sources would run stale code: at import the build's
record of source hashes (`_compiled_sources.json`, written by setup.py) is compared with the `.py` files,
and on any difference, or with TCPGUARD_PURE=1 in the environment, every core module is imported from
its `.py` instead (all or none: compiled modules call each other natively and must come from one build).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

_HERE = Path(__file__).resolve().parent
_RECORD = _HERE / "_compiled_sources.json"


def _stale() -> list[str]:
    """The compiled modules whose source changed since the build (empty when not compiled)."""
    try:
        record: dict[str, str] = json.loads(_RECORD.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    out = []
    for name, digest in record.items():
        try:
            # A compiled module is recorded by its name, a hand-written C source by its file name.
            source = _HERE / (name if name.endswith(".c") else f"{name}.py")
            now = hashlib.sha256(source.read_bytes()).hexdigest()
        except OSError:
            continue  # an installed wheel may ship without sources
        if now != digest:
            out.append(name)
    return out


class _SourceFinder:
    """Finds `tcpguard.core.*` as .py files only, never the compiled extension modules."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not name.startswith(__name__ + ".") or not path:
            return None
        loaders = [(importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES)]
        for entry in path:
            spec = importlib.machinery.FileFinder(entry, *loaders).find_spec(name, target)
            if spec is not None:
                return spec
        return None


def _choose() -> str:
    if os.environ.get("TCPGUARD_PURE", "") not in ("", "0"):
        mode = "pure (TCPGUARD_PURE)"
    elif stale := _stale():
        warnings.warn(
            f"tcpguard.core: compiled modules older than their source ({', '.join(stale)}): running the "
            "pure-Python core; rebuild with `pip install -e .` (or set TCPGUARD_PURE=1)",
            RuntimeWarning,
            stacklevel=2,
        )
        mode = "pure (stale build)"
    elif _RECORD.exists():
        return "compiled"
    else:
        # No record: a pure install, or a build that failed half-way and may have left extension modules
        # behind. Either way the .py files are the code to run.
        mode = "pure"
    sys.meta_path.insert(0, _SourceFinder())
    return mode


MODE = _choose()
