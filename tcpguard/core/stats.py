"""The engine's counters, shared by the modules that do the counting (engine, dispatch, limits)."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True)
class Stats:
    """Counters an operator reads to see what the engine did and what it refused."""

    accepted: int = 0
    alerts: int = 0  # alerts the rules raised (`flow.alert`)
    bad_checksum: int = 0
    # Connections handed to the kernel (Inspection.bypass), and the packets and bytes of theirs that
    # still reached the engine afterwards: in flight when they were bypassed, or every one when the
    # kernel's rule is missing. Offline, the packets that would not have reached the daemon.
    bypass_bytes: int = 0
    bypass_packets: int = 0
    bypassed: int = 0
    # Bytes of the packets handed in, and of those answered at once with ACCEPT or DROP (a held packet's
    # fate comes later, in a Release, which the adapter side counts: the engine does not keep sizes).
    bytes: int = 0
    bytes_accepted: int = 0
    bytes_dropped: int = 0
    connections: int = 0
    depth_reached: int = 0  # directions whose rules stopped at Inspection.depth_up/down
    dropped: int = 0
    evicted: int = 0
    fragments: int = 0
    held: int = 0
    invalid: int = 0
    limit_hits: int = 0
    malformed: int = 0
    midstream: int = 0
    non_tcp: int = 0
    ooo_dropped: int = 0
    packets: int = 0
    refused: int = 0
    resets_sent: int = 0
    rewritten: int = 0
    rst_injections: int = 0
    rule_errors: int = 0
    skipped_gaps: int = 0
    timeouts: int = 0
    unexpected_signatures: int = 0

    def as_dict(self) -> dict[str, int]:
        # fields(), not __slots__: compiled by mypyc, Stats is a native class without __slots__.
        return {f.name: getattr(self, f.name) for f in fields(self)}
