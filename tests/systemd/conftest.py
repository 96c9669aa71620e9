"""Failure reports of the container tests carry what systemd saw: the unit's status and journal.

A failed assertion about a service says little by itself ("never active"); the journal says why (the
sandbox refused a syscall, a rule did not load, the watchdog fired). So when a test that uses the
container fails, its report gets two extra sections, read from inside the container before it goes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .container import Container


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.when != "call" or not report.failed:
        return
    funcargs = getattr(item, "funcargs", {})
    box = next((v for v in funcargs.values() if isinstance(v, Container)), None)
    if box is None or box.leader is None:
        return
    status = box.run(["systemctl", "status", "--no-pager", "-l", "tcpguard.service"], check=False)
    report.sections.append(
        ("systemctl status tcpguard.service (in the container)", status.stdout + status.stderr)
    )
    report.sections.append(
        (
            "journalctl -u tcpguard.service (in the container)",
            box.journal("-u", "tcpguard.service", "-n", "300"),
        )
    )
