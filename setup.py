"""Optional mypyc compilation of tcpguard's hot core; project metadata stays in pyproject.toml.

`pip install .` (or `-e .`) compiles the modules below into C extension modules placed next to their
`.py` files; the `.py` files are installed too. Set TCPGUARD_PURE=1 to install pure Python (also done
without a C compiler or mypyc). The build records each source's SHA-256 in
tcpguard/core/_compiled_sources.json; tcpguard/core/__init__.py imports the pure-Python modules instead
when a source no longer matches (an edit after an editable build), so stale compiled code never runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

import setuptools
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, PlatformError

HERE = Path(__file__).resolve().parent

# pip builds in an isolated environment with pyproject.toml's build requirements, but
# `python setup.py build_ext --inplace` uses whatever setuptools the venv has (a new venv brings 65), which
# fails on the SPDX `license` string with a schema dump that never names the version.
SETUPTOOLS_MIN = 77
if int(setuptools.__version__.split(".")[0]) < SETUPTOOLS_MIN:
    sys.exit(
        f"setup.py: needs setuptools >= {SETUPTOOLS_MIN} (pyproject.toml's license is an SPDX string), this "
        f"is {setuptools.__version__}: {sys.executable} -m pip install -U 'setuptools>={SETUPTOOLS_MIN}'"
    )

# The per-packet path. settings.py, rules.py, errors.py and seq.py stay interpreted: they are cold, and
# the configuration loader introspects the settings dataclasses.
MYPYC_MODULES = [
    "tcpguard/core/packet.py",
    "tcpguard/core/stream.py",
    "tcpguard/core/state.py",
    "tcpguard/core/conntrack.py",
    "tcpguard/core/engine.py",
    "tcpguard/core/dispatch.py",
    "tcpguard/core/tracker.py",
    "tcpguard/core/limits.py",
    "tcpguard/core/stats.py",
    "tcpguard/core/cursor.py",
    "tcpguard/core/decision.py",
    "tcpguard/core/forge.py",
]
C_SOURCES = ["tcpguard/core/_sum16.c"]
RECORD = "_compiled_sources.json"
_hashes: dict[str, str] = {}


def _pure(why: str) -> list[Any]:
    """Install pure Python. A compiled build left in the source tree by an earlier in-place (editable)
    install is removed, or Python would go on importing it."""
    print(f"tcpguard: {why}: installing pure Python", file=sys.stderr)
    core = HERE / "tcpguard" / "core"
    for leftover in [*core.glob("*.so"), *core.glob("*.pyd"), core / RECORD]:
        leftover.unlink(missing_ok=True)
    return []


def _no_compiler() -> str | None:
    """Why C extensions cannot be built here, or None if they can."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    cc = os.environ.get("CC", cc).split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc})"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "no Python headers (Python.h; Debian: python3-dev)"
    return None


def _ext_modules() -> list[Any]:
    if os.environ.get("TCPGUARD_PURE", "") not in ("", "0"):
        return _pure("TCPGUARD_PURE is set")
    if why := _no_compiler():
        return _pure(why)
    try:
        from mypyc.build import mypycify
    except ImportError:
        return _pure("mypyc is not available")
    # Hashed before mypycify reads them, so an edit during the build shows up as stale, never as fresh.
    for m in MYPYC_MODULES:
        _hashes[Path(m).stem] = hashlib.sha256((HERE / m).read_bytes()).hexdigest()
    for c in C_SOURCES:
        _hashes[Path(c).name] = hashlib.sha256((HERE / c).read_bytes()).hexdigest()
    # Hand-written C where a Python loop is too slow (see each file's opening comment).
    hand = [Extension(f"tcpguard.core.{Path(c).stem}", [c]) for c in C_SOURCES]
    return hand + list(
        mypycify(
            ["--config-file", str(HERE / "pyproject.toml"), *MYPYC_MODULES],
            opt_level=os.environ.get("TCPGUARD_MYPYC_OPT_LEVEL", "3"),
            debug_level="1",
            # The shared runtime library goes inside the package (tcpguard/core/_compiled__mypyc.*.so),
            # not at the top of site-packages or of the source tree, where an editable install cannot
            # import it.
            group_name="tcpguard.core._compiled",
        )
    )


class BuildExt(build_ext):
    """build_ext that also writes the source hashes of the compiled modules next to them."""

    def run(self) -> None:
        record = Path(self.get_ext_fullpath("tcpguard.core._compiled__mypyc")).parent / RECORD
        # The record goes first and comes back only after a complete build: a build that fails half-way
        # must never leave an earlier record vouching for a mix of old and new extension modules.
        record.unlink(missing_ok=True)
        try:
            super().run()
        except (CCompilerError, CompileError, ExecError, PlatformError) as e:
            # Without the record, tcpguard.core ignores any compiled module this failed build left behind.
            print(f"tcpguard: compiling the core failed ({e}): installing pure Python", file=sys.stderr)
            return
        if not self.extensions or not _hashes:
            return
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(_hashes, indent=1, sort_keys=True) + "\n", encoding="utf-8")

    def get_outputs(self) -> list[str]:
        outputs: list[str] = super().get_outputs()
        if self.extensions and _hashes:
            outputs.append(str(Path(self.get_ext_fullpath("tcpguard.core._compiled__mypyc")).parent / RECORD))
        return outputs


# setuptools runs this file as __main__ (pip's build backend too): the guard only stops an accidental
# `import setup` (the editable install puts the checkout on sys.path) from starting a build.
if __name__ == "__main__":
    setup(ext_modules=_ext_modules(), cmdclass={"build_ext": BuildExt})
