"""Fixtures of the adversarial suite: the lab with the real daemon, the raw-socket client, clean-up.

`rig` is one lab and one daemon shared by the tests of a module (default config: the evasion cases
attack the configuration an operator gets); each case talks to its own server application port and uses
its own client port, so cases do not see each other's bytes. `make_rig` builds a lab with a daemon
configured for one test (floods, faults). Both remove every namespace, process and iptables rule at the
end, also on failure: the `Lab` kills what it started and deletes the namespaces.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.netns import Lab

from .harness import Guard
from .stack import ClientNet, install_rst_filter


@dataclass
class Rig:
    lab: Lab
    guard: Guard
    net: ClientNet


def _open_rig(
    tmp: Path,
    config: dict[str, Any] | None,
    extra_rules: str,
    start: bool,
    setup: Callable[[Lab], None] | None = None,
) -> Iterator[Rig]:
    with Lab() as lab:
        install_rst_filter(lab)
        if setup is not None:
            setup(lab)
        # TCP Fast Open without cookies on every listener: data on a SYN would reach the server
        # application if the gateway let it through (the data-on-SYN case).
        lab.run("server", ["sysctl", "-q", "-w", "net.ipv4.tcp_fastopen=1539"])
        guard = Guard(lab, tmp, config=config, extra_rules=extra_rules)
        net = ClientNet(lab)
        try:
            if start:
                guard.start_daemon()
            yield Rig(lab, guard, net)
        finally:
            net.close()
            if guard.daemon is not None and guard.daemon.poll() is None:
                guard.daemon.send_signal(signal.SIGTERM)
                try:
                    guard.daemon.wait(3)
                except subprocess.TimeoutExpired:  # stuck (the looping-rule case): the lab kills it
                    guard.daemon.kill()
                    guard.daemon.wait(5)
            if os.environ.get("TCPGUARD_TEST_DEBUG"):
                print(guard.log_text())


@pytest.fixture(scope="module")
def rig_config() -> dict[str, Any] | None:
    """Config overrides of the module's shared daemon (a module redefines this fixture to change it)."""
    return None


@pytest.fixture(scope="module")
def rig_setup() -> Callable[[Lab], None] | None:
    """Extra set-up of the module's lab before the daemon starts (redefined by a module to use it)."""
    return None


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory,
    rig_config: dict[str, Any] | None,
    rig_setup: Callable[[Lab], None] | None,
) -> Iterator[Rig]:
    yield from _open_rig(tmp_path_factory.mktemp("rig"), rig_config, "", start=True, setup=rig_setup)


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    gens: list[Iterator[Rig]] = []

    def make(config: dict[str, Any] | None = None, extra_rules: str = "", start: bool = True) -> Rig:
        gen = _open_rig(tmp_path / f"rig{len(gens)}", config, extra_rules, start)
        gens.append(gen)
        return next(gen)

    yield make
    for gen in reversed(gens):
        for _ in gen:  # runs the clean-up after the yield
            pass
