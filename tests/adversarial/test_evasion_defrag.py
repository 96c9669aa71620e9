"""IP fragments through a gateway whose namespace runs conntrack (any conntrack-based firewall rule loads
it): the kernel reassembles fragments before the FORWARD hook, so the queue gets whole packets.

The same fragment cases as `test_evasion.py` (which runs without conntrack): the pattern split over
8-byte fragments must be seen and reset; overlapping fragments with conflicting bytes must never let the
server read something the rule did not see.
"""

from __future__ import annotations

import pytest

from tests.netns import Lab

from .conftest import Rig
from .harness import PATTERN
from .test_evasion import ALT, EVIL, attack, fragment_body

pytestmark = pytest.mark.root


def _conntrack(lab: Lab) -> None:
    # A rule that never matches our traffic but makes the namespace load conntrack and defragmentation.
    for tool in ("iptables", "ip6tables"):
        lab.run(
            "gw",
            [
                tool,
                "-w",
                "-A",
                "FORWARD",
                "-p",
                "udp",
                "--dport",
                "9",
                "-m",
                "conntrack",
                "--ctstate",
                "NEW",
                "-j",
                "ACCEPT",
            ],
        )


@pytest.fixture(scope="module")
def rig_setup() -> object:
    return _conntrack


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_fragments_are_reassembled_and_inspected(rig: Rig, v6: bool) -> None:
    o = attack(rig, fragment_body("split"), v6=v6, expect="blocked")
    assert o.rule == EVIL and o.server == b""  # the rule saw the reassembled segment, the server nothing


@pytest.mark.parametrize(
    ("mode", "expect", "seen"),
    [
        # An exact duplicate range is ignored by the kernel's reassembly: the first copy wins, and the
        # queue gets the datagram as reassembled, so the rule and the server read the same version.
        ("dup-evil-first", "blocked", EVIL),
        ("dup-alt-first", "clean", ALT),
        # A partial overlap makes the kernel discard the whole datagram: nothing reaches the queue, and
        # the unfragmented request that follows passes.
        ("straddle", "clean", ALT),
    ],
)
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_overlapping_fragments_with_conflicting_bytes(
    rig: Rig, v6: bool, mode: str, expect: str, seen: bytes
) -> None:
    o = attack(rig, fragment_body(mode), v6=v6, expect=expect)
    assert o.rule == seen
    assert PATTERN not in o.server
