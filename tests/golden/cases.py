"""The golden replay cases: name -> (capture, rules directory, settings factory)."""

from __future__ import annotations

from collections.abc import Callable

from tcpguard.core.settings import EngineSettings

CASES: dict[str, tuple[str, str, Callable[[], EngineSettings]]] = {
    "demo": ("samples/demo.pcap", "rules", EngineSettings),
}
