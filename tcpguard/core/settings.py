"""Engine settings: every limit and policy the core applies, with its default.

The YAML config (`tcpguard.app.daemon.config`) maps onto these dataclasses one to one, so the keys
documented in `etc/tcpguard.yaml` are exactly the fields below. They are plain data: the engine reads
them, never the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FailVerdict = Literal["accept", "drop", "reset"]
MidstreamPolicy = Literal["track", "accept", "drop"]
TableFullPolicy = Literal["evict", "refuse"]
FragmentPolicy = Literal["drop", "accept"]
OutOfOrderPolicy = Literal["hold", "drop"]


@dataclass(slots=True)
class Timeouts:
    """Idle timeouts in seconds, per connection state."""

    syn_sent: float = 30.0
    syn_recv: float = 30.0
    established: float = 3600.0
    fin_wait: float = 120.0
    time_wait: float = 60.0
    closed: float = 10.0


@dataclass(slots=True)
class Limits:
    """Bounds on memory. Hitting one is counted, logged and answered by `Policies`, never a crash."""

    max_connections: int = 65536
    # Out-of-order bytes held per direction, waiting for the gap before them to fill.
    max_ooo_bytes: int = 262144
    # Held out-of-order segments per direction.
    max_ooo_segments: int = 64
    # Bytes kept per direction for first-copy checks, rule look-back and streamed readers. A direction
    # keeps every byte its receiver has not acknowledged, up to a whole receive window in flight (Linux's
    # largest by default: 6 MiB), so the bound sits above that (links with a larger bandwidth-delay
    # product need more); max_total_buffer bounds them all together.
    max_stream_buffer: int = 8388608
    # All buffered bytes of all connections together.
    # When data takes it over, the largest holders meet the limit policy first (Engine._free_largest).
    max_total_buffer: int = 268435456
    # Packets held at once (NFQUEUE keeps them queued in the kernel until released). Must stay well
    # below the kernel queue's length (queue.maxlen), or held packets fill the queue and everything
    # behind them is dropped (or passed uninspected with bypass).
    max_held_packets: int = 1024
    # Seconds one rule call may run before the daemon interrupts it (the flow gets the rule_error
    # verdict); 0 turns the budget off. Enforced by tcpguard.app.daemon.budget, outside the sans-IO core.
    rule_time_budget: float = field(default=0.5, metadata={"min": 0})


@dataclass(slots=True)
class Policies:
    """What happens when something goes wrong or a bound is hit."""

    # A rule raised: the flow gets this verdict (`reset` sends RSTs to both ends).
    rule_error: FailVerdict = "reset"
    # A per-stream or global buffer bound was hit on a connection.
    limit: FailVerdict = "reset"
    # A packet of a connection that tcpguard never saw open (started before tcpguard, or evicted).
    midstream: MidstreamPolicy = "track"
    # A new connection arrives while the table is full: evict the connection closest to its timeout,
    # or refuse (drop) the new SYN.
    table_full: TableFullPolicy = "evict"
    # IP fragments carrying TCP. The kernel reassembles them first when conntrack is loaded.
    fragments: FragmentPolicy = "drop"
    # Out-of-order segments: hold them until the gap fills, or drop them (the sender retransmits).
    out_of_order: OutOfOrderPolicy = "hold"
    # Packets that do not decode as IP.
    malformed: Literal["drop", "accept"] = "drop"
    # Verify IPv4 and TCP checksums; a bad one is dropped (the receiver would drop it too).
    verify_checksums: bool = True
    # Drop segments that acknowledge bytes the gateway never forwarded (the receiver drops them too, so
    # their data must not reach the rules). Off for observing captures with missing packets.
    verify_acks: bool = True
    # A segment with a TCP-MD5 (kind 19) or TCP-AO (kind 29) option on a connection whose SYN and SYN-ACK
    # did not both carry one: the receiver discards it, so inspecting it would let an attacker show the
    # rules bytes the application never reads (insertion), or end the connection at the gateway with an
    # RST the endpoint ignores. `drop` drops it (the default); `accept` treats it as any other segment.
    # Signatures themselves are never verified (tcpguard has no keys): on a connection that negotiated
    # MD5/AO, signed segments are inspected as usual.
    unexpected_signature: Literal["drop", "accept"] = "drop"


@dataclass(slots=True)
class Inspection:
    """How far the rules look into a connection, and what happens once none of them looks any more."""

    # When no listener wants more bytes of either direction of an established connection (each said
    # `flow.done()`, returned, or never applied to it), answer its packet with a bypass verdict: the
    # kernel stops queueing the connection (tcpguard's chain lets its conntrack mark through), the rules
    # get end_connection (reason 'bypassed') and the engine forgets it. From then on the connection is out
    # of tcpguard's sight for good: no normalisation, no RST checks, no operator reset. false: such a
    # connection stays tracked and normalised, and every packet still crosses the daemon. Off by default,
    # as Suricata's stream.bypass: with it, tcpguard's own protections (RST checks, normalisation) end
    # with the rules' interest, which an operator who runs tcpguard for them must choose knowingly.
    bypass: bool = False
    # Bytes of each direction the rules see (0: all of them). Past it a direction counts as wanted by no
    # listener, so with bypass a connection past both depths leaves the daemon. Off by default: the
    # inline promise is that a pattern never reaches the server, and past the depth it can.
    depth_up: int = field(default=0, metadata={"min": 0})
    depth_down: int = field(default=0, metadata={"min": 0})


@dataclass(slots=True)
class EngineSettings:
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    policies: Policies = field(default_factory=Policies)
    inspection: Inspection = field(default_factory=Inspection)
