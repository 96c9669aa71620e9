"""The lab, live, with the Lua twins in place of the Python firewall and shell-code samples: the real
daemon in network namespaces, real TCP clients and servers, NFQUEUE and iptables, and the same outcome
for every scenario of the mix as with the Python samples (tests/devtools/test_lab.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.devtools.test_lab import EXPECTED, TCPGUARD, assert_nothing_left

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.root
def test_lab_mix_with_lua_twins_gives_the_python_outcomes(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    for src in sorted((ROOT / "rules").glob("*.py")):
        if src.name not in ("firewall.py", "shellcode.py"):
            shutil.copyfile(src, rules / src.name)
    for name in ("firewall.lua", "shellcode.lua"):
        shutil.copyfile(ROOT / "rules" / "lua" / name, rules / name)
    work, report = tmp_path / "work", tmp_path / "report.json"
    res = subprocess.run(
        [TCPGUARD, "lab", "--rules", str(rules), "--out", str(work), "--report", str(report), "--no-colour"],
        capture_output=True, text=True, timeout=180, cwd=tmp_path, check=False,
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    results = {r["key"]: r for r in json.loads(report.read_text())["results"]}
    assert {k: r["outcome"] for k, r in results.items()} == EXPECTED, out
    # The Lua firewall's alert, word for word the Python one's.
    assert results["telnet"]["alerts"] == ["[low] connection to port 23 not allowed"]
    (shell,) = results["shellcode"]["connections"]
    assert shell["error"] == "reset" and shell["server"]["status"] == "reset"
    assert b"/bin/sh" not in shell["server"]["head"].encode("latin-1")
    assert any("shell-code pattern" in a for a in results["shellcode"]["alerts"])
    assert "exited 0, its iptables rules removed" in out
    assert_nothing_left(out, work)
