"""The golden replay cases: name -> (capture, rules directory, settings factory)."""

from __future__ import annotations

from collections.abc import Callable

from tcpguard.core.settings import EngineSettings

CASES: dict[str, tuple[str, str, Callable[[], EngineSettings]]] = {
    "demo": ("samples/demo.pcap", "rules", EngineSettings),
    # Crafted by tools/make_evasion_capture.py: segment tricks against rules/shellcode.py.
    "evasion": ("samples/evasion.pcap", "rules", EngineSettings),
}
