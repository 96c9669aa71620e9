"""The evasion cases of test_evasion.py again, with offloads on (issue 21).

The same crafted segments, the same real daemon and server application, the same inline promise
(`check_invariant`), but the gateway runs GRO on both veth ends with a GRO flush timeout, the server
keeps TSO/GSO on, and the client's veth end has TSO off, without which veth does not hand its packets
to the gateway's GRO at all. GRO then merges runs of contiguous crafted segments with the same flags that
arrive together into one aggregate (it flushes on a gap, an overlap, a flag change or a bad checksum,
each of which these cases are full of); the daemon, which
asks for GSO packets (NFQA_CFG_F_GSO), gets those aggregates whole, with partial checksums. Whatever the
kernel merged or left alone, the server application must never read the pattern and must read exactly
what the rule saw. `test_gro_merged_crafted_segments` proves that the merging happens: without it this
module would only repeat test_evasion.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.netns import Lab

from .conftest import Rig
from .harness import PATTERN
from .stack import Conn
from .test_evasion import *  # noqa: F403 (the cases, collected again here with this module's rig)
from .test_evasion import GAP, attack

pytestmark = pytest.mark.root

#: How long GRO may hold a packet waiting for the next one (ns); the cases send one every GAP (4 ms).
GRO_FLUSH_TIMEOUT_NS = 20_000_000


def offloads_on(lab: Lab) -> None:
    for dev in ("c0", "s0"):
        lab.run("gw", ["ethtool", "-K", dev, "gro", "on"])
        lab.run("gw", ["sh", "-c", f"echo {GRO_FLUSH_TIMEOUT_NS} > /sys/class/net/{dev}/gro_flush_timeout"])
    # The client's crafted segments are no TSO packets; veth hands a packet to its peer's GRO only when
    # the sending end has no TSO (veth_skb_is_eligible_for_gro: a TSO sender aggregates by itself). The
    # server's replies keep TSO/GSO.
    lab.run("client", ["ethtool", "-K", "eth0", "tso", "off", "gso", "on"])
    lab.run("server", ["ethtool", "-K", "eth0", "tso", "on", "gso", "on"])


@pytest.fixture(scope="module")
def rig_setup() -> Callable[[Lab], None] | None:
    return offloads_on


def test_gro_merged_crafted_segments(rig: Rig) -> None:
    """In-order crafted segments reach the daemon as aggregates, and a pattern cut over them is caught."""
    before = rig.guard.worker_status()["adapter"]
    assert before["gso"] == 1, "the daemon did not get GSO packets on"
    data = b"x" * 3000 + PATTERN + b"y" * 3000

    def body(conn: Conn) -> int:
        # One burst, same flags and increasing IP ids (what GRO requires of IPv4 without DF): GRO merges
        # what arrives in one poll.
        pkts = [
            conn.raw("A", i, data[i : i + 500], ip={"id": 1000 + k})
            for k, i in enumerate(range(0, len(data), 500))
        ]
        rig.net.blast(pkts)
        return len(data)

    assert GAP < GRO_FLUSH_TIMEOUT_NS / 1e9
    # The RST to the server must really reset it (check_invariant): with an RST put in place of the
    # dropped aggregate it did not, in 3 of 4 runs (tcpguard.io.nfqueue, "No RST in place of an aggregate").
    o = attack(rig, body, expect="blocked")
    assert o.blocked
    after = rig.guard.worker_status()["adapter"]
    assert after["gso_packets"] > before["gso_packets"], "GRO merged none of the crafted segments"
    assert after["largest"] > 1500
    assert after["sent_in_place"] == before["sent_in_place"]


@pytest.mark.parametrize("evil", [False, True], ids=["other-bytes", "pattern-in-retransmission"])
def test_an_aggregate_overlapping_forwarded_data_is_rewritten_to_the_first_copy(rig: Rig, evil: bool) -> None:
    """A retransmission burst that GRO merges into one aggregate, whose first half conflicts with bytes
    already forwarded: the engine rewrites the aggregate to the first copy there, the kernel segments
    the rewritten GSO packet on the way out (nfqnl_mangle keeps its GSO type; tcp4_gso_segment fills in
    each segment's checksum) and the server application reads the first copy and the new bytes."""
    first = b"a" * 3000
    new = b"n" * 3000
    other = b"b" * (3000 - len(PATTERN)) + PATTERN if evil else b"b" * 3000
    before = rig.guard.worker_status()["adapter"]

    def body(conn: Conn) -> int:
        for i in range(0, len(first), 1000):
            conn.send("A", i, first[i : i + 1000])
        assert conn.wait_acked(len(first))
        burst = other + new
        rig.net.blast(
            [
                conn.raw("A", i, burst[i : i + 500], ip={"id": 3000 + k})
                for k, i in enumerate(range(0, len(burst), 500))
            ]
        )
        return len(burst)

    o = attack(rig, body, expect="clean")
    assert o.server == first + new
    after = rig.guard.worker_status()["adapter"]
    assert after["gso_packets"] > before["gso_packets"], "GRO did not merge the retransmission"
    assert after["rewritten"] > before["rewritten"]
