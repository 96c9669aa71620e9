"""The status totals over several workers: sums where a sum means something, the maximum for sizes."""

from __future__ import annotations

from typing import Any

from tcpguard.app.control.dispatch import totals


def test_gso_counters_are_summed_and_the_largest_packet_is_the_largest_of_any_worker() -> None:
    workers: list[dict[str, Any]] = [
        {"adapter": {"gso_packets": 3, "csum_partial": 3, "csum_trusted": 5, "largest": 1500}},
        {"adapter": {"gso_packets": 4, "csum_partial": 2, "csum_trusted": 1, "largest": 65212}},
        {"error": "worker 2 did not answer"},
    ]
    adapter = totals(workers)["adapter"]
    assert (adapter["gso_packets"], adapter["csum_partial"], adapter["csum_trusted"]) == (7, 5, 6)
    assert adapter["largest"] == 65212
