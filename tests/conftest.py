"""Shared pytest setup: root-only tests and the network-namespace lab fixture.

Tests marked `@pytest.mark.root` need root, network namespaces, iptables and NFQUEUE. On a developer
machine without root they are skipped; with the `CI` environment variable set they always run, so a CI
runner that lost its privileges or a tool fails loudly instead of silently skipping the integration tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.netns import Lab


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0 or os.environ.get("CI"):
        return
    skip = pytest.mark.skip(reason="needs root (set CI=1 to force root tests to run)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh client <-> gw <-> server namespace network, removed afterwards (also on failure)."""
    with Lab() as the_lab:
        yield the_lab
