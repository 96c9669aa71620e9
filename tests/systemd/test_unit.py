"""The unit file, checked by systemd's own tools without booting anything.

`systemd-analyze verify` loads the unit as systemd would and reports unknown directives, bad values and
missing executables. The unit names the installed path /usr/local/bin/tcpguard, which a development
machine does not have, so the test verifies a copy whose command paths point at this checkout's
virtual environment: everything else is verified exactly as shipped.

`systemd-analyze security --offline` scores the sandbox; the figure must not rise above the one
docs/service.md records (the same figure the container test checks against the installed unit).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd/tcpguard.service"
TCPGUARD = Path(sys.executable).parent / "tcpguard"

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")


def recorded_exposure() -> float:
    m = re.search(r"exposure after: \*\*(\d+\.\d+)\*\*", (REPO / "docs/service.md").read_text())
    assert m, "docs/service.md does not record the exposure figure ('exposure after: **N.N**')"
    return float(m.group(1))


def verifiable_copy(tmp_path: Path, text: str | None = None) -> Path:
    text = UNIT.read_text() if text is None else text
    assert "/usr/local/bin/tcpguard " in text
    out = tmp_path / "tcpguard.service"
    out.write_text(text.replace("/usr/local/bin/tcpguard ", f"{TCPGUARD} "))
    return out


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_systemd_analyze_verify_finds_nothing_to_report(tmp_path: Path) -> None:
    assert TCPGUARD.exists(), f"{TCPGUARD} missing: install the checkout into the venv (scripts/install.sh)"
    res = verify(verifiable_copy(tmp_path))
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr


def test_verify_is_not_vacuous(tmp_path: Path) -> None:
    """The same call does report a broken unit (so the test above really checks something)."""
    broken = (
        UNIT.read_text().replace("Type=notify", "Type=notifyy").replace("WatchdogSec=10", "WatchdogSec=ten")
    )
    res = verify(verifiable_copy(tmp_path, broken))
    out = res.stdout + res.stderr
    assert "notifyy" in out and "ten" in out, out


def test_sandbox_exposure_is_at_most_the_recorded_figure() -> None:
    res = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= recorded_exposure(), res.stdout


def test_only_the_two_network_capabilities() -> None:
    """The least-privilege promise in plain words, so a drop-in-style edit to the unit cannot widen it."""
    lines = [ln.strip() for ln in UNIT.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    settings: dict[str, list[str]] = {}
    for ln in lines:
        if "=" in ln:
            key, value = ln.split("=", 1)
            settings.setdefault(key, []).append(value)
    assert settings["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_NET_RAW"]
    assert settings["AmbientCapabilities"] == ["CAP_NET_ADMIN CAP_NET_RAW"]
    assert settings["Type"] == ["notify"] and settings["NotifyAccess"] == ["main"]
    assert settings["Restart"] == ["on-failure"] and settings["WatchdogSec"]
    assert settings["ExecReload"] == ["/usr/local/bin/tcpguard reload --config /etc/tcpguard/tcpguard.yaml"]


def test_the_legacy_iptables_drop_in_verifies_and_keeps_the_capabilities(tmp_path: Path) -> None:
    """systemd/iptables-legacy.conf, loaded as a drop-in of the unit (systemd finds drop-ins by unit name
    along SYSTEMD_UNIT_PATH, so the unit is verified by name there, not by path)."""
    verifiable_copy(tmp_path)
    (tmp_path / "tcpguard.service.d").mkdir()
    shutil.copy(
        REPO / "systemd/iptables-legacy.conf", tmp_path / "tcpguard.service.d/50-iptables-legacy.conf"
    )
    env = {"SYSTEMD_UNIT_PATH": f"{tmp_path}:", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    res = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "tcpguard.service"],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr
    sec = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(tmp_path / "tcpguard.service")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", sec.stdout)
    assert m and float(m.group(1)) <= 2.0, sec.stdout
    assert (
        "CapabilityBoundingSet=~CAP_SYS_ADMIN" in sec.stdout
        and "✗ CapabilityBoundingSet=~CAP_SYS_ADMIN" not in (sec.stdout)
    )
