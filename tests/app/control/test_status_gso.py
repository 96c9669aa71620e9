"""`tcpguard status` says whether each queue gets GSO packets whole, and how many (issue 21)."""

from __future__ import annotations

from tcpguard.app.control.client import format_status


def _rows(text: str, label: str) -> list[str]:
    return next(line.split() for line in text.splitlines() if line.startswith(label))


def test_status_shows_gso_per_queue() -> None:
    workers = [
        {"queue": 0, "adapter": {"gso": 1, "gso_packets": 1054, "largest": 65212}},
        {"queue": 1, "adapter": {"gso": 0, "gso_packets": 0, "largest": 1500}},
    ]
    text = format_status({"workers": workers, "totals": {}})
    assert _rows(text, "GSO packets whole")[-2:] == ["on", "off"]
    assert _rows(text, "  GSO aggregates")[-2:] == ["1054", "0"]
    assert "63.7 KiB" in " ".join(_rows(text, "  largest"))
