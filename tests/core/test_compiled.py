"""The optional mypyc build (setup.py): the core runs compiled only from a build of the current sources."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tcpguard.core
from tcpguard.core import engine

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "tcpguard" / "core"


def _mode(cwd: Path, **env: str) -> list[str]:
    code = (
        "import tcpguard.core as c, tcpguard.core.engine as e, tcpguard.core.packet as p; "
        "print(c.MODE); print(e.__file__); print(p.SUM16_IMPL)"
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        cwd=cwd,
        env={**{k: v for k, v in os.environ.items() if k != "TCPGUARD_PURE"}, "PYTHONPATH": str(cwd), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split("\n")[:3]


def test_mode_matches_the_modules_imported() -> None:
    compiled = not (engine.__file__ or "").endswith(".py")
    assert (tcpguard.core.MODE == "compiled") == compiled


def test_tcpguard_pure_imports_the_sources() -> None:
    mode, file, sum16 = _mode(ROOT, TCPGUARD_PURE="1")
    assert mode == "pure (TCPGUARD_PURE)"
    assert file.endswith("engine.py")
    assert sum16 == "python"  # the hand-written C checksum too


def test_a_compiled_core_has_the_c_checksum() -> None:
    from tcpguard.core import packet

    assert ("c" if tcpguard.core.MODE == "compiled" else "python") == packet.SUM16_IMPL


def test_an_edited_source_is_never_shadowed_by_its_old_build(tmp_path: Path) -> None:
    if not (CORE / "_compiled_sources.json").exists():
        pytest.skip("the core is not compiled (pip install without TCPGUARD_PURE builds it)")
    copy = tmp_path / "tcpguard"
    shutil.copytree(ROOT / "tcpguard", copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert _mode(tmp_path)[::2] == ["compiled", "c"]
    with (copy / "core" / "stream.py").open("a") as f:
        f.write("# edited after the build\n")
    mode, file, sum16 = _mode(tmp_path)
    assert mode == "pure (stale build)"
    assert file.endswith("engine.py")
    assert sum16 == "python"
    record = json.loads((copy / "core" / "_compiled_sources.json").read_text())
    assert set(record) >= {"engine", "packet", "stream", "_sum16.c"}


def test_an_edited_c_source_is_never_shadowed_by_its_old_build(tmp_path: Path) -> None:
    if not (CORE / "_compiled_sources.json").exists():
        pytest.skip("the core is not compiled (pip install without TCPGUARD_PURE builds it)")
    copy = tmp_path / "tcpguard"
    shutil.copytree(ROOT / "tcpguard", copy, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "core" / "_sum16.c").open("a") as f:
        f.write("/* edited after the build */\n")
    assert _mode(tmp_path)[::2] == ["pure (stale build)", "python"]
